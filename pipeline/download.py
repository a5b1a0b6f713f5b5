"""Stage `download`: fetch the dataset named by the `dataset` param into data/raw, verified.

MovieLens releases come from the official GroupLens URL, or `$MOVIELENS_MIRROR/<archive>.zip` when
MOVIELENS_MIRROR is set (a local directory or a URL prefix). Only the ratings file and the movie
list are extracted, each checked against its published SHA-256 (so a mirror's repack of the same
files passes), or, where none is published, the whole archive against GroupLens's md5.
MOVIELENS_SKIP_VERIFY=1 skips the checks, for tests that serve generated data. `synthetic-*` is
generated here; `custom` copies the table at `custom_path`. Next to the files, source.json says
which dataset they are and which file is which.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import shutil
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path

from tqdm import tqdm

from pipeline import synthetic
from pipeline.common import PipelineError, atomic_output, run_stage, write_json
from pipeline.datasets import DATASETS, SOURCE_FILE, Dataset
from pipeline.params import load_params

log = logging.getLogger("download")

TIMEOUT_S = 30
ATTEMPTS = 3


def resolve_source(dataset: Dataset, mirror: str | None) -> str:
    """Return the archive's location: a local path or a URL."""
    if not mirror:
        return dataset.url
    if urllib.parse.urlparse(mirror).scheme in ("http", "https", "ftp", "file"):
        return mirror.rstrip("/") + "/" + dataset.archive
    return str(Path(mirror).expanduser().resolve() / dataset.archive)


def _fetch_url(url: str, dest: Path) -> None:
    """Download url to dest with a progress bar; retry transient failures with backoff."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp, open(dest, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                received = 0
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                    while chunk := resp.read(1 << 16):
                        out.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            if total is not None and received != total:  # urllib returns a short read silently
                raise http.client.IncompleteRead(b"", total - received)
            return
        except urllib.error.HTTPError as err:
            if err.code < 500 or attempt == ATTEMPTS:
                raise PipelineError(
                    f"download of {url} failed: HTTP {err.code} {err.reason}. "
                    f"Set MOVIELENS_MIRROR to a directory or URL prefix holding {dest.name} to use a copy."
                ) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as err:
            if attempt == ATTEMPTS:
                reason = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"
                raise PipelineError(
                    f"download of {url} failed after {ATTEMPTS} attempts: {reason}. "
                    "Without network access, set MOVIELENS_MIRROR to a directory or URL prefix "
                    f"holding {dest.name}."
                ) from None
        wait = 2 ** (attempt - 1)
        log.warning("attempt %d of %d failed; retrying in %d s", attempt, ATTEMPTS, wait)
        time.sleep(wait)


def fetch(source: str, dest: Path) -> None:
    """Copy the archive at `source` (path or URL) to `dest`."""
    if "://" in source:
        _fetch_url(source, dest)
        return
    if not Path(source).is_file():
        raise PipelineError(f"{source}: no such file (MOVIELENS_MIRROR must be a directory holding {dest.name})")
    shutil.copyfile(source, dest)


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def unsafe_member(info: zipfile.ZipInfo) -> str | None:
    """Return why an archive member could write outside the extraction folder, or None if it can't."""
    name = info.filename
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "a path that climbs out of the folder"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    return None


def extract_verified(dataset: Dataset, archive: Path, out_dir: Path, verify: bool = True) -> None:
    """Write the dataset's ratings and movie list from the archive into out_dir, verified.

    An archive holding any member that could escape the folder (absolute path, '..', a symbolic
    link) is refused as a whole, even though only the named members would be read.
    """
    md5 = _digest(archive, "md5")
    if dataset.md5 and md5 == dataset.md5:
        log.info("archive md5 %s: the official GroupLens archive", md5)
    elif dataset.sha256:
        log.info("archive md5 %s is not the official one (%s); checking its files", md5, dataset.md5)
    elif verify:
        raise PipelineError(f"{archive}: md5 {md5} is not the official {dataset.archive}'s {dataset.md5}; "
                            "refusing it (GroupLens publishes no per-file checksums for this release)")
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if why := unsafe_member(info):
                    raise PipelineError(f"{archive}: refused: member {info.filename!r} is {why}")
            names = set(zf.namelist())
            for member in (dataset.ratings, dataset.titles):
                if member not in names:
                    raise PipelineError(f"{archive}: no {member} in the archive")
                data = zf.read(member)
                expected = dataset.sha256.get(member)
                actual = hashlib.sha256(data).hexdigest()
                if verify and expected and actual != expected:
                    raise PipelineError(
                        f"{archive}: {member} failed its checksum: expected sha256 {expected}, got {actual}"
                    )
                (out_dir / Path(member).name).write_bytes(data)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as err:
        raise PipelineError(
            f"{archive}: not a readable zip archive, truncated or corrupt ({err}); its md5 is {md5}, "
            f"the official archive's is {dataset.md5 or 'not published'}"
        ) from None


def fetch_movielens(dataset: Dataset, out_dir: Path, mirror: str | None, verify: bool) -> dict:
    """Fetch and extract a GroupLens release into out_dir; return its source.json entries."""
    source = resolve_source(dataset, mirror)
    log.info("fetching %s", source)
    archive = out_dir / dataset.archive
    fetch(source, archive)
    if not verify:
        log.warning("MOVIELENS_SKIP_VERIFY is set: checksums are NOT checked")
    extract_verified(dataset, archive, out_dir, verify)
    archive.unlink()
    return {"ratings": Path(dataset.ratings).name, "titles": Path(dataset.titles).name}


def generate_synthetic(name: str, out_dir: Path) -> dict:
    """Write a synthetic dataset as ratings.csv and movies.csv (the ml-20m format)."""
    shape = synthetic.SHAPES[name]
    ratings = synthetic.generate(shape)
    ratings.to_csv(out_dir / "ratings.csv", index=False, lineterminator="\n")
    synthetic.titles(shape).to_csv(out_dir / "movies.csv", index=False, lineterminator="\n")
    log.info("generated %d interactions of %d users on %d items", len(ratings), shape.users, shape.items)
    return {"ratings": "ratings.csv", "titles": "movies.csv"}


def copy_custom(path: str, out_dir: Path) -> dict:
    """Copy the user's table into out_dir (the tracked copy every later stage reads)."""
    src = Path(path).expanduser()
    if not src.is_file():
        raise PipelineError(f"params.yaml: 'custom_path' is {path!r}, which is not a file")
    shutil.copyfile(src, out_dir / src.name)
    return {"ratings": src.name, "titles": None}


def download(out_dir: Path, name: str, mirror: str | None, verify: bool = True,
             custom_path: str = "") -> None:
    """Write the dataset's files and source.json to out_dir, all or nothing."""
    with atomic_output(out_dir, is_dir=True) as tmp:
        if name.startswith("synthetic-"):
            files = generate_synthetic(name, tmp)
        elif name == "custom":
            files = copy_custom(custom_path, tmp)
        else:
            files = fetch_movielens(DATASETS[name], tmp, mirror, verify)
        write_json(tmp / SOURCE_FILE, {"dataset": name, **files})
    log.info("wrote %s to %s", ", ".join(f for f in files.values() if f), out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the dataset's files into")
    args = parser.parse_args()
    params = load_params(models=())
    verify = os.environ.get("MOVIELENS_SKIP_VERIFY", "") not in ("1", "true", "yes")
    download(args.out_dir, params["dataset"], os.environ.get("MOVIELENS_MIRROR") or None, verify,
             params["custom_path"])


if __name__ == "__main__":
    run_stage(main)
