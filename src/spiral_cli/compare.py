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
   ``sweep.max_problems = problems``, the recipe's N x T x R grid, output (and cache) under
   ``<report>/sweep``.
4. The report, rebuilt from the registry, ``<home>/runs/<arm>/`` and ``<report>/sweep/cells.jsonl``
   alone (so a rerun writes it again without training or generating): ``report.md``,
   ``summary.json``, ``efficiency.json``, ``accuracy_vs_inference_tokens.png``,
   ``accuracy_vs_training_tokens.png``, ``recipe.yaml``, ``commands.txt``.

Seeds are pooled per method: at every cell (method, N, T, R) the per-problem values of the
method's seeds are averaged per problem (which keeps the pairing over problems), accuracy is the
mean over seeds and compute (generated tokens per problem) the mean over seeds. Accuracy
intervals are ``metrics.bootstrap_accuracy`` and differences ``metrics.paired_bootstrap_diff``
on the (seeds x problems) values; scaling efficiency (GRPO the baseline, SPIRAL the candidate) is
``sweep.efficiency`` (``metrics.scaling_efficiency`` + ``scaling_efficiency_interval``) on the
pooled curves. Intervals cover the choice of problems, conditional on the trained seeds.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from spiral_cli.progress import fmt_duration

RECOMMENDED_PROBLEMS = 500  # what the issue asks for; fewer is allowed but noted
# --quick: a first taste within ~20 minutes on a 2-core CPU (defaults an explicit flag overrides)
QUICK_SEEDS = 1
QUICK_PROBLEMS = 100
QUICK_BUDGET_STEPS = 8  # budget = this many times the one-step bound
QUICK_PARALLEL = [1, 4, 8]
QUICK_AGG_ROUNDS = [0, 1]
# train_set.steps of an arm: max(recipe steps, STEPS_CAP_FACTOR x budget / step_bound). The token
# budget ends the run unless its steps average less than 1/STEPS_CAP_FACTOR of the one-step bound;
# then the cap does, and the arm is flagged (stopped_on "steps") in the report.
STEPS_CAP_FACTOR = 20
# differences within this of 0 (or efficiency bounds within it of 1) are rounding, not a sign
TOLERANCE = 1e-9
N_BOOT = 2000  # resamples of the accuracy and difference intervals (the efficiency uses sweep's)
ALPHA = 0.05
METHOD_NAMES = {"spiral": "SPIRAL", "grpo": "GRPO"}
GROUPS = ("SFT", "SPIRAL", "GRPO")
# Fields an existing arm may differ in from what this compare would train: the budget and the
# steps cap (the budget logic decides reuse / resume), where and how fast it runs, and sections
# that do not train the arm (its start is pinned by its parent, name@step of the SFT checkpoint).
IGNORED_FIELDS = (
    "train_set.steps", "train_set.max_generated_tokens", "train_set.tensorboard", "train_set.save_every",
    "train_set.micro_batch_size", "model.device", "model.gradient_checkpointing", "generation.backend",
    "generation.batch_size", "generation.fast_decode", "generation.vllm",
)
IGNORED_SECTIONS = ("sft", "train_agg", "sweep", "compare")
EVAL_PANELS = (  # panels of accuracy_vs_training_tokens.png: eval key fragment, title
    ("pass@1", "pass@1 (one trace)"),
    ("majority@", "majority@N"),
    ("learned_agg@", "learned aggregation (one RSA round)"),
    ("final_answer_accuracy", "final answer (RSA)"),
)
REPORT_FILES = ("report.md", "summary.json", "efficiency.json", "accuracy_vs_inference_tokens.png",
                "accuracy_vs_training_tokens.png", "recipe.yaml", "commands.txt")


# ---------------------------------------------------------------- errors


def _input_error(msg: str) -> Exception:
    from spiral_cli.jsonl import InputError

    return InputError(msg)


def _recipe_error(msg: str) -> Exception:
    from spiral_cli.recipe import RecipeError

    return RecipeError(msg)


# ---------------------------------------------------------------- small helpers


