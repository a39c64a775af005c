"""Evaluation metrics against brute force and hand-computed values."""

import itertools
import math
import random
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from spiral_cli.metrics import (
    accuracy_at_compute,
    bootstrap_accuracy,
    bootstrap_ci,
    compute_to_reach,
    majority_at_k_expected,
    majority_vote,
    paired_bootstrap_diff,
    pass_at_k,
    scaling_efficiency,
    scaling_efficiency_interval,
    wilson_interval,
)

# --------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize("c", range(7))
@pytest.mark.parametrize("k", range(1, 7))
def test_pass_at_k_matches_enumeration(c, k):
    n = 6
    flags = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    exact = Fraction(sum(any(flags[i] for i in s) for s in subsets), len(subsets))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_hand_values_and_large_n():
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # Large n: binomials would be huge; the product form stays in [0, 1].
    v = pass_at_k(1024, 3, 256)
    assert v == pytest.approx(1 - math.comb(1021, 256) / math.comb(1024, 256))


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# --------------------------------------------------------------------------- majority vote


def test_majority_vote_basic_and_none():
    assert majority_vote(["a", "b", "a"]) == "a"
    assert majority_vote([None, "x", None]) == "x"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_majority_vote_tie_first_occurrence():
    assert majority_vote(["b", "a", "a", "b"]) == "b"
    assert majority_vote([None, "c", "a", "a", "c"]) == "c"


def test_final_answer_index_is_the_first_member_with_the_vote():
    from spiral_cli.metrics import final_answer_index

    assert final_answer_index(["b", "a", "a"]) == 1
    assert final_answer_index([None, "c", "a", "a", "c"]) == 1  # tie: the first tied answer
    assert final_answer_index([None, None]) == 0  # no answer: the first member (wrong)


def test_majority_vote_tie_random():
    answers = ["b", "a", "a", "b", "z"]
    picks = {majority_vote(answers, rng=random.Random(s), tie_break="random") for s in range(50)}
    assert picks == {"a", "b"}
    picks = {majority_vote(answers, rng=np.random.default_rng(s), tie_break="random") for s in range(50)}
    assert picks == {"a", "b"}
    # Default rng is seeded: reproducible.
    assert majority_vote(answers, tie_break="random") == majority_vote(answers, tie_break="random")
    with pytest.raises(ValueError):
        majority_vote(answers, tie_break="last")


def _brute_majority_at_k(answers, is_right, k):
    """Independent brute force: average fractional tie credit over all size-k subsets."""
    credits = []
    for subset in itertools.combinations(range(len(answers)), k):
        counts = Counter(answers[i] for i in subset if answers[i] is not None)
        if not counts:
            credits.append(Fraction(0))
            continue
        top = max(counts.values())
        tied = [a for a, c in counts.items() if c == top]
        credits.append(Fraction(sum(is_right(a) for a in tied), len(tied)))
    return float(sum(credits) / len(credits))


def test_majority_at_k_hand_case():
    # Pool a, a, b with "a" correct.
    # k=2: {a,a} -> 1; {a,b} twice -> tie, credit 1/2 each -> (1 + 1/2 + 1/2) / 3 = 2/3.
    answers = ["a", "a", "b"]
    flags = [True, True, False]
    assert majority_at_k_expected(answers, flags, 1) == pytest.approx(2 / 3)
    assert majority_at_k_expected(answers, flags, 2) == pytest.approx(2 / 3)
    assert majority_at_k_expected(answers, flags, 3) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_majority_at_k_matches_brute_force(seed):
    rng = random.Random(seed)
    answers = [rng.choice(["1", "2", "3", None]) for _ in range(9)]
    right = "2"
    flags = [a == right for a in answers]
    for k in range(1, 10):
        expected = _brute_majority_at_k(answers, lambda a: a == right, k)
        assert majority_at_k_expected(answers, flags, k) == pytest.approx(expected, abs=1e-12)
        assert majority_at_k_expected(answers, lambda a: a == right, k) == pytest.approx(expected, abs=1e-12)


