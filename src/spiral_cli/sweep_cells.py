"""The numbers of `spiral sweep`: its grid, the cells built from the sampled traces, and scaling
efficiency between models, with intervals. Pure functions of the generated rows (``ModelWork``)
and of the plain cell dicts of ``cells.jsonl``; the sampling and its cache live in ``sweep.py``.

What is measured
----------------
For every model and every sequential budget T of ``sweep.seq_budget``, one *pool* of
``max(sweep.parallel)`` search traces is sampled per eval problem (``sweep.max_problems``
problems of the task's eval split, drawn with ``sweep.seed``). Every cell is computed from that
pool, so the cells of one (model, T) share their samples:

- ``pass`` (R = 0): unbiased pass@k with k = N, per problem ``pass_at_k(n, c, N)`` (n pool
  size, c correct traces), averaged over problems.
- ``majority`` (R = 0): expected majority@k with k = N over all size-N subsets of the pool
  (``majority_at_k_expected``; ties count fractionally), averaged over problems. Answers vote
  after white space is removed (``tasks._answers.vote_key``).
- ``learned`` (R >= 1): recursive self-aggregation on the *first N* traces of the pool:
  population P = ``infer.population``, subsets of size min(``infer.agg_set_size``, N), R rounds.
  Rounds are run one at a time, so R = 2 reuses the population of R = 1. Accuracy is that of
  the final answer, the one `spiral infer` returns: the majority over the final population
  (ties to the first member, ``metrics.final_answer_index``), right or wrong per problem. The
  cell also keeps the RSA population accuracy (the mean over problems of the fraction of the
  final population that is correct, RSA pass@1) under ``population_accuracy`` with its interval
  (``population_ci_lo``/``_hi``) and per-problem values (``per_problem_population``).
  R = 0 is not a learned cell: with no aggregator the answer is the majority vote (``majority``).

Compute of a cell, per problem (mean over problems):

- search part, every method: N x (mean generated tokens of one trace of the pool), i.e. the
  expected cost of N traces estimated from all pool traces; total tokens add N x (mean prompt
  tokens of one trace), counting the prompt once per sampled sequence like the pipeline does.
- ``learned`` adds the aggregation tokens actually spent by its R rounds (P aggregations per
  round, prompt tokens counted in the total, generated tokens in both).

Confidence intervals (95%) on every accuracy: a Wilson interval when each problem's value is 0
or 1 (the metric is then a proportion of problems, e.g. pass@N with N = pool size, or P = 1);
otherwise a percentile bootstrap over problems of the mean (1000 resamples, seeded with
``sweep.seed``), e.g. pass@k with k < n, expected majority@k, population accuracy. The column
``ci_method`` says which.

Scaling efficiency (``metrics.scaling_efficiency``; the first model, or ``sweep.baseline``
when the recipe has one, is the baseline, every other model a candidate): for each method,
each T (and each R >= 1 for learned), the curve (generated tokens per problem, accuracy) over
N of the baseline is compared with the candidate's. Accuracy levels reached by both curves get
the ratio of baseline compute to candidate compute (log-linear interpolation between points);
we report the maximum and the value at the baseline's best accuracy. When the curves do not
overlap in accuracy the status (``candidate_dominates`` / ``baseline_dominates`` /
``no_overlap``) and a one-sided bound are reported instead; when they only touch at one
accuracy level the status is ``not_measurable`` (``max`` null, the censored ratio under
``censored_ratio``, and a bound where one exists). The *headline* comparison of a method is its
curve at the largest T (and the largest R for learned); it is printed and drawn.

Efficiency intervals (``interval`` for the maximum, ``interval_at_baseline_best``): a 95%
percentile bootstrap over problems (``metrics.scaling_efficiency_interval``, 2000 resamples
seeded from ``sweep.seed`` and the comparison): each resample draws problems with replacement
once and applies the draw to every point of both curves (paired), recomputes every point's
accuracy from the per-problem values and recomputes the efficiency; compute is held fixed.
``interval_status`` is ``ok``, ``not_measurable`` (the point estimate, or more than 5% of the
resamples, has no efficiency) or ``unavailable`` (cells without per-problem values). The
per-problem values behind each cell's accuracy are kept in ``cells.jsonl`` (key
``per_problem``, in the order of the labelled problems of ``sweep.json``), so
``efficiency(cells, grid, models)`` rebuilds efficiency.json, intervals included, from that file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from spiral_cli.checkpoints import ModelRef
from spiral_cli.metrics import (
    bootstrap_ci,
    compute_to_reach,
    final_answer_index,
    majority_at_k_expected,
    mean,
    paired_bootstrap_diff,
    pass_at_k,
    scaling_efficiency,
    scaling_efficiency_interval,
    wilson_interval,
)
from spiral_cli.pipeline import vote_key
from spiral_cli.recipe import Recipe, RecipeError

CELL_FIELDS = [
    "model", "method", "N", "T", "R", "accuracy", "ci_lo", "ci_hi", "ci_method", "n_problems",
    "generated_tokens_per_problem", "total_tokens_per_problem",
    "population_accuracy", "population_ci_lo", "population_ci_hi",  # learned cells only (else empty)
]
METHOD_ORDER = ("pass", "majority", "learned")
COMPUTE = "generated_tokens_per_problem"
PER_PROBLEM = "per_problem"  # cells.jsonl only: the per-problem values behind `accuracy`
PER_PROBLEM_POPULATION = "per_problem_population"  # cells.jsonl only, learned: behind `population_accuracy`
EFFICIENCY_N_BOOT = 2000  # resamples of the scaling-efficiency interval
EFFICIENCY_ALPHA = 0.05
EFFICIENCY_MAX_NOT_MEASURABLE = 0.05  # above this share of unmeasurable resamples: no interval


# ---------------------------------------------------------------- small helpers


def _hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def _seed(*parts: Any) -> int:
    """A stable 31-bit seed derived from `parts` (same run to run, machine to machine)."""
    return int(_hash(list(parts), 8), 16) & 0x7FFFFFFF


def _ci(values: list[float], seed: int) -> tuple[float, float, str]:
    """Wilson when every per-problem value is 0/1 (a proportion of problems), else bootstrap."""
    if all(v in (0.0, 1.0) for v in values):
        lo, hi = wilson_interval(int(sum(values)), len(values))
        return lo, hi, "wilson"
    lo, hi = bootstrap_ci(values, n_boot=1000, seed=seed)
    return lo, hi, "bootstrap"


# ---------------------------------------------------------------- the grid


@dataclass
class Grid:
    parallel: list[int]
    seq_budget: list[int]
    agg_rounds: list[int]
    methods: list[str]
    max_problems: int
    seed: int
    population: int
    agg_set_size: int
    baseline: str | None = None

    @property
    def max_n(self) -> int:
        return max(self.parallel)

    @property
    def learned_rounds(self) -> list[int]:
        return [r for r in self.agg_rounds if r > 0] if "learned" in self.methods else []

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Grid:
        sw = recipe.sweep
        grid = cls(
            parallel=sorted(set(sw.parallel)), seq_budget=sorted(set(sw.seq_budget)),
            agg_rounds=sorted(set(sw.agg_rounds)),
            methods=[m for m in METHOD_ORDER if m in set(sw.methods)],
            max_problems=sw.max_problems, seed=sw.seed, population=recipe.infer.population,
            agg_set_size=recipe.infer.agg_set_size, baseline=getattr(sw, "baseline", None),
        )
        for name, values, least in (("parallel", grid.parallel, 1), ("seq_budget", grid.seq_budget, 1),
                                    ("agg_rounds", grid.agg_rounds, 0)):
            if not values:
                raise RecipeError(f"sweep.{name}: give at least one value")
            if min(values) < least:
                raise RecipeError(f"sweep.{name}: values must be >= {least} (got {min(values)})")
        if not grid.methods:
            raise RecipeError("sweep.methods: give at least one of pass, majority, learned")
        return grid


@dataclass
class ModelWork:
    """What one model generated: its search-trace pools per T and its aggregation rounds."""
    label: str
    ref: ModelRef
    pool_keys: dict[int, str] = field(default_factory=dict)  # T -> key
    pools: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # T -> row per problem
    # (T, N) -> {R: rows per problem}
    learned: dict[tuple[int, int], dict[int, list[dict[str, Any]]]] = field(default_factory=dict)


# ---------------------------------------------------------------- cells


def _accuracy(values: list[float], seed: int) -> tuple[float | None, float | None, float | None, str | None]:
    if not values:  # no labelled problems: nothing to score
        return None, None, None, None
    return (mean(values), *_ci(values, seed))


def _compact(values: list[float]) -> list[float]:
    """Exact values (so intervals recomputed from cells.jsonl match), 0/1 as ints to stay short."""
    return [int(v) if v in (0.0, 1.0) else v for v in values]


def _cell(model: str, method: str, n: int, t: int, r: int, values: list[float], n_problems: int,
          gen_tokens: float, total_tokens: float, seed: int,
          population_values: list[float] | None = None) -> dict[str, Any]:
    acc, lo, hi, how = _accuracy(values, seed)
    cell = {
        "model": model, "method": method, "N": n, "T": t, "R": r,
        "accuracy": acc, "ci_lo": lo, "ci_hi": hi, "ci_method": how, "n_problems": n_problems,
        "generated_tokens_per_problem": gen_tokens, "total_tokens_per_problem": total_tokens,
        "population_accuracy": None, "population_ci_lo": None, "population_ci_hi": None,
        PER_PROBLEM: _compact(values),
    }
    if population_values is not None:
        pop, pop_lo, pop_hi, _ = _accuracy(population_values, seed + 1)
        cell.update(population_accuracy=pop, population_ci_lo=pop_lo, population_ci_hi=pop_hi)
        cell[PER_PROBLEM_POPULATION] = _compact(population_values)
    return cell


def final_answer_correct(population: list[dict[str, Any]]) -> float:
    """1.0 when the final answer of a population (its vote, as `spiral infer` answers) is right."""
    if not population:
        return 0.0
    chosen = population[final_answer_index([vote_key(tr.get("answer")) for tr in population])]
    return float(bool(chosen.get("correct")))


def trace_token_means(pool_rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(mean generated tokens, mean prompt tokens) of one search trace over the whole pool."""
    n_traces = sum(len(row["traces"]) for row in pool_rows)
    gen = sum(row["search_generated_tokens"] for row in pool_rows)
    prompt = sum(row["search_prompt_tokens"] for row in pool_rows)
    return (gen / n_traces, prompt / n_traces) if n_traces else (0.0, 0.0)


