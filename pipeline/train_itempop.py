"""Stage `train_itempop`: item popularity, the number of train interactions of every item."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from pipeline.common import atomic_output, run_stage
from pipeline.data import load_split

log = logging.getLogger("train_itempop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prepared_dir", type=Path)
    parser.add_argument("out", type=Path, help="where to write the counts (.npy, int64 per item)")
    args = parser.parse_args()
    split = load_split(args.prepared_dir)
    counts = np.bincount(split.train.indices, minlength=split.n_items).astype(np.int64)
    with atomic_output(args.out) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, counts)
    top = int(np.argmax(counts))
    log.info("%d items; the most popular (index %d) has %d train interactions", len(counts), top, counts[top])


if __name__ == "__main__":
    run_stage(main)
