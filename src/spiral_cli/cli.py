"""The `spiral` command line: thin wrappers that parse, load the recipe and call one function.

Machine-readable output goes to stdout (JSONL), progress and errors to stderr. User mistakes
(bad recipe, bad JSONL, missing checkpoint) exit with code 2 and one line naming the problem.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from spiral_cli import __version__
from spiral_cli.processes import OtherRankFailed

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
BackendOpt = typer.Option(None, "--backend", help="Generation backend: hf | vllm | vllm_server (generation.backend).")
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
    from spiral_cli.paths import SpiralHomeError
    from spiral_cli.recipe import RecipeError
    from spiral_cli.registry import RegistryError
    from spiral_cli.tasks import TaskError

    errors: list[type[BaseException]] = [InputError, RecipeError, RegistryError, TaskError, SpiralHomeError]
    try:
        from spiral_cli.models import ModelError

        errors.append(ModelError)
    except ImportError:  # torch missing: the other commands still work
        pass
    return tuple(errors)


def _error(message: str) -> None:
    """`error: <message>` on stderr, as one line (the message's own markup-like text kept as is)."""
    from rich.markup import escape

    line = " ".join(str(message).split())
    err.print(f"[bold red]error:[/] {escape(line)}", markup=True, highlight=False, soft_wrap=True)


def _os_error(e: OSError) -> str:
    """One line for a file-system error: what failed, on which path, and the likely cause."""
    what = e.strerror or str(e)
    where = f": {e.filename}" if e.filename else ""
    hint = ""
    if isinstance(e, PermissionError) or e.errno in (13, 30):  # EACCES, EROFS
        hint = " (is the spiral home, or the output folder, writable?)"
    elif e.errno == 28:  # ENOSPC
        hint = " (the disk is full)"
    return f"{what}{where}{hint}"


def friendly(fn: Callable) -> Callable:
    """Turn user mistakes into `error: <one line>` and exit code 2, with no traceback; Ctrl-C into
    `interrupted` and exit code 130. SPIRAL_DEBUG=1 shows the traceback of file-system errors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as e:
            _error(str(e))
            raise typer.Exit(2) from None
        except OtherRankFailed as e:  # rank 0 said why (and exits with its own code); this rank follows
            _error(str(e))
            raise typer.Exit(1) from None
        except BrokenPipeError:  # `spiral ... | head` closed the pipe: not an error
            sys.stderr.close()
            raise typer.Exit(0) from None
        except OSError as e:  # a path that cannot be read or written: one line, not a traceback
            if os.environ.get("SPIRAL_DEBUG"):
                raise
            _error(_os_error(e))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def _home() -> Path:
    from spiral_cli.paths import spiral_home

    return spiral_home(_state["home"])


def _registry():
    from spiral_cli.registry import Registry

    return Registry(_home())


def _load(recipe: Optional[Path], overrides: Optional[list[str]]):
    from spiral_cli.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


def _one_process(command: str) -> None:
    """`command` runs in one process: under torchrun or accelerate launch every rank would run all
    of it, and all of them would write the same run and registry entry. Refused before any work."""
    from spiral_cli.jsonl import InputError

    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise InputError(f"spiral {command} runs in one process, and this one was launched as 1 of {world} "
                         "(torchrun / accelerate launch): run it without a launcher; sft, train-set and train-agg "
                         "are the commands that scale out (docs/scaling.md)")


def _check_name(name: Optional[str]) -> None:
    """A --name is checked before anything else: it names folders under the spiral home."""
    if name is not None:
        from spiral_cli.registry import validate_name

        validate_name(name, "run name (--name)")


def _interrupted(name: str, section: str, save_every: int, resumes: bool = True) -> None:
    """Ctrl-C during training: say where the run's state is and how to resume, exit 130."""
    from spiral_cli.paths import runs_dir

    state = runs_dir(_home()) / name / "state"
    step = None
    if (state / "trainer_state.pt").is_file():
        try:
            from spiral_cli.checkpoints import load_trainer_state

            saved = load_trainer_state(state)
            step = saved.get("step", (saved.get("run") or {}).get("step"))
        except Exception:  # noqa: BLE001 - the message below still says where to look
            step = "?"
    if step is not None:
        msg = (f"interrupted: {name} saved its state at step {step} in {state}; "
               + ("run the same command again to resume from there" if resumes else
                  "run the same command without --no-resume to resume from there"))
    else:
        msg = (f"interrupted before {name} saved any state (it saves every {section}.save_every = {save_every} "
               "steps): nothing to resume; the same command starts over")
    err.print(msg, highlight=False, soft_wrap=True)
    raise typer.Exit(130)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"spiral {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    ctx: typer.Context,
    home: Optional[Path] = typer.Option(
        None, "--home", envvar="SPIRAL_HOME",
        help="Spiral home (registry + checkpoints), also after a subcommand. Default: ~/.spiral",
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    # a home from $SPIRAL_HOME is read (and blamed in errors) as the variable, not as --home
    source = ctx.get_parameter_source("home")
    from_env = getattr(source, "name", None) == "ENVIRONMENT"
    _state["home"] = None if from_env else home
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
    _check_name(name)
    if data is not None:
        from spiral_cli.jsonl import check_input_file

        check_input_file(data, "--data")
    r = _load(recipe, _with_backend(overrides, backend))
    if data is not None:
        r.sft.data = str(data)
    if model is not None:
        r.model.name = model
    from spiral_cli.sft import run_sft

    try:
        result = run_sft(r, home=_home(), name=name, resume=resume, console=err)
    except KeyboardInterrupt:
        _interrupted(name or f"{r.name}-sft", "sft", r.sft.save_every, resumes=resume)
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
    _check_name(name)
    r = _load(recipe, _with_backend(overrides, backend) + ([f"train_set.objective={objective}"] if objective else [])
              + _budget("train_set", max_generated_tokens))
    for note in r.train_set.deprecations:
        err.print(f"[yellow]warning:[/] train_set.{note}", highlight=False, soft_wrap=True)
    from spiral_cli.rl.trainer import run_train_set

    default_name = f"{r.name}-{'grpo' if r.train_set.objective == 'grpo' else 'set'}"
    _run_rl(run_train_set, r, name=name, default_name=default_name, model=model, section="train_set")


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
    _check_name(name)
    r = _load(recipe, _with_backend(overrides, backend) + _budget("train_agg", max_generated_tokens))
    from spiral_cli.rl.trainer import run_train_agg

    _run_rl(run_train_agg, r, name=name, default_name=f"{r.name}-agg", model=model, section="train_agg")


def _run_rl(run, r, *, name: Optional[str], default_name: str, model: Optional[str], section: str) -> None:
    """train-set / train-agg: run, and say where the state is on Ctrl-C."""
    run_name = name or default_name
    try:
        result = run(r, home=_home(), name=name, model=model, console=err)
    except KeyboardInterrupt:
        _interrupted(run_name, section, getattr(r, section).save_every)
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
    aggregator: Optional[str] = typer.Option(
        None, help="A separate aggregator checkpoint (two-model form); default: the model aggregates."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="Problems JSONL (default: stdin)."),
    prompt: Optional[str] = typer.Option(None, help="One problem given as a raw search prompt."),
    eval_split: Optional[int] = typer.Option(None, "--eval", help="Use N problems of the task's eval split."),
    traces: bool = typer.Option(False, "--traces", help="Include every trace in the output."),
    backend: Optional[str] = BackendOpt,
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Answer problems: N parallel traces -> R rounds of aggregation -> answer, one JSON line each."""
    _one_process("infer")
    extra = list(overrides or [])
    for key, val in [
        ("infer.parallel", parallel), ("infer.seq_budget", seq_budget), ("infer.agg_rounds", agg_rounds),
        ("infer.aggregate", aggregate), ("infer.population", population), ("infer.agg_set_size", agg_set_size),
        ("infer.aggregator", aggregator), ("generation.backend", backend), ("seed", seed),
    ]:
        if val is not None:
            extra.append(f"{key}={val}")
    from spiral_cli.infer import run_infer

    try:
        run_infer(
            recipe_path=recipe, overrides=extra, model=model, home=_home(), input_path=input, prompt=prompt,
            eval_problems=eval_split, include_traces=traces, console=err,
        )
    except KeyboardInterrupt:
        err.print("interrupted: every answer printed so far is complete (one JSON line per problem)", highlight=False)
        raise typer.Exit(130) from None


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
    _one_process("sweep")
    from spiral_cli.jsonl import InputError

    r = _load(recipe, _with_backend(overrides, backend))
    if out is not None:  # checked before any model loads
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out}: a file is there; give a folder (it is created if missing)")
        first = next(p for p in [out, *out.absolute().parents] if p.exists())
        if not first.is_dir():
            raise InputError(f"--out {out}: {first} is a file, so the folder cannot be created")
        if not os.access(first, os.W_OK):
            raise InputError(f"--out {out}: {first} is not writable")
    from spiral_cli.infer import MAX_AGG_ROUNDS, MAX_PARALLEL
    from spiral_cli.recipe import RecipeError

    if r.sweep.agg_rounds and max(r.sweep.agg_rounds) > MAX_AGG_ROUNDS:
        raise RecipeError(f"sweep.agg_rounds: at most {MAX_AGG_ROUNDS} rounds (got {max(r.sweep.agg_rounds)})")
    if r.sweep.parallel and max(r.sweep.parallel) > MAX_PARALLEL:
        raise RecipeError(f"sweep.parallel: at most {MAX_PARALLEL} traces per problem (got {max(r.sweep.parallel)})")
    from spiral_cli.sweep import run_sweep

    summary = run_sweep(r, models=models.split(","), out=out, home=_home(), console=err)
    typer.echo(json.dumps(summary, default=str))


from spiral_cli.compare import compare_command  # noqa: E402  (light import: typer, rich, stdlib)

app.command("compare")(friendly(compare_command))


@app.command()
@friendly
def curves(
    runs: list[str] = typer.Argument(..., help="RL run names (directories under $SPIRAL_HOME/runs)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Image to write (default: $SPIRAL_HOME/curves/<run>+<run>.png)."),
) -> None:
    """Plot held-out accuracy against step and generated tokens for one or more RL runs."""
    from spiral_cli.jsonl import InputError, read_jsonl_file
    from spiral_cli.paths import runs_dir
    from spiral_cli.plots import check_image_path, plot_training_curves
    from spiral_cli.registry import validate_name

    for name in runs:
        validate_name(name, "run name")
    if out is None:  # inside the spiral home, like everything spiral writes unasked
        out = _home() / "curves" / ("+".join(runs) + ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
    problem = check_image_path(out)
    if problem:
        raise InputError(problem)
    histories = {}
    for name in runs:
        path = runs_dir(_home()) / name / "eval.jsonl"
        if not path.is_file():
            raise InputError(f"no evaluations recorded for run {name!r} ({path} not found)")
        histories[name] = [row for _, row in read_jsonl_file(path)]
    typer.echo(str(plot_training_curves(histories, out)))


# ---------------------------------------------------------------- registry


def _print_entries(entries, as_json: bool) -> None:
    """A table that fits the terminal: name, step, stage, parent and tags always whole; then
    metrics, created and path while they fit (what does not fit is named on stderr; --json has all)."""
    if as_json:
        for e in entries:
            typer.echo(json.dumps(e.to_dict()))
        return
    from rich.table import Table

    from spiral_cli.tables import COMPACT, natural_width

    console = Console()
    rows = []
    for e in entries:
        metrics = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in (e.metrics or {}).items())
        rows.append({"name": e.name, "step": str(e.step), "stage": e.stage, "parent": e.parent or "",
                     "tags": ",".join(e.tags), "metrics": metrics[:60], "created": e.created[:16].replace("T", " "),
                     "path": str(e.path)})

    def table(columns: list[str], compact: bool) -> Table:
        t = Table(*columns, **(COMPACT if compact else {}))
        for c in t.columns:
            c.no_wrap = True
            c.overflow = "ellipsis" if c.header in ("metrics", "path") else "fold"
        for r in rows:
            t.add_row(*(r[c] for c in columns))
        return t

    required = ["name", "step", "stage", "parent", "tags"]
    compact = natural_width(console, table(required, False)) > console.width
    columns, hidden = list(required), []
    for c in ("metrics", "created", "path"):
        if natural_width(console, table(columns + [c], compact)) <= console.width:
            columns.append(c)
        else:
            hidden.append(c)
    console.print(table(columns, compact))
    if hidden and rows:
        err.print(f"({', '.join(hidden)} left out at {console.width} columns: widen the terminal or use --json)",
                  highlight=False)


@registry_app.command("ls")
@friendly
def registry_ls(
    name: Optional[str] = typer.Argument(None, help="Only this name."),
    stage: Optional[str] = typer.Option(None, help="Only this stage (base, sft, set, agg, grpo)."),
    as_json: bool = typer.Option(False, "--json", help="JSONL output."),
) -> None:
    """List registered checkpoints."""
    reg = _registry()
    entries = reg.ls(name=name, stage=stage)
    if name is not None and not entries:
        reg.require_name(name)  # an unknown name is an error (with did-you-mean), not an empty table
    _print_entries(entries, as_json)


@registry_app.command("show")
@friendly
def registry_show(ref: str = typer.Argument(..., help="name, name@step, name:latest or name:tag")) -> None:
    """Show one entry as JSON (recipe snapshot, metrics, lineage)."""
    typer.echo(json.dumps(_registry().show(ref).to_dict(), indent=2))


@registry_app.command("tag")
@friendly
def registry_tag(
    ref: str = typer.Argument(...),
    tag: str = typer.Argument(...),
    move: bool = typer.Option(False, "--move", help="Move the tag even if another checkpoint name carries it."),
) -> None:
    """Give an entry a tag. A tag on another step of the same name moves (and says so); a tag on
    another checkpoint name moves only with --move."""
    from spiral_cli.registry import RegistryError

    reg = _registry()
    target = reg.show(ref)
    before = reg.tagged(tag)
    if before is not None and before.name != target.name and not move:
        raise RegistryError(
            f"tag {tag!r} is on {before.ref}; give --move to move it to {target.ref} "
            f"(then {before.name}:{tag} no longer resolves)"
        )
    e = reg.tag(ref, tag)
    if before is not None and before.id != e.id:
        err.print(f"moved tag {tag} from {before.ref} to {e.ref}", highlight=False)
    else:
        err.print(f"tagged {e.ref} as {tag}", highlight=False)


@registry_app.command("rm")
@friendly
def registry_rm(
    ref: str = typer.Argument(..., help="name (all steps) or name@step"),
    delete_files: bool = typer.Option(False, "--delete-files", help="Also delete the checkpoint directories."),
) -> None:
    """Remove entries (and optionally their files). Entries trained from them keep their lineage
    (it names the removed entry): a warning lists them."""
    reg = _registry()
    removed = reg.rm(ref, delete_files=delete_files)
    for e in removed:
        err.print(f"removed {e.name}@{e.step}", highlight=False)
    children = reg.children(removed)
    if children:
        names = ", ".join(c.ref for c in children[:5]) + (f" and {len(children) - 5} more" if len(children) > 5 else "")
        err.print(f"[yellow]warning:[/] {names} {'was' if len(children) == 1 else 'were'} trained from what was removed: "
                  f"{'its' if len(children) == 1 else 'their'} parent now names a checkpoint that is gone",
                  highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- tasks


def _task(name: str, recipe: Optional[Path], overrides: Optional[list[str]]):
    from spiral_cli.tasks import load_task

    options: dict[str, Any] = {}
    if recipe is not None:
        r = _load(recipe, None)
        if r.task.name == name:
            options = r.task.options()
    from spiral_cli.recipe import coerce_text_field, field_annotation, parse_override
    from spiral_cli.tasks import TaskError, resolve_task_class

    for item in overrides or []:
        path, value = parse_override(item)
        if path[0] == "task":
            path = path[1:]
        if len(path) != 1:
            from spiral_cli.recipe import RecipeError

            raise RecipeError(f"override {item!r}: task options are flat, e.g. --set max_value=50")
        try:
            config = resolve_task_class(name).Config
        except TaskError:
            config = None  # load_task below says what is wrong with the name
        options[path[0]] = coerce_text_field(field_annotation(config, path), value, item.split("=", 1)[1])
    return load_task(name, options)


@tasks_app.command("ls")
@friendly
def tasks_ls() -> None:
    """List available tasks (built-in and entry points)."""
    from spiral_cli.tasks import list_tasks

    for name, desc in list_tasks().items():
        typer.echo(f"{name}\t{desc}")


MAX_SAMPLE = 1_000_000  # tasks sample -n: more is a typo, not a data set


@tasks_app.command("sample")
@friendly
def tasks_sample(
    task: str = typer.Argument(..., help="Task name or pkg.mod:Class"),
    n: int = typer.Option(5, "-n", min=1, max=MAX_SAMPLE, help="How many problems (printed as they are made)."),
    split: str = typer.Option("eval", help="train | eval"),
    seed: int = typer.Option(0, help="Seed."),
    with_prompt: bool = typer.Option(False, "--with-prompt", help="Add the search prompt to each line."),
    recipe: Optional[Path] = typer.Option(None, help="Take task options from this recipe."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help="Task option, e.g. --set max_value=50"),
) -> None:
    """Print problems as JSONL, each as soon as it is made."""
    from spiral_cli.jsonl import InputError, write_jsonl_line

    if split not in ("train", "eval"):
        raise InputError(f"--split {split!r}: give train or eval")
    t = _task(task, recipe, overrides)
    size = getattr(t, "split_size", None)
    available = size(split) if callable(size) else None
    if available is not None and available < n:
        if split == "eval":
            err.print(f"[yellow]warning:[/] the eval split of {task!r} has only {available} problem"
                      f"{'s' if available != 1 else ''}: printing {available}, not {n}", highlight=False, soft_wrap=True)
        else:
            err.print(f"[yellow]warning:[/] the train split of {task!r} has {available} problems: the {n} printed "
                      "repeat them", highlight=False, soft_wrap=True)
    stream = getattr(t, "iter_problems", None)
    for p in (stream(split, n, seed) if callable(stream) else t.problems(split, n, seed)):
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


def _hoist_home(args: list[str]) -> list[str]:
    """`--home X` is an option of `spiral` itself; accept it after a subcommand too
    (`spiral registry ls --home X`) by moving it to the front."""
    out, front, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a == "--":
            out += args[i:]
            break
        if i > 0 and a == "--home" and i + 1 < len(args):
            front += [a, args[i + 1]]
            i += 2
            continue
        if i > 0 and a.startswith("--home="):
            front.append(a)
        else:
            out.append(a)
        i += 1
    return front + out


_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _usage_error_line(e) -> str:
    """A click usage error as one line, with the command's --help to read."""
    msg = " ".join(e.format_message().split())
    extra = msg.lower().startswith("got unexpected extra argument")
    if extra and any(f"({w})" in msg.lower() for w in _BOOL_WORDS):
        msg += "; flags such as --with-prompt take no value: give the flag alone to turn it on"
    ctx = getattr(e, "ctx", None)
    where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
    return msg + where


def _flags_show_no_type() -> None:
    """Help shows a type after an option that takes a value; a flag (--traces, --with-prompt)
    takes none, so it shows none (typer prints <bool>, which invites `--with-prompt true`)."""
    try:
        from typer.core import TyperOption
    except ImportError:
        return
    shown = TyperOption.display_type_rich
    if getattr(shown, "_spiral", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) and not getattr(self, "count", False) and self.metavar is None:
            return None
        return shown(self, ctx)

    display_type_rich._spiral = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich


def main(argv: Optional[list[str]] = None) -> None:
    """`spiral`: every user mistake, including a usage error, is one `error:` line and exit code 2."""
    try:  # typer >= 0.22 carries its own copy of click, and keeps Abort in typer.exceptions
        from typer._click import exceptions as click_errors
        from typer.exceptions import Abort
    except ImportError:  # pragma: no cover - older typer: click itself
        from click import exceptions as click_errors
        from click.exceptions import Abort

    _flags_show_no_type()
    args = _hoist_home(list(sys.argv[1:] if argv is None else argv))
    try:
        rc = app(args=args, standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:
        e.show()
        rc = 2
    except click_errors.UsageError as e:
        _error(_usage_error_line(e))
        rc = 2
    except Abort:  # Ctrl-D at a prompt; a Ctrl-C outside a command's own handler
        err.print("interrupted", highlight=False)
        rc = 130
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