def _majority_value(traces: list[dict[str, Any]], k: int, seed: int) -> float:
    keys = [vote_key(tr.get("answer")) for tr in traces]
    right = {key for key, tr in zip(keys, traces) if key is not None and tr.get("correct")}
    return majority_at_k_expected(keys, lambda a: a in right, k, seed=seed)


def build_cells(ctx_grid: Grid, works: list[ModelWork]) -> list[dict[str, Any]]:
    grid = ctx_grid
    cells: list[dict[str, Any]] = []
    for w in works:
        for method in grid.methods:
            for t in grid.seq_budget:
                pool = w.pools[t]
                mean_gen, mean_prompt = trace_token_means(pool)
                labelled = [row for row in pool if row["labelled"]]
                cell_seed = _seed("ci", grid.seed, w.label, method, t)
                if method in ("pass", "majority"):
                    for n in grid.parallel:
                        if method == "pass":
                            values = [
                                pass_at_k(len(row["traces"]), sum(bool(tr["correct"]) for tr in row["traces"]), n)
                                for row in labelled
                            ]
                        else:
                            values = [_majority_value(row["traces"], n, _seed("maj", grid.seed, row["id"], n)) for row in labelled]
                        cells.append(_cell(
                            w.label, method, n, t, 0, values, len(labelled), n * mean_gen,
                            n * (mean_gen + mean_prompt), cell_seed + n,
                        ))
                else:
                    for r in grid.learned_rounds:
                        for n in grid.parallel:
                            by_round = w.learned[(t, n)]
                            final = [row for row in by_round[r] if row["labelled"]]
                            values = [final_answer_correct(row["population"]) for row in final]
                            pop_values = [mean([float(bool(tr["correct"])) for tr in row["population"]]) for row in final]
                            n_all = len(by_round[r])
                            agg_gen = sum(row["agg_generated_tokens"] for q in range(1, r + 1) for row in by_round[q]) / n_all
                            agg_total = agg_gen + sum(
                                row["agg_prompt_tokens"] for q in range(1, r + 1) for row in by_round[q]
                            ) / n_all
                            cells.append(_cell(
                                w.label, method, n, t, r, values, len(final), n * mean_gen + agg_gen,
                                n * (mean_gen + mean_prompt) + agg_total, cell_seed + 1000 * r + n,
                                population_values=pop_values,
                            ))
    return cells


