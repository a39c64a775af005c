"""Advantage math for SPIRAL set RL, aggregation RL and GRPO, against hand-computed numbers."""

import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from spiral_cli.rl import advantages as adv_mod
from spiral_cli.rl.advantages import (
    grpo_advantages,
    grpo_advantages_batch,
    has_signal,
    length_gate,
    proposition_constant,
    sample_subsets,
    set_advantages,
    set_advantages_batch,
)
from spiral_cli.rl.rollout import (
    PromptRollout,
    RolloutConfig,
    Sample,
    grpo_rollouts,
    scale_batch,
    spiral_rollouts,
)

# --------------------------------------------------------------------------- set advantages


def test_worked_example_four_traces_three_sets():
    # N1 = 4 search traces, K = 3 sets of size 2, N2 = 2 aggregations per set.
    # Trace 3 is in no set; traces 0, 1 and 2 are each in two sets.
    subsets = [(0, 1), (0, 2), (1, 2)]
    rewards = [
        [1.0, 0.5],  # G1: f1 = 0.75
        [1.0, 0.0],  # G2: f2 = 0.50
        [0.5, 0.0],  # G3: f3 = 0.25
    ]
    # f̄ = (0.75 + 0.50 + 0.25) / 3 = 0.5
    # A(G) = f - f̄ = [0.25, 0.0, -0.25]
    # A(y0) = mean(A(G1), A(G2)) = (0.25 + 0.0) / 2   =  0.125
    # A(y1) = mean(A(G1), A(G3)) = (0.25 - 0.25) / 2  =  0.0
    # A(y2) = mean(A(G2), A(G3)) = (0.0 - 0.25) / 2   = -0.125
    # A(y3) = 0 (in no sampled set)
    # A_ij = r_ij - f_i: G1 [0.25, -0.25], G2 [0.5, -0.5], G3 [0.25, -0.25]
    out = set_advantages(rewards, subsets, n_traces=4)
    assert out.set_scores == pytest.approx([0.75, 0.5, 0.25])
    assert out.baseline == pytest.approx(0.5)
    assert out.set_advantages == pytest.approx([0.25, 0.0, -0.25])
    assert out.search_advantages == pytest.approx([0.125, 0.0, -0.125, 0.0])
    assert out.membership == [2, 2, 2, 0]
    assert out.agg_advantages[0] == pytest.approx([0.25, -0.25])
    assert out.agg_advantages[1] == pytest.approx([0.5, -0.5])
    assert out.agg_advantages[2] == pytest.approx([0.25, -0.25])


def test_trace_in_one_set_gets_that_sets_advantage():
    # Trace 0 is in all three sets, traces 1..3 in one each.
    subsets = [(0, 1), (0, 2), (0, 3)]
    rewards = [[1.0], [0.0], [0.5]]  # f = [1, 0, 0.5], f̄ = 0.5, A(G) = [0.5, -0.5, 0]
    out = set_advantages(rewards, subsets, n_traces=4)
    # A(y0) = (0.5 - 0.5 + 0) / 3 = 0; the others inherit their only set's advantage.
    assert out.search_advantages == pytest.approx([0.0, 0.5, -0.5, 0.0])
    assert out.membership == [3, 1, 1, 1]


def test_all_equal_rewards_give_zero_advantages_and_no_signal():
    subsets = [(0, 1, 2, 3), (4, 5, 6, 7), (0, 2, 4, 6), (1, 3, 5, 7)]
    rewards = [[1.0] * 4 for _ in subsets]
    for scale in ("none", "group"):
        out = set_advantages(rewards, subsets, n_traces=8, scale_rewards=scale)
        assert out.set_advantages == [0.0] * 4
        assert out.search_advantages == [0.0] * 8
        assert all(a == 0.0 for row in out.agg_advantages for a in row)
        assert not has_signal(out.search_advantages)
        assert not has_signal(out.agg_advantages)


