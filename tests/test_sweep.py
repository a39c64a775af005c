"""`spiral sweep` with a scripted generator: outputs, resuming, pass@k/majority@k and token counts."""
from __future__ import annotations

import csv
import itertools
import json
from collections import Counter
from fractions import Fraction

import pytest
from fakes import EchoTask, completion

from spiral_cli import sweep as sweep_mod
from spiral_cli import sweep_cells
from spiral_cli.metrics import pass_at_k, scaling_efficiency
from spiral_cli.recipe import Recipe, RecipeError


class Interrupted(RuntimeError):
    pass


class ScriptedGenerator:
    """Search prompt j-th sample: padding line + 'answer: X' from the script; an aggregation
    prompt answers with the majority of the candidates it shows (first of the tied)."""

    def __init__(self, script, pad, log, fail_after=None):
        self.script, self.pad, self.log, self.fail_after = script, pad, log, fail_after

    def generate(self, prompts, *, n=1, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop=None, seed=None):
        if self.fail_after is not None and len(self.log) >= self.fail_after:
            raise Interrupted("simulated crash")
        self.log.append((prompts[0][0], len(prompts), n, max_new_tokens, seed, temperature))
        out = []
        for prompt in prompts:
            pid = prompt.split("\n")[0].split()[1]
            if prompt.startswith("S "):
                texts = ["w" * self.pad(j) + f"\nanswer: {a}" for j, a in enumerate(self.script[pid][:n])]
            else:
                answers = [l.split("answer:")[-1].strip() for l in prompt.splitlines()[1:]]
                best = max(answers, key=answers.count)
                texts = [f"checked\nanswer: {best}"] * n
            out.append([completion(t, prompt) for t in texts])
        return out

    def update_weights(self, model):
        pass


PROBLEMS = [{"id": "p1", "target": "7"}, {"id": "p2", "target": "5"}, {"id": "p3", "target": "3"}]
SCRIPTS = {
    "scratch:base": {"p1": ["7", "3", "3", "1"], "p2": ["1", "2", "2", "5"], "p3": ["4", "4", "4", "4"]},
    "scratch:micro": {"p1": ["7", "7", "3", "7"], "p2": ["5", "2", "5", "5"], "p3": ["3", "4", "3", "1"]},
}
PADS = {"scratch:base": lambda j: 4 * j + 2, "scratch:micro": lambda j: j}
MODELS = ["scratch:base", "scratch:micro"]
P, K = 2, 2  # RSA population and subset size
NS, TS, RS = [1, 2, 4], [8, 16], [0, 1, 2]


def make_recipe(generation_extra=None, **sweep_extra) -> Recipe:
    return Recipe.model_validate({
        "name": "echo-sweep",
        "infer": {"population": P, "agg_set_size": K},
        "generation": {"batch_size": 4, **(generation_extra or {})},  # 4 // max N = 1 problem per search call, 4 // P = 2 per agg call
        "sweep": {"parallel": NS, "seq_budget": TS, "agg_rounds": RS, "max_problems": 3, "seed": 0, **sweep_extra},
    })


@pytest.fixture
def fake(monkeypatch):
    """Patch the task and model loading; returns a controller for call logs and crashes."""
    state = {"log": [], "opened": [], "fail_after": None}

    def open_generator(recipe, model_ref, registry):
        state["opened"].append(model_ref.ref)
        return ScriptedGenerator(SCRIPTS[model_ref.ref], PADS[model_ref.ref], state["log"], state["fail_after"])

    monkeypatch.setattr(sweep_mod, "_load_task", lambda recipe: EchoTask(PROBLEMS))
    monkeypatch.setattr(sweep_mod, "_open_generator", open_generator)
    monkeypatch.setattr(sweep_cells, "EFFICIENCY_N_BOOT", 200)  # 2000 by default; keeps the tests quick
    return state


def run(tmp_path, out_name, generation_extra=None, **kw):
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    summary = sweep_mod.run_sweep(make_recipe(generation_extra, **kw), models=MODELS, out=tmp_path / out_name, home=tmp_path / "home",
                                  console=console)
    return summary, console.file.getvalue()


