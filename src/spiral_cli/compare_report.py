"""The report of `spiral compare` (step 4 of ``compare.py``): rebuilt from the registry,
``<home>/runs/<arm>/`` and ``<report>/sweep/cells.jsonl`` alone, so a rerun writes it again without
training or generating: ``report.md``, ``summary.json``, ``efficiency.json``,
``accuracy_vs_inference_tokens.png``, ``accuracy_vs_training_tokens.png``, ``recipe.yaml``,
``commands.txt``.

Seeds are pooled per method: at every cell (method, N, T, R) the per-problem values of the
method's seeds are averaged per problem (which keeps the pairing over problems), accuracy is the
mean over seeds and compute (generated tokens per problem) the mean over seeds. Accuracy
intervals are ``metrics.bootstrap_accuracy`` and differences ``metrics.paired_bootstrap_diff``
on the (seeds x problems) values; scaling efficiency (GRPO the baseline, SPIRAL the candidate) is
``sweep_cells.efficiency`` (``metrics.scaling_efficiency`` + ``scaling_efficiency_interval``) on the
pooled curves. Intervals cover the choice of problems, conditional on the trained seeds.

Also here: reading an arm's run files and final checkpoint, which the plan uses too.
"""
from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from spiral_cli.compare import Plan

RECOMMENDED_PROBLEMS = 500  # what the issue asks for; fewer is allowed but noted
# train_set.steps of an arm: max(recipe steps, STEPS_CAP_FACTOR x budget / step_bound). The token
# budget ends the run unless its steps average less than 1/STEPS_CAP_FACTOR of the one-step bound;
# then the cap does, and the arm is flagged (stopped_on "steps") in the report.
STEPS_CAP_FACTOR = 20
# differences within this of 0 (or efficiency bounds within it of 1) are rounding, not a sign
TOLERANCE = 1e-9
N_BOOT = 2000  # resamples of the accuracy and difference intervals (the efficiency uses sweep_cells')
ALPHA = 0.05
GROUPS = ("SFT", "SPIRAL", "GRPO")
EVAL_PANELS = (  # panels of accuracy_vs_training_tokens.png: eval key fragment, title
    ("pass@1", "pass@1 (one trace)"),
    ("majority@", "majority@N"),
    ("learned_agg@", "learned aggregation (one RSA round)"),
    ("final_answer_accuracy", "final answer (RSA)"),
)
MACHINE_LOG = Path("compare") / "machines.jsonl"  # under the home: which machine trained each arm, ran each sweep
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


# ---------------------------------------------------------------- an arm's files and final checkpoint


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
                 f"RSA population P = {g['population']}, subset size k = {g['agg_set_size']}; learned aggregation is "
                 "scored on its final answer, the vote over the final population (`spiral infer`'s answer).")
    lines.append(f"- Machines: {machines_line(summary['machines'])}.")
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


def machines(plan: Plan) -> dict[str, Any]:
    """Which machines trained each arm and ran this report's sweep, from ``<home>/compare/machines.jsonl``
    (written by ``spiral compare``; an arm trained before it kept that log has none)."""
    from spiral_cli.machine import describe, summary_line

    rows = []
    path = plan.home / MACHINE_LOG
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if isinstance(row, dict) and isinstance(row.get("machine"), dict):
                rows.append(row)

    def lines(match: Callable[[dict[str, Any]], bool]) -> list[str]:
        return sorted({summary_line(r["machine"]) for r in rows if match(r)})

    arms = {a.name: lines(lambda r, a=a: r.get("kind") == "arm" and r.get("arm") == a.name) for a in plan.arms}
    return {"arms": arms,
            "sweep": lines(lambda r: r.get("kind") == "sweep" and r.get("report") == str(plan.out)),
            "report": summary_line(describe())}


def machines_line(m: dict[str, Any]) -> str:
    """The report's one line on where its times were measured."""
    trained = sorted({line for lines in m["arms"].values() for line in lines})
    unknown = sorted(a for a, lines in m["arms"].items() if not lines)
    parts = [f"arms trained on {' and '.join(trained)}" if trained else "arms' machine not recorded"]
    if trained and unknown:
        parts[0] += f" (not recorded for {', '.join(unknown)})"
    parts.append(f"sweep generated on {' and '.join(m['sweep'])}" if m["sweep"] else "sweep's machine not recorded "
                 "(read from the cache, or run before the log)")
    return "; ".join(parts) + f"; report written on {m['report']}"


def build_report(plan: Plan, console: Console | None = None) -> dict[str, Any]:
    """Write the report files from the registry, the runs' files and the sweep cells; trains and
    generates nothing. Returns the summary (summary.json's content)."""
    import yaml

    from spiral_cli import plots
    from spiral_cli.paths import atomic_write_text, atomic_write_via
    from spiral_cli.sweep_cells import Grid, efficiency

    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    refs = _final_refs(plan)
    grid = Grid.from_recipe(plan.recipe)
    cells = _read_cells(out / "sweep" / "cells.jsonl")
    groups = {"SFT": [plan.sft_ref],
              "SPIRAL": [refs[a.name] for a in plan.arms if a.objective == "spiral"],
              "GRPO": [refs[a.name] for a in plan.arms if a.objective == "grpo"]}
    pooled = pool_cells(cells, groups, grid.seed)
    eff = efficiency(pooled, grid, ["GRPO", "SPIRAL"])
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
        "pooling": eff["pooling"], "machines": machines(plan),
        "out": str(out), "files": list(REPORT_FILES),
    }
    summary["conclusion"] = conclusion(acc, effs, arms, plan, n_scored)
    title = f"{plan.recipe.name}: SFT vs SPIRAL vs GRPO ({plan.seeds} seed{'s' if plan.seeds != 1 else ''} pooled), " \
            f"{n_scored} problems"
    atomic_write_via(out / "accuracy_vs_inference_tokens.png",
                lambda p: plots.plot_accuracy_vs_tokens(pooled, eff["comparisons"], p, title=title))
    atomic_write_via(out / "accuracy_vs_training_tokens.png",
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
