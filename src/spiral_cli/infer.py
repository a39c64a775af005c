"""`spiral infer`: problems in (JSONL, a file, a recipe's eval split or one prompt), answers out.

Output is one JSON object per problem on stdout, written as soon as its batch is done, so the
command composes in shell pipelines; progress and the final summary go to stderr. When the model
is a registry entry and no recipe is given, the task settings come from the recipe that trained it.
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from spiral_cli.checkpoints import resolve_model
from spiral_cli.generation import close_generator, make_generator
from spiral_cli.generation.roles import attach_aggregator_model
from spiral_cli.jsonl import InputError, check_input_file, chunks, iter_jsonl, write_jsonl_line
from spiral_cli.progress import fmt_duration
from spiral_cli.recipe import Recipe, RecipeError, apply_overrides, load_recipe, recipe_from_dict
from spiral_cli.registry import Registry
from spiral_cli.tasks import TaskError, load_task
from spiral_cli.tasks.base import Task


def recipe_for_model(recipe_path: Path | None, overrides: list[str], entry) -> Recipe:
    """The given recipe, else the trained checkpoint's own recipe snapshot, else the defaults."""
    if recipe_path is not None:
        return load_recipe(recipe_path, overrides)
    snapshot: dict[str, Any] = dict(entry.recipe) if entry is not None and entry.recipe else {}
    return recipe_from_dict(apply_overrides(snapshot, overrides))


# Bounds on what one `spiral infer` may be asked to do (README: "Rules spiral keeps"). Past them a
# run is refused before anything loads: they are typos or runs of days, not experiments.
MAX_EVAL_PROBLEMS = 100_000  # --eval N
MAX_AGG_ROUNDS = 32  # -R; more than WARN_AGG_ROUNDS is allowed, with a warning of its cost
WARN_AGG_ROUNDS = 8
MAX_PARALLEL = 1024  # -N and the population P
PROGRESS_EVERY_S = 5.0  # a progress line (with ETA) at least this often during long batches


def check_problem_source(*, input_path: Path | None, prompt: str | None, eval_problems: int | None) -> None:
    """One source of problems, and a usable one -- checked before anything loads."""
    given = [flag for flag, v in (("--input", input_path), ("--prompt", prompt), ("--eval", eval_problems))
             if v is not None]
    if len(given) > 1:
        raise InputError(f"give one source of problems, not {' and '.join(given)}")
    if eval_problems is not None and not (1 <= eval_problems <= MAX_EVAL_PROBLEMS):
        raise InputError(f"--eval {eval_problems}: give a number of problems in 1..{MAX_EVAL_PROBLEMS:,}")
    if input_path is not None:
        check_input_file(input_path, "--input")
    if not given and sys.stdin.isatty():
        raise InputError("no problems: pipe JSONL to stdin, or give --input FILE, --eval N or --prompt TEXT")


def check_infer_settings(recipe: Recipe, overrides: list[str], console: Console) -> None:
    """Refuse absurd pipeline settings and say what an unusual one costs, before the model loads."""
    inf = recipe.infer
    learned = inf.aggregate == "learned" and inf.agg_rounds > 0
    if inf.agg_rounds > MAX_AGG_ROUNDS:
        raise RecipeError(f"infer.agg_rounds (-R) = {inf.agg_rounds}: at most {MAX_AGG_ROUNDS} rounds "
                          f"(each round is a full generation pass over P={inf.population} aggregations per problem)")
    for what, v in (("infer.parallel (-N)", inf.parallel), ("infer.population", inf.population)):
        if v > MAX_PARALLEL:
            raise RecipeError(f"{what} = {v}: at most {MAX_PARALLEL} traces per problem")
    if learned and inf.agg_rounds > WARN_AGG_ROUNDS:
        console.print(f"[yellow]warning:[/] -R {inf.agg_rounds}: every round costs another full aggregation pass "
                      f"({inf.population} traces per problem); gains usually flatten after a few rounds",
                      highlight=False)
    pool = min(inf.parallel, inf.population) if inf.agg_rounds > 1 else inf.parallel
    if learned and inf.agg_set_size > pool:
        what = (f"the N={inf.parallel} search traces" if inf.agg_set_size > inf.parallel
                else f"the population P={inf.population}")
        msg = (f"infer.agg_set_size (k) = {inf.agg_set_size} is more than {what} it draws from: "
               f"each aggregation would see all {pool}")
        if any(o.split("=", 1)[0].strip() == "infer.agg_set_size" for o in overrides):
            raise RecipeError(msg + f"; give --agg-set-size {pool} or less (or raise -N)")
        console.print(f"[yellow]warning:[/] {msg}", highlight=False)