def test_single_set_is_its_own_baseline():
    out = set_advantages([[1.0, 0.0]], [(0, 1)], n_traces=3)
    assert out.set_advantages == [0.0]
    assert out.search_advantages == [0.0, 0.0, 0.0]
    assert out.agg_advantages == [[0.5, -0.5]]


def test_scale_rewards_group_hand_case():
    # f = [1.0, 0.5], f̄ = 0.75, A(G) = [0.25, -0.25]; population std of f = 0.25,
    # so scaled A(G) = ±0.25 / (0.25 + eps) ≈ ±1.
    # G1 rewards [1, 1]: std 0 -> A_1j = 0 / (0 + eps) = 0.
    # G2 rewards [1, 0]: f = 0.5, population std 0.5 -> A_2j = ±0.5 / 0.5 = ±1.
    eps = 1e-6
    out = set_advantages([[1.0, 1.0], [1.0, 0.0]], [(0, 1), (2, 3)], n_traces=4, scale_rewards="group", eps=eps)
    assert out == set_advantages([[1.0, 1.0], [1.0, 0.0]], [(0, 1), (2, 3)], 4, scale_rewards=True, eps=eps)
    s = 0.25 / (0.25 + eps)
    assert out.set_advantages == pytest.approx([s, -s], rel=1e-12)
    assert out.search_advantages == pytest.approx([s, s, -s, -s], rel=1e-12)
    assert out.agg_advantages[0] == [0.0, 0.0]
    assert out.agg_advantages[1] == pytest.approx([0.5 / (0.5 + eps), -0.5 / (0.5 + eps)], rel=1e-12)
    # Unscaled for comparison: the paper's default.
    plain = set_advantages([[1.0, 1.0], [1.0, 0.0]], [(0, 1), (2, 3)], n_traces=4)
    assert plain.set_advantages == pytest.approx([0.25, -0.25])
    assert plain.agg_advantages[1] == pytest.approx([0.5, -0.5])


# Two prompts, two sets of two aggregations each (sets (0, 1) and (2, 3) of 4 search traces):
#   prompt 1: rewards [[1, 1], [1, 0]] -> f = [1, 0.5], f̄ = 0.75, A(G) = [+0.25, -0.25]
#   prompt 2: rewards [[0, 0], [1, 0]] -> f = [0, 0.5], f̄ = 0.25, A(G) = [-0.25, +0.25]
TWO_PROMPTS = [([[1.0, 1.0], [1.0, 0.0]], [(0, 1), (2, 3)], 4), ([[0.0, 0.0], [1.0, 0.0]], [(0, 1), (2, 3)], 4)]


def test_scale_rewards_batch_hand_case():
    # batch: all set scores [1, 0.5, 0, 0.5] (mean 0.5) have population variance
    # (0.25 + 0 + 0.25 + 0) / 4 = 0.125; all aggregation rewards [1, 1, 1, 0, 0, 0, 1, 0] have
    # population std 0.5. The centring stays per prompt and per set.
    eps = 1e-6
    one, two = set_advantages_batch(TWO_PROMPTS, scale_rewards="batch", eps=eps)
    s = 0.25 / (math.sqrt(0.125) + eps)  # ≈ 0.7071
    a = 0.5 / (0.5 + eps)
    assert one.set_advantages == pytest.approx([s, -s], rel=1e-12)
    assert two.set_advantages == pytest.approx([-s, s], rel=1e-12)
    assert one.search_advantages == pytest.approx([s, s, -s, -s], rel=1e-12)
    assert one.agg_advantages == [[0.0, 0.0], pytest.approx([a, -a], rel=1e-12)]
    assert two.agg_advantages == [[0.0, 0.0], pytest.approx([a, -a], rel=1e-12)]
    # group: prompt 2's own set-score std is 0.25 -> ±1; "none" keeps ±0.25
    g2 = set_advantages_batch(TWO_PROMPTS, scale_rewards="group", eps=eps)[1]
    assert g2.set_advantages == pytest.approx([-0.25 / (0.25 + eps), 0.25 / (0.25 + eps)], rel=1e-12)
    n2 = set_advantages_batch(TWO_PROMPTS, scale_rewards="none")[1]
    assert n2.set_advantages == pytest.approx([-0.25, 0.25]) and n2.agg_advantages[1] == pytest.approx([0.5, -0.5])
    with pytest.raises(ValueError, match="set_advantages_batch"):
        set_advantages(*TWO_PROMPTS[0], scale_rewards="batch")