def test_majority_at_k_several_correct_spellings():
    answers = ["0.5", "1/2", "3", "3"]
    is_right = lambda a: a in ("0.5", "1/2")  # noqa: E731
    for k in range(1, 5):
        assert majority_at_k_expected(answers, is_right, k) == pytest.approx(
            _brute_majority_at_k(answers, is_right, k), abs=1e-12
        )


def test_majority_at_k_monte_carlo_close_to_exact():
    rng = random.Random(1)
    answers = [rng.choice(["x", "y", "z"]) for _ in range(14)]
    flags = [a == "y" for a in answers]
    exact = majority_at_k_expected(answers, flags, 7)  # C(14, 7) = 3432: enumerated
    mc = majority_at_k_expected(answers, flags, 7, exact_limit=0, n_mc=20_000, seed=3)
    assert mc == pytest.approx(exact, abs=0.02)  # standard error <= 0.5/sqrt(2e4) ≈ 0.0035
    assert mc == majority_at_k_expected(answers, flags, 7, exact_limit=0, n_mc=20_000, seed=3)


def test_majority_at_k_all_none_earns_nothing():
    assert majority_at_k_expected([None, None], [False, False], 1) == 0.0
    # k=1 over [None, "a"]: half the subsets have no answer.
    assert majority_at_k_expected([None, "a"], [False, True], 1) == pytest.approx(0.5)


def test_majority_at_k_rejects_inconsistent_flags():
    with pytest.raises(ValueError):
        majority_at_k_expected(["a", "a"], [True, False], 1)
    with pytest.raises(ValueError):
        majority_at_k_expected(["a"], [True], 2)


# --------------------------------------------------------------------------- intervals


def test_wilson_known_values():
    # Hand check, z = 1.96, n = 10: z²/n = 0.38416, 1 + z²/n = 1.38416.
    # 0/10: centre = half = 0.19208 / 1.38416 = 0.138770 -> (0, 0.277540)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.277540, abs=1e-6)
    # 5/10: half = 1.96/1.38416 * sqrt(0.025 + 0.009604) = 0.263410 -> (0.236590, 0.763410)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.236590, abs=1e-6), pytest.approx(0.763410, abs=1e-6))
    # 10/10: mirror image of 0/10.
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.722460, abs=1e-6) and hi == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_bootstrap_ci():
    assert bootstrap_ci([0.5] * 20) == (0.5, 0.5)
    values = np.random.default_rng(0).normal(1.0, 1.0, size=200)
    lo, hi = bootstrap_ci(values, n_boot=2000, seed=1)
    assert lo < values.mean() < hi
    # Roughly ±1.96 standard errors of the mean.
    se = values.std(ddof=1) / math.sqrt(len(values))
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(values, seed=1)
    lo_m, hi_m = bootstrap_ci(values, statistic=np.median, seed=1)
    assert lo_m < np.median(values) < hi_m
    with pytest.raises(ValueError):
        bootstrap_ci([])


# --------------------------------------------------------------------------- scaling efficiency


def test_log_linear_interpolation_by_hand():
    curve = [(100, 0.2), (400, 0.6)]
    # 200 is halfway between 100 and 400 in log2 (log2 100 + 1): accuracy 0.4.
    assert accuracy_at_compute(curve, 200) == pytest.approx(0.4)
    assert compute_to_reach(curve, 0.4) == pytest.approx(200)
    # 0.5 is 3/4 of the way: 100 * 2^(2 * 0.75) = 100 * 2^1.5 = 282.84...
    assert compute_to_reach(curve, 0.5) == pytest.approx(100 * 2**1.5)
    assert accuracy_at_compute(curve, 50) is None  # below the cheapest measurement
    assert accuracy_at_compute(curve, 1000) == pytest.approx(0.6)  # no extrapolation
    assert compute_to_reach(curve, 0.7) is None
    assert compute_to_reach(curve, 0.1) == 100  # censored at the cheapest point


