"""Is this experiment better than that one? Paired differences per model, with 95% intervals.

    python -m pipeline.compare main lr01          # a branch and a DVC experiment (any two git revisions)
    python -m pipeline.compare main               # main against the workspace
    python -m pipeline.compare a1,a2,a3 b1,b2,b3  # several runs a side (seeds), matched in order

Each side's per-user ranks (data/ranks.npz, a cached output of `evaluate`) are read through DVC
(`dvc.api.open`: from the local cache, or the default remote), never by checking out a tree. For
every model present on both sides it prints HR@K and NDCG@K of each side, their difference B - A
(the mean of per-user differences), its 95% interval, a p-value and a verdict. One run a side: HR
by the exact McNemar test, NDCG by the paired t-test, over users. Several runs a side (the same
number): run i of A is matched with run i of B and the seeds are replicates, so the test counts how
seeds vary as well as users (pipeline.stats.replicated), and each side's spread over its runs is
shown. Within each protocol and metric the models' p-values are Holm-adjusted (a model whose outcomes
are the same for every user on both sides cannot differ, and is left out of the family). Both sides must
score the same test users against the same candidates (same dataset, `candidate_seed` and
`test_negatives`): otherwise it refuses in one line. So does a revision whose ranks are not its own
run: its params.yaml or code differ from what its dvc.lock says `evaluate`, and every stage before
it, ran with (a commit of params without `dvc repro`, or a workspace edited since its run).
"""
from __future__ import annotations

import argparse
import io
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.common import PipelineError, run_stage
from pipeline.metrics import per_user
from pipeline.stats import UNRANKED, Estimate, adjust, paired, replicated, verdict
from pipeline.summary import PROTOCOL_NAMES, label

log = logging.getLogger("compare")

RANKS = "data/ranks.npz"
WORKSPACE = "workspace"


@dataclass
class Run:
    """One run's evaluation: who was tested on what, and every model's per-user ranks."""

    name: str
    users: np.ndarray
    test_set: str
    dataset: str
    k: int
    ranks: dict[str, dict[str, np.ndarray]]  # model -> protocol -> ranks


def parse_ranks(name: str, data: bytes | Path) -> Run:
    """Read a ranks file written by `evaluate` (bytes from DVC, or a path in the workspace)."""
    try:
        with np.load(io.BytesIO(data) if isinstance(data, bytes) else data, allow_pickle=False) as z:
            models = [str(m) for m in z["models"]]
            return Run(name, z["users"], str(z["test_set"]), str(z["dataset"]), int(z["k"]),
                       {m: {p: z[f"{m}/{p}"] for p in PROTOCOL_NAMES} for m in models})
    except (OSError, KeyError, ValueError) as err:
        raise PipelineError(f"{name}: {RANKS} is not a ranks file of this pipeline ({err}); run `dvc repro` "
                            "there") from None


def read_run(rev: str | None, repo: str | None = None) -> Run:
    """The ranks of one revision (a git revision or DVC experiment name), or of the workspace for None,
    once they are checked to be that revision's own run (check_own_run)."""
    run = _read_ranks(rev, repo)
    check_own_run(rev, repo)
    return run


def _read_ranks(rev: str | None, repo: str | None) -> Run:
    if rev is None:
        path = Path(repo or ".") / RANKS
        if not path.exists():
            raise PipelineError(f"{path}: not found in the workspace; run `dvc repro` first")
        return parse_ranks(WORKSPACE, path)
    import dvc.api  # here: slow to import, needed only for revisions
    from dvc.exceptions import DvcException
    from dvc.scm import RevError

    try:
        data = dvc.api.read(RANKS, repo=repo, rev=rev, mode="rb")
    except RevError:
        raise PipelineError(f"{rev!r}: no such git revision or DVC experiment") from None
    except (FileNotFoundError, DvcException) as err:
        raise PipelineError(f"{rev}: cannot read {RANKS} ({type(err).__name__}: {err}); was `evaluate` run "
                            "there, and is its output in the DVC cache or remote (`dvc pull`)?") from None
    return parse_ranks(rev, data)


def upstream_of(stages: dict, last: str = "evaluate") -> list[str]:
    """The stages of a dvc.lock whose outputs `last` reads, directly or through others, and `last`."""
    def touches(a: str, b: str) -> bool:
        return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")

    chosen = [last]
    grew = True
    while grew:
        grew = False
        needed = [dep["path"] for name in chosen for dep in stages[name].get("deps", [])]
        for name, stage in stages.items():
            if name not in chosen and any(touches(out["path"], dep) for out in stage.get("outs", []) for dep in needed):
                chosen.append(name)
                grew = True
    return chosen


def declared(name: str, stages: dict, params: dict) -> bool:
    """Whether dvc.yaml's `stages` still has the dvc.lock stage `name` (`base@item`: a foreach over a
    list, or over a params key such as ${models}); a lock keeps the entries of removed stages."""
    base, at, item = name.partition("@")
    if not at:
        return name in stages
    over = (stages.get(base) or {}).get("foreach")
    if isinstance(over, str) and over.startswith("${") and over.endswith("}"):
        over = params.get(over[2:-1])
    return isinstance(over, list) and item in [str(x) for x in over]