def _rollout(search_adv, agg_adv, search_rewards, set_scores, agg_rewards) -> PromptRollout:
    samples = [Sample("p", [1], [0.0], a, 0.0, "search", 6) for a in search_adv]
    samples += [Sample("p", [1], [0.0], a, 0.0, "aggregate", 6) for a in agg_adv]
    return PromptRollout({}, samples, search_rewards, agg_rewards, set_scores)


def test_trainer_batch_scaling_matches_set_advantages_batch():
    # The trainer divides the centred ("none") advantages of the kept prompts once the step's
    # batch is complete; the result must be set_advantages_batch's "batch".
    plain = set_advantages_batch(TWO_PROMPTS, scale_rewards="none")
    rollouts = [_rollout(p.search_advantages, [a for row in p.agg_advantages for a in row], [],
                         p.set_scores, [r for row in agg for r in row]) for p, (agg, _, _) in zip(plain, TWO_PROMPTS)]
    scale_batch(rollouts, grpo=False)
    want = set_advantages_batch(TWO_PROMPTS, scale_rewards="batch")
    for r, w in zip(rollouts, want):
        got = [s.advantage for s in r.samples]
        assert got == pytest.approx(w.search_advantages + [a for row in w.agg_advantages for a in row], rel=1e-9)
    # a second rank holding the same prompts doubles every moment: the std is unchanged
    again = [_rollout(p.search_advantages, [], [], p.set_scores, [r for row in agg for r in row])
             for p, (agg, _, _) in zip(plain, TWO_PROMPTS)]
    scale_batch(again, grpo=False, all_sum=lambda xs: [2 * x for x in xs])
    assert [s.advantage for s in again[0].samples] == pytest.approx(want[0].search_advantages, rel=1e-9)


@pytest.mark.parametrize(
    "rewards, subsets, n_traces",
    [
        ([[1.0]], [(0, 1), (1, 2)], 3),  # counts differ
        ([[1.0], []], [(0, 1), (1, 2)], 3),  # empty reward row
        ([[1.0]], [(0, 3)], 3),  # index out of range
        ([[1.0]], [(1, 1)], 3),  # repeated trace
        ([], [], 3),  # no sets
    ],
)
def test_set_advantages_rejects_bad_input(rewards, subsets, n_traces):
    with pytest.raises(ValueError):
        set_advantages(rewards, subsets, n_traces)


# --------------------------------------------------------------------------- Proposition 3.1


def test_proposition_constant_by_hand():
    # N=4, n=2, K=1: (4)_2 = 12, (3)_2 = 6, q = 1 - C(6,1)/C(12,1) = 1/2, M = (4/2)(1/2) - 1 = 0.
    assert proposition_constant(4, 2, 1, exact=True) == 0
    # N=4, n=2, K=2: q = 1 - C(6,2)/C(12,2) = 1 - 15/66 = 17/22; M = 2 * 17/22 - 1 = 6/11.
    assert proposition_constant(4, 2, 2, exact=True) == Fraction(6, 11)
    assert proposition_constant(4, 2, 2) == pytest.approx(6 / 11)
    # N=3, n=1, K=2: (3)_1 = 3, (2)_1 = 2, q = 1 - C(2,2)/C(3,2) = 2/3, M = 3 * 2/3 - 1 = 1.
    assert proposition_constant(3, 1, 2, exact=True) == 1
    # K = all (N)_n tuples: every trace is covered, q = 1, M = N/n - 1.
    assert proposition_constant(4, 2, 12, exact=True) == 1
    # Paper setting N=8, n=4, K=4: (8)_4 = 1680, (7)_4 = 840,
    # C(840,4)/C(1680,4) = (840*839*838*837) / (1680*1679*1678*1677).
    ratio = (840 * 839 * 838 * 837) / (1680 * 1679 * 1678 * 1677)
    assert proposition_constant(8, 4, 4) == pytest.approx(2 * (1 - ratio) - 1, rel=1e-12)
    # Unordered analogue: C(8,4) = 70, C(7,4) = 35, q = 1 - C(35,4)/C(70,4).
    ratio_u = (35 * 34 * 33 * 32) / (70 * 69 * 68 * 67)
    assert proposition_constant(8, 4, 4, ordered=False) == pytest.approx(2 * (1 - ratio_u) - 1, rel=1e-12)