def test_running_max_and_first_crossing():
    curve = [(100, 0.5), (200, 0.3), (400, 0.7)]  # a noisy dip at 200
    assert accuracy_at_compute(curve, 200) == pytest.approx(0.5)  # running max keeps 0.5
    # At 300 the raw line is 0.3 + 0.4 * log2(1.5) = 0.5340 > 0.5.
    assert accuracy_at_compute(curve, 300) == pytest.approx(0.3 + 0.4 * math.log2(1.5))
    # 0.6 is first reached on 200..400 at t = (0.6 - 0.3) / 0.4 = 0.75 -> 200 * 2^0.75.
    assert compute_to_reach(curve, 0.6) == pytest.approx(200 * 2**0.75)
    assert compute_to_reach(curve, 0.5) == 100


def test_identical_curves_efficiency_one():
    curve = [(1000, 0.1), (2000, 0.25), (4000, 0.3), (8000, 0.45)]
    out = scaling_efficiency(curve, curve)
    assert out["status"] == "ok" and out["overlap"] is True
    assert out["max"] == pytest.approx(1.0)
    assert out["at_baseline_best"] == pytest.approx(1.0)
    assert all(r == pytest.approx(1.0) for _, r in out["levels"])
    assert out["accuracy_range"] == (0.1, 0.45)


def test_four_times_cheaper_candidate_is_four_everywhere():
    baseline = [(1000, 0.1), (2000, 0.25), (4000, 0.3), (8000, 0.45)]
    candidate = [(c / 4, a) for c, a in baseline]
    out = scaling_efficiency(baseline, candidate)
    assert out["status"] == "ok"
    assert out["max"] == pytest.approx(4.0)
    assert out["at_baseline_best"] == pytest.approx(4.0)
    assert all(r == pytest.approx(4.0) for _, r in out["levels"])
    assert len(out["levels"]) >= 201


def test_docstring_worked_example():
    out = scaling_efficiency([(100, 0.2), (400, 0.6)], [(50, 0.4), (200, 0.8)])
    assert out["accuracy_range"] == (0.4, 0.6)
    assert out["max"] == pytest.approx(4.0)
    assert out["at_baseline_best"] == pytest.approx(4.0)


def test_efficiency_grows_along_the_curve_by_hand():
    # Baseline gains 0.1 per doubling from (100, 0.2); candidate 0.2 per doubling from (100, 0.4).
    baseline = [(100, 0.2), (1600, 0.6)]
    candidate = [(100, 0.4), (200, 0.6)]
    out = scaling_efficiency(baseline, candidate)

    def ratio_at(a):
        return min(out["levels"], key=lambda pair: abs(pair[0] - a))[1]

    # a = 0.4: C_b = 100 * 2^2 = 400, C_c = 100 -> 4
    assert ratio_at(0.4) == pytest.approx(4.0)
    # a = 0.5: C_b = 100 * 2^3 = 800, C_c = 100 * 2^0.5 -> 800 / 141.42 = 5.657
    assert ratio_at(0.5) == pytest.approx(8 / math.sqrt(2))
    # a = 0.6: C_b = 1600, C_c = 200 -> 8 (the maximum, at the baseline's best accuracy)
    assert out["max"] == pytest.approx(8.0)
    assert out["max_level"] == pytest.approx(0.6)
    assert out["at_baseline_best"] == pytest.approx(8.0)


def test_candidate_never_reaches_baseline_best():
    baseline = [(100, 0.2), (400, 0.6)]
    candidate = [(100, 0.3), (200, 0.4)]
    out = scaling_efficiency(baseline, candidate)
    assert out["status"] == "ok"
    assert out["accuracy_range"] == (0.3, 0.4)
    assert out["at_baseline_best"] is None
    # a = 0.4: C_b = 200, C_c = 200 -> 1; a = 0.3: C_b = 100 * 2^0.5, C_c = 100 -> 1.414
    assert out["max"] == pytest.approx(math.sqrt(2))


