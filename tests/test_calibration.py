"""The verdicts of `evaluate` and `compare` are calibrated: simulated at the scale of ml-100k.

A simulated test set is 943 users (ml-100k's test users) and 6 models whose per-user hits are
correlated as real models' are: two models of equal HR (about 0.6) disagree on about 15% of the
users. The hits come from a Gaussian copula: user u has a common ability z_u ~ N(0, 1), model i
its own noise z_iu ~ N(0, 1), and model i hits user u when

    sqrt(R) z_u + sqrt(1 - R) z_iu < Phi^-1(HR_i),

with R solved for so that two models of HR 0.6 disagree on exactly 15% of the users in expectation.

The procedures are run vectorised over thousands of simulated sets through the primitives the
pipeline uses (`mcnemar_p`, `holm` over arrays of [sets, comparisons]); a few hundred sets go
through the real `pipeline.evaluate.intervals` and `pipeline.compare.compare` to show that they
make the same verdicts, so the fast simulations measure the real code's procedure. Under the null
(equal models) the rates of any false "different" verdict in a family (family-wise) and of a false
verdict per comparison must each be at most 5% plus three Monte Carlo standard errors; a planted
+0.05 HR must be found at least 80% of the time. The old procedures (reference chosen on the test
users, unadjusted paired t-tests; seeds averaged per user) are measured too, and must come out
miscalibrated. `pytest -s` prints every measured rate. All draws are seeded: the results are fixed.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import ndtr, ndtri, stdtr

from pipeline.stats import ALPHA, holm, interval, mcnemar_p, paired, replicated, wilson

N_USERS = 943  # ml-100k's test users
SETS = 2_000  # simulated test sets per rate: a 5% rate's standard error is then 0.49 points
MC = 3 * math.sqrt(ALPHA * (1 - ALPHA) / SETS)  # three Monte Carlo standard errors of a 5% rate
MODELS = ("itempop", "mlp", "gmf", "mf", "ease", "sasrec")  # real model names: `evaluate` looks them up
BASELINE = MODELS.index("itempop")
K = 10  # a hit is encoded as rank 0, a miss as rank K
HR = 0.6
DISCORDANCE = 0.15  # how often two equal real models disagree on a user (13-16% measured)
PLANTED = 0.05  # the difference the power checks plant
END_TO_END_SETS = 250  # simulated sets that also go through the real `intervals` / `compare`
COMPARE_HR = (0.40, 0.60, 0.62, 0.58, 0.64, 0.61)  # per model (the same on both sides under the null)
SEED_SD = 0.01  # several runs a side: each run's HR is the configuration's plus N(0, SEED_SD)
RUNS = 3
REPLICATED_SETS = 1_000

_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(80)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


def discordance(r: float, p: float, q: float) -> float:
    """P(two copula models of HR p and q disagree on a user) at copula correlation r (Gauss-Hermite
    quadrature over the common ability)."""
    scale = math.sqrt(1 - r)
    both = np.sum(_WEIGHTS * ndtr((ndtri(p) - math.sqrt(r) * _NODES) / scale)
                  * ndtr((ndtri(q) - math.sqrt(r) * _NODES) / scale))
    return float(p + q - 2 * both)


R = brentq(lambda r: discordance(r, HR, HR) - DISCORDANCE, 0.01, 0.99)  # about 0.88


def draw_hits(rng: np.random.Generator, hr, sets: int, users: int = N_USERS) -> np.ndarray:
    """Per-user hits, [sets, models, users] (bool), of models with true HR `hr` ([models], or
    [sets, models] for a HR that varies per set), all on the same users (one common ability each)."""
    hr = np.asarray(hr, dtype=np.float64)
    threshold = np.broadcast_to(ndtri(hr), (sets, hr.shape[-1]))[:, :, None].astype(np.float32)
    common = rng.standard_normal((sets, 1, users), dtype=np.float32)
    own = rng.standard_normal((sets, hr.shape[-1], users), dtype=np.float32)
    return np.float32(math.sqrt(R)) * common + np.float32(math.sqrt(1 - R)) * own < threshold


def counts_against(hits: np.ndarray, against: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The discordant counts of every model against the model `against[s]` of its set: (wins, losses),
    each [sets, models]: users the model hits and the other misses, and the reverse."""
    other = hits[np.arange(len(hits)), against][:, None, :]
    return (hits & ~other).sum(axis=-1), (~hits & other).sum(axis=-1)


