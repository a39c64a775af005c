"""rl/logprobs.selective_logprobs: the per-token log-probs, entropies and temperature log-probs of
the RL loss taken a chunk of rows at a time give the whole-tensor computation's figures and
gradients bit for bit on the CPU, and keep no float32 copy of bf16 logits for the backward pass."""
from __future__ import annotations

import pytest
import torch

from spiral_cli.rl.logprobs import _row_chunks, selective_logprobs, token_logprobs


def whole_tensor(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """token_logprobs as it was before the chunking: float32 [B, P, V] log-softmax, made whole."""
    logits = logits.float()
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    with torch.no_grad():
        entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        at_t = torch.stack([torch.log_softmax(row / temperature, dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
                            for row, t in zip(logits, targets)])
    return logp, entropy, at_t


def case(dtype=torch.float32, b=5, p=7, v=263, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a slice of [B, P+1, V], as the trainer's logits[:, :-1]: not contiguous
    logits = (torch.randn(b, p + 1, v, generator=g) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (b, p), generator=g)
    weights = torch.randn(b, p, generator=g)
    return logits, targets, weights


@pytest.mark.parametrize("chunk_elements", [0, 1, 263 * 3, 263 * 7 * 2, 263 * 7 * 5 + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_give_the_whole_tensor_figures_and_gradient_exactly(chunk_elements, dtype):
    # chunk sizes: the default (one chunk here), one position, three positions (runs that cross
    # no sequence), two whole sequences, all of them
    logits, targets, w = case(dtype)
    ref = whole_tensor(logits[:, :-1], targets, 0.7)
    (ref[0] * w).sum().backward()
    ref_grad, logits.grad = logits.grad, None

    out = selective_logprobs(logits[:, :-1], targets, with_entropy=True, temperature=0.7,
                             chunk_elements=chunk_elements)
    (out.logp * w).sum().backward()
    assert out.logp.dtype == out.entropy.dtype == out.logp_sampling.dtype == torch.float32
    assert torch.equal(out.logp, ref[0])
    assert torch.equal(out.entropy, ref[1])
    assert torch.equal(out.logp_sampling, ref[2])
    assert logits.grad.dtype == dtype and torch.equal(logits.grad, ref_grad)
    assert not out.entropy.requires_grad and not out.logp_sampling.requires_grad


def test_temperature_one_or_zero_is_the_trained_logprob_and_none_skips_the_extras():
    logits, targets, _ = case()
    for t in (0, 1):
        out = selective_logprobs(logits[:, :-1], targets, temperature=t, chunk_elements=263)
        assert out.entropy is None and torch.equal(out.logp_sampling, out.logp.detach())
    out = selective_logprobs(logits[:, :-1], targets)
    assert out.entropy is None and out.logp_sampling is None


def test_chunks_cover_every_position_once():
    for shape, elements in [((5, 7, 263), 1), ((5, 7, 263), 263 * 3), ((5, 7, 263), 263 * 7 * 2),
                            ((5, 7, 263), 10**9), ((3, 0, 11), 5), ((1, 4, 10), 39)]:
        seen = torch.zeros(shape[:2], dtype=torch.long)
        for rows in _row_chunks(torch.Size(shape), elements):
            seen[rows] += 1
            assert seen[rows].numel() * shape[2] <= max(elements, shape[2])
        assert bool((seen == 1).all())


def test_backward_keeps_no_float32_copy_of_bf16_logits():
    """What autograd saves for the backward pass: the bf16 logits and [B, P] figures, never a
    float32 tensor the size of the logits (the plain expression saves the float32 copy)."""
    logits, targets, w = case(torch.bfloat16, b=4, p=16, v=512)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    def float32_copies():
        return [t for t in saved if t.dtype == torch.float32 and t.numel() >= logits[:, :-1].numel()]

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = selective_logprobs(logits[:, :-1], targets, chunk_elements=512 * 3)
    assert float32_copies() == []
    (out.logp * w).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        whole_tensor(logits[:, :-1], targets, 1.0)
    assert len(float32_copies()) >= 1  # the check above would see one


def test_token_logprobs_trains_the_model_as_before():
    """Through a model: the same log-probs and the same parameter gradients as the whole-tensor
    computation of the model's own logits."""
    from spiral_cli.models import load_model
    from spiral_cli.recipe import ModelSection
    from spiral_cli.rl.logprobs import build_batch
    from spiral_cli.rl.rollout import Sample

    loaded = load_model(ModelSection(name="scratch:nano", autocast="off", max_seq_len=64), seed=0)
    samples = [Sample("q1:", [40, 41, 42], [], 1.0, 1.0, "search", 4),
               Sample("q22:", [43, 44], [], -0.5, 0.0, "aggregate", 4)]
    batch = build_batch(samples, loaded.tokenizer, loaded.device, {})
    params = [p for p in loaded.model.parameters() if p.requires_grad]

    def grads(logp):
        loss = -(logp * batch.completion_mask).sum()
        return torch.autograd.grad(loss, params)

    out = token_logprobs(loaded.model, batch, with_entropy=True, temperature=0.7)
    logits = loaded.model(input_ids=batch.input_ids).logits[:, :-1]
    ref = whole_tensor(logits, batch.input_ids[:, 1:], 0.7)
    assert torch.equal(out.logp, ref[0]) and torch.equal(out.entropy, ref[1])
    assert torch.equal(out.logp_sampling, ref[2])
    new, old = grads(out.logp), grads(ref[0])
    assert any(g.abs().sum() > 0 for g in new)
    assert all(torch.equal(a, b) for a, b in zip(new, old))


def _shared_prefix_case():
    from spiral_cli.models import load_model
    from spiral_cli.recipe import ModelSection
    from spiral_cli.rl.rollout import Sample

    loaded = load_model(ModelSection(name="scratch:nano", autocast="off", max_seq_len=64), seed=0)
    # three prompts of different lengths (two repeated), completions of different lengths,
    # one of them empty: rows of one prompt are not next to each other
    samples = [Sample("q1:", [40, 41, 42], [], 1.0, 1.0, "search", 4),
               Sample("a longer q2:", [43, 44], [], -0.5, 0.0, "search", 4),
               Sample("q1:", [45], [], 0.5, 1.0, "search", 4),
               Sample("q3 :", [46, 47, 48, 49, 50], [], 2.0, 1.0, "aggregate", 6),
               Sample("a longer q2:", [], [], -1.0, 0.0, "search", 4),
               Sample("q1:", [51, 52, 53, 54], [], -0.25, 0.0, "search", 4)]
    return loaded, samples


def test_shared_prefix_batch_lays_out_each_prompt_once():
    from spiral_cli.rl.logprobs import build_batch

    loaded, samples = _shared_prefix_case()
    cache: dict[str, list[int]] = {}
    batch = build_batch(samples, loaded.tokenizer, loaded.device, cache, shared_prefix=True)
    prompts = [cache[p] for p in ("q1:", "a longer q2:", "q3 :")]
    block = batch.prompts
    assert block.of_row.tolist() == [0, 1, 0, 2, 1, 0]
    assert block.lengths.tolist() == [len(p) for p in prompts]
    for u, p in enumerate(prompts):
        assert block.ids[u, : len(p)].tolist() == p
    assert batch.input_ids.shape == (6, 5)  # the completions alone, right-padded to the longest
    assert batch.completion_mask.sum(1).tolist() == [3, 2, 1, 5, 0, 4]
    assert batch.targets[3].tolist() == [46, 47, 48, 49, 50] and batch.targets[0, :3].tolist() == [40, 41, 42]
    plain = build_batch(samples, loaded.tokenizer, loaded.device, {})
    width = max(len(cache[s.prompt]) + len(s.completion_ids) for s in samples)  # 12 + 2: prompt + completion
    assert plain.prompts is None and plain.completion_mask.shape == (6, width - 1)
    # the completions' positions continue their prompts'; padding keeps its row's last position, so
    # none passes the one-row layout's longest (rope scaled by it, learned positions: the same)
    seen = {}
    real_forward = loaded.model.forward
    loaded.model.forward = lambda **kw: (seen.setdefault(len(seen), kw.get("position_ids")), real_forward(**kw))[1]
    try:
        token_logprobs(loaded.model, batch)
    finally:
        loaded.model.forward = real_forward
    positions = seen[1]
    p0, p1 = len(prompts[0]), len(prompts[1])
    assert positions[0].tolist() == [p0, p0 + 1, p0 + 2, p0 + 2, p0 + 2]  # "q1:" + 3 tokens, then padding
    assert positions[4].tolist() == [p1] * 5  # an empty completion
    assert int(positions.max()) == plain.input_ids.shape[1] - 1
    # the targets under the two masks are the same tokens, row by row
    for b in range(6):
        assert batch.targets[b][batch.completion_mask[b]].tolist() == plain.targets[b][plain.completion_mask[b]].tolist()


def test_shared_prefix_gives_the_one_pass_logprobs_and_gradients():
    """Each prompt forward once, its keys/values shared by its rows: per completion token the
    one-pass layout's log-prob, entropy and temperature log-prob, and the same parameter
    gradients (float32, to rounding)."""
    from spiral_cli.rl.logprobs import build_batch

    loaded, samples = _shared_prefix_case()
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    weights = torch.tensor([0.3, -1.0, 2.0, 0.7, 1.5, -0.4])
    out = {}
    for shared in (False, True):
        batch = build_batch(samples, loaded.tokenizer, loaded.device, {}, shared_prefix=shared)
        tl = token_logprobs(loaded.model, batch, with_entropy=True, temperature=0.7)
        m = batch.completion_mask
        loss = -(tl.logp * m * weights[:, None]).sum()
        grads = torch.autograd.grad(loss, params)
        out[shared] = ([x[m] for x in tl], grads)
    for a, b in zip(out[False][0], out[True][0]):
        assert a.numel() == 15
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in out[True][1])
    for a, b in zip(out[False][1], out[True][1]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_shared_prefix_gradients_repeat_bit_for_bit():
    """The rows that share a prompt add their shares of its keys'/values' gradient in a fixed
    order (index_select's backward). Through indexing, whose backward adds in parallel, repeated
    gradients of this batch differed by ~1e-6, and a resumed run was not the straight one."""
    from spiral_cli.models import load_model
    from spiral_cli.recipe import ModelSection
    from spiral_cli.rl.logprobs import build_batch
    from spiral_cli.rl.rollout import Sample

    loaded = load_model(ModelSection(name="scratch:nano", autocast="off", max_seq_len=128), seed=0)
    g = torch.Generator().manual_seed(0)
    samples = [Sample(f"problem {i % 4}: " + "x y z " * (6 + 3 * (i % 4)), torch.randint(40, 90, (int(n),), generator=g).tolist(),
                      [], 1.0, 1.0, "search", 16) for i, n in enumerate(torch.randint(1, 16, (48,), generator=g))]
    batch = build_batch(samples, loaded.tokenizer, loaded.device, {}, shared_prefix=True)
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    weights = torch.randn(batch.completion_mask.shape, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the parallel adds need two threads to vary
    try:
        runs = [torch.autograd.grad((token_logprobs(loaded.model, batch).logp * weights * batch.completion_mask).sum(),
                                    params) for _ in range(6)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for again in runs[1:] for a, b in zip(runs[0], again))


@pytest.mark.slow
def test_compiled_warm_up_covers_every_shared_prefix_layout():
    """train_set.compile with shared prefixes: the first update compiles the one-row layout and
    the shared one over several prompts and over one (a size-1 dimension is a graph of its own),
    so no graph compiles mid-run, and the compiled forward gives the eager log-probs."""
    from rich.console import Console

    from spiral_cli.rl.rollout import Sample
    from spiral_cli.rl.update import _CompiledForward, _warm_up_batches

    loaded, samples = _shared_prefix_case()
    samples.append(Sample("a longer q2:", [55, 56, 57], [], 0.5, 1.0, "search", 4))
    cache: dict[str, list[int]] = {}
    one_row, shared = _warm_up_batches(samples, True, loaded, cache)
    assert one_row.prompts is None and one_row.input_ids.shape[0] == 4
    # two rows of "q1:" and two of "a longer q2:" (another prompt length), then "q1:"'s alone;
    # rows with one completion token or none left out (size-1 dimensions compile apart)
    q1, q2 = len(cache["q1:"]), len(cache["a longer q2:"])
    assert [b.prompts.lengths.tolist() for b in shared] == [[q1, q2], [q1]]
    assert [b.completion_mask.sum(1).tolist() for b in shared] == [[3, 4, 2, 3], [3, 4]]
    batches = [one_row, *shared]
    console = Console(record=True, width=200)
    compiled = _CompiledForward(loaded, console)
    compiled.warm_up(samples, True, {})
    assert compiled(one_row) is not loaded.model and compiled.shared_prefix_ok, console.export_text()
    for batch in batches:
        got = token_logprobs(compiled(batch), batch).logp
        want = token_logprobs(loaded.model, batch).logp
        torch.testing.assert_close(got[batch.completion_mask], want[batch.completion_mask], atol=1e-5, rtol=1e-5)