def test_no_overlap_statuses():
    # Candidate at its lowest compute (200) beats the baseline's best (0.3 at 1000).
    out = scaling_efficiency([(100, 0.1), (1000, 0.3)], [(200, 0.5), (400, 0.6)])
    assert out["overlap"] is False and out["status"] == "candidate_dominates"
    assert out["lower_bound"] == pytest.approx(1000 / 200)
    assert out["max"] is None and out["levels"] == []
    # Same accuracies but the candidate was only measured at more compute: weak bound < 1.
    out = scaling_efficiency([(100, 0.1), (1000, 0.3)], [(2000, 0.5)])
    assert out["status"] == "no_overlap" and out["lower_bound"] == pytest.approx(0.5)
    # Baseline at its lowest compute (100) beats everything the candidate reached by 400.
    out = scaling_efficiency([(100, 0.7), (200, 0.8)], [(100, 0.2), (400, 0.5)])
    assert out["overlap"] is False and out["status"] == "baseline_dominates"
    assert out["upper_bound"] == pytest.approx(100 / 400)
    out = scaling_efficiency([(1000, 0.7)], [(10, 0.2), (100, 0.5)])
    assert out["status"] == "no_overlap" and out["upper_bound"] == pytest.approx(10.0)


def test_single_point_overlap_is_not_measurable():
    # Overlap is the single level 0.5; duplicate compute keeps the best accuracy (0.5 at 50).
    # The candidate reaches 0.5 at its cheapest point, so C_c(0.5) = 50 is censored (it might
    # need less): 400 / 50 = 8 is only a lower bound, never an efficiency. (This used to be
    # status "ok" with max 8.)
    out = scaling_efficiency([(100, 0.3), (400, 0.5)], [(50, 0.5), (50, 0.4), (100, 0.7)])
    assert out["status"] == "not_measurable" and out["overlap"] is True
    assert out["accuracy_range"] == (0.5, 0.5)
    assert out["max"] is None and out["max_level"] is None and out["at_baseline_best"] is None
    assert out["levels"] == []
    assert out["censored_ratio"] == pytest.approx(400 / 50)
    assert out["lower_bound"] == pytest.approx(8.0) and out["upper_bound"] is None


def test_single_point_overlap_bound_directions():
    # Baseline censored at its cheapest point (0.5 at 100, could need less), the candidate
    # crosses 0.5 at 200 (its best): efficiency <= 100 / 200.
    out = scaling_efficiency([(100, 0.5), (400, 0.7)], [(100, 0.3), (200, 0.5)])
    assert out["status"] == "not_measurable" and out["max"] is None
    assert out["upper_bound"] == pytest.approx(0.5) and out["lower_bound"] is None
    # Flat baseline at 0.5, the candidate crosses 0.5 halfway from 100 to 400 (at 200).
    out = scaling_efficiency([(100, 0.5)], [(100, 0.3), (400, 0.7)])
    assert out["status"] == "not_measurable" and out["accuracy_range"] == (0.5, 0.5)
    assert out["upper_bound"] == pytest.approx(100 / 200)
    # Both flat at 0: both censored, the ratio 100 / 50 bounds nothing.
    out = scaling_efficiency([(100, 0.0), (200, 0.0)], [(50, 0.0), (100, 0.0)])
    assert out["status"] == "not_measurable" and out["censored_ratio"] == pytest.approx(2.0)
    assert out["lower_bound"] is None and out["upper_bound"] is None and out["max"] is None


def test_levels_match_scalar_compute_to_reach():
    # The vectorised level evaluation follows the first crossing, dips included.
    baseline = [(100, 0.2), (200, 0.5), (400, 0.3), (800, 0.7)]
    candidate = [(50, 0.25), (100, 0.45), (400, 0.8)]
    out = scaling_efficiency(baseline, candidate)
    for a, ratio in out["levels"]:
        assert ratio == pytest.approx(compute_to_reach(baseline, a) / compute_to_reach(candidate, a), rel=1e-12)
    # a = 0.45 (a measured level): the baseline first reaches it on 100..200 at t = 0.25 / 0.3
    # -> 100 * 2^(5/6) (not after its dip); the candidate at its point (100, 0.45).
    (ratio,) = [r for a, r in out["levels"] if a == 0.45]
    assert ratio == pytest.approx(2 ** (5 / 6))
    # a = 0.7, the baseline's best (at 800); candidate on 100..400 at t = 0.25 / 0.35 -> 100 * 4^(5/7).
    assert out["at_baseline_best"] == pytest.approx(800 / (100 * 4 ** (5 / 7)))


