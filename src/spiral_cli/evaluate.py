"""Held-out evaluation of one model: the figures every stage reports at its end.

From one pool of N search traces per problem at budget T: single-trace accuracy (pass@1),
pass@N (the oracle "any trace right"), majority vote over the N answers, and learned aggregation
(one RSA round: a population of P aggregations of random size-k subsets; its accuracy is the mean
over the population, i.e. the chance that one aggregation is right). A second, shorter budget
gives single-trace accuracy at a smaller budget (sft uses T/4) so the sequential knob shows.
"""
from __future__ import annotations

from typing import Any

from spiral_cli.generation.base import Generator
from spiral_cli.metrics import mean
from spiral_cli.pipeline import PipelineConfig, ProblemResult, run_pipeline
from spiral_cli.tasks.base import Task


def summarize(results: list[ProblemResult], prefix: str = "") -> dict[str, float]:
    """Accuracy figures averaged over problems (only labelled ones)."""
    rows = [r.summary() for r in results if r.labelled]
    out: dict[str, float] = {}
    if not rows:
        return out
    n = len(results[0].search)
    out[f"{prefix}pass@1"] = mean([row["trace_accuracy"] for row in rows])
    out[f"{prefix}pass@{n}"] = mean([float(row["any_correct"]) for row in rows])
    out[f"{prefix}majority@{n}"] = mean([float(row["majority_correct"]) for row in rows])
    if all("aggregation_accuracy" in row for row in rows):
        out[f"{prefix}learned_agg@{n}"] = mean([row["aggregation_accuracy"] for row in rows])
    out[f"{prefix}final_answer_accuracy"] = mean([float(bool(r.correct)) for r in results if r.labelled])
    tokens = [r.token_totals() for r in results]
    out[f"{prefix}generated_tokens_per_problem"] = mean([t.generated for t in tokens])
    out[f"{prefix}total_tokens_per_problem"] = mean([t.total for t in tokens])
    return out


def _run_batched(task, generator, problems, cfg: PipelineConfig, batch_problems: int, progress) -> list[ProblemResult]:
    results: list[ProblemResult] = []
    for start in range(0, len(problems), batch_problems):
        results += run_pipeline(task, generator, problems[start : start + batch_problems], cfg)
        if progress:
            progress(len(results), len(problems))
    return results


def evaluate(
    task: Task,
    generator: Generator,
    problems: list[dict[str, Any]],
    *,
    parallel: int = 8,
    seq_budget: int = 256,
    population: int = 8,
    agg_set_size: int = 4,
    agg_max_new_tokens: int = 256,
    agg_fit: str = "trim_middle",
    temperature: float = 1.0,
    agg_temperature: float | None = None,
    seed: int = 0,
    short_budget: int | None = None,
    batch_problems: int = 32,
    progress=None,
) -> dict[str, float]:
    """Run the evaluation and return flat metrics named like `T256/pass@1`."""
    cfg = PipelineConfig(
        parallel=parallel, seq_budget=seq_budget, agg_rounds=1, population=population,
        agg_set_size=agg_set_size, aggregate="learned", agg_max_new_tokens=agg_max_new_tokens,
        agg_fit=agg_fit, temperature=temperature, agg_temperature=agg_temperature, seed=seed,
    )
    results = _run_batched(task, generator, problems, cfg, batch_problems, progress)
    metrics = summarize(results, prefix=f"T{seq_budget}/")
    if short_budget:
        short_cfg = PipelineConfig(
            parallel=parallel, seq_budget=short_budget, agg_rounds=0, aggregate="majority",
            temperature=temperature, seed=seed + 7,
        )
        short = _run_batched(task, generator, problems, short_cfg, batch_problems, None)
        m = summarize(short, prefix=f"T{short_budget}/")
        metrics.update({k: v for k, v in m.items() if "pass@1" in k or "majority" in k or "tokens" in k})
    metrics["eval_problems"] = float(len(problems))
    return metrics


def evaluate_recipe(task: Task, generator: Generator, problems: list[dict[str, Any]], recipe,
                    *, short_budget: bool = False) -> dict[str, float]:
    """`evaluate` with a recipe's settings, the one way every training stage evaluates: N =
    infer.parallel traces of T = generation.max_new_tokens at generation.temperature, one learned
    aggregation round of P = infer.population subsets of k = infer.agg_set_size (its traces at
    generation.agg_temperature when set). `short_budget`
    adds single-trace accuracy at T/4 (sft's end-of-run figures; the RL stages evaluate every
    `eval_every` steps and leave it out)."""
    gen, inf = recipe.generation, recipe.infer
    return evaluate(
        task, generator, problems, parallel=inf.parallel, seq_budget=gen.max_new_tokens,
        population=inf.population, agg_set_size=inf.agg_set_size, agg_max_new_tokens=gen.agg_max_new_tokens,
        agg_fit=gen.agg_fit, temperature=gen.temperature, agg_temperature=gen.agg_temperature, seed=recipe.seed,
        short_budget=max(1, gen.max_new_tokens // 4) if short_budget else None,
    )
