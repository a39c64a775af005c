"""A candidate's step path for `agg_view: steps`: the search steps its trace kept on the way to its
answer, the aggregator's check of them (each step re-done in the search's own line format), and
the answer expression the path builds.

Why: the aggregator's verdicts on expressions were near chance (docs/results.md): a 4M byte-level
model does not re-parse an expression it did not write. Re-doing "a op b=r (rest)" one step at a
time is the arithmetic it practises in every search trace.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .expressions import _evaluate
from .solver import _combine

# "25*3=75 (7 12 75)": one search step and the numbers left after it (as the solver writes it);
# 12 digits and 40 numbers at most, so hostile text cannot make huge integers; a line whose
# parentheses hold anything but numbers ("(3-3 7)", sampled by a model) is not a step line
_STEP = re.compile(r"\s*(\d{1,12})\s*([-+*/])\s*(\d{1,12})\s*=\s*(-?\d{1,12})\s*"
                   r"(?:\((\s*(?:-?\d{1,12}(?: +-?\d{1,12}){0,39})?\s*)\))?\s*")
_ANSWER = re.compile(r"\s*(answer:|<answer>|</think>)")
MAX_STEPS = 16  # a longer kept path is not a countdown solution of <= 8 numbers; view and check stop


@dataclass(frozen=True)
class Step:
    a: int
    op: str
    b: int
    result: int  # as the trace claims it
    rest: tuple[int, ...] | None  # the numbers the trace says are left, if it wrote them

    def text(self) -> str:
        tail = "" if self.rest is None else " (" + " ".join(map(str, self.rest)) + ")"
        return f"{self.a}{self.op}{self.b}={self.result}{tail}"


def step_path(trace: str) -> list[Step]:
    """The steps `trace` kept on the way to its last answer: each step line is pushed, each "back"
    pops the last, anything else is skipped; an answer line (or `</think>`) closes the steps read
    since the one before. The last non-empty closed path is the trace's: a search trace's steps,
    or in a resolved selection (`resolve_aggregation`) the steps of the candidate it named."""
    path: list[Step] = []
    kept: list[Step] = []
    for line in trace.split("\n"):
        if _ANSWER.match(line):
            if path:
                kept, path = path, []
            continue
        if line.strip() == "back":
            if path:
                path.pop()
            continue
        step = parse_step(line)
        if step is not None:
            path.append(step)
    return kept[:MAX_STEPS]


def parse_step(line: str) -> Step | None:
    """One search step line ("25*3=75 (7 12 75)"), or None for any other line."""
    m = _STEP.fullmatch(line)
    if m is None:
        return None
    rest = None if m[5] is None else tuple(int(x) for x in m[5].split())
    return Step(int(m[1]), m[2], int(m[3]), int(m[4]), rest)


def _apply(a: int, op: str, b: int) -> int | None:
    """a op b by the verifier's own arithmetic, or None for a division that is not exact (or by zero)."""
    try:
        return int(_evaluate((op, a, b), []))
    except ArithmeticError:
        return None


def check_path(steps: list[Step], numbers: list[int], target: int, rule: str = "at_most_once") -> tuple[bool, str]:
    """Re-do `steps` from the problem's numbers. Returns (correct, the check line): each step
    written again as the search writes it, with the value and the numbers left as they really are,
    e.g. "25*3=75 (7 12 75) 75-12=63 (7 63) 63+7=70 (70) ok". It stops with "no" right after the
    first step whose claimed value is wrong, with "uses x no" at an operand that is not left and
    with "a/b=? no" at an inexact division, and ends "no" when the last value is not the target
    ("unused x no" when `rule` is exactly_once and numbers are left). A path it accepts builds an
    expression that verifies (`path_expression`); it is stricter than the verifier only about a
    wrong claim that no later step uses."""
    if not steps:
        return False, "none"
    left = list(numbers)
    out: list[str] = []
    for s in steps:
        for x in (s.a, s.b):
            if x not in left:
                out.append(f"uses {x} no")
                return False, " ".join(out)
            left.remove(x)
        value = _apply(s.a, s.op, s.b)
        if value is None:
            out.append(f"{s.a}{s.op}{s.b}=? no")
            return False, " ".join(out)
        left.append(value)
        out.append(f"{s.a}{s.op}{s.b}={value} (" + " ".join(map(str, left)) + ")")
        if value != s.result:  # checked where it is claimed: the local check a small model can do
            out.append("no")
            return False, " ".join(out)
    if left[-1] != target:
        out.append("no")
        return False, " ".join(out)
    if rule == "exactly_once" and len(left) > 1:
        unused = left[:-1]
        out.append("unused " + " ".join(map(str, sorted(unused))) + " no")
        return False, " ".join(out)
    out.append("ok")
    return True, " ".join(out)


def path_expression(steps: list[Step]) -> str | None:
    """The answer expression the path builds (None for an empty path). Steps link by value, as
    `check_path` re-does them: an operand is the expression of an earlier step whose real value it
    is (one not used yet), else the number itself; a claimed value is never used. It needs no
    problem: a wrong operand or number stays in it for the verifier to find."""
    if not steps:
        return None
    made: list[tuple[int | None, str, int]] = []  # (real value, expression, precedence) not used yet

    def take(x: int) -> tuple[str, int]:
        for i, (v, e, p) in enumerate(made):
            if v == x:
                del made[i]
                return e, p
        return str(x), 3

    expr = ""
    for s in steps:
        ea, pa = take(s.a)
        eb, pb = take(s.b)
        expr, prec = _combine(ea, pa, s.op, eb, pb)
        made.append((_apply(s.a, s.op, s.b), expr, prec))
    return expr