@pytest.mark.parametrize("bad", [[], [(0, 0.5)], [(-1, 0.5)], [(10, float("nan"))], [(10,)]])
def test_scaling_efficiency_rejects_bad_curves(bad):
    with pytest.raises(ValueError):
        scaling_efficiency(bad, [(10, 0.5)])


# --------------------------------------------------------------------------- intervals over problems and seeds

# numpy.random.default_rng(0).integers(0, 3, size=(4, 3)): the problem draws of the hand checks below.
DRAWS_SEED0_P3_B4 = [[2, 1, 1], [0, 0, 0], [0, 0, 0], [2, 1, 2]]


def test_problem_draws_are_the_documented_ones():
    # The hand checks replay these draws; if numpy ever changes its generator, this says so first.
    assert np.random.default_rng(0).integers(0, 3, size=(4, 3)).tolist() == DRAWS_SEED0_P3_B4


def test_paired_diff_hand_percentile_with_seeds():
    # Arm a: two seeds, arm b: one seed, on the same three problems.
    a = [[1, 0, 1], [1, 1, 0]]  # seed-mean per problem: 1, 0.5, 0.5
    b = [0, 0.5, 0]
    # per-problem differences d = (1, 0, 0.5); estimate = mean d = 0.5 = 2/3 - 1/6
    # resample means over the draws: [2,1,1] -> (0.5+0+0)/3 = 1/6, [0,0,0] -> 1, [0,0,0] -> 1,
    # [2,1,2] -> (0.5+0+0.5)/3 = 1/3; sorted 1/6, 1/3, 1, 1.
    # 2.5% quantile at position 0.025 * 3 = 0.075: 1/6 + 0.075 * (1/3 - 1/6) = 0.1791666...
    # 97.5% quantile at position 2.925: 1 + 0.925 * (1 - 1) = 1
    out = paired_bootstrap_diff(a, b, n_boot=4, seed=0)
    assert out["estimate"] == pytest.approx(0.5)
    assert out["mean_a"] == pytest.approx(2 / 3) and out["mean_b"] == pytest.approx(1 / 6)
    assert out["per_seed_a"] == pytest.approx([2 / 3, 2 / 3]) and out["per_seed_b"] == pytest.approx([1 / 6])
    assert out["interval"] == (pytest.approx(1 / 6 + 0.075 / 6), pytest.approx(1.0))
    assert out["n_problems"] == 3 and out["n_seeds"] == (2, 1) and out["n_boot"] == 4


def test_paired_constant_difference_has_zero_width():
    # Exact binary fractions: every per-problem difference is exactly 0.5.
    a = [1, 1, 0.5, 0.75]
    b = [0.5, 0.5, 0, 0.25]
    out = paired_bootstrap_diff(a, b)
    assert out["estimate"] == 0.5 and out["interval"] == (0.5, 0.5)
    # Each arm on its own varies with the problems drawn ...
    wa = bootstrap_accuracy(a)["interval"]
    wb = bootstrap_accuracy(b)["interval"]
    assert wa[1] - wa[0] > 0.2 and wb[1] - wb[0] > 0.2
    # ... and unpaired draws (independent problems per arm) would give a wide interval.
    rng = np.random.default_rng(0)
    ia, ib = rng.integers(0, 4, size=(2000, 4)), rng.integers(0, 4, size=(2000, 4))
    unpaired = np.array(a)[ia].mean(axis=1) - np.array(b)[ib].mean(axis=1)
    lo, hi = np.quantile(unpaired, [0.025, 0.975])
    assert hi - lo > 0.4