def test_proposition_constant_rejects_bad_sizes():
    with pytest.raises(ValueError):
        proposition_constant(4, 5, 1)
    with pytest.raises(ValueError):
        proposition_constant(4, 2, 13)  # only 12 ordered pairs exist


def _expected_estimator_ratio(N, n, K, p, f, ordered):
    """E[sum_y A(y) d/dθ log π(y)] / dJ/dθ, exact, for a Bernoulli(p = sigmoid θ) policy.

    Enumerates every draw of the N traces and every choice of K distinct groups, with the
    set value f known exactly (N2 -> infinity). d/dθ log π(y) = y - p.
    """
    groups = list((itertools.permutations if ordered else itertools.combinations)(range(N), n))
    choices = list(itertools.combinations(groups, K))
    estimate = Fraction(0)
    for ys in itertools.product([0, 1], repeat=N):
        prob = math.prod(p if y else 1 - p for y in ys)
        total = Fraction(0)
        for chosen in choices:
            values = [f(tuple(ys[i] for i in g)) for g in chosen]
            result = set_advantages([[float(v)] for v in values], list(chosen), N)
            # Rebuild the marginal advantage exactly (floats above only to exercise the API).
            fbar = sum(values, Fraction(0)) / K
            for i in range(N):
                inside = [v - fbar for v, g in zip(values, chosen) if i in g]
                exact_a = sum(inside, Fraction(0)) / len(inside) if inside else Fraction(0)
                assert result.search_advantages[i] == pytest.approx(float(exact_a), abs=1e-12)
                total += exact_a * (ys[i] - p)
        estimate += prob * total / len(choices)
    true_grad = Fraction(0)
    for t in itertools.product([0, 1], repeat=n):
        true_grad += math.prod(p if y else 1 - p for y in t) * f(t) * sum(y - p for y in t)
    return estimate / true_grad


@pytest.mark.parametrize("N, n, K", [(3, 2, 2), (4, 2, 2), (4, 3, 2), (3, 1, 2)])
def test_marginal_estimator_is_M_times_true_gradient_ordered(N, n, K):
    # An order-sensitive set value: the paper's statement is for ordered tuples.
    def f(t):
        return Fraction(2 * t[0] + t[-1] + (3 if all(t) else 0))

    ratio = _expected_estimator_ratio(N, n, K, Fraction(1, 3), f, ordered=True)
    assert ratio == proposition_constant(N, n, K, exact=True)


@pytest.mark.parametrize("N, n, K", [(3, 2, 2), (4, 2, 3), (5, 3, 2)])
def test_marginal_estimator_is_M_times_true_gradient_unordered(N, n, K):
    # Order-insensitive set value, unordered subsets (what sample_subsets draws).
    def f(t):
        return Fraction(sum(t) ** 2 + 1)

    ratio = _expected_estimator_ratio(N, n, K, Fraction(1, 3), f, ordered=False)
    assert ratio == proposition_constant(N, n, K, exact=True, ordered=False)


# --------------------------------------------------------------------------- subset sampling


def test_sample_subsets_shape_distinct_sorted():
    subsets = sample_subsets(8, 4, 4, rng=0)
    assert len(subsets) == 4
    assert len(set(subsets)) == 4
    for s in subsets:
        assert len(s) == 4
        assert list(s) == sorted(set(s))
        assert all(0 <= i < 8 for i in s)


