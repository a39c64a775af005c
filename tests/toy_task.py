"""A toy task for RL tests: reward 1 when a completion's first byte is even, else 0.

An untrained byte-level model gets about half right, so every batch carries signal, and a policy
can learn the rule in a few dozen steps -- which makes "reward goes up" a real, fast test.
"""
from __future__ import annotations

from typing import Any, ClassVar

from spiral_cli.tasks.base import TaskConfig


class ToyConfig(TaskConfig):
    pass


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
        b = text.encode("utf-8")[:1]
        return bool(b) and b[0] % 2 == 0

    def reward(self, problem: dict[str, Any], text: str) -> float:
        return float(self.is_correct(problem, text))

    def stop_strings(self) -> list[str]:
        return []