def test_bootstrap_accuracy_by_hand():
    # Two problems, 0 and 1: a resample mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so
    # the 2.5% / 97.5% quantiles are 0 and 1, and the 30% / 70% ones both 0.5 (the 25% mass at
    # 0 ends more than 5 standard errors, 5 x 0.0097, before the 30% point with 2000 resamples).
    out = bootstrap_accuracy([0, 1])
    assert out["estimate"] == 0.5 and out["interval"] == (0.0, 1.0)
    assert bootstrap_accuracy([0, 1], alpha=0.6)["interval"] == (0.5, 0.5)
    # Seeds: mean over seeds and problems, seeds reported apart.
    out = bootstrap_accuracy([[1, 0, 1, 1], [0, 0, 1, 1]])
    assert out["estimate"] == pytest.approx(5 / 8) and out["per_seed"] == [0.75, 0.5]
    assert out["n_seeds"] == 2 and out["n_problems"] == 4
    # Reproducible; a different seed draws differently.
    x = np.random.default_rng(3).random(30)
    assert bootstrap_accuracy(x, seed=1) == bootstrap_accuracy(x, seed=1)
    assert bootstrap_accuracy(x, seed=1)["interval"] != bootstrap_accuracy(x, seed=2)["interval"]


@pytest.mark.parametrize("bad", [[], [[]], [[[1]]], [float("nan")]])
def test_bootstrap_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        bootstrap_accuracy(bad)


def test_paired_diff_rejects_different_problems():
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1, 0, 1], [1, 0])
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1, 0], [1, 0], alpha=0)


def test_efficiency_interval_identical_problems_is_exact():
    # Every problem the same: every resample is the data itself -> zero width at the exact value
    # (the docstring example of scaling_efficiency: 4.0).
    baseline = [(100, [0.2] * 5), (400, [0.6] * 5)]
    candidate = [(50, [0.4] * 5), (200, [0.8] * 5)]
    out = scaling_efficiency_interval(baseline, candidate, n_boot=200)
    for key in ("max", "at_baseline_best"):
        stat = out[key]
        assert stat["estimate"] == pytest.approx(4.0)
        assert stat["interval"] == (stat["estimate"], stat["estimate"])
        assert stat["status"] == "ok" and stat["n_not_measurable"] == 0 and stat["n_measurable"] == 200
    assert out["point"]["status"] == "ok" and out["n_problems"] == 5


def test_efficiency_interval_is_paired():
    # Per problem the candidate is the baseline shifted up by 0.2 at half the compute, with the
    # same slope, so on any draw of problems the efficiency is 2 * 4^(0.2 / 0.4) = 4 -- although
    # the accuracies themselves move from draw to draw.
    baseline = [(100, [0.2, 0.4]), (400, [0.6, 0.8])]
    candidate = [(50, [0.4, 0.6]), (200, [0.8, 1.0])]
    out = scaling_efficiency_interval(baseline, candidate, n_boot=300)
    assert out["max"]["interval"] == (pytest.approx(4.0), pytest.approx(4.0))
    lo, hi = bootstrap_accuracy([0.2, 0.4])["interval"]
    assert hi - lo == pytest.approx(0.2)
    # Unpaired, a draw could pair the baseline on problem 0 with the candidate on problem 1:
    # the curves would only touch at 0.6 and there would be no efficiency at all.
    assert scaling_efficiency([(100, 0.2), (400, 0.6)], [(50, 0.6), (200, 1.0)])["status"] == "not_measurable"


