"""`spiral sweep`: inference-compute scaling curves over N x T x R, with scaling efficiency.

For every model and every sequential budget T of ``sweep.seq_budget``, one pool of
``max(sweep.parallel)`` search traces is sampled per eval problem; learned aggregation runs R
rounds on the first N traces of a pool. What each cell measures, its compute, its interval and
the scaling efficiency between models are in ``sweep_cells.py``; this module samples (through the
cache below), writes the outputs and prints them.

Caching and resuming
--------------------
Everything generated is cached under ``<out>/cache`` as JSONL files written atomically
(temporary file + ``os.replace``), one per generate call:

- ``cache/pools/<key>/shard-<i>.jsonl``: the traces of one chunk of problems; ``key`` hashes
  the model source and model settings, the task and its options, T, max N, the problems, the
  seed, the sampling settings and the chunk size.
- ``cache/learned/<key>/r<R>-c<i>.jsonl``: the population after round R of one chunk of
  problems; ``key`` hashes the pool key, N, P, k and the aggregation settings.

A rerun of the same sweep loads what exists and generates only the rest; a model whose work is
all cached is not even loaded. The keys hash everything that changes a generation, so sweeps with
other outputs can share a cache (``spiral compare`` keeps one per home: ``<home>/compare/cache``). The result files (cells, plots, efficiency) are rebuilt from the
cache at the end of every run and are identical to those of an uninterrupted run.

Output directory (default ``<home>/sweeps/<recipe name>-<hash of models + grid>``):
``cells.csv``, ``cells.jsonl``, ``efficiency.json``, ``best.json`` (the most accurate cell of
each model x method, and the best learned cell against the best of the other methods),
``accuracy_vs_tokens.png``, ``pass_at_k.png``, ``accuracy_vs_rounds.png`` (when there are
learned cells), ``sweep.json`` (what was run) and ``cache/``.
"""
from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from spiral_cli.checkpoints import ModelRef, resolve_model
from spiral_cli.generation import close_generator, make_generator
from spiral_cli.generation.roles import for_aggregation
from spiral_cli.jsonl import chunks
from spiral_cli.paths import atomic_write_text, atomic_write_via
from spiral_cli.pipeline import PipelineConfig, ProblemResult, Trace, aggregate_rounds, run_pipeline
from spiral_cli.recipe import Recipe, RecipeError
from spiral_cli.registry import Registry

# the grid and the numbers (cells, scaling efficiency), importable from here as before
from spiral_cli.sweep_cells import (  # noqa: F401
    CELL_FIELDS,
    COMPUTE,
    EFFICIENCY_ALPHA,
    EFFICIENCY_MAX_NOT_MEASURABLE,
    EFFICIENCY_N_BOOT,
    METHOD_ORDER,
    PER_PROBLEM,
    PER_PROBLEM_POPULATION,
    Grid,
    ModelWork,
    _hash,
    _seed,
    best_accuracy,
    build_cells,
    describe,
    describe_best,
    efficiency,
    efficiency_interval,
    trace_token_means,
)

CACHE_VERSION = 1


# ---------------------------------------------------------------- hooks (monkeypatched in tests)


def _load_task(recipe: Recipe):
    from spiral_cli.tasks import load_task

    return load_task(recipe.task.name, recipe.task.options())


def _resolve(ref: str, registry: Registry) -> ModelRef:
    """resolve_model (a seam the tests replace)."""
    return resolve_model(ref, registry)


def _open_generator(recipe: Recipe, model_ref: ModelRef, registry: Registry):
    """Load one model for generation (called only when that model has uncached work)."""
    from spiral_cli.models import load_model

    loaded = load_model(recipe.model, source=model_ref.source, for_training=False, seed=recipe.seed)
    return make_generator(loaded, recipe.generation)


