"""Training speed paths: the matmul attention used with gradients on the CPU, the fused AdamW,
and the compiled training forward with its fallback. Each must give the numbers of the plain path."""
from __future__ import annotations

import pytest
import torch
from rich.console import Console

from spiral_cli.models import _matmul_attention, load_model
from spiral_cli.optim import adamw, compile_for_training, full_determinism, resolve_full_determinism
from spiral_cli.recipe import ModelSection


def _qkv(b=2, h=4, hkv=2, lq=7, lk=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g),
            torch.randn(b, hkv, lk, d, generator=g))


def _sdpa(q, k, v, **kw):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw).transpose(1, 2)


def test_matmul_attention_equals_sdpa_causal_with_grouped_heads():
    q, k, v = _qkv()
    for t in (q, k, v):
        t.requires_grad_(True)
    ours = _matmul_attention(q, k, v, None, None, causal=True)
    grads_ours = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref = _sdpa(q, k, v, is_causal=True)
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert ours.shape == (2, 7, 4, 8)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_matmul_attention_equals_sdpa_with_a_padding_mask_and_a_kv_cache_offset():
    # 3 new query positions over 5 keys (2 cached); row 0 has 1 left pad, as in RL's scoring batches
    q, k, v = _qkv(lq=3, lk=5)
    keep = torch.ones(2, 1, 3, 5, dtype=torch.bool).tril(2)
    keep[0, :, :, 0] = False
    ours = _matmul_attention(q, k, v, keep, 0.3, causal=False)
    ref = _sdpa(q, k, v, attn_mask=keep, scale=0.3)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # an additive float mask (0 = attend) means the same
    additive = torch.zeros(2, 1, 3, 5).masked_fill(~keep, torch.finfo(torch.float32).min)
    torch.testing.assert_close(_matmul_attention(q, k, v, additive, 0.3, causal=False), ref, atol=1e-5, rtol=1e-5)


def test_scale_folded_into_the_queries_changes_no_bit_at_a_power_of_two_scale():
    """The scale multiplies the queries before the product (a tensor L / d times smaller than the
    scores: one pass over the scores fewer forward and backward); at a power-of-two scale (head_dim 64 or 16:
    1/8, 1/4) that is exact, so the head_dim-64 scratch presets train on the same numbers as the
    scores-scaled form: forward and every gradient, bit for bit."""
    def scores_scaled(q, k, v, scale):  # the form before the fold
        b, h, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        qg = q.reshape(b, hkv, h // hkv * lq, d)
        s = torch.matmul(qg, k.transpose(-1, -2)) * scale
        keep = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq).repeat(h // hkv, 1)
        p = torch.softmax(s.masked_fill(~keep, torch.finfo(s.dtype).min), dim=-1)
        return torch.matmul(p, v).view(b, h, lq, d).transpose(1, 2).contiguous()

    q, k, v = _qkv(d=16)
    for t in (q, k, v):
        t.requires_grad_(True)
    ours = _matmul_attention(q, k, v, None, 0.25, causal=True)
    ref = scores_scaled(q, k, v, 0.25)
    assert torch.equal(ours, ref)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    # any other scale: the same up to float32 rounding
    torch.testing.assert_close(_matmul_attention(q, k, v, None, 0.3, causal=True), scores_scaled(q, k, v, 0.3),
                               atol=1e-6, rtol=1e-5)


def test_a_fully_masked_row_stays_finite():
    q, k, v = _qkv(b=1)
    keep = torch.zeros(1, 1, 7, 7, dtype=torch.bool)
    assert torch.isfinite(_matmul_attention(q, k, v, keep, None, causal=False)).all()


def test_model_logits_are_the_same_with_and_without_gradients():
    """The training forward (matmul attention) and the no-grad forward (SDPA) of the same scratch
    model agree on every real position, with left padding."""
    loaded = load_model(ModelSection(name="scratch:nano", autocast="off"), source="scratch:nano", seed=0)
    model = loaded.model
    ids = torch.tensor([[0, 0, 51, 52, 53, 54], [61, 62, 63, 64, 65, 66]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    with torch.enable_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=1e-4)


def test_training_uses_the_matmul_attention_only_for_short_sequences(monkeypatch):
    from spiral_cli.models import cpu_attention

    loaded = load_model(ModelSection(name="scratch:nano", autocast="off"), source="scratch:nano", seed=0)
    calls = []
    real = cpu_attention._matmul_attention
    monkeypatch.setattr(cpu_attention, "_matmul_attention", lambda *a, **kw: calls.append(a[1].shape[2]) or real(*a, **kw))
    layers = loaded.model.config.num_hidden_layers
    for length in (8, cpu_attention.MATMUL_ATTENTION_MAX_LEN, cpu_attention.MATMUL_ATTENTION_MAX_LEN + 1):
        ids = torch.full((1, length), 60)
        with torch.no_grad():
            loaded.model(input_ids=ids)  # sampling and scoring: always SDPA
        loaded.model(input_ids=ids)
    assert calls == [8] * layers + [cpu_attention.MATMUL_ATTENTION_MAX_LEN] * layers


def test_adamw_is_fused_on_cpu_and_steps_like_the_for_each_version():
    torch.manual_seed(0)
    w0 = torch.randn(5, 3)
    grads = [torch.randn(5, 3) for _ in range(3)]
    finals = []
    for make in (lambda p: adamw([p], lr=0.1, betas=(0.9, 0.95), weight_decay=0.01),
                 lambda p: torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.95), weight_decay=0.01, foreach=True)):
        p = torch.nn.Parameter(w0.clone())
        opt = make(p)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        finals.append(p.detach())
    assert adamw([torch.nn.Parameter(w0.clone())], lr=0.1, betas=(0.9, 0.95), weight_decay=0.0).defaults["fused"]
    torch.testing.assert_close(finals[0], finals[1])
    assert not torch.equal(finals[0], w0)