# ---------------------------------------------------------------- best cells


def best_accuracy(cells: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """The most accurate cell of every model x method anywhere in the grid, and whether the best
    learned cell beats every cell of the other methods (any model, any budget).

    ``best``: one entry per (model, method) with its cell's N, T, R, accuracy, interval and
    generated tokens. ``learned_vs_rest`` (when the grid has learned and other cells): the best
    learned cell against the best cell of any other method, ``difference`` = learned - other with
    a paired bootstrap interval over problems (``metrics.paired_bootstrap_diff``, 2000 resamples)
    when both cells carry per-problem values for the same problems, and ``learned_is_top`` (point
    estimates). Both cells are maxima picked from the grid, so the difference leans optimistic
    for whichever side has more cells to pick from.
    """
    scored = [c for c in cells if c["accuracy"] is not None]
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for c in scored:  # ties keep the cheaper cell (cells come in order of N within a curve)
        key = (c["model"], c["method"])
        if key not in best or c["accuracy"] > best[key]["accuracy"] or (
                c["accuracy"] == best[key]["accuracy"] and c[COMPUTE] < best[key][COMPUTE]):
            best[key] = c
    fields = ("model", "method", "N", "T", "R", "accuracy", "ci_lo", "ci_hi", COMPUTE)
    out: dict[str, Any] = {"best": [{k: c[k] for k in fields} for c in best.values()]}
    learned = [c for c in best.values() if c["method"] == "learned"]
    rest = [c for c in best.values() if c["method"] != "learned"]
    if learned and rest:
        top_l = max(learned, key=lambda c: c["accuracy"])
        top_r = max(rest, key=lambda c: c["accuracy"])
        entry: dict[str, Any] = {
            "learned": {k: top_l[k] for k in fields}, "other": {k: top_r[k] for k in fields},
            "learned_is_top": top_l["accuracy"] > top_r["accuracy"],
            "difference": top_l["accuracy"] - top_r["accuracy"], "interval": None,
        }
        a, b = top_l.get(PER_PROBLEM), top_r.get(PER_PROBLEM)
        if a and b and len(a) == len(b):
            diff = paired_bootstrap_diff(a, b, seed=seed)
            entry["interval"] = [float(diff["interval"][0]), float(diff["interval"][1])]
        out["learned_vs_rest"] = entry
    return out


def describe_best(best: dict[str, Any]) -> str | None:
    """One line on the best learned cell against the best of the rest; None without both."""
    e = best.get("learned_vs_rest")
    if e is None:
        return None

    def where(c: dict[str, Any]) -> str:
        r = f" R={c['R']}" if c["method"] == "learned" else ""
        return f"{c['model']} {c['method']} N={c['N']} T={c['T']}{r} {100 * c['accuracy']:.1f}%"

    iv = "" if e["interval"] is None else f" [{100 * e['interval'][0]:+.1f}, {100 * e['interval'][1]:+.1f}]"
    verdict = "above" if e["learned_is_top"] else "not above"
    return (f"best learned cell {where(e['learned'])} is {verdict} every other method's best, "
            f"{where(e['other'])}: {100 * e['difference']:+.1f} points{iv}")


# ---------------------------------------------------------------- scaling efficiency


def _curve_cells(cells: list[dict[str, Any]], model: str, method: str, t: int, r: int) -> list[dict[str, Any]]:
    """The scored cells (tokens > 0) of one curve over N, in order of N."""
    return [
        c for c in sorted(cells, key=lambda c: c["N"])
        if c["model"] == model and c["method"] == method and c["T"] == t and c["R"] == r
        and c["accuracy"] is not None and c[COMPUTE] > 0
    ]


def _interval_unavailable(reason: str) -> dict[str, Any]:
    return {
        "interval": None, "interval_status": "unavailable",
        "interval_at_baseline_best": None, "interval_at_baseline_best_status": "unavailable",
        "bootstrap": {"reason": reason},
    }


def efficiency_interval(base_cells: list[dict[str, Any]], cand_cells: list[dict[str, Any]], point: dict[str, Any],
                        seed: int, n_boot: int | None = None) -> dict[str, Any]:
    """The bootstrap interval keys of one comparison, from the cells' per-problem values.

    The same problem draws are applied to every point of both curves (paired; see
    ``metrics.scaling_efficiency_interval``). ``point`` is the comparison's own result: a
    statistic it reports as None gets no interval (status "not_measurable"), so status, value and
    interval always agree (the bootstrap's own point estimate averages with numpy and can differ
    in the last bit). Cells without per-problem values (cells.jsonl of an older sweep) or with
    different problem counts give status "unavailable", not an error.
    """
    n_boot = EFFICIENCY_N_BOOT if n_boot is None else n_boot
    if not base_cells or not cand_cells:
        return _interval_unavailable("a curve has no scored point")
    if any(not c.get(PER_PROBLEM) for c in base_cells + cand_cells):
        return _interval_unavailable("cells without per-problem values (written by an older version); "
                                     "rerun the sweep to rebuild them from its cache")
    if len({len(c[PER_PROBLEM]) for c in base_cells + cand_cells}) != 1:
        return _interval_unavailable("cells hold per-problem values for different numbers of problems")
    res = scaling_efficiency_interval(
        [(c[COMPUTE], c[PER_PROBLEM]) for c in base_cells], [(c[COMPUTE], c[PER_PROBLEM]) for c in cand_cells],
        n_boot=n_boot, alpha=EFFICIENCY_ALPHA, seed=seed, max_not_measurable=EFFICIENCY_MAX_NOT_MEASURABLE,
    )
    best, at_best = res["max"], res["at_baseline_best"]
    for key, stat in (("max", best), ("at_baseline_best", at_best)):
        if point.get("status") != "ok" or point.get(key) is None:
            stat.update(interval=None, status="not_measurable")
    return {
        "interval": None if best["interval"] is None else list(best["interval"]),
        "interval_status": best["status"],
        "interval_at_baseline_best": None if at_best["interval"] is None else list(at_best["interval"]),
        "interval_at_baseline_best_status": at_best["status"],
        "bootstrap": {
            "n_boot": n_boot, "alpha": EFFICIENCY_ALPHA, "seed": seed, "n_problems": res["n_problems"],
            "max_not_measurable": EFFICIENCY_MAX_NOT_MEASURABLE,
            "n_not_measurable": {"max": best["n_not_measurable"], "at_baseline_best": at_best["n_not_measurable"]},
        },
    }


def efficiency(cells: list[dict[str, Any]], grid: Grid, models: list[str]) -> dict[str, Any]:
    """Scaling efficiency of every candidate over the baseline, per method x T (x R), with intervals.

    Works on the plain cell dicts of cells.jsonl, so efficiency.json can be rebuilt from that
    file alone (cells of an older version, without per-problem values, get no interval).
    """
    baseline = grid.baseline if grid.baseline else models[0]
    if baseline not in models:
        raise RecipeError(f"sweep.baseline: {baseline!r} is not one of the swept models ({', '.join(models)})")
    comparisons: list[dict[str, Any]] = []
    t_max = max(grid.seq_budget)
    r_max = max(grid.learned_rounds, default=0)
    for cand in models:
        if cand == baseline:
            continue
        for method in grid.methods:
            rounds = grid.learned_rounds if method == "learned" else [0]
            for t in grid.seq_budget:
                for r in rounds:
                    base_cells = _curve_cells(cells, baseline, method, t, r)
                    cand_cells = _curve_cells(cells, cand, method, t, r)
                    base_curve = [(c[COMPUTE], c["accuracy"]) for c in base_cells]
                    cand_curve = [(c[COMPUTE], c["accuracy"]) for c in cand_cells]
                    entry: dict[str, Any] = {
                        "baseline": baseline, "candidate": cand, "method": method, "T": t, "R": r,
                        "headline": t == t_max and r == (r_max if method == "learned" else 0),
                        "baseline_curve": base_curve, "candidate_curve": cand_curve,
                    }
                    if not base_curve or not cand_curve:
                        entry.update(status="no_data", overlap=False, max=None)
                    else:
                        res = scaling_efficiency(base_curve, cand_curve)
                        entry.update(res)
                        entry["levels"] = [list(p) for p in res["levels"]]
                        if res["accuracy_range"] is not None:
                            entry["accuracy_range"] = list(res["accuracy_range"])
                        if res["status"] == "ok":
                            entry["baseline_compute_at_max"] = compute_to_reach(base_curve, res["max_level"])
                            entry["candidate_compute_at_max"] = compute_to_reach(cand_curve, res["max_level"])
                    entry.update(efficiency_interval(
                        base_cells, cand_cells, entry, _seed("efficiency", grid.seed, baseline, cand, method, t, r)))
                    entry["baseline_curve"] = [list(p) for p in base_curve]
                    entry["candidate_curve"] = [list(p) for p in cand_curve]
                    comparisons.append(entry)
    return {
        "compute": COMPUTE,
        "baseline": baseline,
        "definition": (
            "efficiency(a) = C_baseline(a) / C_candidate(a), C(a) = least generated tokens per problem "
            "at which a curve reaches accuracy a (log-linear interpolation over N); reported: max over "
            "the accuracy levels both curves reach (a range of positive width), and the value at the "
            "baseline's best accuracy; curves that only touch at one accuracy level: status not_measurable "
            "(max null, the censored ratio under censored_ratio); without overlap a one-sided bound (see "
            "metrics.scaling_efficiency). interval / interval_at_baseline_best: 95% percentile bootstrap "
            "over problems, the same problem draws for every point of both curves (paired), compute held "
            "fixed; null with status not_measurable when the point estimate or more than 5% of the "
            "resamples are not measurable, unavailable when the cells lack per-problem values"
        ),
        "comparisons": comparisons,
    }


def _ci_text(comp: dict[str, Any], key: str) -> str:
    """' (95% CI lo..hi)' for a statistic of a comparison, or why there is none."""
    level = f"{100 * (1 - comp.get('bootstrap', {}).get('alpha', EFFICIENCY_ALPHA)):.0f}% CI"
    status = comp.get(f"{key}_status")
    if status == "ok":
        lo, hi = comp[key]
        return f" ({level} {lo:.2f}..{hi:.2f}x)"
    if status == "not_measurable":
        boot = comp["bootstrap"]
        stat = "max" if key == "interval" else "at_baseline_best"
        share = boot["n_not_measurable"][stat] / boot["n_boot"]
        return f" ({level} not measurable: {share:.0%} of resamples have no value)"
    if status == "unavailable":
        return " (no CI: " + comp.get("bootstrap", {}).get("reason", "no per-problem values") + ")"
    return ""  # efficiency.json of an older version: no interval keys


def describe(comp: dict[str, Any]) -> str:
    """One line for a comparison, e.g. for the terminal. Only status "ok" prints an efficiency."""
    what = f"{comp['candidate']} vs {comp['baseline']} [{comp['method']} T={comp['T']}" + (
        f" R={comp['R']}]" if comp["method"] == "learned" else "]")
    status = comp["status"]
    if status == "ok":
        best = comp.get("at_baseline_best")
        at_best = (f"{best:.2f}x{_ci_text(comp, 'interval_at_baseline_best')} at the baseline's best accuracy"
                   if best is not None else "candidate never reaches the baseline's best accuracy")
        lo, hi = comp["accuracy_range"]
        return (f"{what}: max {comp['max']:.2f}x{_ci_text(comp, 'interval')} at accuracy {comp['max_level']:.3f}; "
                f"{at_best} (overlap {lo:.3f}..{hi:.3f})")
    if status == "not_measurable":
        level = comp["accuracy_range"][0]
        if comp.get("lower_bound") is not None:
            bound = f"; one-sided bound: efficiency >= {comp['lower_bound']:.2f}x (candidate censored at its min compute)"
        elif comp.get("upper_bound") is not None:
            bound = f"; one-sided bound: efficiency <= {comp['upper_bound']:.2f}x (baseline censored at its min compute)"
        else:
            bound = "; no bound (both curves censored there)"
        return f"{what}: not measurable: the curves meet at one accuracy level only ({level:.3f}){bound}"
    if status == "no_data":
        return f"{what}: no data (a curve has no scored point with tokens > 0)"
    if comp.get("lower_bound") is not None:
        return (f"{what}: curves do not overlap ({status}): candidate's worst beats baseline's best; "
                f"efficiency > {comp['lower_bound']:.2f}x (baseline max compute / candidate min compute)")
    return (f"{what}: curves do not overlap ({status}): baseline's worst beats candidate's best; "
            f"efficiency < {comp['upper_bound']:.2f}x (baseline min compute / candidate max compute)")