def stale_inputs(read) -> list[str]:
    """What differs between a revision's params and code and the run its dvc.lock records for evaluate
    and every stage before it: "params.yaml KEY" and code paths; [] when the ranks are that revision's
    own. `read(path)` returns a file's bytes at the revision (None where it has none)."""
    import hashlib

    from ruamel.yaml import YAML  # DVC's own reader: a value reads as DVC recorded it (1e-05 a float)

    yaml = YAML(typ="safe", pure=True)
    lock, params, pipeline = (yaml.load(read(name) or b"{}") or {} for name in ("dvc.lock", "params.yaml", "dvc.yaml"))
    stages = {name: stage for name, stage in lock.get("stages", {}).items()
              if declared(name, pipeline.get("stages", {}), params)}
    if "evaluate" not in stages:
        return []  # no run recorded: reading the ranks fails with its own message
    stale = []
    for name in upstream_of(stages):
        for key, value in stages[name].get("params", {}).get("params.yaml", {}).items():
            if (params or {}).get(key) != value:
                stale.append(f"params.yaml {key}")
        for dep in stages[name].get("deps", []):
            path, md5 = dep["path"], str(dep.get("md5", ""))
            if path.startswith("pipeline/") and md5 and not md5.endswith(".dir"):
                data = read(path)
                if data is None or hashlib.md5(data).hexdigest() != md5:
                    stale.append(path)
    return sorted(set(stale))


def check_own_run(rev: str | None, repo: str | None) -> None:
    """Refuse (one line naming the revision) ranks that another run made: the revision's params or
    code differ from what its dvc.lock says evaluate's run, and every stage before it, ran with."""
    if rev is None:
        root = Path(repo or ".")

        def read(path: str) -> bytes | None:
            return (root / path).read_bytes() if (root / path).is_file() else None
    else:
        from dvc.api import DVCFileSystem

        fs = DVCFileSystem(repo or ".", rev=rev)

        def read(path: str) -> bytes | None:
            return fs.read_bytes(path) if fs.isfile(path) else None
    stale = stale_inputs(read)
    if stale:
        name = WORKSPACE if rev is None else rev
        shown = ", ".join(stale[:4]) + (f" and {len(stale) - 4} more" if len(stale) > 4 else "")
        raise PipelineError(f"{name}: its {RANKS} is not its own run: {shown} differ from what its dvc.lock says "
                            "the run was made with; run `dvc repro` there (for a tuning trial: "
                            "`python -m pipeline.tune ... --promote K`)")


def check_comparable(runs: list[Run]) -> None:
    """Refuse runs whose test users or candidate lists differ: they cannot be compared user by user."""
    first = runs[0]
    for run in runs[1:]:
        if run.dataset != first.dataset:
            raise PipelineError(f"cannot compare: {first.name} is dataset {first.dataset!r}, {run.name} is "
                                f"{run.dataset!r}")
        if run.k != first.k:
            raise PipelineError(f"cannot compare: {first.name} has topK {first.k}, {run.name} has {run.k}")
        if run.test_set != first.test_set or not np.array_equal(run.users, first.users):
            raise PipelineError(f"cannot compare: {first.name} and {run.name} rank different test users or "
                                "candidate lists (another `candidate_seed`, `test_negatives`, split or data)")


def ranked(run: Run, model: str, protocol: str) -> np.ndarray:
    """Which test users a protocol ranked (full ranking may rank a seeded sample of them)."""
    return run.ranks[model][protocol] != UNRANKED


