"""HFGenerator: exactness against transformers' generate and a teacher-forced forward pass,
sampling structure, seeding, stop strings / EOS / length, prompt accounting."""
from __future__ import annotations

import pytest
import torch
from fakes import teacher_forced_logprobs

from spiral_cli.generation import Completion, Generator, HFGenerator, cut_at_stop, make_generator
from spiral_cli.generation.hf import _sample
from spiral_cli.models import encode_prompts, load_model
from spiral_cli.recipe import GenerationSection, LoraSection, ModelSection

PROMPTS = ["3 7 12 -> ", "hi", "a much longer prompt, with spaces and symbols: (1+2)*3 = 9\n", ""]
TRAINED_TEXT = "Q: 12 + 30 = 42\n"


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelSection(name="scratch:nano", autocast="off"), for_training=False, seed=1)


@pytest.fixture(scope="module")
def trained():
    """scratch:nano overfitted on one line + EOS, so greedy decoding is predictable."""
    lm = load_model(ModelSection(name="scratch:nano", autocast="off"), for_training=True, seed=0)
    tok = lm.tokenizer
    ids = torch.tensor([tok(TRAINED_TEXT)["input_ids"] + [tok.eos_token_id]])
    opt = torch.optim.Adam(lm.model.parameters(), lr=3e-3)
    for _ in range(100):
        loss = lm.model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05
    lm.model.eval()
    return lm


def test_protocol_and_factory(loaded):
    gen = make_generator(loaded, GenerationSection(batch_size=8))
    assert isinstance(gen, HFGenerator) and isinstance(gen, Generator)
    assert gen.batch_size == 8
    gen.update_weights(loaded.model)
    # fast_decode: auto = the lean engine on the CPU; off (or false) = transformers' forward
    assert make_generator(loaded, GenerationSection()).engine == "lean"
    assert make_generator(loaded, GenerationSection(fast_decode="off")).engine == "transformers"
    assert make_generator(loaded, GenerationSection(fast_decode=False)).engine == "transformers"


@pytest.mark.parametrize("fast_decode", [True, False], ids=["lean", "transformers"])
def test_greedy_matches_transformers_generate_with_mixed_lengths(loaded, fast_decode):
    prompts = PROMPTS[:3]
    gen = HFGenerator(loaded, fast_decode=fast_decode)
    assert gen.engine == ("lean" if fast_decode else "transformers")
    outs = gen.generate(prompts, max_new_tokens=24, temperature=0.0)
    tok, model = loaded.tokenizer, loaded.model
    for prompt, o in zip(prompts, outs):
        enc = tok(prompt, return_tensors="pt")  # alone, unpadded
        ref = model.generate(**enc, do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id)
        ref_ids = ref[0, enc.input_ids.shape[1]:].tolist()
        assert o[0].token_ids == ref_ids[: len(o[0].token_ids)]
        assert len(o[0].token_ids) == 24 or o[0].token_ids[-1] == tok.eos_token_id
    # batched with left padding through transformers too
    enc = tok(prompts, return_tensors="pt", padding=True)
    ref = model.generate(**enc, do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id)
    for i, o in enumerate(outs):
        assert o[0].token_ids == ref[i, enc.input_ids.shape[1]:].tolist()[: len(o[0].token_ids)]


@pytest.mark.parametrize("fast_decode", [True, False], ids=["lean", "transformers"])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9), (0.0, 0, 1.0)])
def test_logprobs_match_teacher_forced_forward(loaded, temperature, top_k, top_p, fast_decode):
    outs = HFGenerator(loaded, batch_size=5, fast_decode=fast_decode).generate(
        PROMPTS, n=3, max_new_tokens=16, temperature=temperature, top_k=top_k, top_p=top_p, seed=3
    )
    for prompt, samples in zip(PROMPTS, outs):
        for c in samples:
            assert len(c.logprobs) == len(c.token_ids) > 0
            ref = teacher_forced_logprobs(loaded, prompt, c.token_ids, temperature)
            assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 1e-4