def _hash(obj: Any, length: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def _seed(*parts: Any) -> int:
    return int(_hash(list(parts), 8), 16) & 0x7FFFFFFF


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _interval_pct(iv) -> str:
    return "–" if iv is None else f"[{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


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


def _arm_run_dir(home: Path, name: str) -> Path:
    from spiral_cli.paths import runs_dir

    return runs_dir(home) / name


def _metric_rows(home: Path, name: str, up_to_step: int | None = None) -> list[dict[str, Any]]:
    path = _arm_run_dir(home, name) / "metrics.jsonl"
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if up_to_step is None or row.get("step", 0) <= up_to_step:
            rows.append(row)
    return rows


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
    from spiral_cli.sweep import Grid

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
    base = _with(recipe, {
        "train_set.max_generated_tokens": budget, "train_set.steps": cap,
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


def _final_refs(plan: Plan) -> dict[str, str]:
    """arm name -> name@step of its final checkpoint (the latest registered step)."""
    from spiral_cli.registry import Registry

    registry = Registry(plan.home)
    refs = {}
    for arm in plan.arms:
        entry = registry.latest(arm.name)
        if entry is None:
            raise _recipe_error(f"{arm.name}: no checkpoint registered after training")
        refs[arm.name] = entry.ref
    return refs


def _run_sweep(plan: Plan, console: Console) -> dict[str, Any]:
    from spiral_cli import sweep as sweep_mod

    refs = _final_refs(plan)
    models = [plan.sft_ref] + [refs[a.name] for a in plan.arms]
    console.print(escape(f"sweep: {len(models)} models on {plan.problems} problems -> {plan.out / 'sweep'}"),
                  highlight=False)
    return sweep_mod.run_sweep(plan.recipe, models=models, out=plan.out / "sweep", home=plan.home, console=console)


# ---------------------------------------------------------------- numbers from the sweep cells


def _read_cells(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise _input_error(f"{path}: no sweep cells (run the compare to make them)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _matrix(cells_index, labels: list[str], key: tuple) -> list[list[float]] | None:
    rows = []
    for label in labels:
        c = cells_index.get((label,) + key)
        if c is None or c.get("accuracy") is None:
            return None
        if not c.get("per_problem"):
            raise _input_error(f"sweep cell {label} {key} has no per-problem values; rerun the compare "
                               "(the sweep rebuilds them from its cache)")
        rows.append([float(v) for v in c["per_problem"]])
    if len({len(r) for r in rows}) != 1:
        raise _input_error(f"sweep cells {key} hold per-problem values for different numbers of problems")
    return rows


def pool_cells(cells: list[dict[str, Any]], groups: dict[str, list[str]], grid_seed: int) -> list[dict[str, Any]]:
    """One curve per group (SFT, SPIRAL, GRPO) with its seeds pooled: per cell (method, N, T, R),
    per-problem values = mean over the group's seeds per problem, accuracy = their mean (= mean over
    seeds), compute = mean over seeds, 95% interval = metrics.bootstrap_accuracy over problems."""
    import numpy as np

    from spiral_cli.metrics import bootstrap_accuracy

    index = {(c["model"], c["method"], c["N"], c["T"], c["R"]): c for c in cells}
    first = next(iter(groups.values()))[0]
    keys = [(c["method"], c["N"], c["T"], c["R"]) for c in cells if c["model"] == first]
    pooled = []
    for group, labels in groups.items():
        for key in keys:
            m = _matrix(index, labels, key)
            if m is None:
                continue
            cs = [index[(label,) + key] for label in labels]
            x = np.asarray(m, dtype=float)
            b = bootstrap_accuracy(x, n_boot=N_BOOT, alpha=ALPHA, seed=_seed("pool", grid_seed, group, *key))
            method, n, t, r = key
            pooled.append({
                "model": group, "method": method, "N": n, "T": t, "R": r,
                "accuracy": b["estimate"], "ci_lo": b["interval"][0], "ci_hi": b["interval"][1],
                "ci_method": "bootstrap", "n_problems": x.shape[1], "n_seeds": x.shape[0],
                "per_seed": b["per_seed"],
                "generated_tokens_per_problem": float(np.mean([c["generated_tokens_per_problem"] for c in cs])),
                "total_tokens_per_problem": float(np.mean([c["total_tokens_per_problem"] for c in cs])),
                "per_problem": x.mean(axis=0).tolist(),
            })
    return pooled


def headline_accuracy(cells: list[dict[str, Any]], groups: dict[str, list[str]], grid) -> dict[str, Any]:
    """Accuracy at the largest inference budget (N max, T max; R max for learned) per method and
    group, with the paired SPIRAL - GRPO difference."""
    from spiral_cli.metrics import bootstrap_accuracy, paired_bootstrap_diff

    index = {(c["model"], c["method"], c["N"], c["T"], c["R"]): c for c in cells}
    n_max, t_max = max(grid.parallel), max(grid.seq_budget)
    out: dict[str, Any] = {}
    for method in grid.methods:
        if method == "learned":
            if not grid.learned_rounds:
                continue
            r = max(grid.learned_rounds)
        else:
            r = 0
        key = (method, n_max, t_max, r)
        entry: dict[str, Any] = {"N": n_max, "T": t_max, "R": r}
        mats = {}
        for group, labels in groups.items():
            m = _matrix(index, labels, key)
            if m is None:
                continue
            mats[group] = m
            b = bootstrap_accuracy(m, n_boot=N_BOOT, alpha=ALPHA, seed=_seed("acc", grid.seed, group, *key))
            entry[group] = {"estimate": b["estimate"], "interval": list(b["interval"]), "per_seed": b["per_seed"],
                            "n_seeds": b["n_seeds"], "n_problems": b["n_problems"]}
        if "SPIRAL" in mats and "GRPO" in mats:
            d = paired_bootstrap_diff(mats["SPIRAL"], mats["GRPO"], n_boot=N_BOOT, alpha=ALPHA,
                                      seed=_seed("diff", grid.seed, *key))
            entry["SPIRAL_minus_GRPO"] = {"estimate": d["estimate"], "interval": list(d["interval"]),
                                          "n_problems": d["n_problems"]}
            if len(mats["SPIRAL"]) == len(mats["GRPO"]):
                entry["SPIRAL_minus_GRPO"]["per_seed"] = [
                    a - b for a, b in zip(d["per_seed_a"], d["per_seed_b"])]
        if len(entry) > 3:
            out[method] = entry
    return out


# ---------------------------------------------------------------- arms' training summaries


def arm_summaries(plan: Plan) -> list[dict[str, Any]]:
    """Per arm, from its final registry entry and runs/<arm>/metrics.jsonl only (no training)."""
    from spiral_cli.registry import Registry

    registry = Registry(plan.home)
    out = []
    for arm in plan.arms:
        e = registry.latest(arm.name)
        rows = _metric_rows(plan.home, arm.name, e.step if e is not None else None)
        seconds = None
        if rows:
            seconds = sum(float((r.get("seconds") or {}).get("total", 0.0)) for r in rows)
        gen = int(e.metrics.get("generated_tokens", 0)) if e is not None else 0
        out.append({
            "name": arm.name, "method": arm.method, "objective": arm.objective, "seed": arm.seed,
            "ref": e.ref if e is not None else None, "steps": e.step if e is not None else 0,
            "generated_tokens": gen,
            "total_tokens": int(e.metrics.get("total_tokens", 0)) if e is not None else 0,
            "seconds": seconds, "budget_met": gen >= plan.budget,
            "stopped_on": "token_budget" if gen >= plan.budget else "steps",
        })
    return out


def _histories(plan: Plan) -> dict[str, list[tuple[int, list[dict[str, Any]]]]]:
    out: dict[str, list[tuple[int, list[dict[str, Any]]]]] = {"SPIRAL": [], "GRPO": []}
    for arm in plan.arms:
        path = _arm_run_dir(plan.home, arm.name) / "eval.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[arm.method].append((arm.seed, rows))
    return out


# ---------------------------------------------------------------- plots


def _atomic_png(path: Path, draw: Callable[[Path], Any]) -> None:
    from spiral_cli.paths import current_umask

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        draw(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _eval_key(history: list[dict[str, Any]], fragment: str) -> str | None:
    keys = sorted({k for h in history for k in h if fragment in k and "/" in k})
    return keys[0] if keys else None


def plot_training_tokens(histories: dict[str, list[tuple[int, list[dict[str, Any]]]]], path: Path,
                         title: str = "") -> Path:
    """Held-out accuracy against generated training tokens: each seed a thin line, the mean over
    seeds (each seed's curve interpolated linearly onto the tokens all seeds reached) thick."""
    import numpy as np

    from spiral_cli.plots import _pyplot, _save

    plt = _pyplot()
    colors = {"SPIRAL": "C1", "GRPO": "C2"}  # as in accuracy_vs_inference_tokens.png (SFT is C0 there)
    panels = [(frag, label) for frag, label in EVAL_PANELS
              if any(_eval_key(h, frag) for runs in histories.values() for _, h in runs)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 4.0), squeeze=False)
    axes = axes[0]
    if not panels:
        axes[0].text(0.5, 0.5, "no held-out evaluations recorded\n(train_set.eval_problems = 0?)",
                     ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, (frag, label) in zip(axes, panels):
        for method, runs in histories.items():
            curves = []
            for _seed, history in runs:
                key = _eval_key(history, frag)
                pts = [(h["generated_tokens"], h[key]) for h in history if key and key in h]
                if not pts:
                    continue
                xs = np.array([p[0] for p in pts], dtype=float)
                ys = np.array([100 * p[1] for p in pts], dtype=float)
                curves.append((xs, ys))
                ax.plot(xs / 1e3, ys, color=colors[method], lw=0.8, alpha=0.35)
            if not curves:
                continue
            x_end = min(xs[-1] for xs, _ in curves)
            grid = np.unique(np.concatenate([xs[xs <= x_end] for xs, _ in curves]))
            mean = np.mean([np.interp(grid, xs, ys) for xs, ys in curves], axis=0)
            ax.plot(grid / 1e3, mean, color=colors[method], lw=2.2,
                    label=f"{method} (mean of {len(curves)} seed{'s' if len(curves) != 1 else ''})")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("generated training tokens (thousands)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_ylabel("held-out accuracy (%)")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


# ---------------------------------------------------------------- the report


def _efficiency_text(comp: dict[str, Any]) -> tuple[str, str, str]:
    """(max with CI, at GRPO's best with CI, status words) for a comparison of the pooled curves."""
    from spiral_cli.plots import efficiency_is_measured

    def ci(key: str) -> str:
        status = comp.get(f"{key}_status")
        if status == "ok":
            lo, hi = comp[key]
            return f" [{lo:.2f}, {hi:.2f}]"
        if status == "not_measurable":
            return " [CI not measurable]"
        return ""

    if efficiency_is_measured(comp):
        best = comp.get("at_baseline_best")
        at_best = (f"{best:.2f}x{ci('interval_at_baseline_best')}" if best is not None
                   else "SPIRAL does not reach GRPO's best")
        lo, hi = comp["accuracy_range"]
        return f"{comp['max']:.2f}x{ci('interval')}", at_best, f"ok (curves overlap at {_pct(lo)}–{_pct(hi)})"
    status = comp["status"]
    lower, upper = comp.get("lower_bound"), comp.get("upper_bound")
    if status == "not_measurable":
        level = (comp.get("accuracy_range") or [None])[0]
        words = "not measurable: the curves meet at one accuracy level only" + (f" ({_pct(level)})" if level is not None else "")
        if lower is not None:
            words += f"; efficiency >= {lower:.2f}x (censored)"
        elif upper is not None:
            words += f"; efficiency <= {upper:.2f}x (censored)"
    elif status == "candidate_dominates":
        words = f"candidate_dominates: SPIRAL's cheapest point beats GRPO's best; efficiency > {lower:.2f}x"
    elif status == "baseline_dominates":
        words = f"baseline_dominates: GRPO's cheapest point beats SPIRAL's best; efficiency < {upper:.2f}x"
    elif status == "no_overlap":
        words = "no_overlap: the curves share no accuracy level and the bound is uninformative"
    elif status == "no_data":
        words = "no data: a curve has no scored point"
    else:
        words = status
    return "not measurable", "–", words


METHOD_LABEL = {"pass": "pass@N", "majority": "majority@N", "learned": "learned aggregation"}


def conclusion(acc: dict[str, Any], effs: list[dict[str, Any]], arms: list[dict[str, Any]], plan: Plan,
               n_labelled: int) -> list[str]:
    """Plain-language conclusions, generated from the numbers."""
    from spiral_cli.plots import efficiency_is_measured

    lines: list[str] = []
    ahead_s, ahead_g, unclear = [], [], []
    for method, entry in acc.items():
        d = entry.get("SPIRAL_minus_GRPO")
        if d is None:
            continue
        lo, hi = d["interval"]
        what = f"{METHOD_LABEL[method]} (N={entry['N']}, T={entry['T']}" + (f", R={entry['R']})" if method == "learned" else ")")
        s, g = entry["SPIRAL"]["estimate"], entry["GRPO"]["estimate"]
        nums = f"{_pct(s)} vs {_pct(g)}, difference {_pts(d['estimate'])} points, 95% CI {_pts(lo)} to {_pts(hi)}"
        if lo > TOLERANCE:
            ahead_s.append(METHOD_LABEL[method])
            lines.append(f"On {what} SPIRAL is ahead of GRPO: {nums}.")
        elif hi < -TOLERANCE:
            ahead_g.append(METHOD_LABEL[method])
            lines.append(f"On {what} GRPO is ahead of SPIRAL: {nums}.")
        else:
            unclear.append(METHOD_LABEL[method])
            lines.append(f"On {what} there is no clear difference: {nums} (the interval includes 0).")
        per_seed = d.get("per_seed")
        if per_seed and len(per_seed) > 1 and min(per_seed) < -TOLERANCE and max(per_seed) > TOLERANCE:
            lines.append(f"The seeds disagree on {METHOD_LABEL[method]}: per-seed differences "
                         + ", ".join(_pts(x) for x in per_seed) + " points.")
    for comp in effs:
        label = METHOD_LABEL.get(comp["method"], comp["method"])
        if efficiency_is_measured(comp):
            e = comp["max"]
            if comp.get("interval_status") == "ok":
                lo, hi = comp["interval"]
                if lo > 1 + TOLERANCE:
                    lines.append(f"Scaling efficiency on {label}: GRPO needs up to {e:.2f}x the inference tokens "
                                 f"(95% CI {lo:.2f}–{hi:.2f}x) to reach the accuracy SPIRAL reaches.")
                elif hi < 1 - TOLERANCE:
                    lines.append(f"Scaling efficiency on {label}: {e:.2f}x (95% CI {lo:.2f}–{hi:.2f}x): at its best "
                                 "SPIRAL still needs more inference tokens than GRPO for the same accuracy.")
                else:
                    lines.append(f"Scaling efficiency on {label}: {e:.2f}x at best, but the 95% CI "
                                 f"({lo:.2f}–{hi:.2f}x) includes 1x: no measurable saving.")
            else:
                lines.append(f"Scaling efficiency on {label}: {e:.2f}x at best; its interval is not measurable "
                             "(too many resamples without overlapping curves).")
        else:
            _, _, words = _efficiency_text(comp)
            status, _, plain = words.partition(": ")
            lines.append(f"Scaling efficiency on {label}: no ratio ({status}); {plain}.")
    parts = []
    if ahead_s:
        parts.append("SPIRAL is ahead on " + ", ".join(ahead_s))
    if ahead_g:
        parts.append("GRPO is ahead on " + ", ".join(ahead_g))
    if unclear:
        parts.append("the difference is within noise on " + ", ".join(unclear))
    if parts:
        lines.insert(0, f"Overall, at {plan.budget:,} generated training tokens per arm and {plan.seeds} "
                        f"seed{'s' if plan.seeds != 1 else ''} per method, " + "; ".join(parts) + ".")
    # caveats
    short = [a for a in arms if not a.get("budget_met")]
    if short:
        lines.append("Caution: " + ", ".join(f"{a['name']} ({a['generated_tokens']:,} tokens)" for a in short)
                     + f" stopped at the steps cap ({plan.cap}) before the budget: the arms did not spend equal "
                     "training tokens.")
    by = {m: [a["generated_tokens"] for a in arms if a["method"] == m] for m in ("SPIRAL", "GRPO")}
    if all(by.values()):
        ms, mg = (sum(v) / len(v) for v in (by["SPIRAL"], by["GRPO"]))
        lines.append(f"Training tokens actually generated: SPIRAL {ms:,.0f}, GRPO {mg:,.0f} on average (each run "
                     "stops after the step that reaches the budget, so it may pass it by up to one step).")
    over = max((a["generated_tokens"] / plan.budget - 1 for a in arms), default=0.0)
    if over > 0.1:
        lines.append(f"Caution: an arm passed the budget by {100 * over:.0f}% (its last step is large next to the "
                     "budget): use a budget of many steps for a tight match of training tokens.")
    if plan.seeds == 1:
        lines.append("With one seed per method the intervals cover the choice of problems only, not training "
                     "noise: run more seeds (--seeds 3) before drawing conclusions.")
    if n_labelled < RECOMMENDED_PROBLEMS:
        lines.append(f"Only {n_labelled} held-out problems were scored (at least {RECOMMENDED_PROBLEMS} recommended); "
                     "differences of a few points are within noise at this size.")
    return lines


def _commands(plan: Plan, refs: dict[str, str]) -> str:
    q = shlex.quote
    home = f"--home {q(str(plan.home))}"
    snap = q(str(plan.out / "recipe.yaml"))
    lines = ["# spiral compare: commands that reproduce this report", ""]
    as_run = [f"spiral {home} compare {q(plan.recipe_path or str(plan.out / 'recipe.yaml'))}"]
    as_run += [f"--set {q(o)}" for o in plan.overrides]
    f = plan.flags
    for flag, key in (("--sft-model", "sft_model"), ("--seeds", "seeds"), ("--budget-tokens", "budget_tokens"),
                      ("--problems", "problems"), ("--out", "out")):
        if f.get(key) is not None:
            as_run.append(f"{flag} {q(str(f[key]))}")
    if plan.quick:
        as_run.append("--quick")
    lines += ["# as run", " ".join(as_run), ""]
    lines += ["# the same, from the saved recipe snapshot (the preset and overrides already applied)",
              f"spiral {home} compare {snap} --sft-model {q(plan.sft_ref)} --seeds {plan.seeds} "
              f"--budget-tokens {plan.budget} --problems {plan.problems} --out {q(str(plan.out))}", ""]
    lines.append("# the individual steps: each arm (a rerun of a finished arm takes no step), then the sweep")
    for arm in plan.arms:
        lines.append(
            f"spiral {home} train-set {snap} --objective {arm.objective} --name {arm.name} --model {q(plan.sft_ref)} "
            f"--set seed={arm.seed} --set train_set.max_generated_tokens={plan.budget} --set train_set.steps={plan.cap}")
    models = ",".join([plan.sft_ref] + [refs[a.name] for a in plan.arms])
    lines.append(f"spiral {home} sweep {snap} --models {q(models)} --set sweep.max_problems={plan.problems} "
                 f"--out {q(str(plan.out / 'sweep'))}")
    return "\n".join(lines) + "\n"


def _report_md(plan: Plan, summary: dict[str, Any]) -> str:
    r = plan.recipe
    g = summary["grid"]
    lines = [f"# SPIRAL vs GRPO at an equal training budget: {r.name}", ""]
    lines += ["**Question.** Starting from the same SFT checkpoint and spending the same number of generated "
              "training tokens, does SPIRAL set RL give a model that turns inference compute (N parallel traces "
              "× T tokens × R aggregation rounds) into held-out accuracy better than GRPO?", ""]
    lines += ["## Setup", ""]
    lines.append(f"- SFT checkpoint: `{plan.sft_ref}` (every arm starts from it; `{plan.sft_entry.path}`)")
    lines.append(f"- Training budget: **{plan.budget:,} generated tokens per arm** (`train_set.max_generated_tokens`); "
                 f"a run stops after the optimizer step that reaches it. Steps cap {plan.cap} "
                 f"(= max(recipe steps, {STEPS_CAP_FACTOR} × budget / one-step bound)); one-step bound: "
                 f"{plan.bound_formula}.")
    lines.append(f"- Seeds: {plan.seeds} per method (seed {', '.join(str(a.seed) for a in plan.arms if a.objective == 'spiral')}); "
                 f"arms `{r.name}-cmp-spiral-s<s>` and `{r.name}-cmp-grpo-s<s>`.")
    lines.append(f"- Held-out problems: {summary['problems_scored']} scored of {plan.problems} requested from the "
                 f"task's eval split (`{r.task.name}`, sweep seed {g['seed']}).")
    lines.append(f"- Inference grid: N ∈ {g['parallel']}, T ∈ {g['seq_budget']}, R ∈ {g['agg_rounds']}; "
                 f"RSA population P = {g['population']}, subset size k = {g['agg_set_size']}.")
    lines.append(f"- Recipe: `recipe.yaml` (hash {summary['recipe_hash']})" + (
        "; **--quick preset**: " + "; ".join(plan.quick_changes) if plan.quick else "") + ".")
    lines.append("")
    lines += ["## Training", "", "| arm | method | seed | steps | generated tokens | total tokens | seconds | stopped on |",
              "|---|---|---|---|---|---|---|---|"]
    for a in summary["arms"]:
        secs = "–" if a["seconds"] is None else f"{a['seconds']:.1f}"
        lines.append(f"| `{a['ref']}` | {a['method']} | {a['seed']} | {a['steps']} | {a['generated_tokens']:,} | "
                     f"{a['total_tokens']:,} | {secs} | {a['stopped_on']} |")
    lines += ["", "Seconds: the optimizer steps (rollouts, update, sync) from `runs/<arm>/metrics.jsonl`; evaluation "
              "and checkpointing are not counted.", ""]
    acc = summary["accuracy"]
    if acc:
        any_e = next(iter(acc.values()))
        lines += [f"## Accuracy at the largest inference budget (N = {any_e['N']}, T = {any_e['T']}; learned at "
                  f"R = max)", "",
                  "| method | SFT | SPIRAL | GRPO | SPIRAL − GRPO (points) |", "|---|---|---|---|---|"]
        for method, e in acc.items():
            cells = []
            for grp in GROUPS:
                x = e.get(grp)
                cells.append("–" if x is None else f"{_pct(x['estimate'])} {_interval_pct(x['interval'])}")
            d = e.get("SPIRAL_minus_GRPO")
            dtxt = "–" if d is None else f"{_pts(d['estimate'])} [{_pts(d['interval'][0])}, {_pts(d['interval'][1])}]"
            name = METHOD_LABEL[method] + (f" (R = {e['R']})" if method == "learned" else "")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {dtxt} |")
        lines += ["", "Each SPIRAL/GRPO value is the mean over its seeds; brackets are 95% percentile bootstrap "
                  "intervals over problems (the same problem draws for every seed and both methods: the "
                  "difference is paired). Per seed:", ""]
        for method, e in acc.items():
            seeds_txt = "; ".join(f"{grp} " + ", ".join(_pct(v) for v in e[grp]["per_seed"])
                                  for grp in ("SPIRAL", "GRPO") if grp in e)
            lines.append(f"- {METHOD_LABEL[method]}: {seeds_txt}")
        lines.append("")
    lines += ["## Scaling efficiency, SPIRAL over GRPO", "",
              "How many times more generated inference tokens per problem GRPO needs to reach the accuracy SPIRAL "
              "reaches (seeds pooled per method; largest T, and largest R for learned).", "",
              "| method | T | R | max efficiency [95% CI] | at GRPO's best accuracy [95% CI] | status |",
              "|---|---|---|---|---|---|"]
    for comp in summary["efficiency"]:
        mx, best, words = _efficiency_text(comp)
        lines.append(f"| {METHOD_LABEL.get(comp['method'], comp['method'])} | {comp['T']} | {comp['R']} | {mx} | "
                     f"{best} | {words} |")
    lines += ["", "All T and R are in `efficiency.json`.", ""]
    lines += ["## Conclusion", ""] + [f"- {c}" for c in summary["conclusion"]] + [""]
    lines += ["## How to read this", "",
              "- Seeds are pooled per method: at every cell (method, N, T, R) the per-problem values of the "
              "method's seeds are averaged per problem, accuracy is the mean over seeds and compute the mean "
              "generated tokens per problem over seeds; scaling efficiency compares the pooled curves.",
              "- Intervals are 95% percentile bootstraps over problems with the same draws for everything compared "
              "(docs/statistics.md); they are conditional on the trained seeds — compare the per-seed values to "
              "see training noise.",
              "- `accuracy_vs_inference_tokens.png`: accuracy against generated inference tokens per problem "
              "(log2), per method and arm (seeds averaged), with the efficiency arrow. "
              "`accuracy_vs_training_tokens.png`: held-out accuracy during training against generated training "
              "tokens (thin: seeds; thick: their mean).",
              "- `summary.json` holds every number here; `commands.txt` the commands that reproduce it; the sweep's "
              "own cells (every model and seed separately) are in `sweep/`.", ""]
    return "\n".join(lines)


def build_report(plan: Plan, console: Console | None = None) -> dict[str, Any]:
    """Write the report files from the registry, the runs' files and the sweep cells; trains and
    generates nothing. Returns the summary (summary.json's content)."""
    import yaml

    from spiral_cli import plots
    from spiral_cli import sweep as sweep_mod
    from spiral_cli.paths import atomic_write_text

    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    refs = _final_refs(plan)
    grid = sweep_mod.Grid.from_recipe(plan.recipe)
    cells = _read_cells(out / "sweep" / "cells.jsonl")
    groups = {"SFT": [plan.sft_ref],
              "SPIRAL": [refs[a.name] for a in plan.arms if a.objective == "spiral"],
              "GRPO": [refs[a.name] for a in plan.arms if a.objective == "grpo"]}
    pooled = pool_cells(cells, groups, grid.seed)
    eff = sweep_mod.efficiency(pooled, grid, ["GRPO", "SPIRAL"])
    eff["pooling"] = ("seeds pooled per method: per cell, per-problem values averaged over seeds per problem, "
                      "compute (generated tokens per problem) averaged over seeds; baseline GRPO, candidate SPIRAL")
    eff["arms"] = groups
    headline = [c for c in eff["comparisons"] if c["headline"]]
    acc = headline_accuracy(cells, groups, grid)
    arms = arm_summaries(plan)
    n_scored = next((c["n_problems"] for c in cells), 0)
    keys = ("method", "T", "R", "status", "max", "max_level", "at_baseline_best", "accuracy_range", "lower_bound",
            "upper_bound", "censored_ratio", "interval", "interval_status", "interval_at_baseline_best",
            "interval_at_baseline_best_status")
    effs = [{k: c.get(k) for k in keys} for c in headline]
    by_method = {}
    for m in ("SPIRAL", "GRPO"):
        mine = [a for a in arms if a["method"] == m]
        if mine:
            by_method[m] = {k: sum(a[k] for a in mine) / len(mine) for k in ("steps", "generated_tokens", "total_tokens")}
            secs = [a["seconds"] for a in mine if a["seconds"] is not None]
            by_method[m]["seconds"] = sum(secs) / len(secs) if secs else None
    summary: dict[str, Any] = {
        "question": "SPIRAL vs GRPO from the same SFT checkpoint at an equal budget of generated training tokens: "
                    "accuracy at the largest inference budget and scaling efficiency of inference compute",
        "recipe": plan.recipe.name, "recipe_hash": plan.recipe.hash(), "task": plan.recipe.task.name,
        "sft_model": plan.sft_ref, "sft_path": str(plan.sft_entry.path),
        "budget_tokens": plan.budget, "one_step_bound": plan.bound, "one_step_bound_formula": plan.bound_formula,
        "steps_cap": plan.cap, "seeds": plan.seeds, "seed_values": sorted({a.seed for a in plan.arms}),
        "problems_requested": plan.problems, "problems_scored": n_scored, "quick": plan.quick,
        "quick_changes": plan.quick_changes,
        "grid": {k: v for k, v in grid.to_dict().items() if k != "baseline"},
        "arms": arms, "training_by_method": by_method,
        "accuracy": acc, "efficiency": effs,
        "pooling": eff["pooling"],
        "out": str(out), "files": list(REPORT_FILES),
    }
    summary["conclusion"] = conclusion(acc, effs, arms, plan, n_scored)
    title = f"{plan.recipe.name}: SFT vs SPIRAL vs GRPO ({plan.seeds} seed{'s' if plan.seeds != 1 else ''} pooled), " \
            f"{n_scored} problems"
    _atomic_png(out / "accuracy_vs_inference_tokens.png",
                lambda p: plots.plot_accuracy_vs_tokens(pooled, eff["comparisons"], p, title=title))
    _atomic_png(out / "accuracy_vs_training_tokens.png",
                lambda p: plot_training_tokens(_histories(plan), p,
                                               title=f"{plan.recipe.name}: held-out accuracy during training, "
                                                     f"budget {plan.budget:,} tokens"))
    atomic_write_text(out / "efficiency.json", json.dumps(eff, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(plan.recipe.snapshot(), sort_keys=False))
    atomic_write_text(out / "commands.txt", _commands(plan, refs))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / "report.md", _report_md(plan, summary))
    if console is not None:
        for line in summary["conclusion"]:
            console.print(escape(f"  {line}"), highlight=False)
        console.print(escape(f"wrote {', '.join(REPORT_FILES)} to {out}"), highlight=False)
    return summary


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
    backend: Optional[str] = typer.Option(None, "--backend", help="Generation backend: hf | vllm (generation.backend)."),
) -> None:
    """SPIRAL vs GRPO at an equal training-token budget: train both per seed, sweep N x T x R, write a report."""
    from spiral_cli import cli

    extra = cli._with_backend(overrides, backend)
    r = cli._load(recipe, extra)
    summary = run_compare(r, home=cli._home(), sft_model=sft_model, seeds=seeds, budget_tokens=budget_tokens,
                          problems=problems, out=out, quick=quick, console=cli.err, recipe_path=recipe,
                          overrides=extra)
    typer.echo(json.dumps({k: summary[k] for k in ("out", "accuracy", "efficiency", "conclusion", "trained",
                                                   "reused")}, default=str))