def test_sample_subsets_reproducible():
    assert sample_subsets(8, 4, 4, rng=7) == sample_subsets(8, 4, 4, rng=7)
    assert sample_subsets(8, 4, 4, rng=random.Random(7)) == sample_subsets(8, 4, 4, rng=random.Random(7))
    a = sample_subsets(8, 4, 4, rng=np.random.default_rng(3))
    b = sample_subsets(8, 4, 4, rng=np.random.default_rng(3))
    assert a == b


def test_sample_subsets_all_when_k_equals_total():
    subsets = sample_subsets(5, 2, 10, rng=1)
    assert sorted(subsets) == list(itertools.combinations(range(5), 2))


def test_sample_subsets_raises_when_too_many():
    with pytest.raises(ValueError, match="only C\\(8, 4\\) = 70"):
        sample_subsets(8, 4, 71, rng=0)
    with pytest.raises(ValueError):
        sample_subsets(4, 5, 1, rng=0)
    with pytest.raises(ValueError):
        sample_subsets(4, 2, 0, rng=0)


def test_unranking_is_lexicographic_bijection():
    combos = [adv_mod._unrank_combination(r, 7, 3) for r in range(math.comb(7, 3))]
    assert combos == list(itertools.combinations(range(7), 3))


def test_sample_subsets_large_population_without_enumeration():
    # C(60, 30) ≈ 1.2e17: must not enumerate.
    subsets = sample_subsets(60, 30, 5, rng=0)
    assert len(set(subsets)) == 5
    assert all(len(s) == 30 and list(s) == sorted(set(s)) for s in subsets)


def _chi_square_uniform(draws, categories):
    counts = {c: 0 for c in categories}
    for d in draws:
        counts[d] += 1
    expected = len(draws) / len(categories)
    return sum((o - expected) ** 2 / expected for o in counts.values())


@pytest.mark.parametrize("force_rejection", [False, True])
def test_sample_subsets_roughly_uniform(monkeypatch, force_rejection):
    if force_rejection:  # exercise the large-population code path on a small case
        monkeypatch.setattr(adv_mod, "_EXACT_RANK_SAMPLING_LIMIT", 0)
    rng = random.Random(123)
    draws = [sample_subsets(5, 2, 1, rng)[0] for _ in range(20_000)]
    chi2 = _chi_square_uniform(draws, list(itertools.combinations(range(5), 2)))
    # 10 categories -> 9 degrees of freedom; P(chi2 > 27.88) = 0.001 under uniformity.
    assert chi2 < 27.88


# --------------------------------------------------------------------------- GRPO


def test_grpo_group_scaled_by_hand():
    # r = [1, 0, 0, 0]: mean 0.25; deviations [0.75, -0.25, -0.25, -0.25];
    # sample variance = (0.5625 + 3 * 0.0625) / 3 = 0.25 -> std 0.5 (ddof = 1, as torch).
    adv = grpo_advantages([1.0, 0.0, 0.0, 0.0])
    assert adv == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])
    assert adv == grpo_advantages([1.0, 0.0, 0.0, 0.0], scale_rewards="group")
    # Matches TRL's torch arithmetic: (r - r.mean()) / (r.std() + 1e-4).
    r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert adv == pytest.approx(((r - r.mean()) / (r.std() + 1e-4)).tolist())


def test_grpo_all_equal_is_zero_and_no_scaling_option():
    assert grpo_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    assert not has_signal(grpo_advantages([0.3, 0.3]))
    assert grpo_advantages([1.0, 0.0, 0.0, 0.0], scale_rewards=False) == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert grpo_advantages([1.0, 0.0, 0.0, 0.0], scale_rewards="none") == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert grpo_advantages([2.0]) == [0.0]  # a group of one: std 0 as in TRL


