"""Rollouts: sample traces, score them and attach one advantage per sequence.

SPIRAL (Algorithm 1): per prompt, N1 search traces; K distinct subsets of size n; N2
aggregation traces per subset (candidate order shuffled) -> set advantages for the search
traces, within-set centred advantages for the aggregation traces.
GRPO: per prompt, G traces with group-relative advantages (scaled as TRL's scale_rewards says).
Aggregator-only (train-agg): sets drawn from a frozen search policy's traces; only the
aggregation traces are trained.

The output is a flat list of `Sample`s that the loss consumes, plus per-prompt statistics.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spiral_cli.generation.base import Completion, Generator
from spiral_cli.prompt_fit import AggregationFit
from spiral_cli.rl.advantages import (
    grpo_advantages,
    has_signal,
    length_gate,
    moments,
    pooled_std,
    sample_subsets,
    set_advantages,
)
from spiral_cli.tasks.base import Task, resolve_aggregation


@dataclass
class Sample:
    """One sequence to train on: prompt text, generated token ids, scalar advantage."""

    prompt: str
    completion_ids: list[int]
    sampling_logprobs: list[float]
    advantage: float
    reward: float
    role: str  # "search" | "aggregate"
    max_new_tokens: int = 0  # the budget it was sampled under (Dr. GRPO's max_completion_length)


@dataclass
class PromptRollout:
    problem: dict[str, Any]
    samples: list[Sample]
    search_rewards: list[float]
    agg_rewards: list[float] = field(default_factory=list)
    set_scores: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    search_lengths: list[int] = field(default_factory=list)
    agg_prompts_trimmed: int = 0  # its aggregation prompts cut to fit the context (prompt_fit)

    @property
    def has_signal(self) -> bool:
        return has_signal([s.advantage for s in self.samples])


@dataclass
class RolloutConfig:
    num_search: int = 8  # N1 (SPIRAL) / G (GRPO)
    num_sets: int = 4  # K
    set_size: int = 4  # n
    num_aggregations: int = 4  # N2
    max_new_tokens: int = 256
    agg_max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # TRL's scale_rewards, resolved: "group" | "batch" | "none". Rollouts apply "group" and
    # "none"; "batch" needs the whole step's batch, so they leave the advantages centred and the
    # trainer divides once the batch is complete (`scale_batch`).
    scale_rewards: str = "none"
    length_target: int | None = None
    balance: bool = False  # train-agg: as many easy as hard sets
    agg_fit: str = "trim_middle"  # generation.agg_fit: aggregation prompts over the context are cut or refused


def _per_prompt(cfg: RolloutConfig) -> str:
    return "none" if cfg.scale_rewards == "batch" else cfg.scale_rewards


def _tokens(cs: list[Completion]) -> tuple[int, int]:
    return sum(c.prompt_tokens for c in cs), sum(len(c.token_ids) for c in cs)


def _gate(advs: list[float], cs: list[Completion], l_target: int | None) -> list[float]:
    return list(length_gate(advs, [len(c.token_ids) for c in cs], l_target))


def spiral_rollouts(
    task: Task, search_gen: Generator, agg_gen: Generator, problems: list[dict[str, Any]],
    cfg: RolloutConfig, rng: random.Random, seed: int, train_search: bool = True, train_aggregate: bool = True,
) -> list[PromptRollout]:
    """Algorithm 1 for a batch of prompts. With train_search=False (train-agg) the search
    traces come from a frozen policy and only aggregation samples are returned; with
    train_aggregate=False (a frozen aggregator checkpoint) only search samples: the frozen model's
    aggregations score the sets but are not the policy's to learn from."""
    stop = task.stop_strings()
    fit = AggregationFit(task, agg_gen, cfg.agg_max_new_tokens, cfg.agg_fit)  # as infer fits them
    fit.check(problems, min(cfg.set_size, cfg.num_search))
    search = search_gen.generate(
        [task.search_prompt(p) for p in problems], n=cfg.num_search, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, stop=stop, seed=seed,
    )
    # Build every aggregation prompt of the batch, then generate them in one call: the N2
    # aggregations of one set share their prompt (n=N2), so the prefill is done once.
    agg_prompts, agg_candidates, owners, subsets_per_problem = [], [], [], []
    for i, (p, traces) in enumerate(zip(problems, search)):
        subsets = sample_subsets(len(traces), cfg.set_size, cfg.num_sets, rng)
        if cfg.balance:
            correct = [task.is_correct(p, c.text) for c in traces]
            subsets = _balanced(subsets, correct, len(traces), cfg, rng)
        subsets_per_problem.append(subsets)
        for subset in subsets:
            order = list(subset)
            rng.shuffle(order)  # the aggregator should not learn a position prior
            agg_candidates.append([traces[j].text for j in order])
            owners.append(i)
    agg_prompts, cut = fit.prompts([problems[i] for i in owners], agg_candidates)
    aggs = agg_gen.generate(
        agg_prompts, n=cfg.num_aggregations, max_new_tokens=cfg.agg_max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, stop=stop, seed=seed + 1,
    )
    out: list[PromptRollout] = []
    cursor = 0
    for p, traces, subsets in zip(problems, search, subsets_per_problem):
        set_prompts = agg_prompts[cursor : cursor + len(subsets)]
        set_outputs = aggs[cursor : cursor + len(subsets)]
        set_candidates = agg_candidates[cursor : cursor + len(subsets)]
        trimmed = sum(c > 0 for c in cut[cursor : cursor + len(subsets)])
        cursor += len(subsets)
        agg_rewards = [[task.reward(p, resolve_aggregation(task, cands, c.text)) for c in cs]
                       for cands, cs in zip(set_candidates, set_outputs)]
        adv = set_advantages(agg_rewards, subsets, len(traces), scale_rewards=_per_prompt(cfg))
        samples: list[Sample] = []
        search_rewards = [task.reward(p, c.text) for c in traces]
        if train_search:
            search_adv = _gate(list(adv.search_advantages), traces, cfg.length_target)
            prompt = task.search_prompt(p)
            samples += [
                Sample(prompt, c.token_ids, c.logprobs, a, r, "search", cfg.max_new_tokens)
                for c, a, r in zip(traces, search_adv, search_rewards)
            ]
        for prompt, cs, advs, rs in zip(set_prompts, set_outputs, adv.agg_advantages, agg_rewards):
            if not train_aggregate:
                break
            gated = _gate(list(advs), cs, cfg.length_target)
            samples += [Sample(prompt, c.token_ids, c.logprobs, a, r, "aggregate", cfg.agg_max_new_tokens)
                        for c, a, r in zip(cs, gated, rs)]
        all_cs = list(traces) + [c for cs in set_outputs for c in cs]
        pt, gt = _tokens(all_cs)
        out.append(PromptRollout(
            problem=p, samples=samples, search_rewards=search_rewards,
            agg_rewards=[r for rs in agg_rewards for r in rs], set_scores=list(adv.set_scores),
            prompt_tokens=pt, generated_tokens=gt, search_lengths=[len(c.token_ids) for c in traces],
            agg_prompts_trimmed=trimmed,
        ))
    return out