CALLS_PER_MODEL = len(TS) * 3 + len(TS) * len(NS) * max(RS) * 2  # 3 search chunks; 2 agg chunks per round


def test_outputs_of_a_two_model_sweep(tmp_path, fake):
    summary, text = run(tmp_path, "a")
    out = tmp_path / "a"
    for name in ("cells.csv", "cells.jsonl", "efficiency.json", "best.json", "accuracy_vs_tokens.png", "pass_at_k.png",
                 "accuracy_vs_rounds.png", "sweep.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "accuracy_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["generate_calls"] == 2 * CALLS_PER_MODEL == len(fake["log"])
    assert fake["opened"] == MODELS
    cells = [json.loads(l) for l in (out / "cells.jsonl").read_text().splitlines()]
    # pass + majority: |N| x |T| each; learned: |N| x |T| x |R>0|
    assert len(cells) == summary["cells"] == 2 * (2 * len(NS) * len(TS) + len(NS) * len(TS) * 2)
    with (out / "cells.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(cells)
    assert set(rows[0]) >= {"model", "method", "N", "T", "R", "accuracy", "ci_lo", "ci_hi", "n_problems",
                            "generated_tokens_per_problem", "total_tokens_per_problem"}
    for c in cells:
        assert c["ci_lo"] <= c["accuracy"] <= c["ci_hi"] and c["n_problems"] == 3
        assert c["ci_method"] in ("wilson", "bootstrap")
    assert "sweep cells" in text and "scaling efficiency" in text and "best learned cell" in text
    for c in cells:  # learned cells: the final answer's accuracy, with the RSA population's beside it
        assert (c["population_accuracy"] is None) == (c["method"] != "learned")
        assert ("per_problem_population" in c) == (c["method"] == "learned")
    best = json.loads((out / "best.json").read_text())
    assert summary["best"] == best["learned_vs_rest"] and len(best["best"]) == 2 * 3
    eff = json.loads((out / "efficiency.json").read_text())
    assert eff["baseline"] == "scratch:base" and eff["compute"] == "generated_tokens_per_problem"
    heads = [c for c in eff["comparisons"] if c["headline"]]
    assert {c["method"] for c in heads} == {"pass", "majority", "learned"}
    for comp in heads:  # the stored comparison is metrics.scaling_efficiency on the cells' curves
        again = scaling_efficiency([tuple(p) for p in comp["baseline_curve"]], [tuple(p) for p in comp["candidate_curve"]])
        assert comp["status"] == again["status"] and comp["max"] == again["max"]
        assert comp["T"] == max(TS) and comp["R"] == (max(RS) if comp["method"] == "learned" else 0)
    for comp in eff["comparisons"]:  # every comparison carries an interval, or says why not
        for key in ("interval", "interval_at_baseline_best"):
            assert comp[f"{key}_status"] in ("ok", "not_measurable")
            assert (comp[key] is None) == (comp[f"{key}_status"] != "ok")
        assert comp["bootstrap"]["n_boot"] == 200 and comp["bootstrap"]["n_problems"] == 3
        if comp["status"] != "ok":  # no efficiency number, hence no interval
            assert comp["max"] is None and comp["interval"] is None
    assert summary["efficiency"] and summary["out"] == str(out)
    assert all("interval_status" in e for e in summary["efficiency"])


def test_cells_keep_per_problem_values_and_efficiency_rebuilds_from_them(tmp_path, fake):
    run(tmp_path, "a")
    out = tmp_path / "a"
    cells = [json.loads(l) for l in (out / "cells.jsonl").read_text().splitlines()]
    for c in cells:
        assert len(c["per_problem"]) == c["n_problems"] == 3
        assert sum(c["per_problem"]) / 3 == c["accuracy"]
    # pass@4 from a pool of 4 is 0/1 per problem, written as ints: base has the target in p1 and
    # p2 only, cand in all three (SCRIPTS)
    assert _cell(cells, "scratch:base", "pass", 4, 8)["per_problem"] == [1, 1, 0]
    assert _cell(cells, "scratch:micro", "pass", 4, 8)["per_problem"] == [1, 1, 1]
    # pass@1 = c / 4 per problem: base 1/4, 1/4, 0
    assert _cell(cells, "scratch:base", "pass", 1, 8)["per_problem"] == [0.25, 0.25, 0]
    assert "per_problem" not in (out / "cells.csv").read_text().splitlines()[0].split(",")
    # efficiency.json, intervals included, rebuilt from cells.jsonl and sweep.json alone
    manifest = json.loads((out / "sweep.json").read_text())
    grid = sweep_mod.Grid(**manifest["grid"])
    again = sweep_mod.efficiency(cells, grid, [m["ref"] for m in manifest["models"]])
    assert json.loads(json.dumps(again)) == json.loads((out / "efficiency.json").read_text())

    # cells.jsonl of an older version (no per-problem values): the interval is unavailable, no crash
    old = [{k: v for k, v in c.items() if k != "per_problem"} for c in cells]
    eff = sweep_mod.efficiency(old, grid, MODELS)
    for comp in eff["comparisons"]:
        assert comp["interval"] is None and comp["interval_status"] == "unavailable"
        assert comp["interval_at_baseline_best_status"] == "unavailable"
        assert "per-problem" in comp["bootstrap"]["reason"]
        assert "no CI" in sweep_mod.describe(comp) or comp["status"] != "ok"
    assert sweep_mod.efficiency(old, grid, MODELS)["comparisons"][0]["max"] == again["comparisons"][0]["max"]
    from spiral_cli import plots

    assert plots.plot_accuracy_vs_tokens(old, eff["comparisons"], tmp_path / "old.png").is_file()


def _touching_cells():
    """Two pass curves that meet at one accuracy level: the baseline's best (0.5 at 400 tokens) is
    the candidate's cheapest point (0.5 at 50 tokens). Per-problem values over 2 problems."""
    def cell(model, n, tokens, values):
        return {"model": model, "method": "pass", "N": n, "T": 8, "R": 0, "accuracy": sum(values) / 2,
                "ci_lo": 0.0, "ci_hi": 1.0, "ci_method": "wilson", "n_problems": 2,
                "generated_tokens_per_problem": tokens, "total_tokens_per_problem": tokens,
                "per_problem": values}
    return [cell("base", 1, 100, [0.5, 0.0]), cell("base", 4, 400, [1, 0]),
            cell("cand", 1, 50, [1, 0]), cell("cand", 2, 100, [1, 0.5])]


def _grid(**kw):
    return sweep_mod.Grid(parallel=[1, 2, 4], seq_budget=[8], agg_rounds=[0], methods=["pass"], max_problems=2,
                          seed=0, population=2, agg_set_size=2, **kw)


def _work(label, pool, learned_pop):
    """A ModelWork at T=8 whose pool holds `pool` (answers per problem, target "7") and whose
    learned round 1 at N=2 left `learned_pop` (answers per problem); 1 token per trace."""
    tr = lambda a: {"answer": a, "correct": a == "7"}  # noqa: E731
    work = sweep_cells.ModelWork(label=label, ref=None)
    work.pools[8] = [{"id": f"p{i}", "labelled": True, "traces": [tr(a) for a in answers],
                      "search_generated_tokens": len(answers), "search_prompt_tokens": len(answers)}
                     for i, answers in enumerate(pool)]
    work.learned[(8, 2)] = {1: [{"id": f"p{i}", "labelled": True, "population": [tr(a) for a in pop],
                                 "agg_generated_tokens": 10, "agg_prompt_tokens": 0}
                                for i, pop in enumerate(learned_pop)]}
    return work


def test_learned_cells_score_the_final_answer_and_keep_the_population():
    grid = sweep_cells.Grid(parallel=[2], seq_budget=[8], agg_rounds=[0, 1], methods=["pass", "majority", "learned"],
                            max_problems=4, seed=0, population=3, agg_set_size=2)
    # final answers (vote over the population, ties to the first member): 7, 7 (a three-way tie),
    # 3, none -> 2/4 right; the population's own accuracy: 2/3, 1/3, 1/3, 0
    pops = [["7", "7", "3"], ["7", "3", "1"], ["3", "3", "7"], [None, None, None]]
    pool = [["7", "3"], ["3", "1"], ["3", "3"], ["1", "2"]]  # pass@2 1/4, majority@2 1/8 (p0: tie)
    cells = sweep_cells.build_cells(grid, [_work("m", pool, pops)])
    learned = _cell(cells, "m", "learned", 2, 8, 1)
    assert learned["accuracy"] == pytest.approx(0.5) and learned["per_problem"] == [1, 1, 0, 0]
    assert learned["ci_method"] == "wilson"
    assert learned["population_accuracy"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3 + 0) / 4)
    assert learned["per_problem_population"] == pytest.approx([2 / 3, 1 / 3, 1 / 3, 0])
    assert learned["population_ci_lo"] <= learned["population_accuracy"] <= learned["population_ci_hi"]
    assert learned["generated_tokens_per_problem"] == pytest.approx(2 * 1 + 10)
    assert _cell(cells, "m", "majority", 2, 8)["population_accuracy"] is None
    # the best learned cell (0.5) is above every other method's best (pass@2 = 0.25): +25 points
    best = sweep_cells.best_accuracy(cells)
    e = best["learned_vs_rest"]
    assert e["learned_is_top"] and e["difference"] == pytest.approx(0.25)
    assert e["other"]["method"] == "pass" and e["learned"]["accuracy"] == pytest.approx(0.5)
    lo, hi = e["interval"]
    assert lo <= 0.25 <= hi
    assert {(b["model"], b["method"]) for b in best["best"]} == {("m", "pass"), ("m", "majority"), ("m", "learned")}
    assert "is above every other method's best" in sweep_cells.describe_best(best)
    assert "+25.0 points" in sweep_cells.describe_best(best)
    # a second model whose vote reaches 1.0 beats it: the verdict turns
    cells += sweep_cells.build_cells(grid, [_work("n", [["7", "7"]] * 4, [["3", "3", "3"]] * 4)])
    e = sweep_cells.best_accuracy(cells)["learned_vs_rest"]
    assert not e["learned_is_top"] and e["other"]["model"] == "n" and e["difference"] == pytest.approx(-0.5)
    assert "is not above" in sweep_cells.describe_best(sweep_cells.best_accuracy(cells))


def test_touching_curves_are_not_measurable_everywhere(tmp_path, monkeypatch):
    """Regression: efficiency.json said status "ok", max 8 where the table said "censored"."""
    monkeypatch.setattr(sweep_cells, "EFFICIENCY_N_BOOT", 100)
    eff = sweep_mod.efficiency(_touching_cells(), _grid(), ["base", "cand"])
    (comp,) = eff["comparisons"]
    assert comp["status"] == "not_measurable"
    assert comp["max"] is None and comp["at_baseline_best"] is None and comp["max_level"] is None
    assert comp["accuracy_range"] == [0.5, 0.5]
    # The ratio there, 400 / 50 = 8, is kept as what it is: censored, a lower bound.
    assert comp["censored_ratio"] == pytest.approx(8.0) and comp["lower_bound"] == pytest.approx(8.0)
    assert comp["interval"] is None and comp["interval_status"] == "not_measurable"
    assert comp["interval_at_baseline_best"] is None
    assert "baseline_compute_at_max" not in comp
    json.dumps(eff)  # plain JSON: null, not NaN
    line = sweep_mod.describe(comp)
    assert "not measurable" in line and "max" not in line and ">= 8.00x" in line
    from spiral_cli import plots

    note = plots.efficiency_note(comp)
    assert "not measurable" in note and "8.00" not in note
    # efficiency.json of the previous version (status "ok", max 8 at a single level): still "not measurable"
    legacy = dict(comp, status="ok", max=8.0, max_level=0.5)
    assert not plots.efficiency_is_measured(legacy) and "not measurable" in plots.efficiency_note(legacy)
    assert plots.plot_accuracy_vs_tokens(_touching_cells(), [dict(comp, headline=True)], tmp_path / "t.png").is_file()


def test_efficiency_interval_in_sweep_by_hand(monkeypatch):
    """Identical problems: every resample equals the data, so the interval is the point: 4x."""
    monkeypatch.setattr(sweep_cells, "EFFICIENCY_N_BOOT", 50)
    cells = _touching_cells()
    # base 0.2 -> 0.6 over 100 -> 400 tokens, cand 0.4 -> 0.8 over 50 -> 200 (metrics docstring example)
    for c, v in zip(cells, ([0.2, 0.2], [0.6, 0.6], [0.4, 0.4], [0.8, 0.8])):
        c.update(per_problem=v, accuracy=sum(v) / 2)
    cells[3].update(generated_tokens_per_problem=200)
    (comp,) = sweep_mod.efficiency(cells, _grid(), ["base", "cand"])["comparisons"]
    assert comp["status"] == "ok" and comp["max"] == pytest.approx(4.0)
    assert comp["interval"] == [pytest.approx(4.0)] * 2 and comp["interval_status"] == "ok"
    assert comp["interval_at_baseline_best"] == [pytest.approx(4.0)] * 2
    assert comp["bootstrap"]["n_not_measurable"] == {"max": 0, "at_baseline_best": 0}
    assert "max 4.00x (95% CI 4.00..4.00x)" in sweep_mod.describe(comp)
    from spiral_cli import plots

    assert "[4.00..4.00]" in plots.efficiency_note(comp)
    # The comparison's own status rules: cell accuracies (Python sums) and the bootstrap's numpy
    # means can differ in the last bit, which must never give an interval without an efficiency.
    base, cand = cells[:2], cells[2:]
    keys = sweep_mod.efficiency_interval(base, cand, {"status": "not_measurable", "max": None}, seed=0)
    assert keys["interval"] is None and keys["interval_status"] == "not_measurable"
    keys = sweep_mod.efficiency_interval(base, cand, {"status": "ok", "max": 4.0, "at_baseline_best": None}, seed=0)
    assert keys["interval_status"] == "ok" and keys["interval_at_baseline_best_status"] == "not_measurable"
    # A comparison whose cells hold different problem counts gets no interval, not an error.
    cells[0]["per_problem"] = [0.2, 0.2, 0.2]
    (comp,) = sweep_mod.efficiency(cells, _grid(), ["base", "cand"])["comparisons"]
    assert comp["interval_status"] == "unavailable" and comp["max"] == pytest.approx(4.0)


def _cell(cells, model, method, n, t, r=0):
    (c,) = [c for c in cells if (c["model"], c["method"], c["N"], c["T"], c["R"]) == (model, method, n, t, r)]
    return c


def _majority_by_hand(answers, target, k):
    """Exact expected majority@k over all size-k subsets, ties split fractionally."""
    total = Fraction(0)
    subsets = list(itertools.combinations(answers, k))
    for s in subsets:
        counts = Counter(s)
        top = max(counts.values())
        tied = [a for a, c in counts.items() if c == top]
        total += Fraction(int(target in tied), len(tied))
    return float(total / len(subsets))


def test_pass_majority_and_tokens_by_hand(tmp_path, fake):
    run(tmp_path, "a")
    cells = [json.loads(l) for l in (tmp_path / "a" / "cells.jsonl").read_text().splitlines()]
    for model in MODELS:
        script, pad = SCRIPTS[model], PADS[model]
        lengths = [pad(j) + len("\nanswer: 7") for j in range(4)]  # same for every problem
        mean_gen = sum(lengths) / 4
        mean_prompt = len("S p1\n")
        for t in TS:
            for n in NS:
                want = sum(pass_at_k(4, script[p["id"]].count(p["target"]), n) for p in PROBLEMS) / 3
                c = _cell(cells, model, "pass", n, t)
                assert c["accuracy"] == pytest.approx(want)
                maj = sum(_majority_by_hand(script[p["id"]], p["target"], n) for p in PROBLEMS) / 3
                assert _cell(cells, model, "majority", n, t)["accuracy"] == pytest.approx(maj)
                for method in ("pass", "majority"):
                    c = _cell(cells, model, method, n, t)
                    assert c["generated_tokens_per_problem"] == pytest.approx(n * mean_gen)
                    assert c["total_tokens_per_problem"] == pytest.approx(n * (mean_gen + mean_prompt))
                for r in (1, 2):
                    c = _cell(cells, model, "learned", n, t, r)
                    # each aggregation: prompt "A pX\n" + one line "#answer: X\n" per candidate (min(K, n)
                    # search traces in round 1, min(K, P) population members later); output "checked\nanswer: X"
                    agg_gen = len("checked\nanswer: 7")
                    agg_prompt = sum(5 + 11 * min(K, n if q == 1 else P) for q in range(1, r + 1))
                    assert c["generated_tokens_per_problem"] == pytest.approx(n * mean_gen + r * P * agg_gen)
                    assert c["total_tokens_per_problem"] == pytest.approx(
                        n * (mean_gen + mean_prompt) + r * P * agg_gen + P * agg_prompt)
        # pass@4 with a pool of 4 is a proportion of problems -> Wilson
        assert _cell(cells, model, "pass", 4, 8)["ci_method"] == "wilson"
    # learned at N=1 aggregates one candidate: it copies the first trace's answer (= pass@1 of trace 0)
    c = _cell(cells, "scratch:base", "learned", 1, 8, 1)
    assert c["accuracy"] == pytest.approx(1 / 3)  # only p1's first trace ("7") is right
    # the candidate model wins at equal compute on pass@k
    assert _cell(cells, "scratch:micro", "pass", 1, 16)["accuracy"] > _cell(cells, "scratch:base", "pass", 1, 16)["accuracy"]


@pytest.mark.parametrize("fail_after", [2, 8, 37])
def test_resume_after_interruption_redoes_nothing(tmp_path, fake, fail_after):
    run(tmp_path, "full")
    full_calls = list(fake["log"])
    assert len(full_calls) == 2 * CALLS_PER_MODEL

    fake["log"].clear()
    fake["fail_after"] = fail_after
    with pytest.raises(Interrupted):
        run(tmp_path, "resumed")
    done_before = list(fake["log"])
    assert len(done_before) == fail_after

    fake["log"].clear()
    fake["fail_after"] = None
    fake["opened"].clear()
    summary, _ = run(tmp_path, "resumed")
    # every call that finished before the crash was cached: only the missing work is redone
    assert summary["generate_calls"] == len(fake["log"]) == len(full_calls) - fail_after
    assert sorted(done_before + fake["log"], key=repr) == sorted(full_calls, key=repr)
    if fail_after >= CALLS_PER_MODEL:  # the first model was finished: it is not even loaded again
        assert fake["opened"] == ["scratch:micro"]
    for name in ("cells.jsonl", "cells.csv", "efficiency.json"):
        assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "full" / name).read_text(), name

    # a third run finds everything cached
    fake["log"].clear()
    fake["opened"].clear()
    summary, _ = run(tmp_path, "resumed")
    assert summary["generate_calls"] == 0 and fake["log"] == [] and fake["opened"] == []