def test_logprobs_match_with_lora_model():
    lm = load_model(ModelSection(name="scratch:nano", autocast="off", lora=LoraSection(r=4)), seed=2)
    for name, p in lm.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    gen = HFGenerator(lm)
    assert gen.engine == "transformers"  # peft models take the transformers forward
    outs = gen.generate(PROMPTS[:2], n=2, max_new_tokens=12, seed=0)
    assert lm.model.training  # restored after generation
    lm.model.eval()
    for prompt, samples in zip(PROMPTS[:2], outs):
        for c in samples:
            ref = teacher_forced_logprobs(lm, prompt, c.token_ids, 1.0)
            assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 1e-4


def test_n_samples_structure_seed_and_chunking(loaded):
    gen = HFGenerator(loaded, batch_size=64)
    a = gen.generate(PROMPTS[:3], n=4, max_new_tokens=12, seed=7)
    assert len(a) == 3 and all(len(s) == 4 for s in a)
    assert all(isinstance(c, Completion) for s in a for c in s)
    for samples in a:
        assert len({tuple(c.token_ids) for c in samples}) > 1  # samples differ
    b = gen.generate(PROMPTS[:3], n=4, max_new_tokens=12, seed=7)
    assert [[c.token_ids for c in s] for s in a] == [[c.token_ids for c in s] for s in b]
    c = gen.generate(PROMPTS[:3], n=4, max_new_tokens=12, seed=8)
    assert [[x.token_ids for x in s] for s in a] != [[x.token_ids for x in s] for s in c]
    # chunks smaller than n (a prompt's samples split over chunks): greedy is chunking-invariant
    g1 = gen.generate(PROMPTS, n=3, max_new_tokens=10, temperature=0)
    g2 = HFGenerator(loaded, batch_size=2).generate(PROMPTS, n=3, max_new_tokens=10, temperature=0)
    assert [[x.token_ids for x in s] for s in g1] == [[x.token_ids for x in s] for s in g2]
    assert all(len({tuple(x.token_ids) for x in s}) == 1 for s in g1)


def test_prompt_tokens(loaded):
    outs = HFGenerator(loaded).generate(PROMPTS, max_new_tokens=2)
    for prompt, s in zip(PROMPTS, outs):
        expected = len(loaded.tokenizer(prompt)["input_ids"]) or 1  # "" gets one start token
        assert s[0].prompt_tokens == expected
    assert outs[0][0].prompt_tokens == len(b"3 7 12 -> ")
    assert [s[0].prompt_tokens for s in outs] == [len(x) for x in encode_prompts(loaded.tokenizer, PROMPTS)]


def test_eos_finish_includes_eos_token(trained):
    tok = trained.tokenizer
    (c,), = HFGenerator(trained).generate(["Q:"], max_new_tokens=40, temperature=0)
    assert c.text == TRAINED_TEXT[2:]
    assert c.finish_reason == "stop" and c.stop_str is None
    assert c.token_ids[-1] == tok.eos_token_id
    assert c.token_ids[:-1] == tok(TRAINED_TEXT[2:])["input_ids"]
    assert len(c.logprobs) == len(c.token_ids)


def test_stop_string_cuts_text_and_tokens(trained):
    tok = trained.tokenizer
    (c,), = HFGenerator(trained).generate(["Q:"], max_new_tokens=40, temperature=0, stop=["= ", "zzz"])
    assert c.text == " 12 + 30 "
    assert c.finish_reason == "stop" and c.stop_str == "= "
    # the stop string's tokens are kept (the policy must learn to emit it); nothing after them
    assert c.token_ids == tok(" 12 + 30 = ")["input_ids"]
    assert len(c.logprobs) == len(c.token_ids)
    # the earliest of several stop strings wins
    (c2,), = HFGenerator(trained).generate(["Q:"], max_new_tokens=40, temperature=0, stop=["42", "+"])
    assert c2.text == " 12 " and c2.stop_str == "+"


def test_max_new_tokens_gives_length(trained):
    (c,), = HFGenerator(trained).generate(["Q:"], max_new_tokens=5, temperature=0, stop=["\n"])
    assert c.finish_reason == "length" and c.stop_str is None
    assert len(c.token_ids) == 5 and c.text == " 12 +"


