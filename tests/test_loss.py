"""policy_loss on toy policies: gradients, clipping, aggregation, accumulation, KL."""

import math

import pytest
import torch

from spiral_cli.rl.loss import policy_loss


@pytest.fixture(autouse=True)
def float64_default():
    """Exact-ish comparisons in float64, restoring the global default for other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


VOCAB = 5


class ToyPolicy(torch.nn.Module):
    """Tiny linear softmax policy: next-token logits from a one-hot of the previous token."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=gen) * 0.5)

    def token_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """log π(tokens[:, t] | tokens[:, t-1]) for t >= 1 (position 0 is the prompt): [B, T-1]."""
        prev = torch.nn.functional.one_hot(tokens[:, :-1], VOCAB).to(self.weight.dtype)
        logp = torch.log_softmax(prev @ self.weight, dim=-1)
        return logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def _batch(seed: int = 0, batch: int = 6, length: int = 6):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, length), generator=gen)
    lengths = torch.randint(1, length, (batch,), generator=gen)  # unequal valid lengths
    mask = (torch.arange(length - 1)[None, :] < lengths[:, None]).double()
    advantages = torch.randn(batch, generator=gen)
    return tokens, mask, advantages


def _grad(policy, loss):
    policy.zero_grad()
    loss.backward()
    return policy.weight.grad.clone()


# (1) ------------------------------------------------------------------ IS == REINFORCE on-policy


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_is_gradient_equals_reinforce_on_policy(aggregation):
    policy = ToyPolicy()
    tokens, mask, adv = _batch()
    logp = policy.token_logprobs(tokens)
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, loss_type="is", aggregation=aggregation)
    got = _grad(policy, loss)

    # REINFORCE written separately: −A_b ∇log π, averaged the same way.
    logp = policy.token_logprobs(tokens)
    if aggregation == "token_mean":
        reinforce = -(adv[:, None] * logp * mask).sum() / mask.sum()
    else:
        reinforce = (-(adv[:, None] * logp * mask).sum(1) / mask.sum(1)).mean()
    want = _grad(policy, reinforce)
    assert torch.allclose(got, want, atol=1e-12)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["clip_fraction"] == 0.0


def test_ppo_clip_equals_is_on_policy():
    # At ratio 1 nothing is clipped, so both losses give the same gradient.
    policy = ToyPolicy(1)
    tokens, mask, adv = _batch(1)
    grads = []
    for loss_type in ("is", "ppo_clip"):
        logp = policy.token_logprobs(tokens)
        loss, _ = policy_loss(logp, logp.detach(), adv, mask, loss_type=loss_type)
        grads.append(_grad(policy, loss))
    assert torch.allclose(grads[0], grads[1])


# (2) ------------------------------------------------------------------ clipping


def _clip_case(advantage: float, ratios, eps_low=0.2, eps_high=0.28):
    logp_new = torch.log(torch.tensor([ratios])).requires_grad_(True)
    logp_old = torch.zeros_like(logp_new)
    mask = torch.ones_like(logp_new)
    loss, stats = policy_loss(
        logp_new, logp_old, torch.tensor([advantage]), mask,
        loss_type="ppo_clip", epsilon_low=eps_low, epsilon_high=eps_high,
    )
    loss.backward()
    return logp_new.grad[0], loss, stats


def test_clip_positive_advantage():
    # A = +1, band [0.8, 1.28]. d(−ratio·A)/d logp = −ratio·A / n_tokens where unclipped.
    ratios = [0.5, 0.9, 1.25, 1.3, 2.0]
    grad, loss, stats = _clip_case(1.0, ratios)
    n = len(ratios)
    # ratio > 1 + ε_high with A > 0: clipped, zero gradient. ratio < 1 − ε_low: A > 0 wants
    # to raise it, the clip does not apply, gradient flows.
    expected = torch.tensor([-0.5, -0.9, -1.25, 0.0, 0.0]) / n
    assert torch.allclose(grad, expected)
    # Loss: −mean(min(r, clip(r))·A) = −(0.5 + 0.9 + 1.25 + 1.28 + 1.28) / 5
    assert loss.item() == pytest.approx(-(0.5 + 0.9 + 1.25 + 1.28 + 1.28) / 5)
    assert stats["clip_fraction"] == pytest.approx(2 / 5)