def test_agg_temperature_redoes_only_the_aggregations(tmp_path, fake):
    run(tmp_path, "a")
    assert {(kind, temp) for kind, *_, temp in fake["log"]} == {("S", 1.0), ("A", 1.0)}
    fake["log"].clear()
    run(tmp_path, "a", generation_extra={"agg_temperature": None})  # unset: the same cache
    assert fake["log"] == []
    cells = (tmp_path / "a" / "cells.jsonl").read_text()
    summary, _ = run(tmp_path, "a", generation_extra={"agg_temperature": 0.0})  # the same output: its cache
    # the search pools are reused; every learned round is redone, greedily
    assert summary["generate_calls"] == len(fake["log"]) == 2 * len(TS) * len(NS) * max(RS) * 2
    assert {(kind, temp) for kind, *_, temp in fake["log"]} == {("A", 0.0)}
    a = {(c["model"], c["method"], c["N"], c["T"], c["R"]): c for c in map(json.loads, cells.splitlines())}
    g = {(c["model"], c["method"], c["N"], c["T"], c["R"]): c for c in map(json.loads, (tmp_path / "a" / "cells.jsonl").open())}
    assert a.keys() == g.keys()
    assert all(a[k] == g[k] for k in a if k[1] != "learned")  # pass@N and majority@N: the same pools


