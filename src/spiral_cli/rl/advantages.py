"""Advantages for SPIRAL set RL, aggregation RL and the GRPO baseline.

Plain Python + numpy, no model code: inputs are rewards, outputs are one scalar advantage
per sequence (the trainer broadcasts it over the sequence's tokens). Equations follow
docs/method.md ("Advantages"), our reading of Hamid et al., "SPIRAL: Learning to Search
and Aggregate" (2026):

    f_i     = mean_j r(x, y*_ij)                 set score (over the N2 aggregations of G_i)
    f̄       = mean_i f_i                         set baseline (over the K sampled sets)
    A(G_i)  = f_i - f̄                            set advantage
    A(y)    = mean_{G_i ∋ y} A(G_i), 0 if none   search-trace (marginal) advantage
    A_ij    = r(x, y*_ij) - f_i                  aggregation advantage (within-set centred)

Public API: ``sample_subsets``, ``set_advantages`` (-> ``SetAdvantages``),
``set_advantages_batch``, ``proposition_constant``, ``grpo_advantages``, ``grpo_advantages_batch``, ``length_gate``,
``has_signal``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = [
    "SetAdvantages",
    "sample_subsets",
    "set_advantages",
    "set_advantages_batch",
    "moments",
    "pooled_std",
    "proposition_constant",
    "grpo_advantages",
    "grpo_advantages_batch",
    "length_gate",
    "has_signal",
]

# Below this many candidate subsets we sample ranks exactly without replacement from the
# whole range; above it, rejection sampling of ranks (K is tiny compared to the range).
_EXACT_RANK_SAMPLING_LIMIT = 1_000_000


# --------------------------------------------------------------------------- subset sampling


def _as_random(rng) -> random.Random:
    """Accept a ``random.Random``, a numpy ``Generator``, an int seed or None."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, np.random.Generator):
        # Python's Random handles arbitrarily large integer ranges (numpy stops at int64).
        return random.Random(int(rng.integers(2**63)))
    if rng is None or isinstance(rng, int):
        return random.Random(rng)
    raise TypeError(f"rng must be random.Random, numpy Generator, int or None, got {type(rng)}")


def _unrank_combination(rank: int, n_items: int, size: int) -> tuple[int, ...]:
    """The ``rank``-th size-``size`` subset of range(n_items) in lexicographic order."""
    chosen = []
    start = 0
    for pos in range(size):
        for v in range(start, n_items):
            # Number of subsets that put v at this position (and larger items after it).
            count = math.comb(n_items - 1 - v, size - 1 - pos)
            if rank < count:
                chosen.append(v)
                start = v + 1
                break
            rank -= count
    return tuple(chosen)


def sample_subsets(
    n_traces: int, set_size: int, num_sets: int, rng=None
) -> list[tuple[int, ...]]:
    """K distinct unordered subsets of size n of range(N), uniformly without replacement.

    Algorithm 1 step 2 of SPIRAL: draw ``num_sets`` (K) distinct subsets out of the C(N, n)
    possible ones. Each subset is a sorted tuple of trace indices; the list is in draw order.
    We draw K distinct *ranks* in [0, C(N, n)) and unrank them (combinatorial number system),
    so nothing is enumerated even when C(N, n) is astronomically large.

    ``rng``: ``random.Random``, numpy ``Generator``, int seed, or None (fresh entropy).
    Raises ValueError when K > C(N, n) or the sizes are invalid.
    """
    if n_traces < 1 or not (1 <= set_size <= n_traces):
        raise ValueError(f"need 1 <= set_size <= n_traces, got n={set_size}, N={n_traces}")
    if num_sets < 1:
        raise ValueError(f"num_sets must be >= 1, got {num_sets}")
    total = math.comb(n_traces, set_size)
    if num_sets > total:
        raise ValueError(
            f"cannot draw {num_sets} distinct subsets of size {set_size} "
            f"from {n_traces} traces: only C({n_traces}, {set_size}) = {total} exist"
        )
    r = _as_random(rng)
    if total <= _EXACT_RANK_SAMPLING_LIMIT:
        ranks = r.sample(range(total), num_sets)
    else:
        # num_sets <= total; here total > 1e6 so rejection rarely repeats a rank.
        seen: set[int] = set()
        ranks = []
        while len(ranks) < num_sets:
            k = r.randrange(total)
            if k not in seen:
                seen.add(k)
                ranks.append(k)
    return [_unrank_combination(k, n_traces, set_size) for k in ranks]


