"""`spiral compare`: SPIRAL against GRPO at an equal training budget, in one command.

The question: trained from the same SFT checkpoint with the same number of *generated training
tokens*, which method gives the model that turns inference compute (N parallel traces x T
tokens x R aggregation rounds) into accuracy better?

What it does
------------
1. Validates everything before any training (one-line errors): the SFT checkpoint is a registry
   entry (pinned to ``name@step``), the budget is at least one step's worth (``step_bound``),
   ``--out`` is not a file, seeds >= 1, problems >= 1, the arm names are valid registry names,
   the sweep grid is valid, and every arm already in the registry was trained with the recipe
   this compare would train it with (``mismatched recipes between arms`` otherwise).
2. Arms: for each seed s in 0..S-1 a SPIRAL arm ``<recipe>-cmp-spiral-s<s>`` and a GRPO arm
   ``<recipe>-cmp-grpo-s<s>``, both from the SFT checkpoint, ``seed = recipe.seed + s``,
   ``train_set.max_generated_tokens = budget`` and ``train_set.steps`` raised to a cap
   (``steps_cap``) so that the token budget ends the run. Trained in process with
   ``rl.trainer.run_train_set``; a finished arm is reused, an interrupted one resumes (the trainer
   resumes from its run state).
3. One ``spiral sweep`` over the SFT checkpoint and every arm's final checkpoint, with
   ``sweep.max_problems = problems``, the recipe's N x T x R grid, output under
   ``<report>/sweep``. Its generations are cached per model under ``<home>/compare/cache``
   (``SWEEP_CACHE``), shared by every report: a compare with one more seed samples only the new
   seed's models (the keys hash the model, its settings, the problems, T and the sampling).
4. The report, rebuilt from the registry, ``<home>/runs/<arm>/`` and ``<report>/sweep/cells.jsonl``
   alone (so a rerun writes it again without training or generating): ``report.md``,
   ``summary.json``, ``efficiency.json``, ``accuracy_vs_inference_tokens.png``,
   ``accuracy_vs_training_tokens.png``, ``recipe.yaml``, ``commands.txt``.

The report and its statistics (seeds pooled per method) are in ``compare_report.py``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from spiral_cli.compare_report import (  # noqa: F401  (also importable from here, as before)
    ALPHA,
    EVAL_PANELS,
    GROUPS,
    MACHINE_LOG,
    METHOD_LABEL,
    N_BOOT,
    RECOMMENDED_PROBLEMS,
    REPORT_FILES,
    STEPS_CAP_FACTOR,
    TOLERANCE,
    _arm_run_dir,
    _final_refs,
    _hash,
    _input_error,
    _metric_rows,
    _recipe_error,
    arm_summaries,
    build_report,
    conclusion,
    headline_accuracy,
    plot_training_tokens,
    pool_cells,
)
from spiral_cli.progress import fmt_duration

# --quick: a first taste within ~20 minutes on a 2-core CPU (defaults an explicit flag overrides)
QUICK_SEEDS = 1
SWEEP_CACHE = Path("compare") / "cache"  # under the home: shared by every compare report
QUICK_PROBLEMS = 100
QUICK_BUDGET_STEPS = 8  # budget = this many times the one-step bound
# held-out evaluations per arm after step 0, at equal token counts (train_set.eval_every_tokens =
# budget / this): a GRPO step generates ~1/4 of a SPIRAL step's tokens, so a cadence in steps
# evaluated GRPO 22 times to SPIRAL's 7 (~21 s each on 2 CPU cores, docs/results.md)
EVAL_POINTS = 6
QUICK_EVAL_POINTS = 4
QUICK_PARALLEL = [1, 4, 8]
QUICK_AGG_ROUNDS = [0, 1]
METHOD_NAMES = {"spiral": "SPIRAL", "grpo": "GRPO"}
# Fields an existing arm may differ in from what this compare would train: the budget and the
# steps cap (the budget logic decides reuse / resume), where and how fast it runs, and sections
# that do not train the arm (its start is pinned by its parent, name@step of the SFT checkpoint).
IGNORED_FIELDS = (
    "train_set.steps", "train_set.max_generated_tokens", "train_set.tensorboard", "train_set.save_every",
    "train_set.eval_every", "train_set.eval_every_tokens", "train_set.eval_problems",
    "train_set.micro_batch_size", "train_set.shared_prefix", "model.device", "model.gradient_checkpointing", "generation.backend",
    "generation.batch_size", "generation.fast_decode", "generation.compile", "generation.vllm",
)
IGNORED_SECTIONS = ("sft", "train_agg", "sweep", "compare")


def _with(recipe, changes: dict[str, Any]):
    """A copy of ``recipe`` with dotted fields set, validated by the recipe schema (the task section
    is unchanged, so its options, checked when the recipe was loaded, are not loaded again)."""
    from pydantic import ValidationError

    from spiral_cli.recipe import Recipe, RecipeError, _format_validation_error

    data = recipe.snapshot()
    for key, value in changes.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_validation_error(e)) from None


def recipe_differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Dotted fields where two recipe snapshots differ, outside IGNORED_FIELDS / IGNORED_SECTIONS,
    each as ``field=<have> (this compare: <want>)``."""
    from spiral_cli.recipe import MISSING, snapshot_differences

    def show(v: Any) -> str:
        return "(absent)" if v is MISSING else json.dumps(v)

    return [f"{key}={show(va)} (this compare: {show(vb)})"
            for key, va, vb in snapshot_differences(have, want, IGNORED_FIELDS + IGNORED_SECTIONS)]