def test_baseline_field_default_out_and_errors(tmp_path, fake, monkeypatch):
    import io

    from rich.console import Console

    # sweep.baseline picks the baseline; default out under <home>/sweeps
    recipe = make_recipe(methods=["pass"], agg_rounds=[0])
    recipe.sweep.baseline = "scratch:micro"
    console = Console(file=io.StringIO(), width=200)
    s = sweep_mod.run_sweep(recipe, models=MODELS, out=None, home=tmp_path / "home", console=console)
    assert s["baseline"] == "scratch:micro"
    assert s["out"].startswith(str(tmp_path / "home" / "sweeps" / "echo-sweep-"))
    assert "out: " in console.file.getvalue()
    assert {e["candidate"] for e in s["efficiency"]} == {"scratch:base"}
    with pytest.raises(RecipeError, match="--models"):
        sweep_mod.run_sweep(make_recipe(), models=[" "], out=tmp_path / "x", home=tmp_path / "home", console=console)
    with pytest.raises(RecipeError, match="more than once"):
        sweep_mod.run_sweep(make_recipe(), models=MODELS * 2, out=tmp_path / "x", home=tmp_path / "home", console=console)


@pytest.mark.slow
def test_real_scratch_model_end_to_end(tmp_path):
    pytest.importorskip("torch")
    import io

    from rich.console import Console

    recipe = Recipe.model_validate({
        "name": "nano-sweep", "model": {"name": "scratch:nano", "device": "cpu"},
        "infer": {"population": 2, "agg_set_size": 2},
        "generation": {"batch_size": 8, "agg_max_new_tokens": 8},
        "sweep": {"parallel": [1, 2], "seq_budget": [8], "agg_rounds": [0, 1], "max_problems": 2},
    })
    console = Console(file=io.StringIO(), width=200)
    s = sweep_mod.run_sweep(recipe, models=["scratch:nano"], out=tmp_path / "o", home=tmp_path / "home", console=console)
    assert s["cells"] == 2 + 2 + 2 and (tmp_path / "o" / "pass_at_k.png").is_file()
    cells = [json.loads(l) for l in (tmp_path / "o" / "cells.jsonl").read_text().splitlines()]
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in cells)