def _close_generator(generator: Any) -> None:
    close_generator(generator)
    del generator
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- small helpers


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def _read_rows(path: Path, ids: list[str]) -> list[dict[str, Any]] | None:
    """Rows of a cache file, or None when it is missing, unreadable or not for these problems."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if [r.get("id") for r in rows] != ids:
        return None
    return rows


def _problem_id(p: dict[str, Any], i: int) -> str:
    return str(p.get("id", i))


def _trace(d: dict[str, Any]) -> Trace:
    return Trace(
        text=d["text"], answer=d.get("answer"), reward=d.get("reward"), correct=d.get("correct"),
        tokens=int(d.get("tokens", 0)), finish_reason=d.get("finish_reason", "stop"),
    )


# ---------------------------------------------------------------- the run's context and cache keys


@dataclass
class _Context:
    recipe: Recipe
    grid: Grid
    task: Any
    problems: list[dict[str, Any]]
    ids: list[str]
    cache: Path
    console: Console
    registry: Registry
    pool_chunk: int
    agg_chunk: int
    calls: int = 0  # generate calls made in this run
    cached_units: int = 0  # cache files reused
    progress: Any = None
    bar: Any = None

    def sampling(self) -> dict[str, Any]:
        g = self.recipe.generation
        return {"temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k}


def _model_settings(recipe: Recipe) -> dict[str, Any]:
    """Model settings that change what is sampled (not where it runs: device is left out, so a
    sweep started on one machine resumes on another)."""
    settings = recipe.model.model_dump(mode="json")
    for irrelevant in ("name", "device", "gradient_checkpointing"):
        settings.pop(irrelevant, None)
    return settings


def _pool_key(ctx: _Context, work: ModelWork, t: int) -> str:
    model_settings = _model_settings(ctx.recipe)
    return _hash({
        "v": CACHE_VERSION, "model": work.ref.source, "model_settings": model_settings,
        "model_seed": ctx.recipe.seed, "task": ctx.recipe.task.name, "task_options": ctx.recipe.task.options(),
        "T": t, "max_n": ctx.grid.max_n, "problems": _hash(ctx.problems), "seed": ctx.grid.seed,
        "sampling": ctx.sampling(), "chunk": ctx.pool_chunk,
    })


def _learned_key(ctx: _Context, pool_key: str, n: int) -> str:
    return _hash({
        "v": CACHE_VERSION, "pool": pool_key, "N": n, "P": ctx.grid.population, "k": ctx.grid.agg_set_size,
        "agg_max_new_tokens": ctx.recipe.generation.agg_max_new_tokens, "sampling": ctx.sampling(),
        "seed": ctx.grid.seed, "chunk": ctx.agg_chunk,
        # only when set, so caches written before the field existed stay valid
        **({"agg_temperature": t} if (t := ctx.recipe.generation.agg_temperature) is not None else {}),
    })


def _pool_path(ctx: _Context, key: str, chunk_idx: int) -> Path:
    return ctx.cache / "pools" / key / f"shard-{chunk_idx:05d}.jsonl"


def _round_path(ctx: _Context, key: str, r: int, chunk_idx: int) -> Path:
    return ctx.cache / "learned" / key / f"r{r:03d}-c{chunk_idx:05d}.jsonl"


# ---------------------------------------------------------------- generation (cached)


def _advance(ctx: _Context, description: str) -> None:
    ctx.calls += 1
    if ctx.progress is not None:
        ctx.progress.update(ctx.bar, advance=1, description=description)


def _plan_missing(ctx: _Context, works: list[ModelWork]) -> dict[str, int]:
    """Generate calls still to make per model (cache files absent)."""
    missing: dict[str, int] = {}
    n_problem_chunks = len(list(chunks(ctx.ids, ctx.pool_chunk)))
    n_agg_chunks = len(list(chunks(ctx.ids, ctx.agg_chunk)))
    max_r = max(ctx.grid.learned_rounds, default=0)
    for w in works:
        count = 0
        for t in ctx.grid.seq_budget:
            key = w.pool_keys[t]
            count += sum(not _pool_path(ctx, key, c).exists() for c in range(n_problem_chunks))
            for n in ctx.grid.parallel:
                lkey = _learned_key(ctx, key, n)
                count += sum(
                    not _round_path(ctx, lkey, r, c).exists() for r in range(1, max_r + 1) for c in range(n_agg_chunks)
                )
        missing[w.label] = count
    return missing


def _sample_pool(ctx: _Context, w: ModelWork, t: int, generator: Callable[[], Any]) -> list[dict[str, Any]]:
    key = w.pool_keys[t]
    rows_all: list[dict[str, Any]] = []
    batches = list(chunks(list(zip(ctx.problems, ctx.ids)), ctx.pool_chunk))
    for c, chunk in enumerate(batches):
        ids = [i for _, i in chunk]
        path = _pool_path(ctx, key, c)
        rows = _read_rows(path, ids)
        if rows is not None:
            ctx.cached_units += 1
        else:
            cfg = PipelineConfig(
                parallel=ctx.grid.max_n, seq_budget=t, agg_rounds=0, aggregate="majority",
                seed=_seed("pool", ctx.grid.seed, t, c), **ctx.sampling(),
            )
            results = run_pipeline(ctx.task, generator(), [p for p, _ in chunk], cfg)
            rows = [
                {
                    "id": pid, "labelled": r.labelled, "traces": [tr.to_dict() for tr in r.search],
                    "search_prompt_tokens": r.tokens["search"].prompt,
                    "search_generated_tokens": r.tokens["search"].generated,
                }
                for pid, r in zip(ids, results)
            ]
            _write_jsonl(path, rows)
            _advance(ctx, f"{w.label} T={t}: search traces {c + 1}/{len(batches)}")
        rows_all.extend(rows)
    return rows_all


def _run_learned(ctx: _Context, w: ModelWork, t: int, n: int, generator: Callable[[], Any]) -> dict[int, list[dict[str, Any]]]:
    """Rounds 1..max R on the first n traces of the pool; returns {R: rows per problem}."""
    max_r = max(ctx.grid.learned_rounds)
    key = _learned_key(ctx, w.pool_keys[t], n)
    pool = {row["id"]: row for row in w.pools[t]}
    problems = dict(zip(ctx.ids, ctx.problems))
    batches = list(chunks(ctx.ids, ctx.agg_chunk))
    prev: dict[str, list[dict[str, Any]]] = {}  # id -> population of the previous round
    by_round: dict[int, list[dict[str, Any]]] = {}
    cfg_base = dict(
        population=ctx.grid.population, agg_set_size=ctx.grid.agg_set_size, aggregate="learned",
        agg_max_new_tokens=ctx.recipe.generation.agg_max_new_tokens, agg_fit=ctx.recipe.generation.agg_fit,
        agg_temperature=ctx.recipe.generation.agg_temperature, **ctx.sampling(),
    )
    for r in range(1, max_r + 1):
        rows_round: list[dict[str, Any]] = []
        for c, ids in enumerate(batches):
            path = _round_path(ctx, key, r, c)
            rows = _read_rows(path, ids)
            if rows is not None:
                ctx.cached_units += 1
            else:
                results = [
                    ProblemResult(
                        problem=problems[pid], search=[_trace(d) for d in pool[pid]["traces"][:n]],
                        rounds=[[_trace(d) for d in prev[pid]]] if r > 1 else [],
                    )
                    for pid in ids
                ]
                seed = _seed("agg", ctx.grid.seed, t, n, r, c)
                cfg = PipelineConfig(parallel=n, seq_budget=t, agg_rounds=1, seed=seed, **cfg_base)
                aggregate_rounds(ctx.task, for_aggregation(generator()), results, cfg, 1, random.Random(seed))
                rows = [
                    {
                        "id": pid, "labelled": res.labelled,
                        "population": [tr.to_dict() for tr in res.rounds[-1]],
                        "agg_prompt_tokens": res.tokens["aggregate"].prompt,
                        "agg_generated_tokens": res.tokens["aggregate"].generated,
                    }
                    for pid, res in zip(ids, results)
                ]
                _write_jsonl(path, rows)
                _advance(ctx, f"{w.label} T={t} N={n}: aggregation round {r} ({c + 1}/{len(batches)})")
            rows_round.extend(rows)
        prev = {row["id"]: row["population"] for row in rows_round}
        by_round[r] = rows_round
    return by_round


def _run_model(ctx: _Context, w: ModelWork) -> None:
    state: dict[str, Any] = {"gen": None}

    def generator():
        if state["gen"] is None:
            ctx.console.print(f"loading {w.label} ({w.ref.source})")
            state["gen"] = _open_generator(ctx.recipe, w.ref, ctx.registry)
        return state["gen"]

    try:
        for t in ctx.grid.seq_budget:
            w.pools[t] = _sample_pool(ctx, w, t, generator)
        if ctx.grid.learned_rounds:
            for t in ctx.grid.seq_budget:
                for n in ctx.grid.parallel:
                    w.learned[(t, n)] = _run_learned(ctx, w, t, n, generator)
    finally:
        if state["gen"] is not None:
            _close_generator(state.pop("gen"))


# ---------------------------------------------------------------- outputs


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _csv_text(cells: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CELL_FIELDS, lineterminator="\n")
    writer.writeheader()
    for c in cells:
        writer.writerow({k: ("" if c[k] is None else c[k]) for k in CELL_FIELDS})
    return buf.getvalue()


def _print_table(console: Console, cells: list[dict[str, Any]]) -> None:
    """One table per model, boxed where it fits the console and compact (no borders) where it does
    not: rich squeezes an over-wide table's narrowest columns to nothing (N vanished at 80 columns in
    a log file), so every column keeps at least its header's width."""
    from rich.table import Table

    from spiral_cli.tables import COMPACT, natural_width

    models: list[str] = []
    for c in cells:
        if c["model"] not in models:
            models.append(c["model"])

    def table(model: str, compact: bool) -> Table:
        t = Table(title=f"sweep cells: {model}", title_justify="left", caption_justify="left",
                  caption="CI: w = Wilson, b = bootstrap over problems; tokens per problem; "
                          "learned: accuracy of the final answer, pop. = RSA population accuracy",
                  **(COMPACT if compact else {}))
        for col in ("method", "T", "N", "R", "accuracy", "95% CI", "pop.", "gen tok", "total tok"):
            t.add_column(col, justify="left" if col == "method" else "right", no_wrap=True, min_width=len(col))
        for c in (c for c in cells if c["model"] == model):
            acc = "-" if c["accuracy"] is None else f"{c['accuracy']:.3f}"
            ci = "" if c["ci_lo"] is None else f"{c['ci_lo']:.3f}..{c['ci_hi']:.3f} {c['ci_method'][0]}"
            pop = "" if c.get("population_accuracy") is None else f"{c['population_accuracy']:.3f}"
            t.add_row(
                c["method"], str(c["T"]), str(c["N"]), str(c["R"]), acc, ci, pop,
                f"{c['generated_tokens_per_problem']:.0f}", f"{c['total_tokens_per_problem']:.0f}",
            )
        return t

    for model in models:
        boxed = table(model, compact=False)
        console.print(boxed if natural_width(console, boxed) <= console.width else table(model, compact=True))


