"""Chat templates (recipe: model.chat_template). With a tokenizer that has one, search and
aggregation prompts become token ids through `apply_chat_template` in the one place prompts are
encoded (models.encode_prompts), so sft's examples, the sampled rollouts, the RL loss's
teacher-forced pass, infer and sweep all see the same ids; scratch models keep the compact format.
"""
from __future__ import annotations

import pytest
from fakes import EchoTask
from hf_fixtures import ARCHS, hub_model
from toy_task import ToyTask

SYSTEM = "You are a careful solver. Answer briefly."


def _prompts() -> list[str]:
    toy, echo = ToyTask(), EchoTask()
    p = ToyTask().problems("eval", 1)[0]
    return [toy.search_prompt(p), toy.aggregate_prompt(p, ["2 ok\n", "3 no\n"]),
            echo.search_prompt({"id": 7}), echo.aggregate_prompt({"id": 7}, ["answer: 12\n", "x\n\nanswer: 13"]), ""]


def _load(arch_or_name, tmp_path_factory, **chat):
    from spiral_cli.models import load_model
    from spiral_cli.recipe import ModelSection

    name = arch_or_name if arch_or_name.startswith("scratch:") else str(hub_model(tmp_path_factory, arch_or_name))
    return load_model(ModelSection(name=name, autocast="off", chat_template=chat), for_training=False)


def _template_ids(tok, prompt: str, system: str | None = None, **kwargs) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("arch", ARCHS)
def test_search_and_aggregation_prompts_are_the_templates_output(tmp_path_factory, arch):
    from spiral_cli.models import encode_prompts

    prompts = _prompts()
    tok = _load(arch, tmp_path_factory).tokenizer
    assert encode_prompts(tok, prompts) == [_template_ids(tok, p) for p in prompts]
    text = tok.decode(encode_prompts(tok, [prompts[1]])[0])
    assert text.endswith(f"<|im_start|>user\n{prompts[1]}<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|begin_of_text|><|im_start|>") == (arch == "llama")  # one BOS, the template's
    # a system prompt and template kwargs (Qwen3's enable_thinking) reach the template
    tok = _load(arch, tmp_path_factory, system_prompt=SYSTEM, kwargs={"enable_thinking": False}).tokenizer
    ids = encode_prompts(tok, prompts)
    assert ids == [_template_ids(tok, p, SYSTEM, enable_thinking=False) for p in prompts]
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert f"<|im_start|>system\n{SYSTEM}<|im_end|>" in tok.decode(ids[0])
    # off: the raw text, as before
    tok = _load(arch, tmp_path_factory, use="off").tokenizer
    assert encode_prompts(tok, prompts[:4]) == tok(prompts[:4])["input_ids"]


def test_scratch_models_keep_the_compact_format(tmp_path_factory):
    from spiral_cli.models import ModelError, chat_format, encode_prompts

    tok = _load("scratch:nano", tmp_path_factory).tokenizer
    assert chat_format(tok) is None
    assert encode_prompts(tok, ["3 7 -> 10\n"]) == [list(b"3 7 -> 10\n")]
    with pytest.raises(ModelError, match="has no chat template"):
        _load("scratch:nano", tmp_path_factory, use="on")


def test_a_template_that_fails_is_a_one_line_error_at_load(tmp_path_factory):
    import shutil

    from transformers import AutoTokenizer

    from spiral_cli.models import ModelError

    src = hub_model(tmp_path_factory, "qwen3")
    bad = tmp_path_factory.mktemp("bad-template") / "qwen3"
    shutil.copytree(src, bad)
    tok = AutoTokenizer.from_pretrained(bad)
    tok.chat_template = "{{ raise_exception('this template wants tools') }}"
    tok.save_pretrained(bad)
    from spiral_cli.models import load_model
    from spiral_cli.recipe import ModelSection

    with pytest.raises(ModelError) as e:
        load_model(ModelSection(name=str(bad), autocast="off"), for_training=False)
    assert "this template wants tools" in str(e.value) and "chat_template.use=off" in str(e.value)
    assert "\n" not in str(e.value)
    load_model(ModelSection(name=str(bad), autocast="off", chat_template={"use": "off"}), for_training=False)


def test_recipe_refuses_apply_chat_template_arguments_as_kwargs():
    from spiral_cli.recipe import Recipe

    with pytest.raises(Exception, match="add_generation_prompt cannot be set here"):
        Recipe.model_validate({"model": {"chat_template": {"kwargs": {"add_generation_prompt": False}}}})
    r = Recipe.model_validate({"model": {"chat_template": {"system_prompt": "x", "kwargs": {"enable_thinking": False}}}})
    assert r.model.chat_template.kwargs == {"enable_thinking": False}


def test_sft_rollouts_and_the_loss_encode_alike(tmp_path_factory):
    """sft's examples, the HF sampler's prompt count and the RL loss's batch all start with the
    template's ids for the same prompt."""
    import torch

    from spiral_cli.generation.hf import HFGenerator
    from spiral_cli.rl.logprobs import build_batch
    from spiral_cli.rl.rollout import Sample
    from spiral_cli.sft import tokenize_examples

    lm = _load("qwen3", tmp_path_factory, system_prompt=SYSTEM)
    prompt = _prompts()[1]
    want = _template_ids(lm.tokenizer, prompt, SYSTEM)
    (ex,), dropped = tokenize_examples([{"prompt": prompt, "completion": "2 ok"}], lm.tokenizer, 512)
    assert dropped == 0 and ex.input_ids[: len(want)] == want and ex.input_ids[len(want):-1] == lm.tokenizer("2 ok")["input_ids"]
    (c,), = HFGenerator(lm).generate([prompt], max_new_tokens=3, temperature=0)
    assert c.prompt_tokens == len(want)
    sample = Sample(prompt=prompt, completion_ids=c.token_ids, sampling_logprobs=c.logprobs, advantage=0.0, reward=0.0,
                    role="search")
    batch = build_batch([sample], lm.tokenizer, torch.device("cpu"), {})
    assert batch.input_ids[0, : len(want)].tolist() == want