def step_bound(recipe) -> tuple[int, str]:
    """The most tokens one optimizer step of either arm can generate from one draw of prompts,
    and the formula with its numbers.

    SPIRAL: prompts_per_step x (N1 x T + K x N2 x T_agg); GRPO: prompts_per_step x G x T_grpo,
    T_grpo = recipe.grpo_budget (train_set.grpo_max_new_tokens or 2T). Dynamic sampling
    may draw up to max_prompt_draws x as many prompts in one step; this bound counts one draw."""
    from spiral_cli.recipe import grpo_budget

    ts, gen = recipe.train_set, recipe.generation
    t, t_agg = gen.max_new_tokens, gen.agg_max_new_tokens
    t_grpo = grpo_budget(recipe)
    spiral = ts.num_search * t + ts.num_sets * ts.num_aggregations * t_agg
    grpo = ts.num_generations * t_grpo
    bound = ts.prompts_per_step * max(spiral, grpo)
    formula = (f"prompts_per_step {ts.prompts_per_step} x max(SPIRAL N1 {ts.num_search} x T {t} + "
               f"K {ts.num_sets} x N2 {ts.num_aggregations} x T_agg {t_agg} = {spiral:,}, "
               f"GRPO G {ts.num_generations} x T_grpo {t_grpo} = {grpo:,}) = {bound:,}")
    return bound, formula


def steps_cap(recipe, budget: int, bound: int) -> int:
    return max(recipe.train_set.steps, STEPS_CAP_FACTOR * math.ceil(budget / bound))


# ---------------------------------------------------------------- the plan (all validation)


@dataclass
class Arm:
    name: str
    objective: str  # spiral | grpo
    index: int  # s in 0..S-1
    seed: int  # recipe.seed + s
    recipe: Any  # the Recipe this arm trains with
    status: str = "new"  # new | resume | finished | capped
    entry: Any = None  # the latest registry entry before this run, if any

    @property
    def method(self) -> str:
        return METHOD_NAMES[self.objective]


@dataclass
class Plan:
    recipe: Any  # the compare recipe (budget, steps cap, problems and the quick grid applied)
    home: Path
    sft_ref: str  # name@step
    sft_entry: Any
    seeds: int
    budget: int
    bound: int
    bound_formula: str
    cap: int
    problems: int
    out: Path
    quick: bool
    quick_changes: list[str]
    arms: list[Arm]
    recipe_path: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    flags: dict[str, Any] = field(default_factory=dict)  # as given on the command line


def _tokens_before(home: Path, name: str, step: int) -> int | None:
    """Generated tokens after step ``step - 1`` (0 before step 1), from metrics.jsonl."""
    if step <= 1:
        return 0
    for row in _metric_rows(home, name):
        if row.get("step") == step - 1:
            return int(row.get("generated_tokens", 0))
    return None


