"""Inference pipeline: N parallel search traces -> R rounds of aggregation (RSA) -> answer.

Recursive self-aggregation (RSA): the first round aggregates random size-k subsets of the search
traces into a population of P aggregation outputs; each later round aggregates random size-k
subsets of the previous population. R = 0 means no aggregator: the answer is the majority vote
over the search traces. Candidate order inside an aggregation prompt is shuffled.

Every result carries token accounting per stage. Prompt tokens are counted once per sampled
sequence (as TRL and the paper count rollouts), even where the backend shares the prefill.
The pipeline knows nothing of training.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

from spiral_cli.generation.base import Completion, Generator
from spiral_cli.generation.roles import for_aggregation
from spiral_cli.metrics import final_answer_index, majority_vote
from spiral_cli.prompt_fit import AggregationFit
from spiral_cli.tasks._answers import vote_key
from spiral_cli.tasks.base import Task, resolve_aggregation

AggregateMode = Literal["learned", "majority", "none"]


@dataclass
class TokenCount:
    prompt: int = 0
    generated: int = 0

    def add(self, c: Completion) -> None:
        self.prompt += c.prompt_tokens
        self.generated += len(c.token_ids)

    @property
    def total(self) -> int:
        return self.prompt + self.generated

    def to_dict(self) -> dict[str, int]:
        return {"prompt": self.prompt, "generated": self.generated, "total": self.total}


@dataclass
class Trace:
    text: str
    answer: str | None
    reward: float | None
    correct: bool | None
    tokens: int
    finish_reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text, "answer": self.answer, "reward": self.reward, "correct": self.correct,
            "tokens": self.tokens, "finish_reason": self.finish_reason,
        }


@dataclass
class ProblemResult:
    problem: dict[str, Any]
    search: list[Trace]
    rounds: list[list[Trace]] = field(default_factory=list)  # aggregation population per round
    answer: str | None = None
    reward: float | None = None
    correct: bool | None = None
    tokens: dict[str, TokenCount] = field(default_factory=lambda: {"search": TokenCount(), "aggregate": TokenCount()})
    agg_prompts_trimmed: int = 0  # aggregation prompts cut to fit the context (prompt_fit)

    @property
    def labelled(self) -> bool:
        """Scored against a label (set when the search traces were scored)."""
        return bool(self.search) and self.search[0].correct is not None

    def token_totals(self) -> TokenCount:
        return TokenCount(
            prompt=sum(t.prompt for t in self.tokens.values()),
            generated=sum(t.generated for t in self.tokens.values()),
        )

    def summary(self) -> dict[str, Any]:
        """Analysis figures on this problem: oracle (any trace right), majority, aggregation pass@1."""
        out: dict[str, Any] = {}
        if self.labelled and self.search:
            flags = [bool(t.correct) for t in self.search]
            out["trace_accuracy"] = sum(flags) / len(flags)
            out["any_correct"] = any(flags)
            winner = majority_vote([vote_key(t.answer) for t in self.search])
            out["majority_correct"] = winner is not None and any(
                bool(t.correct) for t in self.search if vote_key(t.answer) == winner
            )
            if self.rounds:
                final = self.rounds[-1]
                out["aggregation_accuracy"] = sum(bool(t.correct) for t in final) / len(final)
        return out

    def to_dict(self, include_traces: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.problem.get("id"),
            "answer": self.answer,
        }
        if self.labelled:
            d["reward"] = self.reward
            d["correct"] = self.correct
            d.update(self.summary())
        d["tokens"] = {stage: tc.to_dict() for stage, tc in self.tokens.items()}
        d["tokens"]["total"] = self.token_totals().to_dict()
        if self.agg_prompts_trimmed:
            d["agg_prompts_trimmed"] = self.agg_prompts_trimmed
        if include_traces:
            d["traces"] = [t.to_dict() for t in self.search]
            d["aggregations"] = [[t.to_dict() for t in population] for population in self.rounds]
        return d


@dataclass
class PipelineConfig:
    parallel: int = 8  # N
    seq_budget: int = 256  # T, max new tokens per search trace
    agg_rounds: int = 1  # R
    population: int = 8  # P
    agg_set_size: int = 4  # k
    aggregate: AggregateMode = "learned"
    agg_max_new_tokens: int = 256
    agg_fit: str = "trim_middle"  # generation.agg_fit: prompts over the context are cut or refused
    temperature: float = 1.0
    agg_temperature: float | None = None  # aggregation traces; None = temperature
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


def _score(task: Task, problem: dict[str, Any], c: Completion, labelled: bool, text: str | None = None) -> Trace:
    """`text`: the completion as scored when it differs from what was sampled (an aggregation
    that names a candidate, resolved to that candidate's answer)."""
    text = c.text if text is None else text
    return Trace(
        text=text,
        answer=task.extract_answer(text),
        reward=task.reward(problem, text) if labelled else None,
        correct=task.is_correct(problem, text) if labelled else None,
        tokens=len(c.token_ids),
        finish_reason=c.finish_reason,
    )


def is_labelled(task: Task, problem: dict[str, Any]) -> bool:
    """A problem carries a label when the task can score it (e.g. countdown always can)."""
    labelled = getattr(task, "is_labelled", None)
    return bool(labelled(problem)) if callable(labelled) else True


def largest_agg_set(cfg: PipelineConfig, rounds: int) -> int:
    """The most candidates an aggregation prompt of `rounds` RSA rounds holds: k, or fewer when
    the pool it draws from (N search traces, then the population P) is smaller."""
    return min(cfg.agg_set_size, max(cfg.parallel, cfg.population if rounds > 1 else 0))


def draw_subsets(pool_size: int, set_size: int, count: int, rng: random.Random) -> list[list[int]]:
    """`count` random subsets (as shuffled index lists) of size min(set_size, pool_size)."""
    k = min(set_size, pool_size)
    return [rng.sample(range(pool_size), k) for _ in range(count)]  # rng.sample order is random


def aggregate_rounds(
    task: Task, generator: Generator, results: list[ProblemResult], cfg: PipelineConfig, rounds: int,
    rng: random.Random,
) -> list[list[Trace]]:
    """Run `rounds` RSA rounds on top of each result's current last population (its search
    traces when it has no rounds yet); appends to `results[i].rounds` and the token counts, and
    returns the final populations. Callable again to add more rounds (sweeps reuse R-1 rounds)."""
    problems = [r.problem for r in results]
    labelled = [r.labelled for r in results]
    stop = task.stop_strings()
    fit = AggregationFit(task, generator, cfg.agg_max_new_tokens, cfg.agg_fit)
    populations: list[list[Trace]] = [r.rounds[-1] if r.rounds else r.search for r in results]
    for _ in range(rounds):
        owners: list[int] = []
        candidates: list[list[str]] = []
        for i, pool in enumerate(populations):
            for subset in draw_subsets(len(pool), cfg.agg_set_size, cfg.population, rng):
                candidates.append([pool[j].text for j in subset])
                owners.append(i)
        prompts, cut = fit.prompts([problems[i] for i in owners], candidates)
        for i, c in zip(owners, cut):
            results[i].agg_prompts_trimmed += int(c > 0)
        outs = generator.generate(
            prompts, n=1, max_new_tokens=cfg.agg_max_new_tokens,
            temperature=cfg.temperature if cfg.agg_temperature is None else cfg.agg_temperature,
            top_p=cfg.top_p, top_k=cfg.top_k, stop=stop, seed=cfg.seed + 1 + len(results[0].rounds),
        )
        new_pops: list[list[Trace]] = [[] for _ in problems]
        for i, cands, samples in zip(owners, candidates, outs):
            c = samples[0]
            results[i].tokens["aggregate"].add(c)
            text = resolve_aggregation(task, cands, c.text)
            new_pops[i].append(_score(task, problems[i], c, labelled[i], text))
        for i, pop in enumerate(new_pops):
            results[i].rounds.append(pop)
        populations = new_pops
    return populations


def run_pipeline(
    task: Task, generator: Generator, problems: list[dict[str, Any]], cfg: PipelineConfig
) -> list[ProblemResult]:
    """Run search -> aggregation rounds -> final answer for a batch of problems."""
    rng = random.Random(cfg.seed)
    labelled = [is_labelled(task, p) for p in problems]
    stop = task.stop_strings()
    rounds = cfg.agg_rounds if cfg.aggregate == "learned" else 0
    if rounds:  # an aggregation prompt that can never fit the context: say so before any sampling
        fit = AggregationFit(task, for_aggregation(generator), cfg.agg_max_new_tokens, cfg.agg_fit)
        fit.check(problems, largest_agg_set(cfg, rounds))

    search_out = generator.generate(
        [task.search_prompt(p) for p in problems], n=cfg.parallel, max_new_tokens=cfg.seq_budget,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, stop=stop, seed=cfg.seed,
    )
    results: list[ProblemResult] = []
    for p, lab, samples in zip(problems, labelled, search_out):
        r = ProblemResult(problem=p, search=[_score(task, p, c, lab) for c in samples])
        for c in samples:
            r.tokens["search"].add(c)
        results.append(r)

    populations = aggregate_rounds(task, for_aggregation(generator), results, cfg, rounds, rng)
    for r, lab, pop in zip(results, labelled, populations):
        if cfg.aggregate == "none":
            chosen = r.search[0] if r.search else None  # a single trace: no aggregation at all
        else:
            # majority over the final population (the search traces when R = 0); ties -> first
            chosen = pop[final_answer_index([vote_key(t.answer) for t in pop])] if pop else None
        r.answer = chosen.answer if chosen else None
        if lab:
            r.reward, r.correct = (chosen.reward, chosen.correct) if chosen else (0.0, False)
    return results