# --------------------------------------------------------------------------- set advantages


@dataclass(frozen=True)
class SetAdvantages:
    """Advantages of one prompt's SPIRAL rollouts (K sampled sets, N2 aggregations each).

    set_scores:        f_i, length K
    baseline:          f̄ = mean_i f_i
    set_advantages:    A(G_i) = f_i - f̄ (divided by a std unless scale_rewards="none"), length K
    search_advantages: A(y) for each of the N1 search traces (0 for a trace in no set)
    agg_advantages:    A_ij = r_ij - f_i (divided by a std unless scale_rewards="none"), K x N2
    membership:        how many sampled sets contain each search trace, length N1
    """

    set_scores: list[float]
    baseline: float
    set_advantages: list[float]
    search_advantages: list[float]
    agg_advantages: list[list[float]]
    membership: list[int]


def _validate_sets(
    agg_rewards: Sequence[Sequence[float]],
    subsets: Sequence[Sequence[int]],
    n_traces: int,
) -> None:
    if len(agg_rewards) == 0:
        raise ValueError("set_advantages needs at least one set")
    if len(agg_rewards) != len(subsets):
        raise ValueError(
            f"got rewards for {len(agg_rewards)} sets but {len(subsets)} subsets"
        )
    for i, (rewards, subset) in enumerate(zip(agg_rewards, subsets)):
        if len(rewards) == 0:
            raise ValueError(f"set {i} has no aggregation rewards")
        if len(set(subset)) != len(subset):
            raise ValueError(f"subset {i} repeats a trace: {tuple(subset)}")
        if any(not (0 <= y < n_traces) for y in subset):
            raise ValueError(f"subset {i} = {tuple(subset)} has an index outside [0, {n_traces})")


def set_advantages(
    agg_rewards: Sequence[Sequence[float]],
    subsets: Sequence[Sequence[int]],
    n_traces: int,
    scale_rewards: bool | str = "none",
    eps: float = 1e-6,
    batch_stds: tuple[float, float] | None = None,
) -> SetAdvantages:
    """SPIRAL advantages for one prompt (docs/method.md, "Advantages").

    ``agg_rewards[i][j]`` = r(x, y*_ij), the reward of the j-th aggregation of set G_i =
    ``subsets[i]`` (indices into the ``n_traces`` = N1 search traces).

        f_i     = mean_j r_ij                          (set score)
        f̄       = mean_i f_i                           (set baseline)
        A(G_i)  = f_i - f̄                              (set advantage)
        A(y)    = mean over sampled G_i containing y of A(G_i); 0 if y is in none
        A_ij    = r_ij - f_i                           (aggregation advantage)

    With K = 1 every set advantage is 0 (the set is its own baseline).

    ``scale_rewards`` (TRL's name; "none" by default, the paper does not divide):
    "group" divides A(G_i) by (std_i f_i + eps) and A_ij by (std_j r_ij + eps), both
    *population* stds (ddof = 0, the spread of exactly the values being centred; K and N2 are
    ~4 and may be 1, where the sample std is undefined). "batch" divides by the same stds taken
    over the whole step's batch instead, passed as ``batch_stds`` = (std of all set scores, std
    of all aggregation rewards); see ``set_advantages_batch``. A(y) is the mean of the scaled A(G_i).
    """
    mode = _scale_mode(scale_rewards)
    _validate_sets(agg_rewards, subsets, n_traces)
    if mode == "batch" and batch_stds is None:
        raise ValueError("scale_rewards='batch' needs the batch's stds: use set_advantages_batch")
    rewards = [np.asarray(row, dtype=float) for row in agg_rewards]
    scores = np.array([row.mean() for row in rewards])
    baseline = float(scores.mean())
    set_adv = scores - baseline
    if mode == "group":
        set_adv = set_adv / (scores.std() + eps)
    elif mode == "batch":
        set_adv = set_adv / (batch_stds[0] + eps)
    agg_adv = []
    for row, f_i in zip(rewards, scores):
        centred = row - f_i
        if mode == "group":
            centred = centred / (row.std() + eps)
        elif mode == "batch":
            centred = centred / (batch_stds[1] + eps)
        agg_adv.append(centred.tolist())

    # Marginal advantage of each search trace: average over the sampled sets that hold it.
    totals = np.zeros(n_traces)
    membership = np.zeros(n_traces, dtype=int)
    for subset, adv in zip(subsets, set_adv):
        for y in subset:
            totals[y] += adv
            membership[y] += 1
    search_adv = np.divide(totals, membership, out=np.zeros(n_traces), where=membership > 0)

    return SetAdvantages(
        set_scores=scores.tolist(),
        baseline=baseline,
        set_advantages=set_adv.tolist(),
        search_advantages=search_adv.tolist(),
        agg_advantages=agg_adv,
        membership=membership.tolist(),
    )


