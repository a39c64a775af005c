"""`CountdownTask`: the task protocol (tasks/base.py) for countdown, assembled from the parts of
this package (problems, formats, SFT data) and scored with `check_answer`."""
from __future__ import annotations

from typing import Any, ClassVar

from .._answers import extract_answer_text
from ..base import TaskConfig
from .config import CountdownConfig
from .expressions import MAX_ANSWER_CHARS, _split_claim, check_answer, parse_expression
from .formats import CountdownFormats
from .problems import CountdownProblems
from .sft_data import CountdownSftData


class CountdownTask(CountdownProblems, CountdownFormats, CountdownSftData):
    """Countdown arithmetic puzzles: reach the target with + - * / over the given numbers."""

    name: ClassVar[str] = "countdown"
    description: ClassVar[str] = "reach a target with + - * / over given numbers (procedural, exact verifier)"
    Config: ClassVar[type[TaskConfig]] = CountdownConfig

    def __init__(self, config: CountdownConfig | None = None) -> None:
        self.config: CountdownConfig = config if config is not None else CountdownConfig()

    # ---------------------------------------------------------------- scoring
    def extract_answer(self, text: str) -> str | None:
        ans = extract_answer_text(text)
        if ans is None or len(ans) > MAX_ANSWER_CHARS:
            return None
        return ans

    def check(self, problem: dict[str, Any], answer: str | None) -> tuple[bool, str]:
        return check_answer(answer, list(problem["numbers"]), int(problem["target"]), self.config.number_rule)

    def is_correct(self, problem: dict[str, Any], text: str) -> bool:
        return self.check(problem, self.extract_answer(text))[0]

    def reward(self, problem: dict[str, Any], text: str) -> float:
        """binary: 1.0 / 0.0. tinyzero: 1.0 correct, 0.1 when the final answer parses as an
        arithmetic expression but is wrong (value, numbers or division), 0.0 with no usable answer."""
        ans = self.extract_answer(text)
        if self.check(problem, ans)[0]:
            return 1.0
        if self.config.scoring == "tinyzero" and ans is not None:
            try:
                parse_expression(_split_claim(ans)[0])
                return 0.1
            except ValueError:
                return 0.0
        return 0.0