def test_clip_negative_advantage():
    # A = −1: ratio < 1 − ε_low is clipped (already pushed down enough); ratio above the band
    # keeps its gradient (the min picks the unclipped, more pessimistic term).
    ratios = [0.5, 0.75, 0.9, 1.25, 2.0]
    grad, loss, stats = _clip_case(-1.0, ratios)
    expected = torch.tensor([0.0, 0.0, 0.9, 1.25, 2.0]) / len(ratios)
    assert torch.allclose(grad, expected)
    assert loss.item() == pytest.approx((0.8 + 0.8 + 0.9 + 1.25 + 2.0) / 5)
    assert stats["clip_fraction"] == pytest.approx(2 / 5)


def test_is_loss_never_clips():
    logp_new = torch.log(torch.tensor([[0.5, 2.0]])).requires_grad_(True)
    loss, stats = policy_loss(logp_new, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), loss_type="is")
    loss.backward()
    assert torch.allclose(logp_new.grad, torch.tensor([[-0.25, -1.0]]))
    assert stats["clip_fraction"] == 0.0
    assert stats["ratio_min"] == pytest.approx(0.5) and stats["ratio_max"] == pytest.approx(2.0)


# (3) ------------------------------------------------------------------ aggregation


def test_token_mean_vs_seq_mean_hand_values():
    # Sequence 0: 3 tokens, ratios 1, 2, 3, A = 1 -> per-token losses −1, −2, −3.
    # Sequence 1: 1 token, ratio 1, A = −2       -> per-token loss  +2 (padding ignored).
    logp_new = torch.log(torch.tensor([[1.0, 2.0, 3.0], [1.0, 7.0, 7.0]]))
    logp_old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    token, _ = policy_loss(logp_new, logp_old, adv, mask, aggregation="token_mean")
    seq, _ = policy_loss(logp_new, logp_old, adv, mask, aggregation="seq_mean")
    # token_mean: (−1 − 2 − 3 + 2) / 4 = −1
    assert token.item() == pytest.approx(-1.0)
    # seq_mean: mean(−6/3, +2/1) = mean(−2, 2) = 0
    assert seq.item() == pytest.approx(0.0)


def test_dr_grpo_hand_values():
    # Same batch as above: token losses −1, −2, −3 (sequence 0) and +2 (sequence 1); their sum
    # −4 is divided by the constant B · max_completion_length, not by the tokens sampled.
    logp_new = torch.log(torch.tensor([[1.0, 2.0, 3.0], [1.0, 7.0, 7.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    loss, _ = policy_loss(logp_new, torch.zeros(2, 3), adv, mask, aggregation="dr_grpo", max_completion_length=5)
    assert loss.item() == pytest.approx(-4 / (2 * 5))
    # The gradient of a token does not depend on how long its sequence is: d loss / d logp = −ratio·A / (B·L)
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(2, 3), adv, mask, aggregation="dr_grpo", max_completion_length=5)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.1, -0.1, -0.1], [0.2, 0.0, 0.0]]))
    # An explicit normalizer (a global one, for micro-batches) replaces B · L.
    loss, _ = policy_loss(logp_new, torch.zeros(2, 3), adv, mask, aggregation="dr_grpo", normalizer=16)
    assert loss.item() == pytest.approx(-4 / 16)


def test_empty_sequences_are_ignored_by_seq_mean():
    logp = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss, stats = policy_loss(logp, logp, torch.tensor([1.0, 5.0]), mask, aggregation="seq_mean")
    assert loss.item() == pytest.approx(-1.0)
    assert stats["num_tokens"] == 2.0


# (4) ------------------------------------------------------------------ micro-batching


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "dr_grpo"])
@pytest.mark.parametrize("loss_type", ["is", "ppo_clip"])
def test_microbatches_with_global_normalizer_match_full_batch(aggregation, loss_type):
    policy = ToyPolicy(2)
    tokens, mask, adv = _batch(2, batch=6)
    with torch.no_grad():  # an older policy, so ratios != 1 and clipping can engage
        logp_old = policy.token_logprobs(tokens) + 0.3 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(5))

    full, _ = policy_loss(policy.token_logprobs(tokens), logp_old, adv, mask, loss_type=loss_type,
                          aggregation=aggregation, max_completion_length=7)
    want = _grad(policy, full)

    normalizer = {"token_mean": mask.sum(), "seq_mean": (mask.sum(1) > 0).sum(), "dr_grpo": 6 * 7}[aggregation]
    policy.zero_grad()
    total = 0.0
    for idx in (slice(0, 2), slice(2, 3), slice(3, 6)):  # unequal micro-batches
        loss, _ = policy_loss(
            policy.token_logprobs(tokens[idx]), logp_old[idx], adv[idx], mask[idx],
            loss_type=loss_type, aggregation=aggregation, normalizer=normalizer,
        )
        loss.backward()  # gradients accumulate in .grad
        total += loss.item()
    assert torch.allclose(policy.weight.grad, want, atol=1e-12)
    assert total == pytest.approx(full.item())