def set_advantages_batch(
    prompts: Sequence[tuple[Sequence[Sequence[float]], Sequence[Sequence[int]], int]],
    scale_rewards: bool | str = "none",
    eps: float = 1e-6,
) -> list[SetAdvantages]:
    """``set_advantages`` for several prompts, given as (agg_rewards, subsets, n_traces).

    The centring stays per prompt; with "batch" (TRL's meaning carried over) the set advantages
    are divided by the population std of *all* set scores f_i of the batch, and the aggregation
    advantages by the population std of *all* aggregation rewards of the batch (+ eps).
    """
    mode = _scale_mode(scale_rewards)
    stds = None
    if mode == "batch":
        scores = [float(np.mean(row)) for agg, _, _ in prompts for row in agg]
        rewards = [float(r) for agg, _, _ in prompts for row in agg for r in row]
        stds = (pooled_std(*moments(scores), ddof=0), pooled_std(*moments(rewards), ddof=0))
    return [set_advantages(agg, subsets, n, mode, eps, batch_stds=stds) for agg, subsets, n in prompts]


def moments(values: Sequence[float]) -> tuple[float, float, float]:
    """(count, sum, sum of squares): what ranks add up to get a std over all of their values."""
    v = np.asarray(values, dtype=float)
    return float(v.size), float(v.sum()), float((v * v).sum())


def pooled_std(n: float, s1: float, s2: float, ddof: int) -> float:
    """Std from summed ``moments``; 0 when there are no more than ``ddof`` values (as TRL's
    single-sample std)."""
    if n <= ddof:
        return 0.0
    var = (s2 - s1 * s1 / n) / (n - ddof)
    return math.sqrt(max(var, 0.0))  # rounding can make an exact 0 slightly negative


def proposition_constant(
    N: int, n: int, K: int, exact: bool = False, ordered: bool = True
) -> float | Fraction:
    """The positive constant M of SPIRAL's Proposition 3.1.

        M = (N / n) * q_K - 1,   q_K = 1 - C((N-1)_n, K) / C((N)_n, K),

    with (N)_n = N! / (N - n)! the falling factorial (number of ordered n-tuples of distinct
    traces). q_K is the probability that a given trace lies in at least one of K distinct
    ordered tuples drawn without replacement. Then E[sum_y A(y) grad log pi(y)] = M grad J
    when f_i is the exact set value. Computed exactly with integers and Fractions;
    ``exact=True`` returns the Fraction.

    Example: N=4, n=2, K=2 -> (4)_2 = 12, (3)_2 = 6, q = 1 - C(6,2)/C(12,2) = 1 - 15/66 =
    17/22, M = 2 * 17/22 - 1 = 6/11. K = 1 gives M = 0 (a single set is its own baseline).

    ``ordered=False``: the constant for what ``sample_subsets`` draws -- K distinct
    *unordered* subsets -- with an order-insensitive set value: the same formula with C(N, n)
    and C(N-1, n) in place of (N)_n and (N-1)_n. This is our derivation, not the paper's;
    tests/test_advantages.py checks both forms by exact enumeration on a toy policy.
    """
    if not (1 <= n <= N):
        raise ValueError(f"need 1 <= n <= N, got n={n}, N={N}")
    count = math.perm if ordered else math.comb
    groups_all = count(N, n)
    groups_without = count(N - 1, n)  # groups that avoid one given trace
    if not (1 <= K <= groups_all):
        raise ValueError(f"need 1 <= K <= {groups_all} (number of groups), got K={K}")
    q = 1 - Fraction(math.comb(groups_without, K), math.comb(groups_all, K))
    m = Fraction(N, n) * q - 1
    return m if exact else float(m)