def test_mixed_finishes_in_one_batch(trained):
    outs = HFGenerator(trained).generate(["Q:", "Q: 12 + 30 = 4", "Q: 1"], n=2, max_new_tokens=30, temperature=0)
    assert outs[0][0].text == " 12 + 30 = 42\n" and outs[0][0].finish_reason == "stop"
    assert outs[1][1].text == "2\n" and outs[1][1].token_ids[-1] == trained.tokenizer.eos_token_id
    for s in outs:
        for c in s:
            assert len(c.token_ids) == len(c.logprobs) <= 30


def test_sampler_filters_and_unrenormalised_logprobs():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]] * 64)
    tok, lp = _sample(logits, 1.0, 1, 1.0, g)  # top_k=1 -> argmax
    assert (tok == 0).all()
    assert torch.allclose(lp, torch.log_softmax(logits, -1)[:, 0])  # not renormalised to 0
    tok, _ = _sample(logits, 1.0, 0, 0.01, g)  # tiny top_p -> argmax
    assert (tok == 0).all()
    tok, _ = _sample(logits, 1.0, 2, 1.0, g)
    assert set(tok.tolist()) <= {0, 1}
    tok, lp = _sample(logits, 0.5, 0, 1.0, g)
    assert torch.allclose(lp, torch.log_softmax(logits / 0.5, -1).gather(-1, tok[:, None]).squeeze(-1))
    tok, lp = _sample(logits, 0.0, 0, 1.0, g)
    assert (tok == 0).all() and torch.allclose(lp, torch.log_softmax(logits, -1)[:, 0])


def test_argument_checks(loaded):
    gen = HFGenerator(loaded)
    assert gen.generate([], max_new_tokens=4) == []
    with pytest.raises(TypeError):
        gen.generate("a prompt", max_new_tokens=4)  # type: ignore[arg-type]
    for bad in (dict(n=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1)):
        with pytest.raises(ValueError):
            gen.generate(["x"], max_new_tokens=4, **bad)


def test_cut_at_stop():
    assert cut_at_stop("abc</a>def", ["</a>"]) == ("abc", "</a>")
    assert cut_at_stop("abc", ["x"]) == ("abc", None)
    assert cut_at_stop("a;b.c", [".", ";"]) == ("a", ";")
    assert cut_at_stop("abc", None) == ("abc", None)
    assert cut_at_stop("abc", [""]) == ("abc", None)


def test_bf16_autocast_generation_runs():
    lm = load_model(ModelSection(name="scratch:nano", autocast="on"), for_training=False)
    outs = HFGenerator(lm).generate(PROMPTS[:2], n=2, max_new_tokens=8, seed=0)
    lm.autocast = False
    for prompt, s in zip(PROMPTS[:2], outs):
        for c in s:
            ref = teacher_forced_logprobs(lm, prompt, c.token_ids, 1.0)
            assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 0.1  # bf16 vs fp32


def test_bf16_autocast_lean_and_transformers_agree():
    """Under bf16 autocast both engines compute matrix products in bf16: their sampling
    log-probs for the same tokens agree to bf16 rounding, not bit for bit."""
    lm = load_model(ModelSection(name="scratch:nano", autocast="on"), for_training=False, seed=4)
    lean, ref = HFGenerator(lm), HFGenerator(lm, fast_decode=False)
    assert lean.engine == "lean" and lean.lean.compute_dtype == torch.bfloat16
    outs = lean.generate(PROMPTS, n=2, max_new_tokens=12, seed=5)
    # the transformers engine scores the lean engine's tokens through a teacher-forced pass
    with torch.no_grad(), lm.autocast_ctx():
        for prompt, s in zip(PROMPTS, outs):
            for c in s:
                tf = teacher_forced_logprobs(lm, prompt, c.token_ids, 1.0)
                assert max(abs(a - b) for a, b in zip(c.logprobs, tf)) < 0.05
    g_lean = lean.generate(PROMPTS, max_new_tokens=12, temperature=0)
    g_ref = ref.generate(PROMPTS, max_new_tokens=12, temperature=0)
    same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(g_lean, g_ref))
    assert same >= len(PROMPTS) - 1  # an argmax may flip on a bf16 near-tie