def test_microbatches_without_normalizer_differ_for_token_mean():
    # Sanity check that the previous test is sensitive: local normalisation is not the same.
    policy = ToyPolicy(3)
    tokens, mask, adv = _batch(3, batch=4)
    full, _ = policy_loss(*(lambda lp: (lp, lp.detach()))(policy.token_logprobs(tokens)), adv, mask)
    want = _grad(policy, full)
    policy.zero_grad()
    for idx in (slice(0, 1), slice(1, 4)):
        lp = policy.token_logprobs(tokens[idx])
        loss, _ = policy_loss(lp, lp.detach(), adv[idx], mask[idx])
        (loss / 2).backward()
    assert not torch.allclose(policy.weight.grad, want)


# (5) ------------------------------------------------------------------ KL to reference


def test_kl_zero_when_reference_equals_policy():
    logp = torch.log(torch.tensor([[0.3, 0.6]])).requires_grad_(True)
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 2)
    with_kl, stats = policy_loss(logp, logp.detach(), adv, mask, logp_ref=logp.detach(), beta=0.5)
    without, _ = policy_loss(logp, logp.detach(), adv, mask)
    assert with_kl.item() == pytest.approx(without.item())
    assert stats["kl_ref"] == pytest.approx(0.0)


def test_kl_value_and_gradient_sign():
    # logp_new = ref + 1 on token 0 and ref − 1 on token 1; A = 0 isolates the KL term.
    ref = torch.tensor([[-2.0, -2.0]])
    logp_new = (ref + torch.tensor([[1.0, -1.0]])).requires_grad_(True)
    loss, stats = policy_loss(
        logp_new, logp_new.detach(), torch.tensor([0.0]), torch.ones(1, 2), logp_ref=ref, beta=1.0
    )
    # k3 = exp(d) − d − 1, d = ref − new: d = −1 -> e^−1; d = +1 -> e − 2.
    kl0, kl1 = math.exp(-1), math.e - 2
    assert loss.item() == pytest.approx((kl0 + kl1) / 2)
    assert stats["kl_ref"] == pytest.approx((kl0 + kl1) / 2)
    loss.backward()
    # d k3 / d new = 1 − exp(ref − new): positive when new > ref (descent lowers it toward ref),
    # negative when new < ref (descent raises it).
    assert torch.allclose(logp_new.grad, torch.tensor([[(1 - math.exp(-1)) / 2, (1 - math.e) / 2]]))
    assert logp_new.grad[0, 0] > 0 > logp_new.grad[0, 1]


def test_beta_needs_reference():
    logp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="logp_ref"):
        policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), beta=0.1)


@pytest.mark.parametrize(
    "kwargs",
    [{"loss_type": "dpo"}, {"aggregation": "sum"}, {"beta": -1.0}, {"normalizer": 0}, {"aggregation": "dr_grpo"}],
)
def test_rejects_bad_options(kwargs):
    logp = torch.zeros(1, 2)
    with pytest.raises(ValueError):
        policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), **kwargs)


def test_rejects_bad_shapes():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        policy_loss(logp, logp, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError):
        policy_loss(logp, logp, torch.zeros(2), torch.ones(2, 2))


# (6) ------------------------------------------------------------------ toy training


@pytest.mark.parametrize("loss_type", ["is", "ppo_clip"])
def test_training_with_positive_advantage_raises_token_probability(loss_type):
    logits = torch.nn.Parameter(torch.zeros(VOCAB))
    opt = torch.optim.SGD([logits], lr=0.5)
    target = 2
    tokens = torch.tensor([[target], [0]])  # two single-token sequences
    adv = torch.tensor([1.0, -1.0])  # the target is good, token 0 is bad
    mask = torch.ones(2, 1)
    p_before = torch.softmax(logits, -1)[target].item()
    for _ in range(3):  # a few optimisation epochs on the same rollout
        logp_old = torch.log_softmax(logits, -1).detach()[tokens]
        for _ in range(4):
            logp_new = torch.log_softmax(logits, -1)[tokens]
            loss, _ = policy_loss(logp_new, logp_old, adv, mask, loss_type=loss_type)
            opt.zero_grad()
            loss.backward()
            opt.step()
    probs = torch.softmax(logits, -1)
    assert probs[target].item() > p_before + 0.1
    assert probs[0].item() < 1 / VOCAB