# --------------------------------------------------------------------------- GRPO


def _scale_mode(scale_rewards: bool | str) -> str:
    """Normalise TRL's ``scale_rewards`` values: True -> "group", False -> "none"."""
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    if scale_rewards in ("group", "batch", "none"):
        return scale_rewards
    raise ValueError(
        f"scale_rewards must be True, False, 'group', 'batch' or 'none', got {scale_rewards!r}"
    )


def _sample_std(values: np.ndarray) -> float:
    """Unbiased std (ddof = 1) like torch.Tensor.std(); 0 for a single value (as TRL does)."""
    return float(values.std(ddof=1)) if values.size > 1 else 0.0


def grpo_advantages(
    rewards: Sequence[float], scale_rewards: bool | str = True, eps: float = 1e-4
) -> list[float]:
    """Group-relative advantages of one prompt's G samples (GRPO, TRL conventions).

        A_g = (r_g - mean(r)) / (std(r) + eps)    scale_rewards True or "group"
        A_g =  r_g - mean(r)                      scale_rewards False or "none"

    std is the *unbiased sample* std (ddof = 1), matching TRL's ``rewards.std()`` (torch's
    default); a group of one sample gets std 0, as in TRL. eps = 1e-4 as in TRL. A group
    with equal rewards gets all-zero advantages. For "batch" scaling (std over all groups)
    use ``grpo_advantages_batch``.
    """
    mode = _scale_mode(scale_rewards)
    if mode == "batch":
        raise ValueError("scale_rewards='batch' needs the whole batch: use grpo_advantages_batch")
    r = np.asarray(rewards, dtype=float)
    if r.size == 0:
        raise ValueError("grpo_advantages needs at least one reward")
    adv = r - r.mean()
    if mode == "group":
        adv = adv / (_sample_std(r) + eps)
    return adv.tolist()


def grpo_advantages_batch(
    groups: Sequence[Sequence[float]], scale_rewards: bool | str = True, eps: float = 1e-4
) -> list[list[float]]:
    """GRPO advantages for several prompts' groups; supports TRL's ``scale_rewards="batch"``.

    The mean is always per group; "batch" divides by the unbiased std of *all* rewards in
    ``groups`` (+ eps), "group"/True by each group's own std, "none"/False not at all.
    """
    mode = _scale_mode(scale_rewards)
    if mode != "batch":
        return [grpo_advantages(g, mode, eps) for g in groups]
    flat = np.concatenate([np.asarray(g, dtype=float) for g in groups])
    std = _sample_std(flat)
    return [((np.asarray(g, dtype=float) - np.mean(g)) / (std + eps)).tolist() for g in groups]


# --------------------------------------------------------------------------- gates


def length_gate(
    advantages: Sequence[float], lengths: Sequence[int], l_target: int | None
) -> list[float]:
    """Zero the positive advantage of any sequence longer than ``l_target`` tokens.

    docs/method.md ("Advantages", length gate): a long correct answer earns nothing (so length is not rewarded),
    but a long wrong answer keeps its negative advantage. A sequence of exactly ``l_target``
    tokens is not gated. ``l_target=None`` disables the gate.
    """
    if len(advantages) != len(lengths):
        raise ValueError(f"{len(advantages)} advantages but {len(lengths)} lengths")
    if l_target is None:
        return [float(a) for a in advantages]
    return [0.0 if (a > 0 and n > l_target) else float(a) for a, n in zip(advantages, lengths)]


def has_signal(advantages, tol: float = 1e-8) -> bool:
    """True when some advantage is non-zero (|A| > tol).

    Dynamic sampling (docs/method.md, "Loss"): a prompt whose advantages are all zero contributes no
    gradient, so it is dropped and another prompt drawn. Accepts a flat sequence or a
    rectangular nested one (e.g. ``SetAdvantages.agg_advantages``).
    """
    values = np.asarray(advantages, dtype=float).ravel()
    return bool(np.any(np.abs(values) > tol))