def test_lean_engine_samples_from_its_copy_until_update_weights():
    lm = load_model(ModelSection(name="scratch:nano", autocast="off"), for_training=False, seed=6)
    gen = HFGenerator(lm)
    before = gen.generate(PROMPTS[:2], max_new_tokens=10, temperature=0)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    stale = gen.generate(PROMPTS[:2], max_new_tokens=10, temperature=0)
    assert [s[0].token_ids for s in stale] == [s[0].token_ids for s in before]  # its own copy
    gen.update_weights(lm.model)
    fresh = gen.generate(PROMPTS[:2], n=2, max_new_tokens=10, seed=1)
    for prompt, s in zip(PROMPTS[:2], fresh):
        for c in s:
            ref = teacher_forced_logprobs(lm, prompt, c.token_ids, 1.0)
            assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 1e-4


@pytest.mark.parametrize("autocast", ["off", "on"])
def test_lean_float32_cache_decodes_like_sdpa(monkeypatch, autocast):
    """Decoding attention over the float32 KV cache (two matmuls) against the compute-dtype cache
    through SDPA (the path a cache over FP32_CACHE_MAX_BYTES takes): the same greedy tokens, and
    log-probs equal to float32 rounding (bf16 rounding under autocast: SDPA's bf16 kernel rounds
    the attention weights to bf16 before the second product)."""
    from spiral_cli.generation import lean_qwen2

    lm = load_model(ModelSection(name="scratch:nano", autocast=autocast), for_training=False, seed=8)
    gen = HFGenerator(lm, batch_size=5)
    cache = gen.lean.new_cache(4, 32)
    assert cache.dtype == torch.float32 and cache.matmul_attention
    kw = dict(n=2, max_new_tokens=20, seed=2)
    greedy, sampled = gen.generate(PROMPTS, temperature=0, **kw), gen.generate(PROMPTS, **kw)
    monkeypatch.setattr(lean_qwen2, "FP32_CACHE_MAX_BYTES", 0)
    cache = gen.lean.new_cache(4, 32)
    assert cache.dtype == gen.lean.compute_dtype and not cache.matmul_attention
    ref_greedy = gen.generate(PROMPTS, temperature=0, **kw)
    tol = 1e-5 if autocast == "off" else 0.05
    same = 0
    for a, b in zip(greedy, ref_greedy):
        for x, y in zip(a, b):
            same += x.token_ids == y.token_ids
            n = next((i for i, (u, v) in enumerate(zip(x.token_ids, y.token_ids)) if u != v), len(x.token_ids))
            assert n > 0 and max(abs(u - v) for u, v in zip(x.logprobs[:n], y.logprobs[:n])) < tol
    assert same == 2 * len(PROMPTS) if autocast == "off" else same >= 2 * len(PROMPTS) - 2  # bf16 near-ties
    # the sampled tokens' log-probs: the float32-cache engine against a teacher-forced forward
    with torch.no_grad(), lm.autocast_ctx():
        for prompt, s in zip(PROMPTS, sampled):
            for c in s:
                ref = teacher_forced_logprobs(lm, prompt, c.token_ids, 1.0)
                assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < (1e-4 if autocast == "off" else 0.05)


