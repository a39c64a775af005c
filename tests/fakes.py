"""Test doubles and reference computations shared by several test modules."""
from __future__ import annotations

from spiral_cli.generation.base import Completion


def completion(text: str, prompt: str) -> Completion:
    """A finished completion whose token count is its length in characters (as bytes would be)."""
    return Completion(text=text, token_ids=list(range(len(text))), logprobs=[0.0] * len(text),
                      prompt_tokens=len(prompt), finish_reason="stop")


class EchoTask:
    """answer: X on the last 'answer:' line; right when X == problem['target']."""

    name = "echo"

    def __init__(self, problems: list[dict] | None = None):
        self._problems = problems or []

    def problems(self, split, n, seed=0):
        assert split == "eval"
        return [dict(p) for p in self._problems[:n]]

    def search_prompt(self, p):
        return f"S {p['id']}\n"

    def aggregate_prompt(self, p, traces):
        return f"A {p['id']}\n" + "".join(f"#answer: {self.extract_answer(t)}\n" for t in traces)

    def extract_answer(self, text):
        lines = [l for l in text.splitlines() if l.startswith("answer:")]
        return lines[-1][len("answer:"):].strip() if lines else None

    def is_correct(self, p, text):
        return self.extract_answer(text) == p["target"]

    def reward(self, p, text):
        return float(self.is_correct(p, text))

    def stop_strings(self):
        return []


def teacher_forced_logprobs(lm, prompt: str, token_ids: list[int], temperature: float) -> list[float]:
    """Reference logprobs of `token_ids` after `prompt`: one forward pass of the transformers
    model, log_softmax(logits / T) (T = 1 for greedy), the prompt encoded as generators do."""
    import torch

    from spiral_cli.models import encode_prompts

    p = encode_prompts(lm.tokenizer, [prompt])[0]
    ids = torch.tensor([p + token_ids])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0].float()
    t = temperature if temperature > 0 else 1.0
    lp = torch.log_softmax(logits / t, dim=-1)
    pos = torch.arange(len(p) - 1, len(p) - 1 + len(token_ids))
    return lp[pos, torch.tensor(token_ids)].tolist()