def test_grpo_batch_scaling_by_hand():
    # All rewards [1, 0, 1, 1]: mean 0.75, sample variance (0.0625*3 + 0.5625)/3 = 0.25 -> std 0.5.
    # Means stay per group: group 1 mean 0.5 -> ±0.5 / 0.5001; group 2 all equal -> 0.
    out = grpo_advantages_batch([[1.0, 0.0], [1.0, 1.0]], scale_rewards="batch")
    assert out[0] == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001])
    assert out[1] == [0.0, 0.0]
    # Group scaling: group 1 std = 0.7071 (sample std of [1, 0]).
    out = grpo_advantages_batch([[1.0, 0.0], [1.0, 1.0]], scale_rewards=True)
    assert out[0] == pytest.approx([0.5 / (math.sqrt(0.5) + 1e-4), -0.5 / (math.sqrt(0.5) + 1e-4)])


def test_grpo_rejects_unknown_mode():
    with pytest.raises(ValueError):
        grpo_advantages([1.0, 0.0], scale_rewards="sometimes")
    with pytest.raises(ValueError, match="grpo_advantages_batch"):
        grpo_advantages([1.0, 0.0], scale_rewards="batch")


class _ScriptedGenerator:
    """Returns fixed texts per prompt (cycled to n), so rewards are known in advance."""

    def __init__(self, texts: dict[str, list[str]]):
        self.texts = texts

    def generate(self, prompts, n=1, max_new_tokens=0, **kw):
        from fakes import completion

        return [[completion(self.texts.get(p, ["b", "a"])[j % len(self.texts.get(p, ["b", "a"]))], p)
                 for j in range(n)] for p in prompts]


@pytest.mark.parametrize("mode", ["group", "batch", "none"])
def test_grpo_rollouts_follow_scale_rewards(mode):
    # ToyTask: reward 1 when the first byte is even ("b" = 98), 0 otherwise ("a" = 97).
    # prompt q0 samples ["b", "a"] -> rewards [1, 0]; prompt q1 ["b", "b"] -> [1, 1].
    from toy_task import ToyTask

    gen = _ScriptedGenerator({"q0:": ["b", "a"], "q1:": ["b", "b"]})
    cfg = RolloutConfig(num_search=2, max_new_tokens=12, scale_rewards=mode)
    rollouts = grpo_rollouts(ToyTask(), gen, [{"q": 0}, {"q": 1}], cfg, seed=0)
    if mode == "batch":
        scale_batch(rollouts, grpo=True)
    got = [[s.advantage for s in r.samples] for r in rollouts]
    # group: sample std of [1, 0] = sqrt(0.5); batch: sample std of [1, 0, 1, 1] = 0.5 (TRL's)
    d = {"group": math.sqrt(0.5) + 1e-4, "batch": 0.5 + 1e-4, "none": 1.0}[mode]
    assert got[0] == pytest.approx([0.5 / d, -0.5 / d], rel=1e-9)
    assert got[1] == [0.0, 0.0]
    assert all(s.max_new_tokens == 12 for r in rollouts for s in r.samples)
    if mode != "none":
        want = grpo_advantages_batch([[1.0, 0.0], [1.0, 1.0]], scale_rewards=mode)
        assert got[0] == pytest.approx(want[0], rel=1e-9) and got[1] == want[1]


def test_spiral_rollouts_group_scaling_and_budgets():
    # One prompt, N1 = 2 traces "b" (right) and "a" (wrong); K = 1 set of both, N2 = 2
    # aggregations ["b", "a"] -> r = [1, 0]; f = 0.5 and the set is its own baseline (A(G) = 0).
    # group: A_ij = ±0.5 / (population std 0.5 + 1e-6); none: ±0.5.
    from toy_task import ToyTask

    task = ToyTask()
    p = {"q": 3}
    gen = _ScriptedGenerator({task.search_prompt(p): ["b", "a"]})
    for mode, want in (("group", 0.5 / (0.5 + 1e-6)), ("none", 0.5)):
        cfg = RolloutConfig(num_search=2, num_sets=1, set_size=2, num_aggregations=2, max_new_tokens=6,
                            agg_max_new_tokens=9, scale_rewards=mode)
        (r,) = spiral_rollouts(task, gen, gen, [p], cfg, random.Random(0), seed=0)
        agg = [s for s in r.samples if s.role == "aggregate"]
        assert [s.advantage for s in agg] == pytest.approx([want, -want], rel=1e-12)
        assert [s.max_new_tokens for s in r.samples] == [6, 6, 9, 9]