def test_lean_prepacked_weights_sample_as_the_plain_weights(monkeypatch):
    """Under bf16 autocast on a CPU with AMX the lean engine holds its matrix weights pre-packed
    for oneDNN. Its samples score as the transformers forward scores them (to bf16 rounding), and
    the greedy tokens are the plain weights' (a product may differ in its last bf16 bit: another
    accumulation order). A float32 engine, another CPU or a build without the ops keeps plain tensors."""
    from spiral_cli.generation import lean_qwen2

    fp32 = HFGenerator(load_model(ModelSection(name="scratch:nano", autocast="off"), for_training=False, seed=3))
    assert fp32.lean.compute_dtype == torch.float32 and not fp32.lean.lm_head.is_mkldnn
    lm = load_model(ModelSection(name="scratch:nano", autocast="on"), for_training=False, seed=3)
    with torch.no_grad():  # non-zero q/k/v biases, so a bias the packed product dropped would show
        for layer in lm.model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    gen = HFGenerator(lm)
    native = lean_qwen2._prepacked_linear_works()
    if torch.cpu._is_amx_tile_supported():
        assert native  # the check must not switch the packing off where it was measured to pay
    matrices = [w for layer in gen.lean.layers for k, w in layer.items() if k.endswith("_w")] + [gen.lean.lm_head]
    assert all(w.is_mkldnn == native for w in matrices)
    sampled = gen.generate(PROMPTS, n=2, max_new_tokens=16, seed=3)
    greedy = gen.generate(PROMPTS, max_new_tokens=16, temperature=0)
    with torch.no_grad(), lm.autocast_ctx():
        for prompt, s in zip(PROMPTS, sampled):
            for c in s:
                ref = teacher_forced_logprobs(lm, prompt, c.token_ids, 1.0)
                assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 0.05
    monkeypatch.setattr(lean_qwen2, "_prepacked_linear_works", lambda: False)
    gen.update_weights()
    assert not any(w.is_mkldnn for layer in gen.lean.layers for w in layer.values() if w is not None)
    plain = gen.generate(PROMPTS, max_new_tokens=16, temperature=0)
    same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(greedy, plain))
    assert same >= len(PROMPTS) - 1  # an argmax may flip on a bf16 near-tie


@pytest.mark.slow
def test_compiled_decoding_samples_as_the_eager_step(monkeypatch):
    """generation.compile: the lean engine's decoding step compiled. One graph serves every batch
    width of two or more rows (rows leave the batch), cache length and weight update (a single row
    decodes uncompiled); its samples score as the
    transformers forward scores them (to bf16 rounding), repeat under a seed, and its greedy tokens
    are the eager step's (same plain weights; an argmax may flip on a bf16 near-tie)."""
    from torch._dynamo.utils import counters

    from spiral_cli.generation import lean_qwen2

    torch._dynamo.reset()  # the graphs live on the step's code, shared by every engine of the process
    lm = load_model(ModelSection(name="scratch:nano", autocast="on"), for_training=False, seed=3)
    gen = make_generator(lm, GenerationSection(compile=True, batch_size=5))
    assert gen.lean.compile_decode and not gen.lean.lm_head.is_mkldnn  # inductor cannot trace packed weights
    graphs = counters["stats"]["unique_graphs"]
    gen.generate(PROMPTS[:1], max_new_tokens=4, seed=0)  # one row
    gen.generate(["7"], n=3, max_new_tokens=4, seed=0)  # a one-token prefill
    sampled = gen.generate(PROMPTS, n=2, max_new_tokens=16, seed=3)  # chunks of 5 and 3 rows
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert gen.lean._step_compiled and gen.lean._compiled_step is not None
    assert [[c.token_ids for c in s] for s in gen.generate(PROMPTS, n=2, max_new_tokens=16, seed=3)] == \
        [[c.token_ids for c in s] for s in sampled]
    with torch.no_grad(), lm.autocast_ctx():
        for prompt, s in zip(PROMPTS, sampled):
            for c in s:
                ref = teacher_forced_logprobs(lm, prompt, c.token_ids, 1.0)
                assert max(abs(a - b) for a, b in zip(c.logprobs, ref)) < 0.05
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    gen.update_weights()
    greedy = gen.generate(PROMPTS, n=3, max_new_tokens=24, temperature=0)  # new weights, longer cache
    assert counters["stats"]["unique_graphs"] - graphs == 1
    monkeypatch.setattr(lean_qwen2, "_prepacked_linear_works", lambda: False)
    eager = HFGenerator(lm, batch_size=5).generate(PROMPTS, n=3, max_new_tokens=24, temperature=0)
    same = sum(a.token_ids == b.token_ids for x, y in zip(greedy, eager) for a, b in zip(x, y))
    assert same >= 3 * (len(PROMPTS) - 1)
    for x, y in zip(greedy, eager):
        for a, b in zip(x, y):
            n = next((i for i, (u, v) in enumerate(zip(a.token_ids, b.token_ids)) if u != v), len(a.token_ids))
            assert n > 0 and max(abs(u - v) for u, v in zip(a.logprobs[:n], b.logprobs[:n])) < 0.05