def _eval_problems(task: Task, n: int, seed: int, console: Console) -> tuple[Iterator[dict[str, Any]], int]:
    """The eval split's first n problems (streamed where the task can), and how many there are."""
    size = getattr(task, "split_size", None)
    available = size("eval") if callable(size) else None
    if available is not None and available < n:
        console.print(f"[yellow]warning:[/] --eval {n}: the eval split of task {task.name!r} has only {available} "
                      f"problem{'s' if available != 1 else ''}; answering {available}", highlight=False)
        n = available
    stream = getattr(task, "iter_problems", None)
    return (stream("eval", n, seed=seed) if callable(stream) else iter(task.problems("eval", n, seed=seed))), n


def _count_lines(path: Path) -> int | None:
    try:
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def iter_problems(task: Task, stream: Iterator[tuple[int, dict[str, Any]]], source: str) -> Iterator[dict[str, Any]]:
    """Validated problems from JSONL lines; InputError naming the line at the first bad one (after
    every good line before it)."""
    for lineno, obj in stream:
        try:
            yield task.validate_problem(obj)
        except TaskError as e:
            raise InputError(f"{source} line {lineno}: {e}") from None


def _problem_from_text(task: Task, text: str) -> dict[str, Any]:
    text = text.strip()
    try:
        if text.startswith("{"):
            try:
                return task.validate_problem(json.loads(text))
            except json.JSONDecodeError as e:
                raise InputError(f"--prompt: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
        parse = getattr(task, "parse_problem_text", None)
        if parse is None:
            raise InputError(f"--prompt: task {task.name!r} takes a JSON problem object here")
        return parse(text)
    except TaskError as e:
        raise InputError(f"--prompt: {e}") from None


class _Progress:
    """Counts generate calls (one search pass + one per aggregation round, per batch) and prints a
    line with the ETA at most every PROGRESS_EVERY_S seconds, so no batch runs silently."""

    def __init__(self, console: Console, calls_per_batch: int, batches: int | None) -> None:
        self.console, self.per_batch, self.batches = console, calls_per_batch, batches
        self.t0 = self.last = time.time()
        self.calls = 0

    def eta(self) -> str:
        if not self.batches or not self.calls:
            return ""
        left = self.batches * self.per_batch - self.calls
        return f", ETA {fmt_duration((time.time() - self.t0) / self.calls * max(0, left))}"

    def tick(self) -> None:
        self.calls += 1
        now = time.time()
        if now - self.last >= PROGRESS_EVERY_S and self.calls % self.per_batch:
            self.last = now
            batch, call = divmod(self.calls, self.per_batch)
            of = f"/{self.batches}" if self.batches else ""
            what = "search" if call == 1 else f"aggregation round {call - 1}/{self.per_batch - 1}"
            self.console.print(f"  batch {batch + 1}{of}: {what} done, {fmt_duration(now - self.t0)} elapsed{self.eta()}",
                               highlight=False)

    def batch_done(self) -> None:
        self.last = time.time()


class _CountingGenerator:
    """A generator that reports each generate call to a _Progress (and so does its aggregation view)."""

    def __init__(self, inner, progress: _Progress) -> None:
        self.inner, self._progress = inner, progress
        view = getattr(inner, "aggregation_view", None)
        if view is not None:
            self.aggregation_view = _CountingGenerator(view, progress)

    def generate(self, prompts, **kw):
        out = self.inner.generate(prompts, **kw)
        self._progress.tick()
        return out

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def pipeline_config(recipe: Recipe):
    """The pipeline `spiral infer` runs: the recipe's infer and generation sections."""
    from spiral_cli.pipeline import PipelineConfig

    inf, gen = recipe.infer, recipe.generation
    return PipelineConfig(
        parallel=inf.parallel, seq_budget=inf.seq_budget or gen.max_new_tokens, agg_rounds=inf.agg_rounds,
        population=inf.population, agg_set_size=inf.agg_set_size, aggregate=inf.aggregate,
        agg_max_new_tokens=gen.agg_max_new_tokens, agg_fit=gen.agg_fit, temperature=gen.temperature,
        agg_temperature=gen.agg_temperature, top_p=gen.top_p, top_k=gen.top_k, seed=recipe.seed,
    )


def run_infer(
    *,
    recipe_path: Path | None,
    overrides: list[str],
    model: str | None,
    home: Path,
    input_path: Path | None = None,
    prompt: str | None = None,
    eval_problems: int | None = None,
    include_traces: bool = False,
    console: Console | None = None,
    out=None,
) -> dict[str, Any]:
    from spiral_cli.models import load_model
    from spiral_cli.pipeline import largest_agg_set, run_pipeline
    from spiral_cli.prompt_fit import AggregationFit

    console = console or Console(stderr=True)
    # everything that can be wrong is checked before the model loads
    check_problem_source(input_path=input_path, prompt=prompt, eval_problems=eval_problems)
    registry = Registry(home)
    if model is None:
        if recipe_path is None:
            raise RecipeError("give --model (a registry name, path, hub id or scratch:<preset>) or a recipe")
        model = load_recipe(recipe_path, overrides).model.name
    ref = resolve_model(model, registry)
    recipe = recipe_for_model(recipe_path, overrides, ref.entry)
    check_infer_settings(recipe, overrides, console)
    task = load_task(recipe.task.name, recipe.task.options())
    inf, gen = recipe.infer, recipe.generation
    cfg = pipeline_config(recipe)
    total: int | None
    if prompt is not None:
        problems: Iterator[dict[str, Any]] = iter([_problem_from_text(task, prompt)])
        total = 1
    elif eval_problems is not None:
        problems, total = _eval_problems(task, eval_problems, recipe.seed, console)
    elif input_path is not None:
        source = str(input_path)
        problems = iter_problems(task, iter_jsonl(input_path.open(encoding="utf-8"), source), source)
        total = _count_lines(input_path)
    else:
        problems, total = iter_problems(task, iter_jsonl(sys.stdin, "<stdin>"), "<stdin>"), None
    first_chunk_size = max(1, gen.batch_size // max(1, cfg.parallel))  # one generate call's worth

    rounds = cfg.agg_rounds if cfg.aggregate == "learned" else 0
    agg_ref = resolve_model(inf.aggregator, registry) if inf.aggregator and rounds else None
    loaded = load_model(recipe.model, source=ref.source, for_training=False, seed=recipe.seed)
    if rounds and agg_ref is None:  # aggregation prompts that can never fit: say so before the sampler starts
        first = next(problems, None)
        if first is not None:
            problems = itertools.chain([first], problems)
            AggregationFit.before_start(task, loaded, gen).check([first], largest_agg_set(cfg, rounds))
    progress = _Progress(console, 1 + rounds, -(-total // first_chunk_size) if total else None)
    search_gen = make_generator(loaded, recipe.generation)
    if agg_ref is not None:
        attach_aggregator_model(search_gen, aggregator_generator(recipe, agg_ref))
    generator = _CountingGenerator(search_gen, progress)
    console.print(
        f"[bold]infer[/] {model}"
        + (f" (aggregator {inf.aggregator})" if agg_ref is not None else "")
        + f": N={cfg.parallel} T={cfg.seq_budget} R={rounds} "
        f"aggregate={cfg.aggregate} (P={cfg.population}, k={cfg.agg_set_size}) on {loaded.device}"
        + (f", {total} problem{'s' if total != 1 else ''}" if total else "")
    )
    done = correct = labelled = 0
    generated = total_tokens = trimmed = 0
    per_problem: list[dict[str, Any]] = []  # the labelled problems' figures, for the summary
    t0 = time.time()
    try:
        for chunk_idx, chunk in enumerate(chunks(problems, first_chunk_size)):
            cfg.seed = recipe.seed + chunk_idx  # distinct samples per chunk, reproducible run to run
            for r in run_pipeline(task, generator, chunk, cfg):
                row = {"problem": r.problem, **r.to_dict(include_traces=include_traces)}
                write_jsonl_line(row, out)
                done += 1
                if r.labelled:
                    labelled += 1
                    correct += int(bool(r.correct))
                    per_problem.append({**r.summary(), "final": bool(r.correct)})
                t = r.token_totals()
                generated += t.generated
                total_tokens += t.total
                trimmed += r.agg_prompts_trimmed
            progress.batch_done()
            rate = done / max(time.time() - t0, 1e-9)
            acc = f", accuracy {correct}/{labelled} = {correct / labelled:.1%}" if labelled else ""
            of = f"/{total}" if total else ""
            console.print(f"  {done}{of} problems ({rate:.2f}/s){acc}{progress.eta()}")
    except InputError as e:
        close_generator(generator.inner)
        answered = f"the {done} problem{'s' if done != 1 else ''} before it answered" if done else "nothing answered"
        raise InputError(f"{e} (stopped there; {answered})") from None
    close_generator(generator.inner)
    summary = {
        "problems": done, "labelled": labelled, "accuracy": correct / labelled if labelled else None,
        "generated_tokens": generated, "total_tokens": total_tokens, "seconds": round(time.time() - t0, 2),
        "agg_prompts_trimmed": trimmed,  # cut to fit the context (generation.agg_fit)
    }
    if per_problem:
        summary["held_out"] = held_out_figures(per_problem, cfg)
        _print_held_out(console, summary["held_out"])
    console.print(f"done: {json.dumps(summary)}")
    return summary


def aggregator_generator(recipe: Recipe, agg_ref):
    """The separate aggregator's sampler (`infer.aggregator`): the hf backend, like every frozen
    model (one vLLM engine per process serves the search model)."""
    from spiral_cli.generation.hf import HFGenerator
    from spiral_cli.models import load_model

    gen = recipe.generation
    agg = load_model(recipe.model, source=agg_ref.source, for_training=False, seed=recipe.seed)
    return HFGenerator(agg, batch_size=gen.batch_size, fast_decode=gen.fast_decode, compile=gen.compile)


def held_out_figures(rows: list[dict[str, Any]], cfg) -> dict[str, Any]:
    """Accuracy of every way to use the same N traces on the labelled problems, each with a 95%
    bootstrap interval over problems, and the learned aggregation's gains over the vote with a
    paired interval (metrics.paired_bootstrap_diff): is the aggregator worth its tokens?"""
    from spiral_cli.metrics import bootstrap_accuracy, paired_bootstrap_diff

    n = cfg.parallel
    columns = {"pass@1": "trace_accuracy", f"pass@{n}": "any_correct", f"majority@{n}": "majority_correct"}
    if all("aggregation_accuracy" in r for r in rows):
        columns[f"learned population@{n} (R={cfg.agg_rounds})"] = "aggregation_accuracy"
    columns["final answer"] = "final"
    values = {name: [float(r[key]) for r in rows] for name, key in columns.items()}
    out: dict[str, Any] = {"problems": len(rows)}
    for name, xs in values.items():
        b = bootstrap_accuracy(xs)
        out[name] = {"accuracy": b["estimate"], "interval": list(b["interval"])}
    majority = values[f"majority@{n}"]
    for name in [k for k in values if k.startswith("learned") or k == "final answer"]:
        d = paired_bootstrap_diff(values[name], majority)
        out[f"{name} - majority@{n}"] = {"difference": d["estimate"], "interval": list(d["interval"])}
    return out


def _print_held_out(console: Console, figures: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table("on the same traces", "accuracy", "95% interval", title=f"held-out, {figures['problems']} problems")
    for name, v in figures.items():
        if isinstance(v, dict):
            value = v.get("accuracy", v.get("difference"))
            sign = "+" if "difference" in v else ""
            table.add_row(name, f"{value:{sign}.1%}", f"[{v['interval'][0]:{sign}.1%}, {v['interval'][1]:{sign}.1%}]")
    console.print(table)
