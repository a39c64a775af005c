"""`spiral infer`: problems in (JSONL, a file, a recipe's eval split or one prompt), answers out.

Output is one JSON object per problem on stdout, written as soon as its batch is done, so the
command composes in shell pipelines; progress and the final summary go to stderr. When the model
is a registry entry and no recipe is given, the task settings come from the recipe that trained it.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from spiral_cli.checkpoints import resolve_model
from spiral_cli.generation import close_generator
from spiral_cli.jsonl import InputError, iter_jsonl, write_jsonl_line
from spiral_cli.recipe import Recipe, RecipeError, apply_overrides, load_recipe, recipe_from_dict
from spiral_cli.registry import Registry
from spiral_cli.tasks import TaskError, load_task
from spiral_cli.tasks.base import Task


def make_generator(recipe: Recipe, loaded):
    """The recipe's generation backend for `loaded`; a missing backend is a recipe error."""
    from spiral_cli import generation

    try:
        return generation.make_generator(loaded, recipe.generation)
    except ValueError as e:
        raise RecipeError(str(e)) from None


def recipe_for_model(recipe_path: Path | None, overrides: list[str], entry) -> Recipe:
    """The given recipe, else the trained checkpoint's own recipe snapshot, else the defaults."""
    if recipe_path is not None:
        return load_recipe(recipe_path, overrides)
    snapshot: dict[str, Any] = dict(entry.recipe) if entry is not None and entry.recipe else {}
    return recipe_from_dict(apply_overrides(snapshot, overrides))


def iter_problems(
    task: Task, *, input_path: Path | None, prompt: str | None, eval_problems: int | None, recipe: Recipe
) -> Iterator[dict[str, Any]]:
    if prompt is not None:
        yield _problem_from_text(task, prompt)
        return
    if eval_problems is not None:
        yield from task.problems("eval", eval_problems, seed=recipe.seed)
        return
    if input_path is not None:
        if not input_path.is_file():
            raise InputError(f"input file not found: {input_path}")
        stream, source = input_path.open(), str(input_path)
    else:
        if sys.stdin.isatty():
            raise InputError("no problems: pipe JSONL to stdin, or give --input FILE, --eval N or --prompt TEXT")
        stream, source = sys.stdin, "<stdin>"
    for lineno, obj in iter_jsonl(stream, source):
        try:
            yield task.validate_problem(obj)
        except TaskError as e:
            raise InputError(f"{source} line {lineno}: {e}") from None


def _problem_from_text(task: Task, text: str) -> dict[str, Any]:
    text = text.strip()
    if text.startswith("{"):
        try:
            return task.validate_problem(json.loads(text))
        except json.JSONDecodeError as e:
            raise InputError(f"--prompt: not valid JSON ({e.msg})") from None
    parse = getattr(task, "parse_problem_text", None)
    if parse is None:
        raise InputError(f"--prompt: task {task.name!r} takes a JSON problem object here")
    return parse(text)


def _chunks(it: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for item in it:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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
    from spiral_cli.pipeline import PipelineConfig, run_pipeline

    console = console or Console(stderr=True)
    registry = Registry(home)
    if model is None:
        if recipe_path is None:
            raise RecipeError("give --model (a registry name, path, hub id or scratch:<preset>) or a recipe")
        model = load_recipe(recipe_path, overrides).model.name
    ref = resolve_model(model, registry)
    recipe = recipe_for_model(recipe_path, overrides, ref.entry)
    task = load_task(recipe.task.name, recipe.task.options())
    inf, gen = recipe.infer, recipe.generation
    cfg = PipelineConfig(
        parallel=inf.parallel, seq_budget=inf.seq_budget or gen.max_new_tokens, agg_rounds=inf.agg_rounds,
        population=inf.population, agg_set_size=inf.agg_set_size, aggregate=inf.aggregate,
        agg_max_new_tokens=gen.agg_max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
        top_k=gen.top_k, seed=recipe.seed,
    )
    problems = iter_problems(task, input_path=input_path, prompt=prompt, eval_problems=eval_problems, recipe=recipe)
    first_chunk_size = max(1, gen.batch_size // max(1, cfg.parallel))  # one generate call's worth

    loaded = load_model(recipe.model, source=ref.source, for_training=False, seed=recipe.seed)
    generator = make_generator(recipe, loaded)
    console.print(
        f"[bold]infer[/] {model}: N={cfg.parallel} T={cfg.seq_budget} R={cfg.agg_rounds if cfg.aggregate == 'learned' else 0} "
        f"aggregate={cfg.aggregate} (P={cfg.population}, k={cfg.agg_set_size}) on {loaded.device}"
    )
    done = correct = labelled = 0
    generated = total = 0
    per_problem: list[dict[str, Any]] = []  # the labelled problems' figures, for the summary
    t0 = time.time()
    for chunk_idx, chunk in enumerate(_chunks(problems, first_chunk_size)):
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
            total += t.total
        rate = done / max(time.time() - t0, 1e-9)
        acc = f", accuracy {correct}/{labelled} = {correct / labelled:.1%}" if labelled else ""
        console.print(f"  {done} problems ({rate:.2f}/s){acc}")
    close_generator(generator)
    summary = {
        "problems": done, "labelled": labelled, "accuracy": correct / labelled if labelled else None,
        "generated_tokens": generated, "total_tokens": total, "seconds": round(time.time() - t0, 2),
    }
    if per_problem:
        summary["held_out"] = held_out_figures(per_problem, cfg)
        _print_held_out(console, summary["held_out"])
    console.print(f"done: {json.dumps(summary)}")
    return summary


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
