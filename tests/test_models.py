"""spiral_cli.models: byte tokenizer round trip through plain transformers, scratch presets, save/load of
full and LoRA checkpoints that plain transformers/peft load with identical outputs, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from spiral_cli.models import (
    SCRATCH_PRESETS,
    LoadedModel,
    ModelError,
    build_byte_tokenizer,
    count_parameters,
    load_model,
    resolve_autocast,
    resolve_device,
    save_checkpoint,
    scratch_config,
)
from spiral_cli.recipe import LoraSection, ModelSection

TEXT = "3 7 12 -> 69\n  two  spaces\ttab\r\n\nend 'quote' \"dq\" <x>=(1+2)*3; {a: [b]} ~`!@#$%^&|\\ é ü 日本 🎉 \n"
PROMPTS = ["3 7 12 -> ", "hello world", "x\ny\n  z"]

# documented in models.SCRATCH_PRESETS' comment (measured)
EXPECTED_PARAMS = {"nano": 1_018_240, "micro": 2_215_232, "tiny": 4_002_560, "tiny-deep": 7_938_816, "small": 31_610_368, "base": 96_963_840}
RANGES = {"nano": (0.8e6, 1.3e6), "micro": (1.5e6, 3e6), "tiny": (3e6, 5e6), "tiny-deep": (7e6, 9e6), "small": (20e6, 40e6), "base": (80e6, 120e6)}


def _section(**kw) -> ModelSection:
    kw.setdefault("name", "scratch:nano")
    kw.setdefault("autocast", "off")
    return ModelSection(**kw)


def _greedy(model, tok, prompts=PROMPTS, n=12) -> list[list[int]]:
    enc = tok(prompts, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=n, pad_token_id=tok.pad_token_id)
    return out[:, enc.input_ids.shape[1]:].tolist()


def _randomize_lora(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter do something
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# -- tokenizer --------------------------------------------------------------------------------


def test_byte_tokenizer_ids_are_bytes():
    tok = build_byte_tokenizer()
    ids = tok("3 7 12 -> 69\n")["input_ids"]
    assert ids == list(b"3 7 12 -> 69\n")
    assert tok.decode(tok(TEXT)["input_ids"]) == TEXT
    assert tok(TEXT)["input_ids"] == list(TEXT.encode("utf-8"))
    assert len(tok) == 258 and tok.eos_token_id == 256 and tok.pad_token_id == 257
    assert tok.bos_token_id is None and tok.padding_side == "left"
    assert tok("a<|endoftext|>b")["input_ids"] == [97, 256, 98]
    assert tok.decode([97, 256, 98], skip_special_tokens=True) == "ab"


def test_tokenizer_round_trips_through_plain_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    lm = load_model(_section())
    save_checkpoint(lm, tmp_path / "ck")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "ck")
    ours = lm.tokenizer(TEXT)["input_ids"]
    assert tok2(TEXT)["input_ids"] == ours
    assert tok2.decode(ours) == TEXT
    assert (tok2.eos_token_id, tok2.pad_token_id, len(tok2)) == (256, 257, 258)
    batch = tok2(PROMPTS, padding=True)["input_ids"]
    assert batch == lm.tokenizer(PROMPTS, padding=True)["input_ids"]  # same left padding
    # and through our loader
    lm2 = load_model(_section(name=str(tmp_path / "ck")))
    assert lm2.tokenizer(TEXT)["input_ids"] == ours and lm2.tokenizer.decode(ours) == TEXT


# -- presets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(SCRATCH_PRESETS))
def test_preset_parameter_counts(preset):
    from transformers import Qwen2ForCausalLM

    cfg = scratch_config(preset, build_byte_tokenizer(), 1024)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    total, _ = count_parameters(model)
    assert total == EXPECTED_PARAMS[preset]
    lo, hi = RANGES[preset]
    assert lo <= total <= hi
    assert cfg.tie_word_embeddings and cfg.vocab_size == 258


def test_scratch_model_is_seeded_and_configured():
    a = load_model(_section(max_seq_len=333), seed=5)
    b = load_model(_section(), seed=5)
    c = load_model(_section(), seed=6)
    pa, pb, pc = (dict(x.model.named_parameters()) for x in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)
    cfg = a.model.config
    assert cfg.max_position_embeddings == 333 and cfg.model_type == "qwen2"
    assert a.model.lm_head.weight is a.model.model.embed_tokens.weight  # tied
    assert a.scratch_preset == "nano" and not a.is_lora and a.dtype == torch.float32
    assert a.model.training and count_parameters(a.model)[1] == count_parameters(a.model)[0]
    d = load_model(_section(), for_training=False)
    assert not d.model.training and count_parameters(d.model)[1] == 0


def test_devices_dtypes_autocast():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("tpu9000")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA"):
            resolve_device("cuda:0")
    lm = load_model(_section(autocast="off"))
    with lm.autocast_ctx():
        assert not torch.is_autocast_enabled("cpu")
    lm = load_model(_section(autocast="on"))
    assert lm.autocast
    with lm.autocast_ctx():
        out = lm.model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.dtype == torch.bfloat16
    lm = load_model(_section(gradient_checkpointing=True))
    assert lm.model.is_gradient_checkpointing


def _fake_timer(bf16_seconds: float, fp32_seconds: float):
    """The clock of measure_cpu_autocast's steps, which alternate fp32, bf16: each step reads it
    at its start and its end."""
    calls = [0]

    def timer() -> float:
        k = calls[0]
        calls[0] += 1
        step, is_end = divmod(k, 2)
        seconds = bf16_seconds if step % 2 else fp32_seconds
        return 10.0 * step + (seconds if is_end else 0.0)

    return timer


@pytest.mark.parametrize("bf16,fp32,chosen", [(0.14, 0.25, True), (0.336, 0.235, False), (0.24, 0.25, False)])
def test_autocast_auto_measures_this_cpu(monkeypatch, bf16, fp32, chosen):
    """On a CPU "auto" times the model in both precisions and keeps the faster; a near tie
    (bf16 less than 10% faster) keeps fp32. Weights, gradients and the RNG are left untouched."""
    from spiral_cli.models import device

    assert resolve_autocast("auto", torch.device("cpu"), torch.float32) == device.MEASURE
    assert resolve_autocast("auto", torch.device("cpu"), torch.float16) is False
    lm = load_model(_section(autocast="off"), for_training=True)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    rng = torch.get_rng_state()
    monkeypatch.setattr(device, "_AUTOCAST_MEASURED", {})
    use, note = device.measure_cpu_autocast(lm.model, for_training=True, timer=_fake_timer(bf16, fp32))
    assert use is chosen
    assert f"bf16 {bf16 * 1e3:.0f} ms vs fp32 {fp32 * 1e3:.0f} ms" in note and note.endswith("bf16" if chosen else "fp32")
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    assert all(p.grad is None for p in lm.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_autocast_auto_is_resolved_at_load(monkeypatch):
    from spiral_cli.models import load

    monkeypatch.setattr(load, "measure_cpu_autocast", lambda model, for_training: (True, "measured"))
    lm = load_model(_section(autocast="auto"), for_training=False)
    assert lm.autocast is True and lm.autocast_note == "measured"
    lm = load_model(_section(autocast="off"))
    assert lm.autocast is False and lm.autocast_note == ""


@pytest.mark.parametrize("native", [True, False])
def test_forced_bf16_on_a_cpu_without_bf16_matmuls_warns_once(monkeypatch, caplog, native):
    """`autocast: on` is obeyed everywhere, but on a CPU whose bf16 matmuls take torch's fallback
    (AVX2 only: 9.5x slower than fp32, bench/README.md) the load says so, once per process."""
    from spiral_cli.models import device, load

    monkeypatch.setattr(device, "cpu_bf16_matmul_is_native", lambda: native)
    monkeypatch.setattr(load, "_WARNED", set())
    with caplog.at_level("WARNING", logger=load.__name__):
        first = load_model(_section(autocast="on"))
        second = load_model(_section(autocast="on"))
        off = load_model(_section(autocast="off"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert first.autocast is True and off.autocast_note == ""
    if native:
        assert first.autocast_note == "" and warnings == []
    else:
        assert first.autocast_note.startswith("warning: model.autocast: on, but this CPU has no bf16 matrix")
        assert second.autocast_note == first.autocast_note and warnings == [first.autocast_note]


# -- checkpoints ------------------------------------------------------------------------------


def test_full_checkpoint_loads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = load_model(_section(), seed=3)
    ours = _greedy(lm.model, lm.tokenizer)
    save_checkpoint(lm, tmp_path / "full", extra_files={"recipe.json": b"{}", "sub/x.txt": b"x"})
    assert (tmp_path / "full" / "model.safetensors").is_file()
    assert (tmp_path / "full" / "recipe.json").read_bytes() == b"{}"
    assert (tmp_path / "full" / "sub" / "x.txt").read_bytes() == b"x"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    tok = AutoTokenizer.from_pretrained(tmp_path / "full")
    tok.padding_side = "left"
    assert _greedy(model, tok) == ours
    lm2 = load_model(_section(name=str(tmp_path / "full")))
    assert lm2.scratch_preset == "nano" and not lm2.is_lora
    assert _greedy(lm2.model, lm2.tokenizer) == ours
    with pytest.raises(ModelError, match="relative path"):
        save_checkpoint(lm, tmp_path / "bad", extra_files={"../evil": b""})


def test_lora_checkpoint_on_scratch_base_loads_in_plain_peft(tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoTokenizer

    lm = load_model(_section(lora=LoraSection(r=4, alpha=8)), seed=1)
    assert lm.is_lora and isinstance(lm.model, PeftModel)
    total, trainable = count_parameters(lm.model)
    assert 0 < trainable < total
    _randomize_lora(lm.model)
    ours = _greedy(lm.model, lm.tokenizer)
    # written under a temporary name, then renamed into place (as the registry does)
    tmp, final = tmp_path / "ck.tmp", tmp_path / "ck"
    save_checkpoint(lm, tmp, final_path=final)
    tmp.rename(final)
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(final.absolute() / "base")
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    plain = AutoPeftModelForCausalLM.from_pretrained(str(final))
    tok = AutoTokenizer.from_pretrained(final)
    assert _greedy(plain, tok) == ours
    # our loader continues training the same adapter
    again = load_model(_section(name=str(final), lora=LoraSection(r=4, alpha=8)))
    assert again.is_lora and count_parameters(again.model)[1] == trainable
    assert _greedy(again.model, again.tokenizer) == ours
    # inference: merged into the base, same outputs
    merged = load_model(_section(name=str(final)), for_training=False)
    assert not merged.is_lora and not isinstance(merged.model, PeftModel)
    assert _greedy(merged.model, merged.tokenizer) == ours
    # saving the continued adapter again bundles the base again (the first checkpoint may be deleted)
    save_checkpoint(again, tmp_path / "ck2")
    cfg2 = json.loads((tmp_path / "ck2" / "adapter_config.json").read_text())
    assert cfg2["base_model_name_or_path"] == str((tmp_path / "ck2" / "base").absolute())
    assert _greedy(AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "ck2")), tok) == ours


def test_lora_on_local_full_checkpoint(tmp_path):
    from peft import AutoPeftModelForCausalLM

    base = load_model(_section(), seed=4)
    save_checkpoint(base, tmp_path / "sft")
    lm = load_model(_section(lora=LoraSection(r=2)), source=str(tmp_path / "sft"))
    assert lm.is_lora and lm.base_source == str((tmp_path / "sft").resolve())
    _randomize_lora(lm.model, 1)
    ours = _greedy(lm.model, lm.tokenizer)
    save_checkpoint(lm, tmp_path / "rl")
    assert (tmp_path / "rl" / "base" / "model.safetensors").is_file()  # bundled (hard-linked)
    assert _greedy(AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "rl")), lm.tokenizer) == ours


# -- errors -----------------------------------------------------------------------------------


def _one_line_error(fn) -> str:
    with pytest.raises(ModelError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_quantization_errors_on_cpu():
    msg = _one_line_error(lambda: load_model(_section(quantization="4bit", lora=LoraSection())))
    assert msg == (
        "model.quantization=4bit: 4-bit bases need a CUDA GPU with bitsandbytes and this machine has no CUDA device; "
        "--set model.quantization=none trains the LoRA adapter on the full-precision base instead"
    )
    msg = _one_line_error(lambda: load_model(_section(quantization="8bit", lora=LoraSection())))
    assert msg.startswith("model.quantization=8bit: 8-bit bases need a CUDA GPU") and "model.quantization=none" in msg
    msg = _one_line_error(lambda: load_model(_section(quantization="4bit", lora=LoraSection(), device="cpu")))
    assert "model.device=cpu" in msg and "--set model.quantization=none" in msg
    msg = _one_line_error(lambda: load_model(_section(quantization="4bit")))
    assert "needs LoRA" in msg


def test_source_errors_are_one_line(tmp_path):
    assert "unknown scratch preset 'huge'" in _one_line_error(lambda: load_model(_section(name="scratch:huge")))
    assert "not found" in _one_line_error(lambda: load_model(_section(name=str(tmp_path / "missing"))))
    assert "not found" in _one_line_error(lambda: load_model(_section(name="./no/such/dir")))
    (tmp_path / "empty").mkdir()
    assert "not a model checkpoint" in _one_line_error(lambda: load_model(_section(name=str(tmp_path / "empty"))))
    (tmp_path / "file.txt").write_text("x")
    assert "is a file" in _one_line_error(lambda: load_model(_section(name=str(tmp_path / "file.txt"))))
    assert "not a valid hub id" in _one_line_error(lambda: load_model(_section(name="bad name!")))


def test_offline_hub_id_is_a_quick_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _one_line_error(lambda: load_model(_section(name="spiral-test-org/definitely-missing-model")))
    assert "could not be found" in msg and "offline" in msg


def test_hub_id_loads_from_local_cache(tmp_path):
    """A hub id that is in the HF cache loads with no network (HF_HUB_OFFLINE=1), in a fresh
    process so that huggingface_hub reads HF_HUB_CACHE from the environment."""
    lm = load_model(_section(), seed=9)
    snap = tmp_path / "hub" / "models--spiral-test--nano" / "snapshots" / ("a" * 40)
    save_checkpoint(lm, snap)
    (tmp_path / "hub" / "models--spiral-test--nano" / "refs").mkdir()
    (tmp_path / "hub" / "models--spiral-test--nano" / "refs" / "main").write_text("a" * 40)
    expected = _greedy(lm.model, lm.tokenizer)
    code = textwrap.dedent(
        f"""
        import json, torch
        from spiral_cli.models import load_model
        from spiral_cli.recipe import ModelSection
        lm = load_model(ModelSection(name="spiral-test/nano", autocast="off"), for_training=False)
        enc = lm.tokenizer({PROMPTS!r}, return_tensors="pt", padding=True)
        out = lm.model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=lm.tokenizer.pad_token_id)
        print(json.dumps(out[:, enc.input_ids.shape[1]:].tolist()))
        """
    )
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected


def test_loaded_model_dataclass_fields():
    lm = load_model(_section())
    assert isinstance(lm, LoadedModel)
    assert lm.source == "scratch:nano" and lm.device == torch.device("cpu")
    assert lm.eos_token_ids == [256]
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token_id == 257


def test_lora_training_step_with_gradient_checkpointing():
    lm = load_model(_section(lora=LoraSection(r=4, target_modules=["q_proj", "v_proj"]), gradient_checkpointing=True))
    ids = torch.randint(0, 256, (2, 16))
    with lm.autocast_ctx():
        loss = lm.model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in lm.model.named_parameters() if p.requires_grad}
    assert grads and all(n.count("lora_") for n in grads)
    assert all(g is not None for g in grads.values())
    assert not any("k_proj.lora" in n for n in grads)


def test_bad_lora_target_is_one_line_error():
    msg = _one_line_error(lambda: load_model(_section(lora=LoraSection(target_modules=["no_such_proj"]))))
    assert msg.startswith("model.lora:")
