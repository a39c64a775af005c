"""A tiny model learns a handful of examples through `spiral sft`; `spiral infer` reproduces them;
the checkpoint loads with plain transformers and gives the same greedy output."""
from __future__ import annotations

import io
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spiral_cli.tasks.countdown import CountdownTask

REPO = Path(__file__).resolve().parents[1]

RECIPE = """
name: tiny
seed: 0
task: {name: countdown}
model: {name: "scratch:nano", max_seq_len: 128}
generation: {temperature: 0.0, max_new_tokens: 24, agg_max_new_tokens: 24, batch_size: 16}
sft: {steps: 120, batch_size: 4, lr: 3.0e-3, warmup_steps: 10, eval_problems: 0, save_every: 60, log_every: 40, max_len: 128}
"""


def spiral(args, home: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPIRAL_HOME": str(home)}
    p = subprocess.run([sys.executable, "-m", "spiral_cli", *args], input=stdin, capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    home = tmp / "home"
    task = CountdownTask()
    problems = task.problems("train", 4, seed=5)
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": task.search_prompt(p), "completion": f"answer: {p['solution']}\n"}) + "\n" for p in problems
    ))
    recipe = tmp / "tiny.yaml"
    recipe.write_text(RECIPE)
    out = spiral(["sft", str(recipe), "--data", str(pairs)], home)
    return home, recipe, problems, json.loads(out.stdout), out.stderr


@pytest.mark.slow
def test_sft_then_infer_reproduces_the_examples(trained):
    home, _, problems, result, _ = trained
    assert result["name"] == "tiny-sft" and result["step"] == 120
    assert result["metrics"]["train_loss"] < 0.1
    stdin = "".join(json.dumps(p) + "\n" for p in problems)
    out = spiral(["infer", "--model", "tiny-sft", "--parallel", "2", "--agg-rounds", "0", "--aggregate", "majority"], home, stdin)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["answer"] for r in rows] == [p["solution"] for p in problems]
    assert all(r["correct"] for r in rows)
    for r in rows:  # token accounting adds up
        t = r["tokens"]
        assert t["total"]["generated"] == t["search"]["generated"] + t["aggregate"]["generated"]
        assert t["total"]["total"] == t["total"]["prompt"] + t["total"]["generated"]
        assert t["aggregate"]["total"] == 0 and t["search"]["generated"] > 0