def _balanced(subsets, correct: list[bool], n_traces: int, cfg: RolloutConfig, rng: random.Random):
    """Redraw sets so that easy (majority of candidates right) and hard sets are balanced where
    the pool allows it (AggLM's balancing). Falls back to the uniform draw otherwise."""
    def easy(s):
        return sum(correct[j] for j in s) * 2 > len(s)

    pool = sample_subsets(n_traces, cfg.set_size, min(math.comb(n_traces, cfg.set_size), 64), rng)
    easy_sets = [s for s in pool if easy(s)]
    hard_sets = [s for s in pool if not easy(s)]
    if not easy_sets or not hard_sets:
        return subsets
    half = cfg.num_sets // 2
    chosen = easy_sets[:half] + hard_sets[: cfg.num_sets - half]
    rest = [s for s in pool if s not in chosen]
    return (chosen + rest)[: cfg.num_sets]


def grpo_rollouts(
    task: Task, gen: Generator, problems: list[dict[str, Any]], cfg: RolloutConfig, seed: int
) -> list[PromptRollout]:
    """Standard GRPO: G samples per prompt, group-normalised advantages."""
    outs = gen.generate(
        [task.search_prompt(p) for p in problems], n=cfg.num_search, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, stop=task.stop_strings(), seed=seed,
    )
    rollouts = []
    for p, cs in zip(problems, outs):
        rewards = [task.reward(p, c.text) for c in cs]
        advs = _gate(list(grpo_advantages(rewards, scale_rewards=_per_prompt(cfg))), cs, cfg.length_target)
        prompt = task.search_prompt(p)
        pt, gt = _tokens(cs)
        rollouts.append(PromptRollout(
            problem=p, samples=[Sample(prompt, c.token_ids, c.logprobs, a, r, "search", cfg.max_new_tokens)
                                for c, a, r in zip(cs, advs, rewards)],
            search_rewards=rewards, prompt_tokens=pt, generated_tokens=gt, search_lengths=[len(c.token_ids) for c in cs],
        ))
    return rollouts


def scale_batch(rollouts: list[PromptRollout], grpo: bool,
                all_sum: Callable[[list[float]], list[float]] = lambda xs: xs) -> None:
    """scale_rewards="batch": divide the centred advantages of the step's batch (the prompts it
    trains on, across all ranks via `all_sum`) by the batch's std, in place.

    GRPO (TRL's meaning): the unbiased std of all rewards, + 1e-4. SPIRAL: search samples by the
    population std of all set scores f_i, aggregation samples by the population std of all
    aggregation rewards, + 1e-6 (as `set_advantages_batch`). Gating commutes with a positive
    divisor, so gated advantages can be divided after the fact."""
    if grpo:
        pools = {"search": ([x for r in rollouts for x in r.search_rewards], 1, 1e-4)}
    else:
        pools = {"search": ([x for r in rollouts for x in r.set_scores], 0, 1e-6),
                 "aggregate": ([x for r in rollouts for x in r.agg_rewards], 0, 1e-6)}
    roles = sorted(pools)
    summed = all_sum([m for role in roles for m in moments(pools[role][0])])
    divisor = {role: pooled_std(*summed[3 * i : 3 * i + 3], ddof=pools[role][1]) + pools[role][2]
               for i, role in enumerate(roles)}
    for r in rollouts:
        for s in r.samples:
            s.advantage = s.advantage / divisor[s.role]
