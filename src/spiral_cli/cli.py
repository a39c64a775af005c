"""The `spiral` command line: thin wrappers that parse, load the recipe and call one function.

Machine-readable output goes to stdout (JSONL), progress and errors to stderr. User mistakes
(bad recipe, bad JSONL, missing checkpoint) exit with code 2 and one line naming the problem.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console

from spiral_cli import __version__

app = typer.Typer(
    help="SPIRAL: train LMs to search in parallel and aggregate. Recipes in YAML, one shared checkpoint registry.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
registry_app = typer.Typer(help="The checkpoint registry shared by all commands.", no_args_is_help=True)
tasks_app = typer.Typer(help="Built-in and plug-in tasks: list, sample problems, score completions.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
app.add_typer(tasks_app, name="tasks")

err = Console(stderr=True, soft_wrap=True)
_state: dict[str, Any] = {"home": None}

SetOpt = typer.Option(None, "--set", help="Override a recipe field, e.g. --set train_set.lr=1e-5 (repeatable).")
BackendOpt = typer.Option(None, "--backend", help="Generation backend: hf | vllm (generation.backend).")
BudgetOpt = typer.Option(
    None, "--max-generated-tokens",
    help="Stop once this many tokens were generated (<section>.max_generated_tokens); steps stays a cap.",
)


def _with_backend(overrides: Optional[list[str]], backend: Optional[str]) -> list[str]:
    return list(overrides or []) + ([f"generation.backend={backend}"] if backend else [])


def _budget(section: str, tokens: Optional[int]) -> list[str]:
    """--max-generated-tokens is an override of the recipe field (validated with it: > 0)."""
    return [f"{section}.max_generated_tokens={tokens}"] if tokens is not None else []


def _user_errors() -> tuple[type[BaseException], ...]:
    from spiral_cli.jsonl import InputError
    from spiral_cli.recipe import RecipeError
    from spiral_cli.registry import RegistryError
    from spiral_cli.tasks import TaskError

    errors: list[type[BaseException]] = [InputError, RecipeError, RegistryError, TaskError]
    try:
        from spiral_cli.models import ModelError

        errors.append(ModelError)
    except ImportError:  # torch missing: the other commands still work
        pass
    return tuple(errors)


def friendly(fn: Callable) -> Callable:
    """Turn user mistakes into `error: <one line>` and exit code 2, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as e:
            err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except NotAvailableYet as e:
            err.print(f"[yellow]not available yet:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(3) from None
        except BrokenPipeError:  # `spiral ... | head` closed the pipe: not an error
            sys.stderr.close()
            raise typer.Exit(0) from None

    return wrapper


class NotAvailableYet(Exception):
    pass


def _home() -> Path:
    from spiral_cli.paths import spiral_home

    return spiral_home(_state["home"])


def _registry():
    from spiral_cli.registry import Registry

    return Registry(_home())


def _load(recipe: Optional[Path], overrides: Optional[list[str]]):
    from spiral_cli.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


def _version(value: bool) -> None:
    if value:
        typer.echo(f"spiral {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    home: Optional[Path] = typer.Option(
        None, "--home", envvar="SPIRAL_HOME", help="Spiral home (registry + checkpoints). Default: ~/.spiral"
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["home"] = home
    _quiet_libraries()


def _quiet_libraries() -> None:
    """Our own progress goes to stderr; the libraries' loading bars and warnings are noise there."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------- training stages


@app.command()
@friendly
def sft(
    recipe: Path = typer.Argument(..., help="Recipe YAML, e.g. recipes/countdown.yaml"),
    overrides: Optional[list[str]] = SetOpt,
    name: Optional[str] = typer.Option(None, help="Registry name of the result (default: <recipe name>-sft)."),
    model: Optional[str] = typer.Option(None, help="Start from this model instead of the recipe's model.name."),
    data: Optional[Path] = typer.Option(None, help="JSONL of {prompt, completion} instead of the task's examples."),
    resume: bool = typer.Option(True, help="Resume from the run's last checkpoint if there is one."),
    backend: Optional[str] = BackendOpt,
) -> None:
    """Supervised warm start: the search format and the aggregation format."""
    r = _load(recipe, _with_backend(overrides, backend))
    if data is not None:
        r.sft.data = str(data)
    if model is not None:
        r.model.name = model
    from spiral_cli.sft import run_sft

    result = run_sft(r, home=_home(), name=name, resume=resume, console=err)
    typer.echo(json.dumps(result, default=str))


@app.command("train-set")
@friendly
def train_set(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    overrides: Optional[list[str]] = SetOpt,
    objective: Optional[str] = typer.Option(None, help="spiral (set RL, default) or grpo (baseline)."),
    name: Optional[str] = typer.Option(None, help="Registry name (default: <recipe>-set or <recipe>-grpo)."),
    model: Optional[str] = typer.Option(None, help="Start from this checkpoint (default: <recipe>-sft)."),
    backend: Optional[str] = BackendOpt,
    max_generated_tokens: Optional[int] = BudgetOpt,
) -> None:
    """SPIRAL set RL on search + aggregation traces (or --objective grpo)."""
    r = _load(recipe, _with_backend(overrides, backend) + ([f"train_set.objective={objective}"] if objective else [])
              + _budget("train_set", max_generated_tokens))
    for note in r.train_set.deprecations:
        err.print(f"[yellow]warning:[/] train_set.{note}", highlight=False, soft_wrap=True)
    try:
        from spiral_cli.rl.trainer import run_train_set
    except ImportError:
        raise NotAvailableYet("the RL engine (train-set) is not built yet; recipe validated OK") from None
    result = run_train_set(r, home=_home(), name=name, model=model, console=err)
    typer.echo(json.dumps(result, default=str))


@app.command("train-agg")
@friendly
def train_agg(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    overrides: Optional[list[str]] = SetOpt,
    name: Optional[str] = typer.Option(None, help="Registry name (default: <recipe>-agg)."),
    model: Optional[str] = typer.Option(None, help="Aggregator to train (default: <recipe>-sft)."),
    backend: Optional[str] = BackendOpt,
    max_generated_tokens: Optional[int] = BudgetOpt,
) -> None:
    """RL on the aggregation role only, over sets from a frozen search policy."""
    r = _load(recipe, _with_backend(overrides, backend) + _budget("train_agg", max_generated_tokens))
    try:
        from spiral_cli.rl.trainer import run_train_agg
    except ImportError:
        raise NotAvailableYet("the RL engine (train-agg) is not built yet; recipe validated OK") from None
    result = run_train_agg(r, home=_home(), name=name, model=model, console=err)
    typer.echo(json.dumps(result, default=str))


# ---------------------------------------------------------------- inference and evaluation


@app.command()
@friendly
def infer(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML (task and defaults). Optional."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Registry name, path, hub id or scratch:<preset>."),
    parallel: Optional[int] = typer.Option(None, "--parallel", "-N", help="Parallel search traces per problem."),
    seq_budget: Optional[int] = typer.Option(None, "--seq-budget", "-T", help="Max new tokens per search trace."),
    agg_rounds: Optional[int] = typer.Option(None, "--agg-rounds", "-R", help="RSA rounds (0 = no aggregator)."),
    aggregate: Optional[str] = typer.Option(None, help="learned | majority | none"),
    population: Optional[int] = typer.Option(None, help="RSA population P."),
    agg_set_size: Optional[int] = typer.Option(None, help="RSA subset size k."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="Problems JSONL (default: stdin)."),
    prompt: Optional[str] = typer.Option(None, help="One problem given as a raw search prompt."),
    eval_split: Optional[int] = typer.Option(None, "--eval", help="Use N problems of the task's eval split."),
    traces: bool = typer.Option(False, "--traces", help="Include every trace in the output."),
    backend: Optional[str] = BackendOpt,
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Answer problems: N parallel traces -> R rounds of aggregation -> answer, one JSON line each."""
    extra = list(overrides or [])
    for key, val in [
        ("infer.parallel", parallel), ("infer.seq_budget", seq_budget), ("infer.agg_rounds", agg_rounds),
        ("infer.aggregate", aggregate), ("infer.population", population), ("infer.agg_set_size", agg_set_size),
        ("generation.backend", backend), ("seed", seed),
    ]:
        if val is not None:
            extra.append(f"{key}={val}")
    from spiral_cli.infer import run_infer

    run_infer(
        recipe_path=recipe, overrides=extra, model=model, home=_home(), input_path=input, prompt=prompt,
        eval_problems=eval_split, include_traces=traces, console=err,
    )


@app.command()
@friendly
def sweep(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    models: str = typer.Option(..., help="Comma-separated models (registry names or paths)."),
    overrides: Optional[list[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, help="Output directory."),
    backend: Optional[str] = BackendOpt,
) -> None:
    """Inference-compute scaling curves over N x T x R, with plots and scaling efficiency."""
    from spiral_cli.sweep import run_sweep

    summary = run_sweep(_load(recipe, _with_backend(overrides, backend)), models=models.split(","), out=out, home=_home(), console=err)
    typer.echo(json.dumps(summary, default=str))


from spiral_cli.compare import compare_command  # noqa: E402  (light import: typer, rich, stdlib)

app.command("compare")(friendly(compare_command))


@app.command()
@friendly
def curves(
    runs: list[str] = typer.Argument(..., help="RL run names (directories under $SPIRAL_HOME/runs)."),
    out: Path = typer.Option(Path("curves.png"), "--out", "-o", help="Image to write."),
) -> None:
    """Plot held-out accuracy against step and generated tokens for one or more RL runs."""
    from spiral_cli.jsonl import InputError, read_jsonl_file
    from spiral_cli.paths import runs_dir
    from spiral_cli.plots import plot_training_curves

    histories = {}
    for name in runs:
        path = runs_dir(_home()) / name / "eval.jsonl"
        if not path.is_file():
            raise InputError(f"no evaluations recorded for run {name!r} ({path} not found)")
        histories[name] = [row for _, row in read_jsonl_file(path)]
    typer.echo(str(plot_training_curves(histories, out)))


# ---------------------------------------------------------------- registry


def _print_entries(entries, as_json: bool) -> None:
    if as_json:
        for e in entries:
            typer.echo(json.dumps(e.to_dict()))
        return
    from rich.table import Table

    table = Table("name", "step", "stage", "parent", "tags", "metrics", "created", "path")
    for e in entries:
        metrics = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in (e.metrics or {}).items())
        table.add_row(e.name, str(e.step), e.stage, e.parent or "", ",".join(e.tags), metrics[:60], e.created[:19], str(e.path))
    Console().print(table)


@registry_app.command("ls")
@friendly
def registry_ls(
    name: Optional[str] = typer.Argument(None, help="Only this name."),
    stage: Optional[str] = typer.Option(None, help="Only this stage (base, sft, set, agg, grpo)."),
    as_json: bool = typer.Option(False, "--json", help="JSONL output."),
) -> None:
    """List registered checkpoints."""
    _print_entries(_registry().ls(name=name, stage=stage), as_json)


@registry_app.command("show")
@friendly
def registry_show(ref: str = typer.Argument(..., help="name, name@step, name:latest or name:tag")) -> None:
    """Show one entry as JSON (recipe snapshot, metrics, lineage)."""
    typer.echo(json.dumps(_registry().show(ref).to_dict(), indent=2))


@registry_app.command("tag")
@friendly
def registry_tag(ref: str = typer.Argument(...), tag: str = typer.Argument(...)) -> None:
    """Give an entry a tag (moves the tag if another entry had it)."""
    e = _registry().tag(ref, tag)
    err.print(f"tagged {e.name}@{e.step} as {tag}" if e is not None else f"tagged {ref} as {tag}")


@registry_app.command("rm")
@friendly
def registry_rm(
    ref: str = typer.Argument(..., help="name (all steps) or name@step"),
    delete_files: bool = typer.Option(False, "--delete-files", help="Also delete the checkpoint directories."),
) -> None:
    """Remove entries (and optionally their files)."""
    removed = _registry().rm(ref, delete_files=delete_files)
    for e in removed:
        err.print(f"removed {e.name}@{e.step}")


# ---------------------------------------------------------------- tasks


def _task(name: str, recipe: Optional[Path], overrides: Optional[list[str]]):
    from spiral_cli.tasks import load_task

    options: dict[str, Any] = {}
    if recipe is not None:
        r = _load(recipe, None)
        if r.task.name == name:
            options = r.task.options()
    from spiral_cli.recipe import parse_override

    for item in overrides or []:
        path, value = parse_override(item)
        if path[0] == "task":
            path = path[1:]
        if len(path) != 1:
            from spiral_cli.recipe import RecipeError

            raise RecipeError(f"override {item!r}: task options are flat, e.g. --set max_value=50")
        options[path[0]] = value
    return load_task(name, options)


@tasks_app.command("ls")
@friendly
def tasks_ls() -> None:
    """List available tasks (built-in and entry points)."""
    from spiral_cli.tasks import list_tasks

    for name, desc in list_tasks().items():
        typer.echo(f"{name}\t{desc}")


@tasks_app.command("sample")
@friendly
def tasks_sample(
    task: str = typer.Argument(..., help="Task name or pkg.mod:Class"),
    n: int = typer.Option(5, "-n", help="How many problems."),
    split: str = typer.Option("eval", help="train | eval"),
    seed: int = typer.Option(0, help="Seed."),
    with_prompt: bool = typer.Option(False, "--with-prompt", help="Add the search prompt to each line."),
    recipe: Optional[Path] = typer.Option(None, help="Take task options from this recipe."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Task option, e.g. --set max_value=50"),
) -> None:
    """Print problems as JSONL."""
    from spiral_cli.jsonl import write_jsonl_line

    t = _task(task, recipe, overrides)
    if split not in ("train", "eval"):
        raise typer.BadParameter("split must be train or eval")
    for p in t.problems(split, n, seed):
        write_jsonl_line({**p, "prompt": t.search_prompt(p)} if with_prompt else p)


@tasks_app.command("score")
@friendly
def tasks_score(
    task: str = typer.Argument(..., help="Task name or pkg.mod:Class"),
    recipe: Optional[Path] = typer.Option(None, help="Take task options from this recipe."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Task option, e.g. --set scoring=tinyzero"),
) -> None:
    """Score JSONL lines {"problem": {...}, "completion": "..."} from stdin; prints each with its reward."""
    from spiral_cli.jsonl import InputError, iter_jsonl, write_jsonl_line
    from spiral_cli.tasks import TaskError

    t = _task(task, recipe, overrides)
    for lineno, obj in iter_jsonl(sys.stdin):
        if not isinstance(obj.get("problem"), dict) or not isinstance(obj.get("completion"), str):
            raise InputError(f"<stdin> line {lineno}: expected {{\"problem\": {{...}}, \"completion\": \"...\"}}")
        try:
            problem = t.validate_problem(obj["problem"])
        except TaskError as e:
            raise InputError(f"<stdin> line {lineno}: {e}") from None
        text = obj["completion"]
        write_jsonl_line({
            **obj, "answer": t.extract_answer(text), "reward": t.reward(problem, text),
            "correct": t.is_correct(problem, text),
        })


def main() -> None:
    app()


if __name__ == "__main__":
    main()
