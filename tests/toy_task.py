"""A toy task for RL tests: reward 1 when a completion's first byte is even, else 0.

An untrained byte-level model gets about half right, so every batch carries signal, and a policy
can learn the rule in a few dozen steps -- which makes "reward goes up" a real, fast test.

`toy_recipe` builds the recipe the RL tests train it with.
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar

import yaml

from spiral_cli.tasks.base import TaskConfig

TOY_RECIPE: dict[str, Any] = {
    "name": "toy",
    "seed": 0,
    "task": {"name": "toy_task:ToyTask"},
    "model": {"name": "scratch:nano", "max_seq_len": 128, "autocast": "off"},
    "generation": {"max_new_tokens": 6, "agg_max_new_tokens": 6, "batch_size": 128},
    "train_set": {
        "steps": 4, "prompts_per_step": 4, "num_search": 8, "num_sets": 4, "set_size": 4,
        "num_aggregations": 2, "lr": 1.0e-3, "eval_every": 100, "eval_problems": 0, "save_every": 2,
        "micro_batch_size": 64,
    },
    "infer": {"parallel": 4, "population": 2, "agg_set_size": 2},
}


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def toy_recipe(**sections: Any) -> str:
    """TOY_RECIPE as YAML text, with each keyword merged into its section (nested dicts merged
    recursively, other values replaced, None removes the key).

    One toy recipe for the RL tests, varied per test by overrides, instead of a copied YAML string
    per file patched by text replacement."""
    return yaml.safe_dump(_merge(TOY_RECIPE, sections), sort_keys=False)


class ToyConfig(TaskConfig):
    # questions every answer to is wrong: their prompts never carry signal, so a test can make
    # dynamic sampling draw again on one rank and not on another
    no_signal: list[int] = []


class ToyTask:
    name: ClassVar[str] = "toy"
    description: ClassVar[str] = "first byte even"
    Config: ClassVar[type[TaskConfig]] = ToyConfig

    def __init__(self, config: ToyConfig | None = None) -> None:
        self.config = config or ToyConfig()

    def problems(self, split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
        offset = 0 if split == "train" else 10_000
        return [{"id": f"{split}-{seed}-{i}", "q": (offset + seed * 7 + i) % 50} for i in range(n)]

    def validate_problem(self, problem: dict[str, Any]) -> dict[str, Any]:
        return problem

    def search_prompt(self, problem: dict[str, Any]) -> str:
        return f"q{problem['q']}:"

    def aggregate_prompt(self, problem: dict[str, Any], traces: list[str]) -> str:
        return f"a{problem['q']}:" + "|".join(t[:4] for t in traces) + ":"

    def extract_answer(self, text: str) -> str | None:
        return text[:1] or None

    def is_correct(self, problem: dict[str, Any], text: str) -> bool:
        if problem["q"] in self.config.no_signal:
            return False
        b = text.encode("utf-8")[:1]
        return bool(b) and b[0] % 2 == 0

    def reward(self, problem: dict[str, Any], text: str) -> float:
        return float(self.is_correct(problem, text))

    def stop_strings(self) -> list[str]:
        return []