def test_efficiency_interval_hand_percentile():
    # Per problem both curves rise by 0.4 (slope s = 0.4 per 2 doublings); the candidate starts
    # delta_i higher at half the compute: delta = (0, 0.2, 0.4). On a draw with mean delta d the
    # efficiency is the same at every level: 100 * 4^(d / 0.4) / 50 = 2 * 2^(5 d).
    baseline = [(100, [0.2, 0.2, 0.2]), (400, [0.6, 0.6, 0.6])]
    candidate = [(50, [0.2, 0.4, 0.6]), (200, [0.6, 0.8, 1.0])]
    # point: d = 0.2 -> 4. Draws (DRAWS_SEED0_P3_B4): [2,1,1] d = 0.8/3 -> 2 * 2^(4/3);
    # [0,0,0] d = 0 -> 2 (twice); [2,1,2] d = 1/3 -> 2 * 2^(5/3). Sorted: 2, 2, 5.040, 6.350.
    # 2.5%: position 0.075 -> 2; 97.5%: position 2.925 -> s2 + 0.925 * (s3 - s2).
    s2, s3 = 2 * 2 ** (4 / 3), 2 * 2 ** (5 / 3)
    out = scaling_efficiency_interval(baseline, candidate, n_boot=4, seed=0)
    for key in ("max", "at_baseline_best"):
        assert out[key]["estimate"] == pytest.approx(4.0)
        assert out[key]["interval"] == (pytest.approx(2.0), pytest.approx(s2 + 0.925 * (s3 - s2)))


def _touching_share(baseline, candidate):
    """Exact share of resamples without an efficiency: enumerate all n^n equally likely draws."""
    n = len(baseline[0][1])
    bad = 0
    for draw in itertools.product(range(n), repeat=n):
        acc = lambda v: sum(v[i] for i in draw) / n  # noqa: E731, B023 - used within this iteration
        res = scaling_efficiency([(c, acc(v)) for c, v in baseline], [(c, acc(v)) for c, v in candidate])
        bad += res["status"] != "ok"
    return bad / n**n


def test_efficiency_interval_not_measurable():
    # Point estimate: both curves 1/3 -> 2/3, the candidate at half the compute: efficiency 2.
    # But on 3 problems many draws leave curves that do not overlap (e.g. draw [0,0,0]: the
    # baseline is flat at 0, the candidate 0 -> 1).
    baseline = [(100, [0, 0, 1]), (200, [0, 1, 1])]
    candidate = [(50, [0, 1, 0]), (100, [1, 1, 0])]
    share = _touching_share(baseline, candidate)
    assert share > 0.05
    out = scaling_efficiency_interval(baseline, candidate, n_boot=2000)
    assert out["point"]["status"] == "ok" and out["max"]["estimate"] == pytest.approx(2.0)
    stat = out["max"]
    assert stat["status"] == "not_measurable" and stat["interval"] is None
    assert stat["n_not_measurable"] + stat["n_measurable"] == 2000
    sd = math.sqrt(share * (1 - share) / 2000)
    assert stat["n_not_measurable"] / 2000 == pytest.approx(share, abs=4 * sd)
    # Allowing that share of unmeasurable resamples gives a number again.
    loose = scaling_efficiency_interval(baseline, candidate, n_boot=2000, max_not_measurable=0.99)
    assert loose["max"]["status"] == "ok" and loose["max"]["interval"][0] <= 2.0 <= loose["max"]["interval"][1]


def test_efficiency_interval_point_not_measurable():
    # Touching curves: no point estimate, hence no interval, even if resamples had values.
    baseline = [(100, [0.3, 0.3]), (400, [0.5, 0.5])]
    candidate = [(50, [0.5, 0.5]), (100, [0.7, 0.7])]
    out = scaling_efficiency_interval(baseline, candidate, n_boot=50)
    assert out["point"]["status"] == "not_measurable"
    for key in ("max", "at_baseline_best"):
        assert out[key] == {"estimate": None, "interval": None, "status": "not_measurable",
                            "n_measurable": 0, "n_not_measurable": 50}


def test_efficiency_interval_rejects_mismatched_problems():
    with pytest.raises(ValueError):
        scaling_efficiency_interval([(100, [0, 1]), (200, [1, 1, 0])], [(100, [0, 1])])
    with pytest.raises(ValueError):
        scaling_efficiency_interval([(100, [0, 1])], [(100, [0, 1, 1])])
    with pytest.raises(ValueError):
        scaling_efficiency_interval([], [(100, [0, 1])])