def counts_between(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(b wins, a wins), [sets, models]: users where side B hits and side A misses, and the reverse."""
    return (b & ~a).sum(axis=-1), (a & ~b).sum(axis=-1)


def holm_mcnemar(wins: np.ndarray, losses: np.ndarray, excluded: np.ndarray | None = None):
    """The pipeline's procedure on arrays of [sets, comparisons]: exact McNemar p-values, Holm-adjusted
    per set over the comparisons not `excluded`. Returns (adjusted p, verdict code: +1 'higher',
    -1 'lower', 0 'indistinguishable')."""
    p = mcnemar_p(wins, losses).astype(np.float64)
    if excluded is not None:
        p = np.where(excluded, np.nan, p)
    adjusted = holm(p)
    return adjusted, np.where(adjusted < ALPHA, np.sign(wins - losses), 0)


def ttest_p(wins: np.ndarray, losses: np.ndarray, n: int) -> np.ndarray:
    """The paired t-test's two-sided p-value on per-user hit differences (+1 wins, -1 losses, else 0),
    from the discordant counts: t = mean(d) / (sd(d) / sqrt(n))."""
    mean = (wins - losses) / n
    var = (wins + losses - n * mean ** 2) / (n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = mean / np.sqrt(var / n)
    return np.where(var > 0, 2 * stdtr(n - 1, -np.abs(t)), 1.0)


def rates(different: np.ndarray, present: np.ndarray | None = None) -> tuple[float, float]:
    """(per-comparison rate, family-wise rate) of `different` ([sets, comparisons] bool); `present`
    masks the comparisons that exist (the reference is not compared with itself)."""
    present = np.ones_like(different) if present is None else present
    different = different & present
    return float(different.sum() / present.sum()), float(different.any(axis=1).mean())


VERDICTS = {1: "higher", -1: "lower", 0: "indistinguishable"}


def as_ranks(hits: np.ndarray) -> dict[str, np.ndarray]:
    ranks = np.where(hits, 0, K).astype(np.int64)
    return {"sampled": ranks, "full": ranks.copy()}


# --- the simulated models ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluate_null() -> SimpleNamespace:
    """SETS simulated evaluations of 6 equal models: each a validation set (its own users) and a test set."""
    rng = np.random.default_rng(20240601)
    validation = draw_hits(rng, [HR] * len(MODELS), SETS).sum(axis=-1)  # hits per model: only the counts matter
    return SimpleNamespace(validation=validation, test=draw_hits(rng, [HR] * len(MODELS), SETS))


def test_the_simulated_models_disagree_as_real_ones_do(evaluate_null):
    hits = evaluate_null.test
    assert hits.mean() == pytest.approx(HR, abs=0.005)
    measured = float((hits[:, 0] != hits[:, 1]).mean())
    print(f"\ncalibration: copula correlation R = {R:.4f}; two equal models disagree on {measured:.2%} of users")
    assert 0.12 <= measured <= 0.18
    assert discordance(R, HR, HR) == pytest.approx(DISCORDANCE, abs=1e-9)
    # with a planted +0.05, the discordance stays realistic
    assert 0.12 <= discordance(R, HR + PLANTED, HR) <= 0.18


# --- evaluate: every model against the reference -----------------------------------------------------

def evaluate_procedure(validation: np.ndarray, test: np.ndarray):
    """The procedure of `intervals` for one protocol and HR: the reference is the validation argmax
    (first on ties, as `max` in dict order), every other model against it by exact McNemar, Holm
    over the 5. Returns (reference [sets], adjusted p [sets, models] (NaN at the reference), code)."""
    reference = validation.argmax(axis=1)
    wins, losses = counts_against(test, reference)
    is_reference = np.arange(test.shape[1])[None, :] == reference[:, None]
    adjusted, code = holm_mcnemar(wins, losses, excluded=is_reference)
    return reference, adjusted, code, ~is_reference


def test_evaluate_keeps_both_error_rates_at_5_percent(evaluate_null):
    _, _, code, present = evaluate_procedure(evaluate_null.validation, evaluate_null.test)
    per_comparison, family_wise = rates(code != 0, present)
    print(f"\ncalibration: evaluate, new (validation reference, exact McNemar, Holm over 5), 6 equal models, "
          f"{SETS} sets: per-comparison {per_comparison:.2%}, family-wise {family_wise:.2%} "
          f"(bound {ALPHA + MC:.2%})")
    assert per_comparison <= ALPHA + MC
    assert family_wise <= ALPHA + MC


def test_the_old_evaluate_procedure_was_miscalibrated(evaluate_null):
    """Old: the reference is the best model on the test users themselves, every other model against it
    by the paired t-test on hits, each read alone at p < 0.05."""
    test = evaluate_null.test
    n = test.shape[-1]
    reference = test.sum(axis=-1).argmax(axis=1)
    wins, losses = counts_against(test, reference)
    present = np.arange(test.shape[1])[None, :] != reference[:, None]
    per_comparison, family_wise = rates(ttest_p(wins, losses, n) < ALPHA, present)
    # apart: the same t-tests against the validation reference (no selection on the test users)
    honest = evaluate_null.validation.argmax(axis=1)
    wins, losses = counts_against(test, honest)
    honest_present = np.arange(test.shape[1])[None, :] != honest[:, None]
    honest_per, honest_fw = rates(ttest_p(wins, losses, n) < ALPHA, honest_present)
    print(f"\ncalibration: evaluate, old (test-set reference, unadjusted paired t-test): per-comparison "
          f"{per_comparison:.2%}, family-wise {family_wise:.2%}; the t-tests against the validation "
          f"reference, unadjusted: per-comparison {honest_per:.2%}, family-wise {honest_fw:.2%}")
    assert per_comparison > 0.08  # the issue measured 10.5%
    assert family_wise > 0.25  # the issue measured 37%
    assert family_wise > honest_fw + 0.1  # picking the reference on the test users is most of it


def test_evaluate_finds_a_planted_difference_of_005():
    """One model (MLP) has true HR 0.65, the five others 0.6, on validation and test alike.

    "Found": the comparisons that involve the planted model all come out in the right direction after
    Holm. If the planted model is the reference, each of the 5 others must be "lower"; otherwise the
    planted model must be "higher" than the reference (the other comparisons are not asked about)."""
    rng = np.random.default_rng(7)
    planted = MODELS.index("mlp")
    hr = [HR + PLANTED if i == planted else HR for i in range(len(MODELS))]
    validation, test = draw_hits(rng, hr, SETS).sum(axis=-1), draw_hits(rng, hr, SETS)
    reference, _, code, present = evaluate_procedure(validation, test)
    is_planted = reference == planted
    others_lower = np.all((code == -1) | ~present, axis=1)
    planted_higher = code[:, planted] == 1
    found = np.where(is_planted, others_lower, planted_higher)
    print(f"\ncalibration: evaluate, planted +{PLANTED} HR on {N_USERS} users: found in {found.mean():.2%} of "
          f"{SETS} sets (reference = the planted model in {is_planted.mean():.2%})")
    assert found.mean() >= 0.80


def test_intervals_makes_the_simulated_verdicts():
    """The real `intervals` on simulated sets: its reference per protocol is the validation argmax (not
    the test argmax), and its HR verdicts and adjusted p-values, against the reference and against
    ItemPop, are those of the vectorised procedure on the same hits."""
    from pipeline.evaluate import intervals

    rng = np.random.default_rng(11)
    hr = rng.uniform(0.55, 0.65, size=(END_TO_END_SETS, len(MODELS)))  # a mix of verdicts
    hr[:, BASELINE] = 0.5
    hr[: END_TO_END_SETS // 2, :] = HR  # half the sets: all equal, so that the test argmax is arbitrary
    val_hits, test = draw_hits(rng, hr, END_TO_END_SETS), draw_hits(rng, hr, END_TO_END_SETS)
    validation = val_hits.sum(axis=-1)
    reference, adjusted, code, present = evaluate_procedure(validation, test)
    baseline = np.full(END_TO_END_SETS, BASELINE)
    wins, losses = counts_against(test, baseline)
    base_adjusted, base_code = holm_mcnemar(wins, losses, excluded=np.arange(len(MODELS))[None, :] == BASELINE)
    checked = {"higher": 0, "lower": 0, "indistinguishable": 0}
    for s in range(END_TO_END_SETS):
        val_hr = validation[s] / N_USERS
        val = {m: {p: {"hr": float(val_hr[i]), "ndcg": float(val_hr[i]) / 2} for p in ("sampled", "full")}
               for i, m in enumerate(MODELS)}
        out = intervals({m: as_ranks(test[s, i]) for i, m in enumerate(MODELS)}, K, val)
        assert out["reference"] == {"sampled": MODELS[reference[s]], "full": MODELS[reference[s]]}
        for protocol in ("sampled", "full"):
            for i, m in enumerate(MODELS):
                entry = out["models"][m][protocol]
                for label, against, adj, codes in (("vs_reference", reference[s], adjusted, code),
                                                   ("vs_itempop", BASELINE, base_adjusted, base_code)):
                    if i == against:
                        assert label not in entry
                        continue
                    hr_entry = entry[label]["hr"]
                    assert entry[label]["model"] == MODELS[against] and entry[label]["comparisons"] == 5
                    assert hr_entry["verdict"] == VERDICTS[int(codes[s, i])], (s, m, label, hr_entry)
                    assert hr_entry["p_adjusted"] == float(f"{adj[s, i]:.3g}")
                    checked[hr_entry["verdict"]] += 1
    test_argmax = test.sum(axis=-1).argmax(axis=1)
    print(f"\ncalibration: intervals() on {END_TO_END_SETS} sets agrees with the vectorised procedure; "
          f"verdicts checked {checked}; reference != test argmax in {(reference != test_argmax).sum()} sets")
    assert (reference != test_argmax).sum() >= END_TO_END_SETS // 4  # the two choices were told apart
    assert min(checked.values()) >= 20  # every verdict was exercised


# --- compare: one run a side ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compare_null() -> SimpleNamespace:
    """SETS simulated comparisons of two sides, each model on side B an independent retrain of the same
    model on side A (equal HR, hits correlated through the users' common ability)."""
    rng = np.random.default_rng(424242)
    hits = draw_hits(rng, COMPARE_HR + COMPARE_HR, SETS)
    return SimpleNamespace(a=hits[:, : len(MODELS)], b=hits[:, len(MODELS):])


def test_compare_keeps_both_error_rates_at_5_percent(compare_null):
    a, b = compare_null.a, compare_null.b
    measured = (a != b).mean(axis=(0, 2))
    assert np.all((measured >= 0.12) & (measured <= 0.18)), measured
    wins, losses = counts_between(a, b)
    _, code = holm_mcnemar(wins, losses)
    per_comparison, family_wise = rates(code != 0)
    old_per, old_fw = rates(ttest_p(wins, losses, N_USERS) < ALPHA)
    print(f"\ncalibration: compare, one run a side, 6 models equal on both sides (discordance "
          f"{measured.min():.1%}-{measured.max():.1%}), {SETS} sets: new (exact McNemar, Holm over 6) "
          f"per-comparison {per_comparison:.2%}, family-wise {family_wise:.2%} (bound {ALPHA + MC:.2%}); "
          f"old (unadjusted paired t-test) per-comparison {old_per:.2%}, family-wise {old_fw:.2%}")
    assert per_comparison <= ALPHA + MC
    assert family_wise <= ALPHA + MC
    assert old_fw > 0.15  # six unadjusted tests: about 1 - 0.95^6 = 26%


def test_compare_finds_a_planted_difference_of_005():
    """Side B's MLP has true HR +0.05 over side A's; every other model is equal on both sides. "Found":
    the MLP's HR verdict is 'higher' (B higher) after Holm over the 6 models."""
    rng = np.random.default_rng(99)
    planted = MODELS.index("mlp")
    b_hr = tuple(h + PLANTED if i == planted else h for i, h in enumerate(COMPARE_HR))
    hits = draw_hits(rng, COMPARE_HR + b_hr, SETS)
    wins, losses = counts_between(hits[:, : len(MODELS)], hits[:, len(MODELS):])
    _, code = holm_mcnemar(wins, losses)
    found = float((code[:, planted] == 1).mean())
    print(f"\ncalibration: compare, one run a side, planted +{PLANTED} HR on {N_USERS} users: found in "
          f"{found:.2%} of {SETS} sets")
    assert found >= 0.80


def run_of(name: str, hits: np.ndarray):
    from pipeline.compare import Run

    return Run(name, np.arange(hits.shape[-1]), "simulated", "ml-100k", K,
               {m: as_ranks(hits[i]) for i, m in enumerate(MODELS)})


def test_compare_makes_the_simulated_verdicts():
    """The real `compare` with one run a side: its HR rows' adjusted p-values and verdicts are those of
    the vectorised procedure (exact McNemar of B against A, Holm over the 6 models per protocol)."""
    from pipeline.compare import compare

    rng = np.random.default_rng(3)
    a_hr = rng.uniform(0.55, 0.65, size=(END_TO_END_SETS, len(MODELS)))
    b_hr = a_hr + rng.choice([-0.05, -0.03, 0.0, 0.0, 0.03, 0.05], size=a_hr.shape)
    hits = draw_hits(rng, np.concatenate([a_hr, b_hr], axis=1), END_TO_END_SETS)
    a, b = hits[:, : len(MODELS)], hits[:, len(MODELS):]
    wins, losses = counts_between(a, b)
    adjusted, code = holm_mcnemar(wins, losses)
    checked = {"higher": 0, "lower": 0, "indistinguishable": 0}
    for s in range(END_TO_END_SETS):
        models, rows = compare([run_of("A", a[s])], [run_of("B", b[s])])
        assert models == list(MODELS)
        hr_rows = [row for row in rows if row["metric"] == "hr"]
        assert len(hr_rows) == 2 * len(MODELS)
        for row in hr_rows:
            i = MODELS.index(row["model"])
            assert row["verdict"] == VERDICTS[int(code[s, i])], (s, row)
            assert row["diff"].p_adjusted == pytest.approx(adjusted[s, i], rel=1e-12)
            assert row["diff"].mean == pytest.approx((wins[s, i] - losses[s, i]) / N_USERS, abs=1e-12)
            if row["protocol"] == "sampled":
                checked[row["verdict"]] += 1
    print(f"\ncalibration: compare() on {END_TO_END_SETS} sets agrees with the vectorised procedure; "
          f"verdicts checked {checked}")
    assert min(checked.values()) >= 20


# --- compare: several runs a side ----------------------------------------------------------------------

def draw_seeded_runs(rng: np.random.Generator, sets: int, b_shift: np.ndarray | None = None) -> np.ndarray:
    """[sets, models, side (A, B), runs, users] hits: each run's HR is its configuration's (COMPARE_HR,
    plus `b_shift` on side B) plus a seed effect N(0, SEED_SD); the users' hits as in draw_hits."""
    base = np.broadcast_to(np.asarray(COMPARE_HR)[:, None, None], (len(MODELS), 2, RUNS)).copy()
    if b_shift is not None:
        base[:, 1, :] += b_shift[:, None]
    out = []
    for start in range(0, sets, 100):
        chunk = min(100, sets - start)
        hr = base[None] + SEED_SD * rng.standard_normal((chunk, len(MODELS), 2, RUNS))
        out.append(draw_hits(rng, hr.reshape(chunk, -1), chunk).reshape(chunk, len(MODELS), 2, RUNS, -1))
    return np.concatenate(out)


@pytest.fixture(scope="module")
def seeded_null() -> SimpleNamespace:
    """Three seeds a side, equal configurations, REPLICATED_SETS sets of 6 models: the p-values of
    `replicated` (what `compare` uses for several runs a side) and of the old approach (average each
    user's hits over the seeds of a side, then the paired t-test over users), [sets, models]."""
    rng = np.random.default_rng(31)
    hits = draw_seeded_runs(rng, REPLICATED_SETS).astype(np.float64)
    new_p = np.empty((REPLICATED_SETS, len(MODELS)))
    old_p = np.empty_like(new_p)
    for s in range(REPLICATED_SETS):
        for m in range(len(MODELS)):
            a, b = hits[s, m, 0], hits[s, m, 1]
            new_p[s, m] = replicated(a, b).p
            old_p[s, m] = paired(b.mean(axis=0), a.mean(axis=0)).p
    per_comparison = float((new_p < ALPHA).mean())
    _, family_wise = rates(holm(new_p) < ALPHA)
    old_per, old_fw = rates(old_p < ALPHA)
    print(f"\ncalibration: compare, {RUNS} runs a side (seed sd {SEED_SD} on HR), equal configurations, "
          f"{REPLICATED_SETS} sets x {len(MODELS)} models: replicated per-comparison {per_comparison:.2%} "
          f"(bound {ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / new_p.size):.2%}), Holm family-wise "
          f"{family_wise:.2%}; old (seeds averaged, paired t-test) per-comparison {old_per:.2%}, "
          f"family-wise unadjusted {old_fw:.2%}")
    return SimpleNamespace(new_p=new_p, old_p=old_p)


def test_replicated_keeps_the_false_verdict_rate_at_5_percent_with_seeds(seeded_null):
    new_p = seeded_null.new_p
    per_comparison = float((new_p < ALPHA).mean())
    _, family_wise = rates(holm(new_p) < ALPHA)
    assert per_comparison <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / new_p.size)
    assert family_wise <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / REPLICATED_SETS)


