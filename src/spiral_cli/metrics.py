"""Evaluation metrics: pass@k, majority vote, confidence intervals, scaling efficiency.

Pure math (numpy only, no torch) so that evaluation and plotting can use it without
pulling in the training stack.

Public API
----------
- ``pass_at_k(n, c, k)``: unbiased pass@k from ``n`` samples of which ``c`` are correct.
- ``majority_vote(answers, rng=None, tie_break="first")``: most common non-None answer.
- ``majority_at_k_expected(answers, correct, k, ...)``: expected majority@k accuracy over
  all size-k subsets of a pool (exact, or a seeded Monte-Carlo estimate when too many).
- ``wilson_interval(successes, n, z=1.96)`` and ``bootstrap_ci(values, ...)``.
- ``accuracy_at_compute(curve, compute)`` and ``compute_to_reach(curve, accuracy)``: the
  interpolated accuracy-vs-compute curve used by ``scaling_efficiency``.
- ``scaling_efficiency(baseline, candidate)``: how many times more compute the baseline
  needs to reach the candidate's accuracy (definition in its docstring); "not_measurable"
  when the curves share no accuracy range of positive width.
- Intervals over problems (and training seeds), percentile bootstrap with shared problem
  draws: ``bootstrap_accuracy(values)``, ``paired_bootstrap_diff(a, b)`` and
  ``scaling_efficiency_interval(baseline, candidate)``.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "pass_at_k",
    "majority_vote",
    "majority_at_k_expected",
    "wilson_interval",
    "bootstrap_ci",
    "accuracy_at_compute",
    "compute_to_reach",
    "scaling_efficiency",
    "bootstrap_accuracy",
    "paired_bootstrap_diff",
    "scaling_efficiency_interval",
]


# --------------------------------------------------------------------------- pass@k


def mean(xs: Iterable[float], empty: Any = 0.0) -> Any:
    """The arithmetic mean; `empty` when there are no values (0.0, or None where "no value" must
    stay distinguishable from zero, as in the RL step metrics)."""
    xs = list(xs)
    return sum(xs) / len(xs) if xs else empty


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator: ``1 - C(n-c, k) / C(n, k)``.

    The probability that a size-k subset drawn without replacement from ``n`` samples, ``c``
    of them correct, holds at least one correct sample (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code", eq. 1). Computed in the stable product form

        C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i)

    which never forms the (huge) binomial coefficients.

    Raises ValueError unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (0 <= c <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        # Every size-k subset must contain a correct sample.
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


# --------------------------------------------------------------------------- majority vote


def _rand_index(rng, size: int) -> int:
    """A uniform index in [0, size) from a ``random.Random`` or a numpy ``Generator``."""
    if hasattr(rng, "integers"):  # numpy Generator
        return int(rng.integers(size))
    return rng.randrange(size)


def majority_vote(
    answers: Sequence[str | None],
    rng=None,
    tie_break: str = "first",
) -> str | None:
    """The most common answer, ignoring ``None`` (no answer extracted).

    Ties: ``tie_break="first"`` (default) returns the tied answer that occurs first in
    ``answers``, which makes the vote deterministic; ``"random"`` picks uniformly among the
    tied answers with ``rng`` (a ``random.Random`` or numpy ``Generator``; defaults to
    ``random.Random(0)`` so results stay reproducible). All ``None`` (or empty) -> ``None``.
    """
    if tie_break not in ("first", "random"):
        raise ValueError(f"tie_break must be 'first' or 'random', got {tie_break!r}")
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    # Counter keeps first-insertion order, so this list is in order of first occurrence.
    tied = [a for a, cnt in counts.items() if cnt == top]
    if tie_break == "first" or len(tied) == 1:
        return tied[0]
    rng = random.Random(0) if rng is None else rng
    return tied[_rand_index(rng, len(tied))]


def final_answer_index(keys: Sequence[str | None]) -> int:
    """Index of the member whose answer a population's final vote returns: the first one that
    carries the majority answer (``majority_vote``, ties to the first); 0 when no member has an
    answer. `spiral infer` scores that member, and `spiral sweep` scores learned cells so too."""
    winner = majority_vote(keys)
    return 0 if winner is None else keys.index(winner)


def _answer_correctness(
    answers: Sequence[str | None],
    correct: Sequence[bool] | Callable[[str], bool],
) -> tuple[np.ndarray, np.ndarray]:
    """Map answers to integer ids (-1 for None) and return (ids, is_correct per id)."""
    vocab: dict[str, int] = {}
    ids = np.array([-1 if a is None else vocab.setdefault(a, len(vocab)) for a in answers])
    is_correct = np.zeros(len(vocab), dtype=bool)
    if callable(correct):
        for a, i in vocab.items():
            is_correct[i] = bool(correct(a))
        return ids, is_correct
    if len(correct) != len(answers):
        raise ValueError(
            f"correct has {len(correct)} flags but there are {len(answers)} answers"
        )
    seen: dict[int, bool] = {}
    for i, flag in zip(ids, correct):
        if i < 0:
            continue  # a missing answer is never correct; its flag is ignored
        if seen.setdefault(int(i), bool(flag)) != bool(flag):
            raise ValueError("correct flags disagree for two samples with the same answer")
        is_correct[i] = bool(flag)
    return ids, is_correct


def _majority_credit(subset_ids: np.ndarray, is_correct: np.ndarray) -> np.ndarray:
    """Fractional majority-vote credit for each row of ``subset_ids`` (S x k answer ids).

    Credit = (number of correct answers among the tied top answers) / (number tied), i.e. the
    chance that a uniform random tie-break picks a correct answer; 0 when all are None.
    """
    s, _ = subset_ids.shape
    n_ids = len(is_correct)
    counts = np.zeros((s, n_ids + 1), dtype=np.int64)  # last column collects None (-1)
    rows = np.repeat(np.arange(s), subset_ids.shape[1])
    np.add.at(counts, (rows, subset_ids.ravel()), 1)
    counts = counts[:, :n_ids]
    top = counts.max(axis=1, initial=0)
    tied = (counts == top[:, None]) & (top[:, None] > 0)
    n_tied = tied.sum(axis=1)
    n_right = (tied & is_correct[None, :]).sum(axis=1)
    return np.where(n_tied > 0, n_right / np.maximum(n_tied, 1), 0.0)


def majority_at_k_expected(
    answers: Sequence[str | None],
    correct: Sequence[bool] | Callable[[str], bool],
    k: int,
    *,
    exact_limit: int = 20_000,
    n_mc: int = 20_000,
    seed: int = 0,
) -> float:
    """Expected majority@k accuracy over size-k subsets of a pool of ``n`` samples.

    majority@k = E_S[credit(S)], S uniform over the C(n, k) size-k subsets of the pool.
    ``credit(S)`` is 1 when the most common non-None answer of S is correct. Ties are counted
    fractionally: if ``t`` answers tie for the top count and ``m`` of them are correct, the
    credit is ``m / t`` -- the expected accuracy of breaking the tie uniformly at random
    (a first-occurrence tie-break would depend on sample order, which is arbitrary here).
    A subset whose answers are all None earns 0.

    ``correct`` is either one flag per sample (flags must agree for equal answers) or a
    function ``answer -> bool`` (which allows several correct spellings).

    Exact enumeration when C(n, k) <= ``exact_limit``; otherwise the mean over ``n_mc``
    subsets drawn uniformly with a numpy generator seeded by ``seed`` (standard error
    at most 0.5 / sqrt(n_mc)).
    """
    n = len(answers)
    if not (1 <= k <= n):
        raise ValueError(f"majority_at_k_expected needs 1 <= k <= n, got n={n}, k={k}")
    ids, is_correct = _answer_correctness(answers, correct)
    if math.comb(n, k) <= exact_limit:
        subsets = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64)
    else:
        rng = np.random.default_rng(seed)
        # argsort of iid uniforms is a uniform permutation; its first k entries a uniform subset.
        subsets = np.argsort(rng.random((n_mc, n)), axis=1)[:, :k]
    return float(_majority_credit(ids[subsets], is_correct).mean())


# --------------------------------------------------------------------------- intervals


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    with p = successes / n; returns (centre - half, centre + half) clipped to [0, 1].
    ``n == 0`` -> (0.0, 1.0) (no information).
    """
    if n < 0 or not (0 <= successes <= n):
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(
    values: Sequence[float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    statistic: Callable[[np.ndarray], float] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of ``statistic`` (default: the mean).

    Resamples ``values`` with replacement ``n_boot`` times using a numpy generator seeded by
    ``seed`` and returns the alpha/2 and 1 - alpha/2 quantiles of the resampled statistic.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    samples = x[rng.integers(0, x.size, size=(n_boot, x.size))]
    if statistic is None:
        stats = samples.mean(axis=1)
    else:
        stats = np.array([statistic(row) for row in samples], dtype=float)
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


# --------------------------------------------------------------------------- scaling efficiency

Curve = Sequence[tuple[float, float]]


def _clean_curve(curve: Curve, name: str = "curve") -> list[tuple[float, float]]:
    """Validate a (compute, accuracy) curve; sort by compute; keep the best accuracy per compute."""
    if len(curve) == 0:
        raise ValueError(f"{name} has no points")
    best: dict[float, float] = {}
    for point in curve:
        if len(point) != 2:
            raise ValueError(f"{name}: each point must be (compute, accuracy), got {point!r}")
        c, a = float(point[0]), float(point[1])
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"{name}: compute must be a finite number > 0, got {point[0]!r}")
        if not math.isfinite(a):
            raise ValueError(f"{name}: accuracy must be finite, got {point[1]!r}")
        best[c] = max(a, best.get(c, -math.inf))
    return sorted(best.items())


def accuracy_at_compute(curve: Curve, compute: float) -> float | None:
    """Accuracy reachable with at most ``compute``: the running max of the log-linear curve.

    Between measured points (c_i, a_i) and (c_{i+1}, a_{i+1}) accuracy is linear in log2(c):
    A(c) = a_i + (a_{i+1} - a_i) * (log2 c - log2 c_i) / (log2 c_{i+1} - log2 c_i).
    Returns max over c' in [c_min, compute] of A(c'); None when compute < c_min (nothing was
    measured that cheaply); for compute > c_max the best measured accuracy (no extrapolation).
    """
    pts = _clean_curve(curve)
    if compute < pts[0][0]:
        return None
    best = -math.inf
    for (c0, a0), (c1, a1) in zip(pts, pts[1:]):
        best = max(best, a0)
        if c0 <= compute < c1:
            t = (math.log2(compute) - math.log2(c0)) / (math.log2(c1) - math.log2(c0))
            return max(best, a0 + t * (a1 - a0))
    return max(a for _, a in pts)


def compute_to_reach(curve: Curve, accuracy: float) -> float | None:
    """C(a): the least interpolated compute at which the curve reaches ``accuracy``.

    Walk the points in order of compute: if the first point already has accuracy >= a,
    C(a) = c_min (a censored value when a is below that point's accuracy -- the curve says
    nothing about less compute). Otherwise find the first segment whose right end reaches a
    and solve the log-linear interpolation for it:
        log2 C(a) = log2 c_i + (a - a_i) / (a_{i+1} - a_i) * (log2 c_{i+1} - log2 c_i).
    None if the curve never reaches a. Because this is the *first* crossing, it is the same
    as the least compute at which the running-max curve (``accuracy_at_compute``) reaches a.
    """
    pts = _clean_curve(curve)
    if pts[0][1] >= accuracy:
        return pts[0][0]
    for (c0, a0), (c1, a1) in zip(pts, pts[1:]):
        if a1 >= accuracy:  # a0 < accuracy holds here, else an earlier step would have returned
            t = (accuracy - a0) / (a1 - a0)
            return 2.0 ** (math.log2(c0) + t * (math.log2(c1) - math.log2(c0)))
    return None


def _compute_to_reach_many(pts: list[tuple[float, float]], levels: np.ndarray) -> np.ndarray:
    """``compute_to_reach`` for many accuracy levels at once (NaN where never reached).

    Same rule as the scalar version, vectorised because the bootstrap of ``scaling_efficiency``
    evaluates ~200 levels thousands of times. The first crossing of level a is the first point
    whose running-max accuracy reaches a (``searchsorted`` on the running max).
    """
    comp = np.array([c for c, _ in pts], dtype=float)
    acc = np.array([a for _, a in pts], dtype=float)
    out = np.full(levels.shape, np.nan)
    at_first = levels <= acc[0]
    out[at_first] = comp[0]
    j = np.searchsorted(np.maximum.accumulate(acc), levels, side="left")
    inner = ~at_first & (j < len(pts))
    j = j[inner]
    a0, a1 = acc[j - 1], acc[j]  # a0 < level <= a1 on the crossing segment
    t = (levels[inner] - a0) / (a1 - a0)
    log_c = np.log2(comp)
    out[inner] = np.exp2(log_c[j - 1] + t * (log_c[j] - log_c[j - 1]))
    return out


def scaling_efficiency(
    baseline: Curve,
    candidate: Curve,
    *,
    grid_points: int = 201,
) -> dict:
    """How many times more compute the baseline needs to match the candidate's accuracy.

    Definition (each curve is a list of (compute, accuracy) points, compute > 0, e.g. tokens
    per problem):

    1. Interpolation. Sort a curve by compute (for repeated compute keep the best accuracy).
       Between neighbouring points accuracy is linear in log2(compute). No extrapolation
       outside [c_min, c_max]. The curve is made monotone by a running max: the accuracy
       reachable with *at most* c (``accuracy_at_compute``).
    2. C(a), the compute needed for accuracy a, is the least interpolated compute at which
       the curve reaches a (``compute_to_reach``): find the first segment whose upper point
       reaches a and solve the straight line in log2(compute) for a.
    3. Trusted range of a curve: [lo, hi] where lo = accuracy at its *lowest* measured
       compute and hi = its best accuracy. Below lo, C(a) would be censored at c_min (we do
       not know how much less compute would do), above hi it does not exist.
    4. Overlap range: [max(lo_b, lo_c), min(hi_b, hi_c)]. For each a in it,
           efficiency(a) = C_baseline(a) / C_candidate(a)
       (> 1: the candidate needs less compute for the same accuracy).
    5. Report, for status "ok" (overlap of *positive width*, lo < hi):
       - ``levels``: [(a, efficiency(a))] on ``grid_points`` evenly spaced levels across the
         overlap range plus every measured accuracy of either curve that falls in it;
       - ``max`` (and ``max_level``): the largest efficiency among ``levels``;
       - ``at_baseline_best``: efficiency(hi_b), or None when the candidate never reaches
         the baseline's best accuracy (hi_c < hi_b).
    6. Overlap of zero width (lo == hi: the curves only touch at one accuracy level a, e.g.
       the candidate's cheapest point equals the baseline's best, or both curves are flat at
       0): status "not_measurable"; ``max`` and ``at_baseline_best`` stay None because at
       least one of C_b(a), C_c(a) is censored at its curve's c_min (a = that curve's lo), so
       the ratio there is not a measured efficiency. It is kept as ``censored_ratio`` and,
       where it is a valid one-sided bound, also as a bound: only the candidate censored
       (its true C_c(a) <= c_min) -> efficiency >= ``lower_bound`` = censored_ratio; only the
       baseline censored -> efficiency <= ``upper_bound`` = censored_ratio; both -> no bound.
    7. Without overlap, no ratio is measured; a one-sided bound at the levels a in the gap:
       - lo_c > hi_b (the candidate at its lowest compute beats everything the baseline
         reached): the baseline needs more than its c_max, the candidate at most its c_min, so
         efficiency > ``lower_bound`` = c_max(baseline) / c_min(candidate).
         Status "candidate_dominates" when that bound is >= 1, else "no_overlap" (the
         candidate was simply measured at larger compute; the bound is weak).
       - lo_b > hi_c (symmetric): efficiency < ``upper_bound`` = c_min(baseline) /
         c_max(candidate). Status "baseline_dominates" when that bound is <= 1, else
         "no_overlap".
    Only status "ok" carries an efficiency number (``max``); every other status has
    ``max`` = ``at_baseline_best`` = None.

    Worked example: baseline [(100, 0.2), (400, 0.6)], candidate [(50, 0.4), (200, 0.8)].
    Overlap [0.4, 0.6]. At a = 0.4 the baseline crosses halfway along log2 100 .. log2 400,
    so C_b = 2^(log2 100 + 1) = 200, C_c = 50: efficiency 4.0 (and 4.0 at every level).

    Returns a dict with keys: status, overlap (bool: the accuracy ranges intersect, possibly
    in one point), accuracy_range ((lo, hi) or None), max, max_level, at_baseline_best,
    levels, lower_bound, upper_bound, censored_ratio (None where not applicable).
    """
    base = _clean_curve(baseline, "baseline")
    cand = _clean_curve(candidate, "candidate")
    lo_b, hi_b = base[0][1], max(a for _, a in base)
    lo_c, hi_c = cand[0][1], max(a for _, a in cand)
    result = {
        "status": "ok",
        "overlap": True,
        "accuracy_range": None,
        "max": None,
        "max_level": None,
        "at_baseline_best": None,
        "levels": [],
        "lower_bound": None,
        "upper_bound": None,
        "censored_ratio": None,
    }
    lo, hi = max(lo_b, lo_c), min(hi_b, hi_c)
    if lo > hi:
        result["overlap"] = False
        if lo_c > hi_b:
            bound = base[-1][0] / cand[0][0]
            result["lower_bound"] = bound
            result["status"] = "candidate_dominates" if bound >= 1 else "no_overlap"
        else:  # lo_b > hi_c
            bound = base[0][0] / cand[-1][0]
            result["upper_bound"] = bound
            result["status"] = "baseline_dominates" if bound <= 1 else "no_overlap"
        return result

    if lo == hi:  # the curves touch at one level: the ratio there is censored (step 6)
        ratio = compute_to_reach(base, lo) / compute_to_reach(cand, lo)
        base_censored, cand_censored = lo_b >= lo, lo_c >= lo
        result.update(status="not_measurable", accuracy_range=(lo, hi), censored_ratio=ratio)
        if cand_censored and not base_censored:
            result["lower_bound"] = ratio
        elif base_censored and not cand_censored:
            result["upper_bound"] = ratio
        return result

    measured = [a for _, a in base + cand if lo <= a <= hi]
    levels = sorted(set(np.linspace(lo, hi, grid_points).tolist() + measured))
    ratios = _compute_to_reach_many(base, np.array(levels)) / _compute_to_reach_many(cand, np.array(levels))
    best = int(np.argmax(ratios))  # first of equal maxima, like max() over the list
    result.update(
        accuracy_range=(lo, hi),
        max=float(ratios[best]),
        max_level=levels[best],
        levels=list(zip(levels, ratios.tolist())),
    )
    if hi_c >= hi_b:
        result["at_baseline_best"] = compute_to_reach(base, hi_b) / compute_to_reach(cand, hi_b)
    return result


# --------------------------------------------------------------------------- intervals over problems and seeds


def _seed_problem_matrix(values, name: str) -> np.ndarray:
    """Per-problem values as a (seeds, problems) float array: 1-D input is one seed."""
    x = np.asarray(values, dtype=float)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: give per-problem values as (problems,) or (seeds, problems), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: per-problem values must be finite")
    return x


def _check_boot(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _problem_draws(n_problems: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_problems) problem indices drawn with replacement; one numpy call, so a
    given seed always gives the same draws (the tests replay them by hand)."""
    return np.random.default_rng(seed).integers(0, n_problems, size=(n_boot, n_problems))


def _percentile(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])  # numpy's default linear interpolation
    return float(lo), float(hi)


def bootstrap_accuracy(values, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Accuracy (mean over seeds and problems) with a percentile bootstrap interval over problems.

    ``values``: per-problem correctness (0/1) or per-problem accuracy in [0, 1] (e.g. a pass@k
    estimate), shape (problems,) or (seeds, problems) when several training seeds were
    evaluated on the same problems. Each resample draws problems with replacement, the *same*
    problem indices for every seed (as in ``paired_bootstrap_diff``: the problems are the
    shared source of variance), and keeps every seed: with two or three seeds, resampling
    seeds says nothing. The interval therefore covers the choice of problems, conditional on
    the trained seeds; ``per_seed`` shows how much the seeds themselves differ.

    Returns {"estimate", "interval": (lo, hi), "per_seed", "n_problems", "n_seeds", "n_boot",
    "alpha", "seed"}.
    """
    _check_boot(n_boot, alpha)
    x = _seed_problem_matrix(values, "values")
    per_problem = x.mean(axis=0)  # equal problems per seed: mean over seeds, then problems
    stats = per_problem[_problem_draws(x.shape[1], n_boot, seed)].mean(axis=1)
    return {
        "estimate": float(per_problem.mean()), "interval": _percentile(stats, alpha),
        "per_seed": x.mean(axis=1).tolist(), "n_problems": x.shape[1], "n_seeds": x.shape[0],
        "n_boot": n_boot, "alpha": alpha, "seed": seed,
    }


def paired_bootstrap_diff(a, b, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Mean difference a - b between two arms on the same problems, with a paired bootstrap interval.

    ``a`` and ``b``: per-problem correctness (0/1) or per-problem accuracy in [0, 1], shape
    (problems,) or (seeds, problems); column i of both is problem i (the same problem list,
    same order). The arms may have different numbers of seeds (each seed is its own trained
    checkpoint).

    Pairing. Each of the ``n_boot`` resamples draws problem indices with replacement once and
    applies them to both arms and to every seed. Why shared: the arms (and seeds) answer the
    same problems, and problem difficulty is the largest common source of variance; drawing the
    same problems for both arms cancels it, so the interval reflects only how the *difference*
    varies across problems (a constant difference gives a zero-width interval, whereas two
    independent intervals would overlap widely). Drawing problems separately per seed would
    treat the seeds' problem sets as independent samples, which they are not here. Seeds are
    strata that every resample keeps (they are averaged, not resampled): the interval is
    conditional on the trained seeds; ``per_seed_a`` / ``per_seed_b`` show their spread.

    Statistic: mean over seeds of the per-problem mean, per arm, then a - b; since every seed
    has the same problems this is the mean over problems of (seed-mean a_i - seed-mean b_i).
    Interval: the alpha/2 and 1 - alpha/2 quantiles (numpy linear interpolation) of the
    resampled statistic; draws from ``numpy.random.default_rng(seed)``, so reproducible.

    Returns {"estimate", "interval": (lo, hi), "mean_a", "mean_b", "per_seed_a",
    "per_seed_b", "n_problems", "n_seeds": (seeds of a, seeds of b), "n_boot", "alpha",
    "seed"}.
    """
    _check_boot(n_boot, alpha)
    xa, xb = _seed_problem_matrix(a, "a"), _seed_problem_matrix(b, "b")
    if xa.shape[1] != xb.shape[1]:
        raise ValueError(f"a and b must cover the same problems, got {xa.shape[1]} and {xb.shape[1]}")
    pa, pb = xa.mean(axis=0), xb.mean(axis=0)
    diff = pa - pb
    stats = diff[_problem_draws(len(diff), n_boot, seed)].mean(axis=1)
    return {
        "estimate": float(pa.mean() - pb.mean()), "interval": _percentile(stats, alpha),
        "mean_a": float(pa.mean()), "mean_b": float(pb.mean()),
        "per_seed_a": xa.mean(axis=1).tolist(), "per_seed_b": xb.mean(axis=1).tolist(),
        "n_problems": len(diff), "n_seeds": (xa.shape[0], xb.shape[0]),
        "n_boot": n_boot, "alpha": alpha, "seed": seed,
    }


EFFICIENCY_STATISTICS = ("max", "at_baseline_best")


def scaling_efficiency_interval(
    baseline: Sequence[tuple[float, Sequence[float]]],
    candidate: Sequence[tuple[float, Sequence[float]]],
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    max_not_measurable: float = 0.05,
    grid_points: int = 201,
) -> dict:
    """``scaling_efficiency`` with a paired percentile bootstrap interval over problems.

    Each curve is a list of (compute, per-problem values) points: the values behind the
    point's accuracy (0/1 correctness or per-problem accuracy, shape (problems,) or
    (seeds, problems)), column i being the same problem i at every point of both curves.
    The accuracy of a point is the mean of its values; compute is taken as fixed (it is a
    mean token count over all traces, far less noisy than accuracy, and it is not resampled).

    Resampling: each of ``n_boot`` resamples draws problem indices with replacement once
    and applies them to every point of both curves (and every seed), so the curves move
    together as they would on another draw of problems from the same distribution (paired,
    as in ``paired_bootstrap_diff``). ``scaling_efficiency`` is recomputed on the resampled
    curves, and the alpha/2 and 1 - alpha/2 quantiles of each statistic are reported for
    ``max`` and ``at_baseline_best``. This is the plain percentile interval of the statistic
    as defined; no bias correction (``max`` over levels is biased upwards under noise).

    Not measurable. A resample in which a statistic has no value (the resampled curves do not
    overlap in a range of positive width, or, for at_baseline_best, the candidate does not
    reach the baseline's best accuracy) is counted in ``n_not_measurable`` and left out of
    the percentiles. Leaving out a fraction f of the resamples can move each reported bound
    by up to f in probability (if the left-out ones all sit in one tail, which is typical:
    "candidate dominates" resamples are the very efficient ones), so a nominal 95% interval
    may cover only 95% - f. Hence when f > ``max_not_measurable`` (default 5%), or when the
    point estimate itself is not measurable, the interval is None with status
    "not_measurable" rather than a number that would look more precise than it is.

    Returns {"point": scaling_efficiency on the full data, "max": {...},
    "at_baseline_best": {...}, "n_problems", "n_boot", "alpha", "seed",
    "max_not_measurable"}, each statistic's dict holding "estimate" (None when not
    measurable), "interval" ((lo, hi) or None), "status" ("ok" or "not_measurable"),
    "n_measurable", "n_not_measurable".
    """
    _check_boot(n_boot, alpha)
    if not (0.0 <= max_not_measurable < 1.0):
        raise ValueError(f"max_not_measurable must be in [0, 1), got {max_not_measurable}")
    curves = []
    for name, curve in (("baseline", baseline), ("candidate", candidate)):
        if len(curve) == 0:
            raise ValueError(f"{name} has no points")
        comp = [float(c) for c, _ in curve]
        vals = [_seed_problem_matrix(v, f"{name} point {j}").mean(axis=0) for j, (_, v) in enumerate(curve)]
        if len({len(v) for v in vals}) != 1:
            raise ValueError(f"{name}: every point must have values for the same problems")
        curves.append((comp, np.stack(vals)))
    (comp_b, vals_b), (comp_c, vals_c) = curves
    n_problems = vals_b.shape[1]
    if vals_c.shape[1] != n_problems:
        raise ValueError(f"baseline and candidate must cover the same problems, got {n_problems} "
                         f"and {vals_c.shape[1]}")
    vals = np.concatenate([vals_b, vals_c])  # (points of both curves, problems)
    nb = len(comp_b)

    def efficiency_of(acc: np.ndarray) -> dict:
        return scaling_efficiency(list(zip(comp_b, acc[:nb].tolist())), list(zip(comp_c, acc[nb:].tolist())),
                                  grid_points=grid_points)

    point = efficiency_of(vals.mean(axis=1))
    draws = _problem_draws(n_problems, n_boot, seed)
    samples: dict[str, list[float]] = {k: [] for k in EFFICIENCY_STATISTICS}
    chunk = max(1, 4_000_000 // (vals.shape[0] * n_problems))  # bound the gathered array's size
    for start in range(0, n_boot, chunk):
        acc_chunk = vals[:, draws[start : start + chunk]].mean(axis=2)  # (points, resamples)
        for acc in acc_chunk.T:
            res = efficiency_of(acc)
            for key in EFFICIENCY_STATISTICS:
                if res["status"] == "ok" and res[key] is not None:
                    samples[key].append(res[key])
    out: dict = {"point": point, "n_problems": n_problems, "n_boot": n_boot, "alpha": alpha, "seed": seed,
                 "max_not_measurable": max_not_measurable}
    for key in EFFICIENCY_STATISTICS:
        estimate = point[key] if point["status"] == "ok" else None
        n_ok = len(samples[key])
        measurable = estimate is not None and (n_boot - n_ok) <= max_not_measurable * n_boot
        out[key] = {
            "estimate": estimate,
            "interval": _percentile(np.array(samples[key]), alpha) if measurable else None,
            "status": "ok" if measurable else "not_measurable",
            "n_measurable": n_ok, "n_not_measurable": n_boot - n_ok,
        }
    return out