def _nano_batch(loaded):
    ids = torch.tensor([[51, 52, 53, 54, 55], [61, 62, 63, 64, 65]])
    return {"input_ids": ids, "labels": ids.clone()}


def test_compile_failure_falls_back_to_the_plain_model(monkeypatch):
    loaded = load_model(ModelSection(name="scratch:nano", autocast="off"), source="scratch:nano", for_training=True, seed=0)

    def broken(model, **kw):
        def run(**inputs):
            raise RuntimeError("InductorError: no C compiler found\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    console = Console(record=True, width=200)
    forward = compile_for_training(loaded, console, lambda f: f(**_nano_batch(loaded)).loss)
    assert forward is loaded.model
    out = console.export_text()
    assert "torch.compile failed (RuntimeError: InductorError: no C compiler found); training uncompiled" in out
    assert all(p.grad is None for p in loaded.model.parameters())


@pytest.mark.slow
def test_compiled_forward_gives_the_plain_loss_and_gradients():
    loaded = load_model(ModelSection(name="scratch:nano", autocast="off"), source="scratch:nano", for_training=True, seed=0)
    model = loaded.model
    batch = _nano_batch(loaded)
    forward = compile_for_training(loaded, Console(quiet=True), lambda f: f(**batch).loss)
    assert forward is not model
    assert all(p.grad is None for p in model.parameters())  # the warm-up's gradients are discarded
    wider = {k: torch.cat([v, v[:, :3]], dim=1) for k, v in batch.items()}  # another width: no failure
    losses, grads = [], []
    for fn in (forward, model):
        loss = fn(**wider).loss
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_full_determinism_is_scoped_and_auto_means_the_cpu():
    assert resolve_full_determinism("auto", "cpu") and not resolve_full_determinism("auto", "cuda")
    assert resolve_full_determinism(True, "cuda") and not resolve_full_determinism(False, "cpu")
    assert not torch.are_deterministic_algorithms_enabled()
    with full_determinism(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()  # restored: nothing leaks into the rest
    with full_determinism(False):
        assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError), full_determinism(True):
        raise RuntimeError("a failed run")
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.slow
def test_compiled_step_under_full_determinism_repeats_bit_for_bit():
    """The embedding's gradient is a scatter-add over the batch's token ids: compiled without the
    mode it runs as parallel atomic adds, whose order varies; with it, the same batch gives the
    same gradient every time, and the same as the uncompiled model up to rounding."""
    loaded = load_model(ModelSection(name="scratch:nano", autocast="off"), source="scratch:nano", for_training=True, seed=0)
    model = loaded.model
    ids = torch.tensor([[51, 52, 51, 53, 51, 52] * 8] * 8)  # few ids, many times: the adds collide
    batch = {"input_ids": ids, "labels": ids.clone()}
    embedding = model.get_input_embeddings().weight
    with full_determinism(True):
        forward = compile_for_training(loaded, Console(quiet=True), lambda f: f(**batch).loss)
        assert forward is not model
        grads = []
        for _ in range(8):  # without the mode, 2 of 7 repeats differed here (4.8e-7)
            forward(**batch).loss.backward()
            grads.append(embedding.grad.clone())
            model.zero_grad(set_to_none=True)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    model(**batch).loss.backward()
    torch.testing.assert_close(grads[0], embedding.grad, atol=1e-5, rtol=1e-4)


def test_matmul_attention_keeps_float32_scores_under_bf16_autocast():
    """Under bf16 autocast the scores stay float32 (as in flash attention). With attention logits
    around ±20, scores rounded to bf16 (the kernel before) move the output several times more than
    the bf16 value product that remains."""
    q, k, v = _qkv(h=2, hkv=2, lq=64, lk=64, d=16, seed=3)
    q = q * 5.0  # sharp attention, as a copy from a long prompt needs
    ref = _sdpa(q, k, v, is_causal=True)
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _matmul_attention(q, k, v, None, None, causal=True)
        scores = torch.matmul(q, k.transpose(-1, -2)) * 16**-0.5  # bf16, as before
        probs = torch.softmax(scores.masked_fill(~causal, torch.finfo(scores.dtype).min), dim=-1, dtype=torch.float32)
        before = torch.matmul(probs.to(torch.bfloat16), v.to(torch.bfloat16)).transpose(1, 2)
    assert ours.dtype == torch.bfloat16 and scores.dtype == torch.bfloat16
    err, err_before = (ours.float() - ref).abs().max().item(), (before.float() - ref).abs().max().item()
    assert err < 0.03, err
    assert err_before > 2 * err, (err_before, err)