def _arm_status(arm: Arm, plan_budget: int, cap: int, home: Path) -> str:
    """new | resume | finished | capped, or a RecipeError when the arm went past this budget."""
    entry = arm.entry
    if entry is None:
        return "new"
    gen = entry.metrics.get("generated_tokens")
    if gen is not None and gen >= plan_budget:
        # the run for this budget stops at the first step whose tokens reach it: that is this
        # step when the step before had not reached it
        prev = _tokens_before(home, arm.name, entry.step)
        if entry.metrics.get("max_generated_tokens") == plan_budget or (prev is not None and prev < plan_budget):
            return "finished"
        raise _recipe_error(
            f"{entry.ref} was trained to {gen:,} generated tokens (budget "
            f"{entry.metrics.get('max_generated_tokens')}), past this compare's budget of {plan_budget:,}: "
            f"use --budget-tokens {entry.metrics.get('max_generated_tokens')} or remove the arm "
            f"(spiral registry rm {arm.name} --delete-files; rm -r {_arm_run_dir(home, arm.name)})"
        )
    if entry.step >= cap:
        return "capped"
    return "resume"


def plan_compare(recipe, *, home: Path, sft_model: str | None = None, seeds: int | None = None,
                 budget_tokens: int | None = None, problems: int | None = None, out: Path | None = None,
                 quick: bool = False, recipe_path: str | Path | None = None,
                 overrides: list[str] | None = None) -> Plan:
    """Every check of the compare, and what it will do; trains and generates nothing."""
    from spiral_cli.registry import Registry, RegistryError, validate_name
    from spiral_cli.sweep_cells import Grid

    home = Path(home)
    flags = {"sft_model": sft_model, "seeds": seeds, "budget_tokens": budget_tokens, "problems": problems,
             "out": str(out) if out is not None else None, "quick": quick}
    # -- flags
    if seeds is not None and seeds < 1:
        raise _input_error(f"--seeds: must be >= 1 (got {seeds})")
    if problems is not None and problems < 1:
        raise _input_error(f"--problems: must be >= 1 (got {problems})")
    if budget_tokens is not None and budget_tokens < 1:
        raise _input_error(f"--budget-tokens: must be >= 1 (got {budget_tokens})")
    if out is not None:
        out = Path(out).expanduser()
        if out.exists() and not out.is_dir():
            raise _input_error(f"--out {out}: exists and is not a directory")
    # -- the SFT checkpoint: a registry entry, pinned to name@step
    registry = Registry(home)
    sft_model = sft_model or f"{recipe.name}-sft"
    try:
        resolved = registry.resolve(sft_model)
    except RegistryError as e:
        raise RegistryError(f"--sft-model {sft_model}: {e} (train it with: spiral sft RECIPE)") from None
    if resolved.entry is None:
        raise RegistryError(f"--sft-model {sft_model}: not a registry entry (it resolves to a {resolved.kind}); "
                            "every arm starts from a registered SFT checkpoint, e.g. <recipe>-sft")
    sft_entry = resolved.entry
    sft_ref = sft_entry.ref
    # -- the preset
    quick_changes: list[str] = []
    cmp = recipe.compare
    n_seeds = seeds if seeds is not None else (QUICK_SEEDS if quick else cmp.seeds)
    n_problems = problems if problems is not None else (QUICK_PROBLEMS if quick else cmp.problems)
    sw = recipe.sweep
    # the compare sweeps every arm: its grid is the recipe's `compare` section, not `sweep`'s
    grid_changes: dict[str, Any] = {
        "sweep.parallel": sorted(set(cmp.parallel)), "sweep.seq_budget": sorted(set(cmp.seq_budget or [max(sw.seq_budget)])),
        "sweep.agg_rounds": sorted(set(cmp.agg_rounds)),
    }
    if quick:
        if seeds is None:
            quick_changes.append(f"seeds {cmp.seeds} -> {QUICK_SEEDS}")
        if problems is None:
            quick_changes.append(f"problems {cmp.problems} -> {QUICK_PROBLEMS}")
        quick_grid = {"sweep.parallel": list(QUICK_PARALLEL), "sweep.seq_budget": [max(grid_changes["sweep.seq_budget"])],
                      "sweep.agg_rounds": list(QUICK_AGG_ROUNDS)}
        for key, value in quick_grid.items():
            if grid_changes[key] != value:
                quick_changes.append(f"{key} {grid_changes[key]} -> {value}")
        grid_changes = quick_grid
    bound, formula = step_bound(recipe)
    if budget_tokens is not None:
        budget = budget_tokens
    elif quick:
        budget = QUICK_BUDGET_STEPS * bound
        quick_changes.append(f"budget -> {budget:,} generated tokens per arm ({QUICK_BUDGET_STEPS} x the one-step bound)")
    elif recipe.train_set.max_generated_tokens is not None:
        budget = recipe.train_set.max_generated_tokens
    else:
        raise _recipe_error(
            "no training budget: give --budget-tokens N (generated tokens per arm, at least "
            f"{bound:,}, one step's worth) or set train_set.max_generated_tokens in the recipe")
    if budget < bound:
        raise _recipe_error(
            f"--budget-tokens {budget:,} is less than one training step can generate (one draw of prompts: "
            f"{formula}); give at least {bound:,} so the budget, not the first step, sets the training length")
    cap = steps_cap(recipe, budget, bound)
    eval_every_tokens = recipe.train_set.eval_every_tokens or max(1, budget // (QUICK_EVAL_POINTS if quick else EVAL_POINTS))
    base = _with(recipe, {
        "train_set.max_generated_tokens": budget, "train_set.steps": cap, "train_set.eval_every_tokens": eval_every_tokens,
        "sweep.max_problems": n_problems, "sweep.baseline": None, **grid_changes,
    })
    Grid.from_recipe(base)  # the sweep grid, checked now rather than after training
    if out is None:
        ident = {"recipe": base.snapshot(), "sft": sft_ref, "seeds": n_seeds}
        out = home / "compare" / f"{recipe.name}-{_hash(ident)}"
    # -- the arms, and what exists of them
    arms: list[Arm] = []
    for s in range(n_seeds):
        for objective in ("spiral", "grpo"):
            name = f"{recipe.name}-cmp-{objective}-s{s}"
            validate_name(name, "arm name")
            arm_recipe = _with(base, {"seed": recipe.seed + s, "train_set.objective": objective})
            arms.append(Arm(name=name, objective=objective, index=s, seed=recipe.seed + s, recipe=arm_recipe,
                            entry=registry.latest(name)))
    mismatched = []
    for arm in arms:
        state = _arm_run_dir(home, arm.name) / "state" / "trainer_state.pt"
        if arm.entry is None:
            if state.is_file():
                raise _recipe_error(
                    f"{arm.name}: a run state exists in {state.parent} but the registry has no entry for it "
                    f"(removed with spiral registry rm?); its recipe cannot be checked: delete "
                    f"{_arm_run_dir(home, arm.name)} to train the arm afresh")
            continue
        diffs = recipe_differences(arm.entry.recipe, arm.recipe.snapshot())
        if arm.entry.parent != sft_ref:
            diffs.insert(0, f"parent={arm.entry.parent} (this compare: {sft_ref})")
        if diffs:
            mismatched.append((arm, diffs))
    if mismatched:
        arm, diffs = mismatched[0]
        more = f"; {len(mismatched) - 1} more arm(s) differ" if len(mismatched) > 1 else ""
        shown = "; ".join(diffs[:4]) + (f"; +{len(diffs) - 4} more fields" if len(diffs) > 4 else "")
        raise _recipe_error(
            f"mismatched recipes between arms: {arm.entry.ref} was trained with {shown}{more}; run the compare "
            f"with the recipe it was trained with, or remove the arm (spiral registry rm {arm.name} --delete-files; "
            f"rm -r {_arm_run_dir(home, arm.name)})")
    for arm in arms:
        arm.status = _arm_status(arm, budget, cap, home)
    return Plan(recipe=base, home=home, sft_ref=sft_ref, sft_entry=sft_entry, seeds=n_seeds, budget=budget,
                bound=bound, bound_formula=formula, cap=cap, problems=n_problems, out=Path(out), quick=quick,
                quick_changes=quick_changes, arms=arms, recipe_path=str(recipe_path) if recipe_path else None,
                overrides=list(overrides or []), flags=flags)


# ---------------------------------------------------------------- training (with progress and ETA)


def _train_arm(recipe, *, home: Path, name: str, model: str, console: Console) -> dict[str, Any]:
    """rl.trainer.run_train_set, looked up at call time (tests replace it)."""
    from spiral_cli.rl import trainer

    return trainer.run_train_set(recipe, home=home, name=name, model=model, console=console)


def _train_arms(plan: Plan, console: Console) -> tuple[list[str], list[str]]:
    from spiral_cli.registry import Registry

    registry = Registry(plan.home)
    trained, reused = [], []
    spent: dict[str, list[float]] = {}  # objective -> [seconds, tokens] trained in this run
    n = len(plan.arms)
    for i, arm in enumerate(plan.arms, start=1):
        head = f"[{i}/{n}] {arm.name} ({arm.method}, seed {arm.seed})"
        if arm.status in ("finished", "capped"):
            e = arm.entry
            how = "at its budget" if arm.status == "finished" else "at the steps cap, BEFORE its budget"
            console.print(escape(f"{head}: reused, finished earlier {how}: step {e.step}, "
                                 f"{e.metrics.get('generated_tokens', 0):,} generated tokens"), highlight=False)
            reused.append(arm.name)
            continue
        before = int(arm.entry.metrics.get("generated_tokens", 0)) if arm.entry is not None else 0
        what = (f"resuming at step {arm.entry.step} ({before:,} / {plan.budget:,} generated tokens)"
                if arm.entry is not None else f"training to {plan.budget:,} generated tokens")
        console.print(escape(f"{head}: {what}, from {plan.sft_ref}"), highlight=False)
        t0 = time.monotonic()
        result = _train_arm(arm.recipe, home=plan.home, name=arm.name, model=plan.sft_ref, console=console)
        seconds = time.monotonic() - t0
        trained.append(arm.name)
        gen = int(result.get("generated_tokens", 0)) if isinstance(result, dict) else 0
        entry = registry.latest(arm.name)
        gen = int(entry.metrics.get("generated_tokens", gen)) if entry is not None else gen
        log_machine(plan.home, {"kind": "arm", "arm": arm.name,
                                "from_step": arm.entry.step if arm.entry is not None else 0,
                                "to_step": entry.step if entry is not None else None, "seconds": round(seconds, 1)})
        acc = spent.setdefault(arm.objective, [0.0, 0.0])
        acc[0] += seconds
        acc[1] += max(0, gen - before)
        steps = entry.step if entry is not None else result.get("steps")
        flag = "" if gen >= plan.budget else f" (stopped at the steps cap {plan.cap}, before its budget)"
        console.print(escape(f"[{i}/{n}] done: {steps} steps, {gen:,} / {plan.budget:,} generated tokens, "
                             f"{fmt_duration(seconds)}{flag}"), highlight=False)
        left = [a for a in plan.arms[i:] if a.status in ("new", "resume")]
        if left:
            eta = _eta(left, spent, plan.budget)
            console.print(escape(f"  ETA: ~{fmt_duration(eta)} for the {len(left)} arm(s) left (from the arms "
                                 "trained so far), then the sweep"), highlight=False)
    return trained, reused


def _eta(left: list[Arm], spent: dict[str, list[float]], budget: int) -> float | None:
    total_s = sum(v[0] for v in spent.values())
    total_t = sum(v[1] for v in spent.values())
    if total_t <= 0:
        return None
    eta = 0.0
    for arm in left:
        s, t = spent.get(arm.objective, (total_s, total_t))
        rate = s / t if t > 0 else total_s / total_t
        done = int(arm.entry.metrics.get("generated_tokens", 0)) if arm.entry is not None else 0
        eta += max(0, budget - done) * rate
    return eta


# ---------------------------------------------------------------- the sweep


def _run_sweep(plan: Plan, console: Console) -> dict[str, Any]:
    from spiral_cli import sweep as sweep_mod

    refs = _final_refs(plan)
    models = [plan.sft_ref] + [refs[a.name] for a in plan.arms]
    console.print(escape(f"sweep: {len(models)} models on {plan.problems} problems -> {plan.out / 'sweep'}"),
                  highlight=False)
    t0 = time.monotonic()
    result = sweep_mod.run_sweep(plan.recipe, models=models, out=plan.out / "sweep", home=plan.home,
                                 console=console, cache=plan.home / SWEEP_CACHE)
    if result.get("generate_calls"):  # a sweep read whole from the cache measured nothing here
        log_machine(plan.home, {"kind": "sweep", "report": str(plan.out), "generate_calls": result["generate_calls"],
                                "seconds": round(time.monotonic() - t0, 1)})
    return result


def log_machine(home: Path, record: dict[str, Any]) -> None:
    """Append what ran where to ``<home>/compare/machines.jsonl``: arm seconds and sweep times are
    only comparable beside the CPU (or GPU) that produced them, and an arm may be trained by one
    compare and reused by another on another machine."""
    from spiral_cli.jsonl import write_jsonl_line
    from spiral_cli.machine import describe

    path = home / MACHINE_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {**record, "machine": describe(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(path, "a") as f:  # one short line per append: a crash loses at most that line
        write_jsonl_line(row, f)


# ---------------------------------------------------------------- entry point


def run_compare(recipe, *, home: Path, sft_model: str | None = None, seeds: int | None = None,
                budget_tokens: int | None = None, problems: int | None = None, out: Path | None = None,
                quick: bool = False, console: Console | None = None, recipe_path: str | Path | None = None,
                overrides: list[str] | None = None) -> dict[str, Any]:
    """Validate, train (or reuse) every arm, sweep, write the report; returns the summary.

    ``seeds`` (default 3), ``problems`` (default 500) and ``budget_tokens`` (default the recipe's
    ``train_set.max_generated_tokens``) fall back to the --quick preset's values when ``quick``.
    ``recipe_path`` and ``overrides`` only go into commands.txt."""
    console = console or Console(stderr=True)
    t0 = time.monotonic()
    plan = plan_compare(recipe, home=home, sft_model=sft_model, seeds=seeds, budget_tokens=budget_tokens,
                        problems=problems, out=out, quick=quick, recipe_path=recipe_path, overrides=overrides)
    if plan.quick_changes:
        console.print(escape("quick preset: " + "; ".join(plan.quick_changes)), highlight=False)
    if not plan.quick and plan.problems < RECOMMENDED_PROBLEMS:
        console.print(escape(f"note: {plan.problems} problems; at least {RECOMMENDED_PROBLEMS} are recommended"),
                      highlight=False)
    todo = [a for a in plan.arms if a.status in ("new", "resume")]
    console.print(escape(
        f"compare {plan.recipe.name}: {plan.seeds} seed(s) x (SPIRAL, GRPO) from {plan.sft_ref}; budget "
        f"{plan.budget:,} generated tokens per arm (steps cap {plan.cap}); {len(todo)} of {len(plan.arms)} arms to "
        f"train; sweep N={plan.recipe.sweep.parallel} T={plan.recipe.sweep.seq_budget} "
        f"R={plan.recipe.sweep.agg_rounds} on {plan.problems} problems\n  report: {plan.out}"), highlight=False)
    plan.out.mkdir(parents=True, exist_ok=True)
    trained, reused = _train_arms(plan, console)
    sweep_summary = _run_sweep(plan, console)
    summary = build_report(plan, console)
    console.print(escape(f"compare done in {fmt_duration(time.monotonic() - t0)}"), highlight=False)
    return {**summary, "trained": trained, "reused": reused,
            "sweep": {k: sweep_summary.get(k) for k in ("out", "generate_calls", "cached_units", "cells")}}


# ---------------------------------------------------------------- the command (wired into cli.py)


def compare_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    overrides: Optional[list[str]] = typer.Option(
        None, "--set", help="Override a recipe field, e.g. --set train_set.lr=1e-5 (repeatable)."),
    sft_model: Optional[str] = typer.Option(
        None, "--sft-model", help="Registered SFT checkpoint every arm starts from (default: <recipe name>-sft)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds per method (default 3; --quick: 1)."),
    budget_tokens: Optional[int] = typer.Option(
        None, "--budget-tokens",
        help="Generated training tokens per arm (default: train_set.max_generated_tokens; --quick: 8 steps' worth)."),
    problems: Optional[int] = typer.Option(
        None, "--problems", help="Held-out problems of the sweep (default 500; --quick: 100)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Report directory (default: $SPIRAL_HOME/compare/<recipe>-<hash>)."),
    quick: bool = typer.Option(
        False, "--quick", help="Small preset for a first look: 1 seed, 8 steps' budget, 100 problems, N 1,4,8, one T, R 0,1."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Generation backend: hf | vllm | vllm_server (generation.backend)."),
) -> None:
    """SPIRAL vs GRPO at an equal training-token budget: train both per seed, sweep N x T x R, write a report."""
    from spiral_cli import cli

    cli._one_process("compare")
    extra = cli._with_backend(overrides, backend)
    r = cli._load(recipe, extra)
    summary = run_compare(r, home=cli._home(), sft_model=sft_model, seeds=seeds, budget_tokens=budget_tokens,
                          problems=problems, out=out, quick=quick, console=cli.err, recipe_path=recipe,
                          overrides=extra)
    typer.echo(json.dumps({k: summary[k] for k in ("out", "accuracy", "efficiency", "conclusion", "trained",
                                                   "reused")}, default=str))