@pytest.mark.slow
def test_checkpoint_loads_with_plain_transformers_same_greedy_output(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spiral_cli.generation.hf import HFGenerator
    from spiral_cli.models import load_model
    from spiral_cli.recipe import ModelSection
    from spiral_cli.registry import Registry

    home, _, problems, result, _ = trained
    path = Registry(home).resolve("tiny-sft").entry.path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = CountdownTask().search_prompt(problems[0])
    ids = tok(prompt, return_tensors="pt")
    plain = model.generate(**ids, do_sample=False, max_new_tokens=24, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    plain_text = tok.decode(plain[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    ours = HFGenerator(load_model(ModelSection(autocast="off"), source=str(path), for_training=False))
    ours_text = ours.generate([prompt], n=1, max_new_tokens=24, temperature=0.0)[0][0].text
    assert plain_text == ours_text == f"answer: {problems[0]['solution']}\n"


@pytest.mark.slow
def test_sft_resumes_from_its_last_state(trained, tmp_path):
    home, recipe, _, _, stderr = trained
    # the first run saved its state at step 60 and at the end (120); asking for more steps resumes
    out = spiral(["sft", str(recipe), "--data", str(recipe.parent / "pairs.jsonl"), "--set", "sft.steps=130"], home)
    assert "resumed from" in out.stderr and "at step 120" in out.stderr
    assert json.loads(out.stdout)["step"] == 130
    steps = [e.step for e in __import__("spiral_cli.registry", fromlist=["Registry"]).Registry(home).ls("tiny-sft")]
    assert steps == [120, 130]
    # the same command again: nothing left to train; it reports the loss it last logged, not NaN
    again = spiral(["sft", str(recipe), "--data", str(recipe.parent / "pairs.jsonl"), "--set", "sft.steps=130"], home)
    assert "already finished" in again.stderr
    logged = [json.loads(line) for line in (home / "runs" / "tiny-sft" / "metrics.jsonl").read_text().splitlines()]
    assert json.loads(again.stdout)["metrics"]["train_loss"] == pytest.approx(logged[-1]["loss"])


def test_a_resumed_run_reports_its_last_logged_loss(tmp_path):
    from spiral_cli.sft import _last_logged_loss

    log = tmp_path / "metrics.jsonl"
    assert math.isnan(_last_logged_loss(log))  # no log yet
    log.write_text('{"step": 10, "loss": 1.5}\n{"step": 20, "loss": 0.25}\n{"step": 20, "loss": "oops"}\n')
    assert _last_logged_loss(log) == 0.25  # the last line with a loss that is a number


@pytest.mark.slow
def test_sft_adds_aggregation_examples_over_its_own_candidates(tmp_path):
    """sft.self_aggregate_examples: halfway through, the model samples candidates for new train
    problems; the verifier writes the targets; training continues on the mixed pool. Two rounds,
    each pool half own examples (self_aggregate_share), the learning rate restarted at each."""
    from rich.console import Console

    from spiral_cli.recipe import load_recipe
    from spiral_cli.sft import run_sft

    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(RECIPE)
    recipe = load_recipe(recipe_path, [
        "sft.steps=8", "sft.save_every=4", "sft.num_search_examples=32", "sft.num_aggregate_examples=8",
        "sft.self_aggregate_examples=6", "sft.self_aggregate_after=[0.25, 0.75]", "generation.temperature=1.0",
        "sft.self_aggregate_share=0.5", "sft.restart_lr_each_round=true", "sft.warmup_steps=2", "sft.log_every=1",
    ])
    home = tmp_path / "home"
    log = io.StringIO()
    result = run_sft(recipe, home=home, console=Console(file=log, width=400))
    assert result["step"] == 8
    # the learning rate of steps 1-8 (peak 3e-3, 2 warm-up steps): cycles [0, 2), [2, 6), [6, 8)
    lrs = [float(m) for m in re.findall(r"step \d+/8 loss \S+ lr (\S+)", log.getvalue())]
    assert lrs == pytest.approx([1.5e-3, 3e-3, 1.5e-3, 3e-3, 3e-3, 1.65e-3, 1.5e-3, 3e-3], rel=1e-2)
    run_dir = home / "runs" / "tiny-sft"
    rounds = [[json.loads(line) for line in (run_dir / name).read_text().splitlines()]
              for name in ("self_aggregate.jsonl", "self_aggregate-2.jsonl")]  # two rounds, built at steps 2 and 6
    assert sorted(p.name for p in run_dir.glob("self_aggregate*.jsonl")) == ["self_aggregate-2.jsonl", "self_aggregate.jsonl"]
    first, second = ({r["prompt"].split("\n")[0] for r in rows} for rows in rounds)
    assert not first & second  # each round samples other problems
    for rows in rounds:
        assert len(rows) == 6 and all(r["kind"] == "self_aggregate" for r in rows)
    for r in rounds[0] + rounds[1]:
        assert r["prompt"].startswith("agg ")
        # one verdict line per candidate, written by the verifier, not by the model
        verdicts = [line for line in r["completion"].splitlines() if line[:2] in ("1:", "2:", "3:", "4:")]
        assert [v[:2] for v in verdicts] == ["1:", "2:", "3:", "4:"]
        assert all(v.endswith((" ok", " no", "none")) for v in verdicts)


def record_sft_batches(monkeypatch, crash_at: list):
    """Wrap sft.collate: every batch it builds is appended to the returned list as the (kind, token
    ids) of its examples; when `crash_at[0]` batches are recorded, the next call raises."""
    import spiral_cli.sft as sft

    batches: list[list] = []
    real_collate = sft.collate

    def recording_collate(examples, pad_id, device):
        if crash_at[0] is not None and len(batches) == crash_at[0]:
            raise RuntimeError("simulated crash")
        batches.append([(e.kind, tuple(e.input_ids)) for e in examples])
        return real_collate(examples, pad_id, device)

    monkeypatch.setattr(sft, "collate", recording_collate)
    return batches


def test_sft_trains_on_search_examples_alone_until_aggregate_after(tmp_path, monkeypatch):
    """sft.aggregate_after=0.5: the first half of the steps sees only search examples, the second
    half the whole pool; a run interrupted in the second half resumes with the same batches."""
    from rich.console import Console

    import spiral_cli.sft as sft
    from spiral_cli.recipe import load_recipe

    crash_at = [None]
    batches = record_sft_batches(monkeypatch, crash_at)  # per step: the (kind, token ids) of its examples
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(RECIPE)
    recipe = load_recipe(recipe_path, [
        "sft.steps=12", "sft.save_every=9", "sft.batch_size=8", "sft.num_search_examples=24",
        "sft.num_aggregate_examples=24", "sft.aggregate_after=0.5", "model.max_seq_len=512", "sft.max_len=512",
    ])
    quiet = Console(stderr=True, quiet=True)
    assert sft.run_sft(recipe, home=tmp_path / "a", console=quiet)["step"] == 12
    uninterrupted = list(batches)
    kinds = [{kind for kind, _ in batch} for batch in uninterrupted]
    assert kinds[:6] == [{"search"}] * 6
    assert sum("aggregate" in k for k in kinds[6:]) >= 3  # 24 of the 48 examples are aggregation ones

    batches.clear()
    crash_at[0] = 10  # dies in step 11, after the state of step 9 was saved
    with pytest.raises(RuntimeError, match="simulated crash"):
        sft.run_sft(recipe, home=tmp_path / "b", console=quiet)
    assert batches == uninterrupted[:10]
    batches.clear()
    crash_at[0] = None
    assert sft.run_sft(recipe, home=tmp_path / "b", console=quiet)["step"] == 12
    assert batches == uninterrupted[9:]


def test_sft_time_budget_is_a_loud_safety_net_not_a_schedule(tmp_path, monkeypatch):
    """The phases count steps whatever the clock says (the same recipe trains the same model on a
    slow machine); when sft.time_budget_minutes cuts the run short, it says so loudly, the registry
    records it, and rerunning the command trains on from where it stopped."""
    import io

    from rich.console import Console

    import spiral_cli.sft as sft
    from spiral_cli.recipe import load_recipe
    from spiral_cli.registry import Registry

    class Clock:  # every reading of the clock is one more second
        now = 1_000_000.0

        def time(self):
            self.now += 1.0
            return self.now

        def __getattr__(self, name):
            return getattr(__import__("time"), name)

    monkeypatch.setattr(sft, "time", Clock())
    batches = record_sft_batches(monkeypatch, [None])
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(RECIPE)
    recipe = load_recipe(recipe_path, [
        "sft.steps=1000", "sft.save_every=5", "sft.log_every=1000", "sft.batch_size=8", "sft.num_search_examples=24",
        "sft.num_aggregate_examples=24", "sft.aggregate_after=0.5", "sft.time_budget_minutes=1",
        "sft.eval_problems=0", "model.max_seq_len=512", "sft.max_len=512",
        "sft.self_aggregate_examples=4", "sft.self_aggregate_after=[0.6, 0.8]",
    ])
    out = io.StringIO()
    result = sft.run_sft(recipe, home=tmp_path / "home", console=Console(file=out, width=400))
    stopped = result["step"]
    assert result["stopped_early"] and 5 < stopped < 100  # 60 clock seconds, a few per step
    assert all({kind for kind, _ in batch} == {"search"} for batch in batches)  # the boundary stays at step 500
    text = " ".join(out.getvalue().split())
    assert f"WARNING: sft.time_budget_minutes=1.0 stopped the run at step {stopped} of 1000" in text
    assert "the aggregation examples (from step 500) were never trained on" in text
    for r, at in ((1, 600), (2, 800)):  # each self-aggregation round it never reached, named
        assert f"sft.self_aggregate_examples (round {r}) (from step {at}) were never trained on" in text
    entry = Registry(tmp_path / "home").latest("tiny-sft")
    assert entry.metrics["stopped_by_time_budget"] == 1 and entry.metrics["planned_steps"] == 1000
    again = sft.run_sft(recipe, home=tmp_path / "home", console=Console(file=io.StringIO()))
    assert again["step"] > stopped  # resumed and trained on


def test_infer_held_out_figures_put_aggregation_beside_the_vote():
    """The summary of `spiral infer` on labelled problems: every way to use the same N traces,
    with intervals, and the learned aggregation's gain over majority@N with a paired interval."""
    from types import SimpleNamespace

    from spiral_cli.infer import held_out_figures

    rows = [  # 4 problems, N = 8
        {"trace_accuracy": 0.5, "any_correct": True, "majority_correct": True, "aggregation_accuracy": 1.0, "final": True},
        {"trace_accuracy": 0.125, "any_correct": True, "majority_correct": False, "aggregation_accuracy": 0.5, "final": True},
        {"trace_accuracy": 0.0, "any_correct": False, "majority_correct": False, "aggregation_accuracy": 0.0, "final": False},
        {"trace_accuracy": 0.25, "any_correct": True, "majority_correct": False, "aggregation_accuracy": 0.75, "final": True},
    ]
    f = held_out_figures(rows, SimpleNamespace(parallel=8, agg_rounds=1))
    assert f["problems"] == 4
    assert f["pass@1"]["accuracy"] == pytest.approx(0.21875)
    assert f["pass@8"]["accuracy"] == 0.75 and f["majority@8"]["accuracy"] == 0.25
    assert f["learned population@8 (R=1)"]["accuracy"] == pytest.approx(0.5625)
    assert f["final answer"]["accuracy"] == 0.75
    gain = f["final answer - majority@8"]
    assert gain["difference"] == pytest.approx(0.5)
    assert 0.0 <= gain["interval"][0] <= 0.5 <= gain["interval"][1] <= 1.0  # per-problem gains are 0, 1, 0, 1
    assert f["learned population@8 (R=1) - majority@8"]["difference"] == pytest.approx(0.3125)
    lo, hi = f["majority@8"]["interval"]
    assert 0.0 <= lo <= 0.25 <= hi <= 1.0
    # without aggregation rounds there is no population column, the final answer is the vote's
    f = held_out_figures([{k: v for k, v in r.items() if k != "aggregation_accuracy"} for r in rows],
                         SimpleNamespace(parallel=8, agg_rounds=0))
    assert [k for k in f if k.startswith("learned")] == []


def test_sft_phases_follow_the_steps_and_build_self_aggregation_once():
    """The phase schedule alone: search examples until aggregate_after, then all of them; from
    self_aggregate_after also the self-aggregation examples, built once, at the first step that needs
    them; batches are a pure function of (seed, phase, epoch)."""
    from spiral_cli.recipe import SftSection
    from spiral_cli.sft import Example, SftPhases

    examples = [Example([i], [i], "search") for i in range(8)] + [Example([100 + i], [i], "aggregate") for i in range(4)]
    own = [Example([200 + i], [i], "self_aggregate") for i in range(4)]
    built = []
    cfg = SftSection(steps=20, aggregate_after=0.25, self_aggregate_examples=4, self_aggregate_after=0.5, batch_size=4)
    phases = SftPhases.for_recipe(cfg, examples, seed=3, build_self_agg=lambda r: built.append(r) or own)
    assert (phases.aggregate_from, phases.self_agg_starts) == (5, [10])
    assert phases.at(0) == (0, examples[:8]) and phases.at(4) == (0, examples[:8])
    assert phases.at(5) == (5, examples) and phases.at(9) == (5, examples)
    assert not built
    assert phases.at(10) == (10, examples + own) and phases.at(19)[1] == examples + own and built == [0]
    assert all(e.kind == "search" for s in range(5) for e in phases.batch(s))
    again = SftPhases.for_recipe(cfg, examples, seed=3, build_self_agg=lambda r: own)
    assert [phases.batch(s) for s in range(20)] == [again.batch(s) for s in range(20)]
    # a pool of one kind has one phase (sft.data with rounds is refused by `spiral sft`: test_cli_robustness)
    one_kind = SftPhases.for_recipe(cfg, examples[:8], seed=3)
    assert one_kind.aggregate_from == 0


def test_self_aggregation_rounds_replace_each_other_and_resume_in_place():
    """sft.self_aggregate_after as a list: round r's examples are built at its own step, from the
    model of that step, and replace round r-1's; a run resumed inside round 2 builds (reads back)
    round 2 only and trains on the batches the uninterrupted run trained on."""
    from spiral_cli.recipe import SftSection
    from spiral_cli.sft import Example, SftPhases

    cfg = SftSection(steps=40, aggregate_after=0.0, self_aggregate_examples=4, self_aggregate_after=[0.25, 0.5, 0.75],
                     batch_size=4)
    assert cfg.self_aggregate_rounds() == [0.25, 0.5, 0.75]
    examples = [Example([i], [i], "search") for i in range(8)]
    own = {r: [Example([100 * (r + 1) + i], [i], "self_aggregate") for i in range(4)] for r in range(3)}
    built = []
    phases = SftPhases.for_recipe(cfg, examples, seed=5, build_self_agg=lambda r: built.append(r) or own[r])
    assert phases.self_agg_starts == [10, 20, 30]
    assert phases.at(9) == (0, examples) and built == []
    assert phases.at(10) == (10, examples + own[0]) and phases.at(19) == (10, examples + own[0])
    assert phases.at(20) == (20, examples + own[1]) and phases.at(29)[1] == examples + own[1]  # round 1's replaced
    assert phases.at(39) == (30, examples + own[2]) and built == [0, 1, 2]  # each round built once
    resumed_built = []
    resumed = SftPhases.for_recipe(cfg, examples, seed=5, build_self_agg=lambda r: resumed_built.append(r) or own[r])
    assert [resumed.batch(s) for s in range(25, 40)] == [phases.batch(s) for s in range(25, 40)]
    assert resumed_built == [1, 2]  # resumed at step 25: round 1's examples were never needed again
    # one fraction is one round, as before; fractions out of order or out of (0, 1) are refused
    assert SftSection(self_aggregate_after=0.6).self_aggregate_rounds() == [0.6]
    for bad in ([0.5, 0.5], [0.7, 0.3], [], [0.5, 1.0], 0.0):
        with pytest.raises(ValueError, match="self_aggregate_after"):
            SftSection(self_aggregate_after=bad)


def test_rounds_as_continuations_draw_a_share_and_restart_the_learning_rate():
    """sft.self_aggregate_share: a round's pool is its own examples plus a draw of the others sized
    to give them that share (the same draw on resume, another each round); restart_lr_each_round:
    the warm-up and cosine start again at each round, as a continuation run from that model would."""
    from spiral_cli.recipe import SftSection
    from spiral_cli.sft import Example, SftPhases, lr_at

    cfg = SftSection(steps=100, aggregate_after=0.0, self_aggregate_examples=5, self_aggregate_after=[0.5, 0.8],
                     self_aggregate_share=0.2, restart_lr_each_round=True, batch_size=4, warmup_steps=10)
    examples = [Example([i], [i], "search") for i in range(40)]
    own = {r: [Example([100 * (r + 1) + i], [i], "self_aggregate") for i in range(5)] for r in range(2)}
    phases = SftPhases.for_recipe(cfg, examples, seed=5, build_self_agg=lambda r: own[r])
    assert phases.at(49) == (0, examples)  # before the first round: every example
    start, pool = phases.at(50)
    others = [e for e in pool if e.kind == "search"]
    assert start == 50 and len(pool) == 25 and pool[-5:] == own[0] and len(others) == 20  # 5 of 25 = 0.2
    assert others == sorted(others, key=lambda e: e.input_ids[0]) and len(set(id(e) for e in others)) == 20
    again = SftPhases.for_recipe(cfg, examples, seed=5, build_self_agg=lambda r: own[r])
    assert again.at(60)[1] == pool  # a resumed run draws the same
    second = [e for e in phases.at(80)[1] if e.kind == "search"]
    assert len(second) == 20 and second != others  # each round its own draw
    # the learning-rate cycles: [0, 50), [50, 80), [80, 100), each warm-up then cosine to 10% of the peak
    assert [phases.lr_cycle(s) for s in (0, 49, 50, 79, 80, 99)] == [(0, 50), (0, 50), (50, 30), (50, 30),
                                                                   (80, 20), (80, 20)]
    no_restart = SftPhases.for_recipe(cfg.model_copy(update={"restart_lr_each_round": False}), examples, seed=5)
    assert no_restart.lr_cycle(80) == (0, 100)
    assert lr_at(0, 30, 10, 1.0) == pytest.approx(0.1)  # step 50: the warm-up's first step again
    assert lr_at(20, 30, 10, 1.0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 10 / 20)))  # step 70: 0.55
    # a pool that cannot be what the recipe asks is said, not silently changed: no own examples
    # (all others), or too few others for the share (the own share rises)
    warned = []
    empty = SftPhases.for_recipe(cfg, examples, seed=5, build_self_agg=lambda r: [], warn=warned.append)
    assert empty.at(50)[1] == examples and "no examples of the model's own" in warned[-1]
    few = SftPhases.for_recipe(cfg, examples[:12], seed=5, build_self_agg=lambda r: own[r], warn=warned.append)
    assert len(few.at(50)[1]) == 17 and "asks for 20 other examples" in warned[-1] and "is 0.29" in warned[-1]
    unshared = SftPhases.for_recipe(cfg.model_copy(update={"self_aggregate_share": None}), examples, seed=5,
                                    build_self_agg=lambda r: [], warn=warned.append)
    assert unshared.at(50)[1] == examples and "round 1 has no examples of the model's own" in warned[-1]
    del warned[-1]
    assert len(warned) == 2
    short = cfg.model_copy(update={"warmup_steps": 25})  # cycles of 50, 30, 20 steps
    SftPhases.for_recipe(short, examples, seed=5, warn=warned.append)
    assert warned[2:] == ["the learning-rate cycle from step 80 is 20 steps, shorter than sft.warmup_steps=25: "
                          "it never reaches sft.lr"]
    # the time spent building a round is kept apart, so the ETA and tok/s count training alone
    slow = SftPhases.for_recipe(cfg, examples, seed=5, build_self_agg=lambda r: time.sleep(0.05) or own[r])
    assert slow.build_seconds == 0 and slow.at(50) and slow.build_seconds >= 0.05 and slow.rounds_built == 1
    # the ETA: steps left at the training pace, plus the rounds ahead at the mean build time so far.
    # 60 steps done (10 of them before a resume) in 40 s, of which 10 s built round 1 (at step 50):
    # 0.6 s per step x 40 steps left + 1 round ahead (step 80) x 10 s = 34 s
    slow.build_seconds = 10.0
    assert slow.eta_seconds(60, 10, 40.0) == pytest.approx(40 * 0.6 + 10.0)
    assert slow.eta_seconds(85, 10, 75.0) == pytest.approx(15 * (65 / 75))  # no round ahead
    fresh = SftPhases.for_recipe(cfg, examples, seed=5)
    assert fresh.eta_seconds(20, 0, 10.0) == pytest.approx(80 * 0.5)  # none built yet: rounds not counted
    with pytest.raises(ValueError, match="total_steps"):
        SftPhases(examples, aggregate_from=0, self_agg_starts=[], batch_size=4, seed=0)
    # without rounds the two options mean nothing: refused
    for bad in ({"self_aggregate_share": 0.2}, {"restart_lr_each_round": True}):
        with pytest.raises(ValueError, match="self_aggregate_examples"):
            SftSection(**bad)
    with pytest.raises(ValueError, match="self_aggregate_share"):
        SftSection(self_aggregate_examples=5, self_aggregate_share=1.0)


def test_rounds_can_draw_their_other_examples_from_the_search_examples_alone():
    """sft.self_aggregate_others=search: a round's others are a draw of the search examples only,
    so its aggregation examples are its own candidates' (and its steps shorter); "all" (the
    default) draws from every example, as before. Before the rounds nothing changes."""
    from spiral_cli.recipe import SftSection
    from spiral_cli.sft import Example, SftPhases

    cfg = SftSection(steps=100, aggregate_after=0.2, self_aggregate_examples=5, self_aggregate_after=[0.5, 0.8],
                     self_aggregate_share=0.2, self_aggregate_others="search", batch_size=4)
    search = [Example([i], [i], "search") for i in range(40)]
    synthetic = [Example([1000 + i], [i], "aggregate") for i in range(40)]
    examples = search + synthetic
    own = {r: [Example([100 * (r + 1) + i], [i], "self_aggregate") for i in range(5)] for r in range(2)}
    phases = SftPhases.for_recipe(cfg, examples, seed=5, build_self_agg=lambda r: own[r])
    assert phases.at(10) == (0, search) and phases.at(20) == (20, examples)  # the phases before the rounds
    start, pool = phases.at(50)
    assert start == 50 and len(pool) == 25 and pool[-5:] == own[0]
    assert [e.kind for e in pool[:20]] == ["search"] * 20  # 20 of the 40 search examples, no task aggregation
    assert pool[:20] == sorted(pool[:20], key=lambda e: e.input_ids[0])
    again = SftPhases.for_recipe(cfg, examples, seed=5, build_self_agg=lambda r: own[r])
    assert again.at(79)[1] == pool  # a resumed run draws the same
    assert [e.kind for e in phases.at(80)[1][:20]] == ["search"] * 20 and phases.at(80)[1][:20] != pool[:20]
    # without a share: every search example beside the own ones
    unshared = SftPhases.for_recipe(cfg.model_copy(update={"self_aggregate_share": None}), examples, seed=5,
                                    build_self_agg=lambda r: own[r])
    assert unshared.at(50)[1] == search + own[0]
    # the default draws from every example: about half of the 20 are task aggregation examples here
    mixed = SftPhases.for_recipe(cfg.model_copy(update={"self_aggregate_others": "all"}), examples, seed=5,
                                 build_self_agg=lambda r: own[r])
    kinds = [e.kind for e in mixed.at(50)[1][:20]]
    assert len(kinds) == 20 and 0 < kinds.count("aggregate") < 20
    # ... exactly the draw it made before the option existed (existing recipes train the same model)
    drawn = sorted(random.Random("self-aggregate-share/5/0").sample(range(len(examples)), 20))
    assert mixed.at(50)[1][:20] == [examples[i] for i in drawn]
    # no search example left (all longer than sft.max_len): said, and drawn from every example
    warned = []
    only_agg = SftPhases.for_recipe(cfg, synthetic, seed=5, build_self_agg=lambda r: own[r], warn=warned.append)
    assert [e.kind for e in only_agg.at(50)[1][:20]] == ["aggregate"] * 20 and "no search example fits" in warned[-1]
    with pytest.raises(ValueError, match="self_aggregate_examples"):
        SftSection(self_aggregate_others="search")
    with pytest.raises(ValueError, match="num_search_examples is 0"):
        SftSection(self_aggregate_examples=5, self_aggregate_others="search", num_search_examples=0)
    with pytest.raises(ValueError):
        SftSection(self_aggregate_examples=5, self_aggregate_others="aggregate")


@pytest.mark.slow
def test_infer_aggregates_with_a_separate_aggregator_checkpoint(trained, tmp_path):
    """`--aggregator` (the two-model form): the search traces come from --model, every aggregation
    from the aggregator checkpoint. The aggregator here learned to answer "fail" to aggregation
    prompts, something the search model never writes."""
    home, recipe, problems, _, _ = trained
    task = CountdownTask()
    search_texts = [f"answer: {p['solution']}\n" for p in problems]  # what tiny-sft writes, greedily
    pairs = tmp_path / "agg.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": task.aggregate_prompt(p, [t] * k), "completion": "fail\n"}) + "\n"
        for p, t in zip(problems, search_texts) for k in (1, 2)
    ))
    spiral(["sft", str(recipe), "--data", str(pairs), "--name", "tiny-agg", "--set", "sft.steps=60"], home)
    stdin = "".join(json.dumps(p) + "\n" for p in problems)
    args = ["infer", "--model", "tiny-sft", "--parallel", "2", "--agg-rounds", "1", "--population", "2",
            "--agg-set-size", "2", "--traces"]
    own = [json.loads(line) for line in spiral(args, home, stdin).stdout.splitlines()]
    out = spiral(args + ["--aggregator", "tiny-agg"], home, stdin)
    two = [json.loads(line) for line in out.stdout.splitlines()]
    assert "(aggregator tiny-agg)" in out.stderr
    assert [[t["text"] for t in r["traces"]] for r in two] == [[t["text"] for t in r["traces"]] for r in own]
    assert all(t["text"] == "fail\n" for r in two for t in r["aggregations"][0])
    assert not any(t["text"] == "fail\n" for r in own for t in r["aggregations"][0])
    assert all(r["tokens"]["aggregate"]["generated"] > 0 for r in two)


def test_infer_refuses_an_unknown_aggregator_before_loading_anything(tmp_path):
    p = subprocess.run([sys.executable, "-m", "spiral_cli", "infer", "--model", "scratch:nano", "--prompt", "1 2 -> 3",
                        "--aggregator", "no-such-model"], capture_output=True, text=True,
                       env={**os.environ, "SPIRAL_HOME": str(tmp_path)}, cwd=REPO, timeout=300)
    assert p.returncode == 2 and "no-such-model" in p.stderr and "Traceback" not in p.stderr