# --------------------------------------------------------------------------- gates


def test_length_gate_cases():
    advantages = [1.0, -1.0, 0.5, 2.0, 0.0]
    lengths = [11, 11, 10, 3, 50]
    # positive & over length -> 0; negative over length stays; exactly L_target stays.
    assert length_gate(advantages, lengths, 10) == [0.0, -1.0, 0.5, 2.0, 0.0]
    assert length_gate(advantages, lengths, None) == advantages
    with pytest.raises(ValueError):
        length_gate([1.0], [1, 2], 10)


def test_has_signal():
    assert not has_signal([])
    assert not has_signal([0.0, 1e-12, -1e-10])
    assert has_signal([0.0, -0.5])
    assert has_signal([[0.0, 0.0], [0.0, 1e-3]])


def test_spiral_rollouts_with_a_frozen_aggregator_train_search_traces_only():
    """train_aggregate=False (train_set.aggregator.mode: frozen): the frozen model's aggregations
    still give the set values, so the search traces get the same advantages, but none of them
    becomes a sample the policy trains on."""
    from toy_task import ToyTask

    task = ToyTask()
    p = {"q": 3}
    # sets {b} and {a}: the aggregator answers "b" twice over {b} (f = 1) and "a" twice over {a}
    # (f = 0); baseline 0.5, so the right trace "b" gets +0.5 and "a" -0.5 (scale_rewards none)
    gen = _ScriptedGenerator({task.search_prompt(p): ["b", "a"], "a3:b:": ["b"], "a3:a:": ["a"]})
    cfg = RolloutConfig(num_search=2, num_sets=2, set_size=1, num_aggregations=2, max_new_tokens=6,
                        agg_max_new_tokens=9, scale_rewards="none")
    (shared,) = spiral_rollouts(task, gen, gen, [p], cfg, random.Random(0), seed=0)
    (frozen,) = spiral_rollouts(task, gen, gen, [p], cfg, random.Random(0), seed=0, train_aggregate=False)
    assert [s.role for s in frozen.samples] == ["search", "search"]
    assert [s.advantage for s in frozen.samples] == pytest.approx([0.5, -0.5])
    assert [s.advantage for s in frozen.samples] == [s.advantage for s in shared.samples if s.role == "search"]
    assert frozen.set_scores == shared.set_scores and frozen.agg_rewards == shared.agg_rewards


def test_spiral_rollouts_score_a_named_candidate_as_its_answer():
    """countdown with agg_answer=select: an aggregation "answer: #i" earns the reward of the i-th
    answer of its prompt (resolved by the task), while the sample trains on the tokens sampled."""
    from spiral_cli.tasks.countdown import CountdownConfig, CountdownTask

    task = CountdownTask(CountdownConfig(agg_view="grouped", agg_answer="select"))
    p = {"id": "p", "numbers": [3, 7, 12, 25], "target": 70}
    right, wrong = "answer: 25*3-12+7\n", "answer: 3+7\n"
    grouped = task.aggregate_prompt(p, [right, wrong])  # one set of both: "1: 1x 25*3-12+7", "2: 1x 3+7"
    gen = _ScriptedGenerator({task.search_prompt(p): [right, wrong], grouped: ["answer: #1\n", "answer: #2\n"]})
    cfg = RolloutConfig(num_search=2, num_sets=1, set_size=2, num_aggregations=2, max_new_tokens=32,
                        agg_max_new_tokens=32, scale_rewards="none")
    (r,) = spiral_rollouts(task, gen, gen, [p], cfg, random.Random(0), seed=0)
    assert r.agg_rewards == [1.0, 0.0] and r.search_rewards == [1.0, 0.0]
    agg = [s for s in r.samples if s.role == "aggregate"]
    assert [s.advantage for s in agg] == pytest.approx([0.5, -0.5])
    assert [len(s.completion_ids) for s in agg] == [len("answer: #1\n")] * 2