def test_sweep_table_keeps_every_column_at_80_columns():
    """The table with its pop. column is wider than 80 columns boxed; rich then squeezed N to
    nothing in a log file. At 80 columns it is printed compact, every N and R in its row."""
    import io

    from rich.console import Console

    from spiral_cli.sweep import _print_table

    cells = [{"model": "r4-s1", "method": m, "T": 256, "N": n, "R": r, "accuracy": 0.794, "ci_lo": 0.756,
              "ci_hi": 0.827, "ci_method": "wilson", "population_accuracy": 0.78 if m == "learned" else None,
              "generated_tokens_per_problem": 2534.7, "total_tokens_per_problem": 4272.0}
             for m, r in (("pass", 0), ("learned", 2)) for n in (1, 8)]
    for width, boxed in ((80, False), (200, True)):
        buf = io.StringIO()
        _print_table(Console(file=buf, width=width, force_terminal=False), cells)
        lines = buf.getvalue().splitlines()
        assert max(len(line) for line in lines) <= width
        assert any("┃" in line or "│" in line for line in lines) == boxed
        rows = [line.replace("│", " ").split() for line in lines]
        rows = [r for r in rows if r and r[0] in ("pass", "learned")]
        assert [r[:4] for r in rows] == [["pass", "256", "1", "0"], ["pass", "256", "8", "0"],
                                         ["learned", "256", "1", "2"], ["learned", "256", "8", "2"]]
        assert all(r[-2:] == ["2535", "4272"] for r in rows)
        assert [("0.780" in r) for r in rows] == [False, False, True, True]
