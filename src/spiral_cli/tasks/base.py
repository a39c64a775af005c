"""The Task protocol: what the rest of spiral needs to know about a problem domain.

Tasks know nothing of torch and never generate. A problem is a plain JSON-serialisable dict
(it travels through JSONL), always with an "id": a string, or the integer a user's problem came with
(ids come back as they were given). Everything a task needs to score a
completion lives in the problem dict (e.g. countdown: numbers and target; math: the answer).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict


class TaskConfig(BaseModel):
    """Base of every task's own options (the recipe's `task:` section minus `name`)."""

    model_config = ConfigDict(extra="forbid")


class TaskError(ValueError):
    """A user-facing problem with task input (a bad problem dict, a bad data file)."""


@runtime_checkable
class Task(Protocol):
    name: ClassVar[str]
    Config: ClassVar[type[TaskConfig]]

    def __init__(self, config: TaskConfig) -> None: ...

    def problems(self, split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """`n` problems of `split` ("train" or "eval"; the two are disjoint), reproducible by seed."""

    def validate_problem(self, problem: dict[str, Any]) -> dict[str, Any]:
        """Check a user-supplied problem (e.g. a JSONL line); return it normalised or raise TaskError."""

    def search_prompt(self, problem: dict[str, Any]) -> str:
        """The prompt for one search trace (sampled from the problem alone)."""

    def aggregate_prompt(self, problem: dict[str, Any], traces: list[str]) -> str:
        """The prompt for one aggregation trace: the problem plus candidate traces, in the given order."""

    def extract_answer(self, text: str) -> str | None:
        """The final answer a completion commits to, or None when it gives none."""

    def reward(self, problem: dict[str, Any], text: str) -> float:
        """Scalar reward of a completion (search or aggregation trace). Never evaluates text as code."""

    def is_correct(self, problem: dict[str, Any], text: str) -> bool:
        """Whether the completion's final answer is right (reward may also pay for format)."""

    def stop_strings(self) -> list[str]:
        """Strings that end a completion (besides EOS)."""

    # Optional (duck-typed; check with hasattr): supervised warm-start data for tasks that can
    # write their own traces, e.g. countdown's solver.
    #
    # def sft_examples(self, n_search: int, n_aggregate: int, seed: int = 0, set_size: int = 4
    #                  ) -> list[dict[str, str]]:
    #     """[{"prompt", "completion", "kind": "search" | "aggregate"}] from TRAIN problems, built
    #     with the same `search_prompt` / `aggregate_prompt` a model sees at inference."""


def candidate_view(trace: str, agg_view: str, max_chars: int, extract: Callable[[str], str | None]) -> str:
    """How a candidate trace appears inside an aggregation prompt: its final answer ("answer"
    view; "none" when it gives none) or its text, cut to the last `max_chars` ("full" view)."""
    if agg_view == "answer":
        ans = extract(trace)
        return ans if ans is not None else "none"
    text = trace.strip()
    if len(text) > max_chars:
        text = "..." + text[-(max_chars - 3) :]
    return text


def resolve_aggregation(task: Task, traces: list[str], completion: str) -> str:
    """The aggregation completion as it is scored and passed on to the next round: tasks whose
    aggregator may name a candidate instead of writing its answer (`resolve_aggregation`,
    optional) substitute it here; for every other task the completion itself."""
    resolve = getattr(task, "resolve_aggregation", None)
    return resolve(traces, completion) if callable(resolve) else completion