@pytest.mark.slow
def test_compiled_decoding_in_float32_samples_the_eager_tokens():
    """Without autocast the compiled step computes in float32: the same samples as the eager step
    under one seed, log-probs equal to float32 rounding."""
    lm = load_model(ModelSection(name="scratch:nano", autocast="off"), for_training=False, seed=3)
    gen = HFGenerator(lm, compile=True)
    compiled = gen.generate(PROMPTS, n=3, max_new_tokens=20, seed=1)
    assert gen.lean._step_compiled and gen.lean._compiled_step is not None
    eager = HFGenerator(lm).generate(PROMPTS, n=3, max_new_tokens=20, seed=1)
    for s, t in zip(compiled, eager):
        for a, b in zip(s, t):
            assert a.token_ids == b.token_ids
            assert max(abs(u - v) for u, v in zip(a.logprobs, b.logprobs)) < 1e-5


def test_compiled_decoding_falls_back_when_the_compile_fails(monkeypatch, capsys):
    """A machine where the decoding step cannot compile (no C++ compiler) decodes uncompiled with
    one warning line: the same samples as an engine that never tried (both hold plain weights)."""
    from spiral_cli.generation import lean_qwen2

    monkeypatch.setattr(lean_qwen2, "_prepacked_linear_works", lambda: False)
    lm = load_model(ModelSection(name="scratch:nano", autocast="on"), for_training=False, seed=3)
    ref = HFGenerator(lm).generate(PROMPTS, n=2, max_new_tokens=12, seed=4)
    gen = HFGenerator(lm, compile=True)

    def broken(*args, **kwargs):
        raise RuntimeError("C++ compile error\nthe compiler's whole log")
    gen.lean._compiled_step = broken
    out = gen.generate(PROMPTS, n=2, max_new_tokens=12, seed=4)
    err = capsys.readouterr().err
    assert err.count("warning: generation.compile: the compiled decoding step failed (RuntimeError: C++ compile "
                     "error); decoding uncompiled") == 1 and "whole log" not in err
    assert gen.lean._compiled_step is None
    assert [[(c.token_ids, c.logprobs) for c in s] for s in out] == [[(c.token_ids, c.logprobs) for c in s] for s in ref]
    # a model the lean engine does not serve: generation.compile says it does not apply
    HFGenerator(lm, fast_decode=False, compile=True)
    assert "generation.compile applies to the lean engine on the CPU" in capsys.readouterr().err


def test_lean_kv_cache_float32_unless_too_large(monkeypatch):
    from spiral_cli.generation import lean_qwen2

    lm = load_model(ModelSection(name="scratch:nano", autocast="on"), for_training=False, seed=0)
    lean = HFGenerator(lm).lean
    assert lean.compute_dtype == torch.bfloat16
    cache = lean.new_cache(3, 10)
    assert cache.dtype == torch.float32 and cache.k[0].dtype == torch.float32
    per_position = 2 * len(lean.layers) * 3 * lean.num_kv_heads * lean.head_dim * 4
    monkeypatch.setattr(lean_qwen2, "FP32_CACHE_MAX_BYTES", per_position * 10)
    assert lean.new_cache(3, 10).dtype == torch.float32 and lean.new_cache(3, 10).matmul_attention
    big = lean.new_cache(3, 11)
    assert big.dtype == torch.bfloat16 and not big.matmul_attention


def test_lean_engine_support_check():
    from spiral_cli.generation.lean_qwen2 import supports

    plain = load_model(ModelSection(name="scratch:nano", autocast="off"), for_training=False)
    assert supports(plain.model)
    lora = load_model(ModelSection(name="scratch:nano", autocast="off", lora=LoraSection(r=4)))
    assert not supports(lora.model)
    plain.model.config.use_sliding_window = True
    assert not supports(plain.model)