def test_averaging_the_seeds_was_anti_conservative(seeded_null):
    """The old approach reads the seeds' spread as a real difference between the configurations."""
    old_per, _ = rates(seeded_null.old_p < ALPHA)
    assert old_per > 0.10
    assert old_per > float((seeded_null.new_p < ALPHA).mean()) + 0.05


def test_compare_with_several_runs_uses_replicated():
    """The real `compare` with 3 runs a side: each HR row is `replicated` of that model's [runs, users]
    hits, Holm-adjusted over the models, with its verdict."""
    from pipeline.compare import compare

    rng = np.random.default_rng(8)
    shift = np.array([0.0, 0.06, 0.0, -0.06, 0.0, 0.0])
    hits = draw_seeded_runs(rng, 20, b_shift=shift)
    seen = set()
    for s in range(len(hits)):
        a_runs = [run_of(f"a{r}", hits[s, :, 0, r]) for r in range(RUNS)]
        b_runs = [run_of(f"b{r}", hits[s, :, 1, r]) for r in range(RUNS)]
        _, rows = compare(a_runs, b_runs)
        expected = [replicated(hits[s, m, 0].astype(float), hits[s, m, 1].astype(float)) for m in range(len(MODELS))]
        adjusted = holm(np.array([e.p for e in expected]))
        for row in (r for r in rows if r["metric"] == "hr"):
            m = MODELS.index(row["model"])
            assert (row["diff"].mean, row["diff"].p) == pytest.approx((expected[m].mean, expected[m].p), rel=1e-12)
            assert row["diff"].p_adjusted == pytest.approx(adjusted[m], rel=1e-12)
            code = int(np.sign(expected[m].mean)) if adjusted[m] < ALPHA else 0
            assert row["verdict"] == VERDICTS[code]
            assert row["seed_sd"] is not None and len(row["seed_sd"]) == 2
            seen.add(row["verdict"])
    assert seen == {"higher", "lower", "indistinguishable"}


# --- Wilson intervals --------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0.0, 1.0])
def test_wilson_interval_of_an_all_equal_vector(value):
    est = interval(np.full(N_USERS, value), proportion=True)
    assert est.mean == value and est.n == N_USERS
    assert est.hi - est.lo > 0.001
    assert est.lo - 1e-12 <= value <= est.hi + 1e-12
    assert -1e-12 <= est.lo and est.hi <= 1 + 1e-12


@pytest.mark.parametrize("rate", [0.02, 0.4, 0.65])
def test_wilson_interval_covers_the_true_rate(rate):
    rng = np.random.default_rng(int(rate * 100))
    successes = rng.binomial(N_USERS, rate, size=SETS)
    lo, hi = wilson(successes, N_USERS)
    covered = float(np.mean((lo <= rate) & (rate <= hi)))
    print(f"\ncalibration: Wilson 95% interval at HR {rate}, {N_USERS} users: coverage {covered:.2%}")
    assert 0.93 <= covered <= 0.975
    # and `interval` of a 0/1 vector is this interval
    values = (np.arange(N_USERS) < successes[0]).astype(float)
    est = interval(values, proportion=True)
    assert (est.lo, est.hi) == pytest.approx((lo[0], hi[0]), rel=1e-12)
