"""Benchmark task: countdown prompts, reward 1 when a completion's first byte is even.

The reward has signal for an untrained model (about a quarter of completions earn it), so neither
trainer can skip the update, and it costs the same in spiral and in TRL (see trl_grpo.py).
"""
from __future__ import annotations

from typing import Any, ClassVar

from spiral_cli.tasks.countdown import CountdownTask


def first_byte_even(text: str) -> float:
    b = text.encode("utf-8")[:1]
    return float(bool(b) and b[0] % 2 == 0)


class BenchTask(CountdownTask):
    name: ClassVar[str] = "bench"

    def reward(self, problem: dict[str, Any], text: str) -> float:
        return first_byte_even(text)

    def is_correct(self, problem: dict[str, Any], text: str) -> bool:
        return first_byte_even(text) == 1.0