def default_out(home: Path, recipe: Recipe, sources: list[str], grid: Grid) -> Path:
    grid_id = {k: v for k, v in grid.to_dict().items() if k != "baseline"}  # baseline changes no cell
    ident = {
        "models": sources, "grid": grid_id, "task": recipe.task.name, "task_options": recipe.task.options(),
        "generation": recipe.generation.model_dump(mode="json"), "model": _model_settings(recipe),
        "seed": recipe.seed,
    }
    return Path(home) / "sweeps" / f"{recipe.name}-{_hash(ident, 8)}"


def _write_outputs(out: Path, recipe: Recipe, cells: list[dict[str, Any]], eff: dict[str, Any],
                   best: dict[str, Any]) -> list[str]:
    from spiral_cli import plots

    keep = CELL_FIELDS + [PER_PROBLEM, PER_PROBLEM_POPULATION]
    _write_jsonl(out / "cells.jsonl", [{k: c[k] for k in keep if k in c} for c in cells])
    atomic_write_text(out / "cells.csv", _csv_text(cells))
    atomic_write_text(out / "efficiency.json", json.dumps(eff, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / "best.json", json.dumps(best, indent=2, sort_keys=True) + "\n")
    files = ["cells.jsonl", "cells.csv", "efficiency.json", "best.json"]
    title = f"{recipe.name}: {recipe.task.name}"
    for name, draw in (
        ("accuracy_vs_tokens.png", lambda p: plots.plot_accuracy_vs_tokens(cells, eff["comparisons"], p, title=title)),
        ("pass_at_k.png", lambda p: plots.plot_pass_at_k(cells, p, title=title)),
        ("accuracy_vs_rounds.png", lambda p: plots.plot_accuracy_vs_rounds(cells, p, title=title)),
    ):
        if atomic_write_via(out / name, draw) is not None:  # None: nothing to draw (no learned cells)
            files.append(name)
    return files


# ---------------------------------------------------------------- entry point


def run_sweep(
    recipe: Recipe,
    *,
    models: list[str],
    out: Path | None = None,
    home: Path,
    console: Console | None = None,
    cache: Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep of ``recipe.sweep`` for ``models``; write the outputs; return a summary.

    ``models``: registry names, paths, hub ids or ``scratch:<preset>``; the first one is the
    baseline of the scaling-efficiency comparison unless the recipe names ``sweep.baseline``.
    ``cache``: where generations are cached (default ``<out>/cache``); the keys hash everything
    that changes a generation, so sweeps with other outputs may share one cache directory.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = console or Console(stderr=True)
    labels = [m.strip() for m in models if m and m.strip()]
    if not labels:
        raise RecipeError("--models: give at least one model")
    dupes = sorted({m for m in labels if labels.count(m) > 1})
    if dupes:
        raise RecipeError(f"--models: {', '.join(dupes)} given more than once")
    grid = Grid.from_recipe(recipe)
    if grid.baseline and grid.baseline not in labels:
        raise RecipeError(f"sweep.baseline: {grid.baseline!r} is not one of --models ({', '.join(labels)})")
    registry = Registry(home)
    refs = [_resolve(m, registry) for m in labels]
    task = _load_task(recipe)
    problems = list(task.problems("eval", grid.max_problems, grid.seed))
    if not problems:
        raise RecipeError("sweep.max_problems: the task's eval split gave no problems")
    ids = [_problem_id(p, i) for i, p in enumerate(problems)]
    if len(set(ids)) != len(ids):
        raise RecipeError("task eval problems have duplicate ids; the sweep cache needs unique ids")
    out = Path(out) if out is not None else default_out(home, recipe, [r.source for r in refs], grid)
    out.mkdir(parents=True, exist_ok=True)
    batch = recipe.generation.batch_size
    cache = Path(cache) if cache is not None else out / "cache"
    ctx = _Context(
        recipe=recipe, grid=grid, task=task, problems=problems, ids=ids, cache=cache, console=console,
        registry=registry, pool_chunk=max(1, batch // grid.max_n), agg_chunk=max(1, batch // grid.population),
    )
    works = [ModelWork(label=label, ref=ref) for label, ref in zip(labels, refs)]
    for w in works:
        w.pool_keys = {t: _pool_key(ctx, w, t) for t in grid.seq_budget}
    manifest = {
        "recipe": recipe.name, "recipe_hash": recipe.hash(), "models": [{"ref": w.label, "source": w.ref.source} for w in works],
        "grid": grid.to_dict(), "task": recipe.task.name, "task_options": recipe.task.options(), "problems": ids,
        "pool_chunk": ctx.pool_chunk, "agg_chunk": ctx.agg_chunk, "recipe_snapshot": recipe.snapshot(),
        "cache": str(ctx.cache),
    }
    atomic_write_text(out / "sweep.json", json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    missing = _plan_missing(ctx, works)
    if "learned" in grid.methods and not grid.learned_rounds:
        console.print("[yellow]note:[/] method learned needs some sweep.agg_rounds >= 1; no learned cells")
    from rich.markup import escape

    console.print(
        "[bold]sweep[/] " + escape(f"{recipe.name}: models {', '.join(labels)}; N={grid.parallel} T={grid.seq_budget} "
        f"R={grid.agg_rounds} methods={grid.methods}; {len(problems)} problems; P={grid.population} "
        f"k={grid.agg_set_size}\n  out: {out}\n  generate calls to make: {sum(missing.values())} "
        f"({', '.join(f'{k}: {v}' for k, v in missing.items())})"),
        highlight=False,
    )
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
    )
    with progress:
        ctx.progress = progress
        ctx.bar = progress.add_task("generating", total=max(1, sum(missing.values())))
        for w in works:
            _run_model(ctx, w)
        if sum(missing.values()) == 0:
            progress.update(ctx.bar, completed=1, description="all cached")
    ctx.progress = None

    cells = build_cells(grid, works)
    eff = efficiency(cells, grid, labels)
    best = best_accuracy(cells, seed=grid.seed)
    files = _write_outputs(out, recipe, cells, eff, best)
    _print_table(console, cells)
    if (line := describe_best(best)) is not None:
        console.print(line, highlight=False, markup=False)
    headline = [c for c in eff["comparisons"] if c["headline"]]
    if headline:
        console.print(f"[bold]scaling efficiency[/] (compute = {COMPUTE}; baseline {eff['baseline']}):")
        for comp in headline:
            console.print("  " + describe(comp), highlight=False, markup=False)
    console.print(f"wrote {', '.join(files)} to {out}", highlight=False, markup=False)
    return {
        "out": str(out),
        "models": labels,
        "baseline": eff["baseline"],
        "problems": len(problems),
        "cells": len(cells),
        "generate_calls": ctx.calls,
        "cached_units": ctx.cached_units,
        "files": files,
        "best": best.get("learned_vs_rest"),
        "efficiency": [
            {k: c.get(k) for k in ("candidate", "method", "T", "R", "status", "max", "max_level",
                                   "at_baseline_best", "lower_bound", "upper_bound", "censored_ratio",
                                   "interval", "interval_status", "interval_at_baseline_best",
                                   "interval_at_baseline_best_status")}
            for c in headline
        ],
    }