def side_values(side: list[Run], model: str, protocol: str, k: int, users: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user HR, NDCG and MRR of a model for the `users` mask: [runs, users] per metric."""
    values = [per_user(run.ranks[model][protocol][users], k) for run in side]
    return {metric: np.stack([v[metric] for v in values]) for metric in values[0]}


def difference(va: np.ndarray, vb: np.ndarray, metric: str) -> Estimate:
    """B - A for one model and metric ([runs, users] each): one run a side, a paired test over users
    (exact McNemar for HR); several, `replicated` (seeds and users both vary)."""
    if len(va) == 1:
        return paired(vb[0], va[0], binary=metric == "hr")
    return replicated(va, vb)


def compare(a: list[Run], b: list[Run]) -> tuple[list[str], list[dict]]:
    """Return (the models on both sides, one row per protocol, model and metric: A, B, the difference).

    Each protocol and metric is a family (one comparison per model), Holm-adjusted."""
    check_comparable(a + b)
    if len(a) != len(b):
        raise PipelineError(f"cannot compare a side of {len(a)} run(s) with one of {len(b)}: give both sides the "
                            "same number of runs (run i of A is matched with run i of B), or one each")
    k = a[0].k
    models = [m for m in a[0].ranks if all(m in run.ranks for run in a + b)]
    rows = []
    for protocol in PROTOCOL_NAMES:
        values = {}
        for model in models:
            users = ranked(a[0], model, protocol)
            if any(not np.array_equal(ranked(run, model, protocol), users) for run in a + b):
                raise PipelineError("cannot compare: the runs fully ranked different samples of test users "
                                    "(another full_rank_users)")
            values[model] = side_values(a, model, protocol, k, users), side_values(b, model, protocol, k, users)
        for metric in ("hr", "ndcg"):
            # A model whose outcomes are the same for every user on both sides cannot differ (p = 1 whatever
            # the data): it is left out of the family, as Tarone's rule for discrete tests allows.
            same = {model: np.array_equal(vb[metric], va[metric]) for model, (va, vb) in values.items()}
            tests = {model: difference(va[metric], vb[metric], metric) for model, (va, vb) in values.items()}
            family = adjust({model: diff for model, diff in tests.items() if not same[model]})
            for model, diff in tests.items():
                diff = family.get(model, Estimate(diff.mean, diff.lo, diff.hi, diff.n, diff.p, diff.p))
                va, vb = (v[metric] for v in values[model])
                same_outcomes = same[model]
                spread = (va.mean(axis=1).std(ddof=1), vb.mean(axis=1).std(ddof=1)) if len(va) > 1 else None
                rows.append({"protocol": protocol, "model": model, "metric": metric, "a": float(va.mean()),
                             "b": float(vb.mean()), "diff": diff, "seed_sd": spread,
                             "verdict": "the same for every user" if same_outcomes else verdict(diff)})
    return models, rows


def side_name(side: list[Run]) -> str:
    return side[0].name if len(side) == 1 else f"{','.join(r.name for r in side)} ({len(side)} runs)"


def render(a: list[Run], b: list[Run], rows: list[dict]) -> str:
    """The comparison as text, at most 100 columns."""
    k = a[0].k
    metric_names = {"hr": f"HR@{k}", "ndcg": f"NDCG@{k}"}
    runs = len(a)
    if runs == 1:
        how = ["B - A: the mean per-user difference with its 95% interval. p: HR by the exact McNemar test,",
               "NDCG by the paired t-test."]
    else:
        how = [f"Run i of A is matched with run i of B ({runs} pairs: seeds are replicates). B - A and its",
               "95% interval count how the seeds and the users vary (a runs x users random-effects t-test);",
               "sd: the spread of each side's metric over its runs."]
    out = [f"A = {side_name(a)}", f"B = {side_name(b)}", f"{len(a[0].users):,} test users ({a[0].dataset}).", *how,
           "Each protocol and metric is one family (the models whose outcomes differ): p is adjusted by",
           "Holm's method, and a verdict needs an adjusted p below 0.05.", ""]
    for protocol, title in PROTOCOL_NAMES.items():
        users = int(ranked(a[0], rows[0]["model"], protocol).sum()) if rows else 0
        if users < len(a[0].users):
            title += f" (a seeded sample of {users:,} test users)"
        sd_head = "  sd A/B" if runs > 1 else ""
        out += [title, f"{'model':<8} {'metric':<8} {'A':>6} {'B':>6}  {'B - A [95%]':<26} {'p adj.':>6}{sd_head}"
                "  verdict"]
        for row in (r for r in rows if r["protocol"] == protocol):
            d = row["diff"]
            cell = f"{d.mean:+.4f} [{d.lo:+.4f}, {d.hi:+.4f}]"
            sd = f"  {row['seed_sd'][0]:.3f}/{row['seed_sd'][1]:.3f}" if row["seed_sd"] else ""
            shown = {"higher": "B higher", "lower": "B lower"}.get(row["verdict"], row["verdict"])
            out.append(f"{label(row['model']):<8} {metric_names[row['metric']]:<8} {row['a']:6.4f} {row['b']:6.4f}  "
                       f"{cell:<26} {d.p_adjusted:6.2g}{sd}  {shown}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def parse_side(text: str | None) -> list[str | None]:
    if text is None:
        return [None]
    revs = [part.strip() for part in text.split(",")]
    if not all(revs):
        raise PipelineError(f"{text!r}: an empty revision in the list")
    return [None if rev == WORKSPACE else rev for rev in revs]


def main() -> None:
    parser = argparse.ArgumentParser(description="Compare two runs (git revisions or DVC experiments), per model.")
    parser.add_argument("a", nargs="?", default="HEAD", help="a revision, or several joined by commas (default HEAD)")
    parser.add_argument("b", nargs="?", help="likewise (default: the workspace)")
    parser.add_argument("--repo", help="the DVC repository (default: the current one)")
    args = parser.parse_args()
    a = [read_run(rev, args.repo) for rev in parse_side(args.a)]
    b = [read_run(rev, args.repo) for rev in parse_side(args.b)]
    models, rows = compare(a, b)
    if not models:
        raise PipelineError("no model is evaluated on both sides")
    sys.stdout.write(render(a, b, rows))


if __name__ == "__main__":
    run_stage(main)
