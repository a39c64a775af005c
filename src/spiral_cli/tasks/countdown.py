"""Countdown: combine some of the given numbers with + - * / to hit a target.

Everything here is plain Python: a seeded generator whose problems are solvable by construction,
a verifier that parses answers with a small hand-written parser (never ``eval``), a depth-first
solver that writes its search (steps and backtracks) as text for supervised warm-start data, and
the aggregation format (a problem plus candidate answers; the target completion checks each
candidate step by step).

Compact format (byte-level friendly, every line ends with "\\n"; real solver output)::

    search prompt       "1 20 6 -> 15\\n"
    search trace        "20+6=26 (1 26)\\n26+1=27 (27)\\nback\\n26-1=25 (25)\\nback\\nback\\n"
                        "20-6=14 (1 14)\\n14-1=13 (13)\\nback\\n14+1=15 (15)\\nanswer: 20-6+1\\n"
                        (a step shows the numbers left after it; "back" undoes the last step;
                        a trace that runs out of budget ends with "fail\\n" and has no answer line)
    aggregation prompt  "agg 1 23 14 -> 8\\n1: 24-14-1\\n2: 23-14\\n3: 23-(14+1)\\n4: 23-14-1\\n--\\n"
    aggregation target  "1: 24-14=10 10-1=9 no\\n2: 23-14=9 no\\n3: 14+1=15 23-15=8 ok\\n"
                        "4: 23-14=9 9-1=8 ok\\nanswer: 23-(14+1)\\n"
                        (no candidate ok -> the check lines are followed by a search of its own)

Verbose format (for instruct models, TinyZero style): a natural-language instruction; the
completion reasons inside <think>...</think> and answers with <answer>expr</answer>.
"""
from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from ._answers import extract_answer_text, vote_key
from .base import TaskConfig, TaskError

MAX_ANSWER_CHARS = 200  # longer answers are rejected before parsing
MAX_TARGET = 1_000_000_000  # the largest target a problem may have (as task.max_target)
_MAX_NUMBER_DIGITS = 12
_OPS = "+-*/"
_SELECT = re.compile(r"#\s*(\d{1,3})")  # "answer: #2": the aggregator names candidate 2
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


# --------------------------------------------------------------------------------------------
# Expressions: tokenizer + recursive-descent parser + exact evaluation
# --------------------------------------------------------------------------------------------
class _ParseError(Exception):
    pass


def _tokenize(s: str) -> list[str]:
    toks: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c in " \t":
            i += 1
        elif c in "+-*/()":
            toks.append(c)
            i += 1
        elif c in "×xX" and toks and toks[-1] not in _OPS + "(":
            toks.append("*")  # tolerate "3 x 4" / "3×4"
            i += 1
        elif c == "÷":
            toks.append("/")
            i += 1
        elif "0" <= c <= "9":
            j = i
            while j < n and "0" <= s[j] <= "9":
                j += 1
            if j - i > _MAX_NUMBER_DIGITS:
                raise _ParseError("number too long")
            toks.append(s[i:j])
            i = j
        else:
            raise _ParseError(f"bad character {c!r}")
    return toks


# AST: int (a number) or tuple (op, left, right)
Node = Any


class _Parser:
    """expr := term (('+'|'-') term)* ; term := atom (('*'|'/') atom)* ; atom := INT | '(' expr ')'"""

    def __init__(self, toks: list[str]) -> None:
        self.toks = toks
        self.i = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        t = self.peek()
        if t is None:
            raise _ParseError("unexpected end")
        self.i += 1
        return t

    def parse(self) -> Node:
        node = self.expr()
        if self.peek() is not None:
            raise _ParseError(f"unexpected {self.peek()!r}")
        return node

    def expr(self) -> Node:
        node = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            node = (op, node, self.term())
        return node

    def term(self) -> Node:
        node = self.atom()
        while self.peek() in ("*", "/"):
            op = self.take()
            node = (op, node, self.atom())
        return node

    def atom(self) -> Node:
        t = self.take()
        if t == "(":
            self.depth += 1
            if self.depth > 50:
                raise _ParseError("too deeply nested")
            node = self.expr()
            if self.take() != ")":
                raise _ParseError("expected )")
            self.depth -= 1
            return node
        if t.isdigit():
            return int(t)
        raise _ParseError(f"unexpected {t!r}")


def parse_expression(s: str) -> Node:
    """Parse an arithmetic expression (ints, + - * /, parentheses) into a tiny AST; raises ValueError."""
    if len(s) > MAX_ANSWER_CHARS:
        raise ValueError("expression too long")
    try:
        return _Parser(_tokenize(s)).parse()
    except _ParseError as e:
        raise ValueError(str(e)) from None


def _leaves(node: Node) -> list[int]:
    if isinstance(node, int):
        return [node]
    return _leaves(node[1]) + _leaves(node[2])


def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _evaluate(node: Node, steps: list[str]) -> Fraction:
    """Exact evaluation; appends "a+b=c" per operation. Raises ArithmeticError on /0 or inexact /."""
    if isinstance(node, int):
        return Fraction(node)
    op, left, right = node
    a = _evaluate(left, steps)
    b = _evaluate(right, steps)
    if op == "+":
        r = a + b
    elif op == "-":
        r = a - b
    elif op == "*":
        r = a * b
    else:
        if b == 0:
            steps.append(f"{_fmt(a)}/{_fmt(b)}=?")
            raise ArithmeticError("division by zero")
        r = a / b
        if r.denominator != 1:
            steps.append(f"{_fmt(a)}/{_fmt(b)}=?")
            raise ArithmeticError("inexact division")
    steps.append(f"{_fmt(a)}{op}{_fmt(b)}={_fmt(r)}")
    return r


def _split_claim(answer: str) -> tuple[str, str | None]:
    """'expr = 24' -> ('expr', '24'); 'expr' -> ('expr', None). More than one '=' is malformed."""
    parts = answer.split("=")
    if len(parts) == 1:
        return answer, None
    if len(parts) == 2:
        return parts[0], parts[1].strip()
    raise ValueError("more than one '='")


def check_answer(
    answer: str | None, numbers: list[int], target: int, rule: str = "at_most_once"
) -> tuple[bool, str]:
    """Verify an answer expression. Returns (correct, a one-line step-by-step check).

    The check line is what an aggregation completion writes for a candidate, e.g.
    "25+12=37 37*3=111 111-7=104 no", "12*3=36 36-7=29 29+25=54 uses 29 no", "ok" at the end when right.
    """
    if answer is None:
        return False, "none"
    if len(answer) > MAX_ANSWER_CHARS:
        return False, "? no"
    try:
        expr, claim = _split_claim(answer)
        node = parse_expression(expr)
    except ValueError:
        return False, "? no"
    steps: list[str] = []
    try:
        value = _evaluate(node, steps)
    except ArithmeticError:
        return False, " ".join(steps + ["no"])
    if not steps:
        steps.append(_fmt(value))
    if claim is not None and claim != str(target):
        return False, " ".join(steps + ["no"])
    if value != target:
        return False, " ".join(steps + ["no"])
    used = Counter(_leaves(node))
    given = Counter(numbers)
    extra = used - given
    if extra:
        bad = " ".join(str(x) for x in sorted(extra.elements()))
        return False, " ".join(steps + [f"uses {bad} no"])
    if rule == "exactly_once":
        missing = given - used
        if missing:
            bad = " ".join(str(x) for x in sorted(missing.elements()))
            return False, " ".join(steps + [f"unused {bad} no"])
    return True, " ".join(steps + ["ok"])


# --------------------------------------------------------------------------------------------
# Expression building (for the generator and the solver)
# --------------------------------------------------------------------------------------------
def _combine(ea: str, pa: int, op: str, eb: str, pb: int) -> tuple[str, int]:
    """Join two expressions with minimal parentheses; returns (expr, precedence). Atoms have 3."""
    p = _PREC[op]
    left = f"({ea})" if pa < p else ea
    right_needs = pb < p or (op in "-/" and pb == p)
    right = f"({eb})" if right_needs else eb
    return f"{left}{op}{right}", p


def _moves(a: int, b: int, rule: str) -> list[tuple[int, str, int, int]]:
    """Valid moves on a pair as (result, op, left, right): positive integer results only."""
    hi, lo = (a, b) if a >= b else (b, a)
    out = [(hi + lo, "+", hi, lo)]
    useless_one = rule != "exactly_once" and lo == 1  # *1, /1 waste a number unless all must be used
    if not useless_one:
        out.append((hi * lo, "*", hi, lo))
    if hi > lo:
        out.append((hi - lo, "-", hi, lo))
    if lo > 0 and hi % lo == 0 and not useless_one:
        out.append((hi // lo, "/", hi, lo))
    return out


def stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big")


# --------------------------------------------------------------------------------------------
# Solver
# --------------------------------------------------------------------------------------------
def _search(
    numbers: list[int],
    target: int,
    rng: random.Random,
    max_nodes: int,
    order: str,
    moves_per_node: int,
    rule: str,
) -> tuple[list[str], str | None, tuple[int, str]]:
    """DFS. Returns (trace lines without answer/fail, answer expr or None, closest (value, expr))."""
    lines: list[str] = []
    state: list[tuple[int, str, int]] = [(x, str(x), 3) for x in numbers]
    closest = min(((abs(v - target), v, e) for v, e, _ in state))
    best = [closest]
    budget = [max_nodes]

    def solved(st: list[tuple[int, str, int]]) -> str | None:
        if rule == "exactly_once":
            return st[0][1] if len(st) == 1 and st[0][0] == target else None
        for v, e, _ in st:
            if v == target:
                return e
        return None

    def dfs(st: list[tuple[int, str, int]]) -> str | None:
        if len(st) < 2:
            return None
        cands = []
        seen = set()
        for i in range(len(st)):
            for j in range(i + 1, len(st)):
                ia, ib = (i, j) if st[i][0] >= st[j][0] else (j, i)  # larger value on the left
                for r, op, _x, _y in _moves(st[ia][0], st[ib][0], rule):
                    rest = tuple(sorted([st[k][0] for k in range(len(st)) if k not in (i, j)] + [r]))
                    key = (rest, r)
                    if key in seen:
                        continue
                    seen.add(key)
                    cands.append((r, op, ia, ib))
        if order == "random":
            rng.shuffle(cands)
        else:  # closest first; a +-40% jitter on the distance reorders near-ties between samples
            cands.sort(key=lambda c: abs(c[0] - target) * (0.6 + 0.8 * rng.random()))
        for r, op, ia, ib in cands[:moves_per_node]:
            if budget[0] <= 0:
                return None
            budget[0] -= 1
            expr, prec = _combine(st[ia][1], st[ia][2], op, st[ib][1], st[ib][2])
            new = [st[k] for k in range(len(st)) if k not in (ia, ib)] + [(r, expr, prec)]
            lines.append(f"{st[ia][0]}{op}{st[ib][0]}={r} ({' '.join(str(v) for v, _, _ in new)})")
            d = abs(r - target)
            if (d, r, expr) < best[0]:
                best[0] = (d, r, expr)
            ans = solved(new)
            if ans is not None:
                return ans
            ans = dfs(new)
            if ans is not None:
                return ans
            lines.append("back")
        return None

    ans = solved(state)
    if ans is None:
        ans = dfs(state)
    return lines, ans, (best[0][1], best[0][2])


def solve(
    problem: dict[str, Any],
    rng: random.Random,
    max_nodes: int = 8,
    order: str = "closest",
    moves_per_node: int = 3,
    number_rule: str = "at_most_once",
) -> tuple[str, bool]:
    """A compact search trace for `problem` and whether it found the target.

    Each tried step is a line "a op b=r (remaining numbers)", each undo a line "back"; the trace
    ends with "answer: expr" on success or "fail" when the node budget or the (capped) tree runs out.
    """
    lines, ans, _ = _search(
        list(problem["numbers"]), int(problem["target"]), rng, max_nodes, order, moves_per_node, number_rule
    )
    lines.append(f"answer: {ans}" if ans is not None else "fail")
    return "".join(line + "\n" for line in lines), ans is not None


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------
class CountdownConfig(TaskConfig):
    """Countdown's options. The defaults are those of the default recipe (recipes/countdown.yaml,
    `task:`), so `spiral tasks sample countdown` draws the problems that recipe trains and
    evaluates on: 3-4 numbers in 1..25, targets up to 100, each number used at most once."""

    min_numbers: int = Field(3, ge=2, le=8)
    max_numbers: int = Field(4, ge=2, le=8)
    min_value: int = Field(1, ge=1, le=1_000_000)
    max_value: int = Field(25, ge=1, le=1_000_000)
    max_target: int = Field(100, ge=1, le=MAX_TARGET)
    number_rule: Literal["at_most_once", "exactly_once"] = "at_most_once"
    prompt_format: Literal["compact", "verbose"] = "compact"
    scoring: Literal["binary", "tinyzero"] = "binary"
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    solver_order: Literal["closest", "random"] = "closest"
    solver_max_nodes: int = Field(8, ge=1, le=100_000)
    solver_moves_per_node: int = Field(3, ge=1, le=100)
    # node budgets of the SFT search traces, one drawn per trace: longer searches succeed more
    # often, so a model trained on a mix learns that spending more tokens pays (the T knob)
    sft_max_nodes: list[int] = Field(default_factory=lambda: [2, 4, 8, 16], min_length=1)
    # what the aggregator sees of each candidate: its answer line ("answer"), its trace ("full"),
    # or the distinct answers with their vote counts, most votes first ("grouped": the vote's
    # information, one line per distinct answer)
    agg_view: Literal["answer", "full", "grouped"] = "answer"
    # the aggregation target: "all" checks every candidate, then answers with the first that
    # verified; "until_ok" stops at the first that verifies and answers at once, so the answer
    # line follows the check of the candidate it copies (a small model miscopies across lines)
    agg_checks: Literal["all", "until_ok"] = "all"
    # how the aggregator gives a verified candidate's answer: "write" copies it out (the paper's
    # form); "select" names it ("answer: #2") and `resolve_aggregation` substitutes that
    # candidate's answer, so the answer is exactly the candidate the check accepted
    agg_answer: Literal["write", "select"] = "write"
    agg_max_chars: int = Field(400, ge=20)

    @model_validator(mode="after")
    def _ranges(self) -> CountdownConfig:
        if self.agg_answer == "select" and self.agg_view == "full":
            raise ValueError("agg_answer: select needs agg_view answer or grouped (a full trace has no answer line to name)")
        if self.min_numbers > self.max_numbers:
            raise ValueError("min_numbers must be <= max_numbers")
        if self.min_value > self.max_value:
            raise ValueError("min_value must be <= max_value")
        return self


_VERBOSE_RULE = {
    "at_most_once": "each number can be used at most once",
    "exactly_once": "each number must be used exactly once",
}


class CountdownTask:
    """Countdown arithmetic puzzles: reach the target with + - * / over the given numbers."""

    name: ClassVar[str] = "countdown"
    description: ClassVar[str] = "reach a target with + - * / over given numbers (procedural, exact verifier)"
    Config: ClassVar[type[TaskConfig]] = CountdownConfig

    def __init__(self, config: CountdownConfig | None = None) -> None:
        self.config: CountdownConfig = config if config is not None else CountdownConfig()

    # ---------------------------------------------------------------- problems
    def split_of(self, numbers: list[int], target: int) -> str:
        key = " ".join(str(x) for x in sorted(numbers)) + f" -> {target}"
        return "eval" if stable_hash(key) % 1_000_000 < self.config.eval_fraction * 1_000_000 else "train"

    def _random_problem(self, rng: random.Random) -> tuple[list[int], int, str] | None:
        c = self.config
        k = rng.randint(c.min_numbers, c.max_numbers)
        numbers = [rng.randint(c.min_value, c.max_value) for _ in range(k)]
        r = k if c.number_rule == "exactly_once" else rng.randint(2, k)
        idx = rng.sample(range(k), r)
        items = [(numbers[i], str(numbers[i]), 3) for i in idx]
        limit = c.max_target * max(c.max_value, 2)
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            a, b = items[i], items[j]
            moves = [m for m in _moves(a[0], b[0], c.number_rule) if m[0] <= limit]
            if not moves:
                return None
            val, op, x, _y = rng.choice(moves)
            first, second = (a, b) if a[0] == x else (b, a)
            expr, prec = _combine(first[1], first[2], op, second[1], second[2])
            items = [items[t] for t in range(len(items)) if t not in (i, j)] + [(val, expr, prec)]
        target, solution = items[0][0], items[0][1]
        if not (1 <= target <= c.max_target) or target in numbers:
            return None
        return numbers, target, solution

    def problems(self, split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
        return list(self.iter_problems(split, n, seed))

    def iter_problems(self, split: str, n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
        """The problems of `problems(split, n, seed)`, in the same order, each as soon as it is
        made (so `spiral tasks sample -n 100000 | head` prints at once)."""
        if split not in ("train", "eval"):
            raise TaskError(f"split must be 'train' or 'eval', got {split!r}")
        rng = random.Random(f"countdown/{split}/{seed}")
        made_count = 0
        seen: set[str] = set()
        attempts, max_attempts = 0, 200 * n + 10_000
        while made_count < n:
            attempts += 1
            if attempts > max_attempts:
                raise TaskError(
                    f"could only make {made_count} distinct {split} problems of the {n} asked for; "
                    "widen task.max_value / task.max_numbers / task.max_target"
                )
            made = self._random_problem(rng)
            if made is None:
                continue
            numbers, target, solution = made
            key = " ".join(str(x) for x in sorted(numbers)) + f" -> {target}"
            if key in seen or self.split_of(numbers, target) != split:
                continue
            seen.add(key)
            made_count += 1
            yield {"id": f"cd-{stable_hash(key):016x}", "numbers": numbers, "target": target, "solution": solution}

    def validate_problem(self, problem: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(problem, dict):
            raise TaskError("problem: expected a JSON object")
        nums = problem.get("numbers")
        if not isinstance(nums, list) or not (2 <= len(nums) <= 8):
            raise TaskError("numbers: expected a list of 2 to 8 integers")
        for x in nums:
            if isinstance(x, bool) or not isinstance(x, int) or not (1 <= x <= 1_000_000):
                raise TaskError(f"numbers: {x!r} is not an integer in 1..1000000")
        target = problem.get("target")
        if isinstance(target, bool) or not isinstance(target, int):
            raise TaskError(f"target: expected an integer, got {target!r:.40}")
        if not (1 <= target <= MAX_TARGET):
            raise TaskError(f"target: {target!r:.40} is not an integer in 1..{MAX_TARGET}")
        out = dict(problem)
        key = " ".join(str(x) for x in sorted(nums)) + f" -> {target}"
        pid = problem.get("id")
        if pid is None:
            out["id"] = f"cd-{stable_hash(key):016x}"
        elif not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise TaskError("id: expected a string or an integer")
        # else: the id comes back as given (an integer stays an integer)
        sol = problem.get("solution")
        if sol is not None and not isinstance(sol, str):
            raise TaskError("solution: expected a string")
        return out

    def parse_problem_text(self, text: str) -> dict[str, Any]:
        """A problem typed by hand, as in the compact prompt: "3 7 25 -> 46"."""
        left, sep, right = text.partition("->")
        try:
            if not sep:
                raise ValueError
            numbers = [int(x) for x in left.replace(",", " ").split()]
            target = int(right.strip())
        except ValueError:
            raise TaskError(f"cannot read {text[:60]!r} as a countdown problem: write it as '3 7 25 -> 46'") from None
        return self.validate_problem({"numbers": numbers, "target": target})

    # ---------------------------------------------------------------- prompts
    def _header(self, problem: dict[str, Any]) -> str:
        return " ".join(str(x) for x in problem["numbers"]) + f" -> {problem['target']}"

    def _verbose_problem(self, problem: dict[str, Any]) -> str:
        nums = ", ".join(str(x) for x in problem["numbers"])
        return (
            f"Using the numbers [{nums}], create an equation that equals {problem['target']}. "
            f"You can use basic arithmetic operations (+, -, *, /) and "
            f"{_VERBOSE_RULE[self.config.number_rule]}; every division must come out even."
        )

    def search_prompt(self, problem: dict[str, Any]) -> str:
        if self.config.prompt_format == "compact":
            return self._header(problem) + "\n"
        return (
            self._verbose_problem(problem)
            + " Show your work in <think> </think> tags. And return the final answer in <answer> </answer> "
            "tags, for example <answer> (1 + 2) / 3 </answer>.\n"
        )

    def _candidate_view(self, trace: str) -> str:
        if self.config.agg_view == "answer":
            ans = self.extract_answer(trace)
            return ans if ans is not None else "none"
        text = trace.strip("\n")
        if len(text) > self.config.agg_max_chars:
            text = "..." + text[-(self.config.agg_max_chars - 3) :]
        return text

    def _answer_groups(self, traces: list[str]) -> tuple[list[tuple[str, int]], int]:
        """The distinct answers of `traces` with their counts, most votes first (ties in order of
        first appearance; grouped as the majority vote groups them, by `vote_key`), and how many gave none."""
        groups: dict[str, list] = {}
        none = 0
        for t in traces:
            ans = self.extract_answer(t)
            if ans is None:
                none += 1
                continue
            key = vote_key(ans)
            if key in groups:
                groups[key][1] += 1
            else:
                groups[key] = [ans, 1]
        ordered = sorted(groups.values(), key=lambda g: -g[1])  # stable sort keeps first appearance
        return [(a, n) for a, n in ordered], none

    def candidate_answers(self, traces: list[str]) -> list[str | None]:
        """The answers the aggregator numbers 1, 2, ... in its prompt (None: a candidate without
        one): one per candidate, or one per distinct answer in the grouped view."""
        if self.config.agg_view == "grouped":
            return [a for a, _ in self._answer_groups(traces)[0]]
        return [self.extract_answer(t) for t in traces]

    def aggregate_prompt(self, problem: dict[str, Any], traces: list[str]) -> str:
        c = self.config
        if c.agg_view == "grouped":
            groups, none = self._answer_groups(traces)
            if c.prompt_format == "compact":
                out = ["agg " + self._header(problem)]
                out += [f"{i}: {n}x {a}" for i, (a, n) in enumerate(groups, 1)]
                if none:
                    out.append(f"none: {none}x")
                out.append("--")
                return "\n".join(out) + "\n"
            parts = [self._verbose_problem(problem),
                     f"Here are the distinct answers of {len(traces)} candidate solutions, most common first:"]
            parts += [f"Answer {i} (given by {n} of {len(traces)}): {a}" for i, (a, n) in enumerate(groups, 1)]
            if none:
                parts.append(f"{none} of {len(traces)} candidates gave no answer.")
            parts.append(self._verbose_instruction())
            return "\n\n".join(parts)
        views = [self._candidate_view(t) for t in traces]
        if c.prompt_format == "compact":
            out = ["agg " + self._header(problem)]
            for i, v in enumerate(views, 1):
                if c.agg_view == "answer":
                    out.append(f"{i}: {v}")
                else:
                    out.append(f"[{i}]")
                    out.append(v)
            out.append("--")
            return "\n".join(out) + "\n"
        parts = [self._verbose_problem(problem), f"Here are {len(views)} candidate solutions:"]
        for i, v in enumerate(views, 1):
            parts.append(f"Candidate {i}:\n{v}")
        parts.append(self._verbose_instruction())
        return "\n\n".join(parts)

    def _verbose_instruction(self) -> str:
        give = ("name it by its number, e.g. <answer>#2</answer>" if self.config.agg_answer == "select"
                else "give it in <answer> </answer> tags")
        return (
            "Check each candidate's answer step by step: its arithmetic and that it only uses the given "
            f"numbers. Then, for a correct one, {give}; if no candidate is correct, solve the problem "
            "yourself and give your answer in <answer> </answer> tags. Show your work in <think> </think> tags.\n"
        )

    def resolve_aggregation(self, traces: list[str], completion: str) -> str:
        """With `agg_answer: select`, an aggregation that names candidate i ("answer: #2") gets that
        candidate's answer appended as its final answer; anything else is returned unchanged (a
        number with no answer behind it stays an unscorable answer)."""
        if self.config.agg_answer != "select":
            return completion
        m = _SELECT.fullmatch(self.extract_answer(completion) or "")
        if m is None:
            return completion
        answers = self.candidate_answers(traces)
        i = int(m.group(1))
        if not 1 <= i <= len(answers) or answers[i - 1] is None:
            return completion
        tail = f"answer: {answers[i - 1]}\n" if self.config.prompt_format == "compact" else f"<answer>{answers[i - 1]}</answer>"
        return completion.rstrip("\n") + "\n" + tail

    def stop_strings(self) -> list[str]:
        return [] if self.config.prompt_format == "compact" else ["</answer>"]

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

    # ---------------------------------------------------------------- solver + SFT data
    def solve(
        self,
        problem: dict[str, Any],
        rng: random.Random,
        max_nodes: int | None = None,
        order: str | None = None,
        moves_per_node: int | None = None,
    ) -> tuple[str, bool]:
        """A search-trace completion in this task's prompt format, and whether it succeeded."""
        c = self.config
        lines, ans, _ = _search(
            list(problem["numbers"]),
            int(problem["target"]),
            rng,
            c.solver_max_nodes if max_nodes is None else max_nodes,
            order or c.solver_order,
            c.solver_moves_per_node if moves_per_node is None else moves_per_node,
            c.number_rule,
        )
        return self._finish(lines, ans), ans is not None

    def _finish(self, lines: list[str], ans: str | None) -> str:
        if self.config.prompt_format == "compact":
            lines = lines + [f"answer: {ans}" if ans is not None else "fail"]
            return "".join(line + "\n" for line in lines)
        body = "".join(line + "\n" for line in lines) + ("" if ans is not None else "fail\n")
        tail = f"<answer>{ans}</answer>" if ans is not None else ""
        return f"<think>\n{body}</think>\n{tail}"

    def _corrupt(self, problem: dict[str, Any], expr: str, rng: random.Random) -> str | None:
        """A plausible wrong claim: `expr` with one number or one operator changed."""
        toks = _tokenize(expr)
        for _ in range(20):
            t = list(toks)
            num_pos = [i for i, x in enumerate(t) if x.isdigit()]
            op_pos = [i for i, x in enumerate(t) if x in _OPS]
            if op_pos and rng.random() < 0.4:
                i = rng.choice(op_pos)
                t[i] = rng.choice([o for o in _OPS if o != t[i]])
            else:
                i = rng.choice(num_pos)
                v = int(t[i])
                choices = [v + d for d in (-2, -1, 1, 2) if v + d > 0] + list(problem["numbers"])
                t[i] = str(rng.choice([x for x in choices if x != v]))
            cand = "".join(t)
            ok, _ = self.check(problem, cand)
            if not ok:
                try:
                    _evaluate(parse_expression(cand), [])
                except (ArithmeticError, ValueError):
                    continue  # keep claims that at least evaluate: those are the plausible ones
                return cand
        return None

    def _candidate(self, problem: dict[str, Any], rng: random.Random) -> str:
        c = self.config
        kind = rng.random()
        budget = rng.randint(1, 2 * c.solver_max_nodes)
        lines, ans, (_cv, cexpr) = _search(
            list(problem["numbers"]), int(problem["target"]), rng, budget,
            c.solver_order, c.solver_moves_per_node, c.number_rule,
        )
        if kind < 0.4:  # an honest solver trace (succeeds or fails)
            return self._finish(lines, ans)
        if kind < 0.7:  # a corrupted version of a correct expression
            src = ans or problem.get("solution")
            if src:
                bad = self._corrupt(problem, src, rng)
                if bad is not None:
                    return self._finish(lines, bad)
        # a failed search that claims its closest expression anyway
        if ans is not None or cexpr is None or self.check(problem, cexpr)[0]:
            return self._finish(lines, ans)
        return self._finish(lines, cexpr)

    def aggregate_completion(self, problem: dict[str, Any], traces: list[str], rng: random.Random) -> str:
        """The target aggregation completion: check the candidates in the order the prompt numbers
        them (distinct answers in the grouped view), answer from the first that verifies (checking
        the rest first unless `agg_checks` is until_ok), by writing it or, with `agg_answer:
        select`, naming it; if none does, search (a solver trace) and end with its answer or fail."""
        checks = []
        chosen = None
        for i, ans in enumerate(self.candidate_answers(traces), 1):
            ok, line = self.check(problem, ans)
            checks.append(f"{i}: {line}")
            if ok and chosen is None:
                chosen = f"#{i}" if self.config.agg_answer == "select" else ans
                if self.config.agg_checks == "until_ok":
                    break
        if chosen is not None:
            return self._finish(checks, chosen)
        lines, ans, _ = _search(
            list(problem["numbers"]), int(problem["target"]), rng, self.config.solver_max_nodes,
            self.config.solver_order, self.config.solver_moves_per_node, self.config.number_rule,
        )
        return self._finish(checks + lines, ans)

    def sft_examples(
        self, n_search: int, n_aggregate: int, seed: int = 0, set_size: int = 4
    ) -> list[dict[str, str]]:
        """Supervised warm-start data from TRAIN problems: `n_search` solver traces (successful and
        failed) and `n_aggregate` aggregation examples over `set_size` mixed candidates."""
        rng = random.Random(f"countdown-sft/{seed}")
        probs = self.problems("train", n_search + n_aggregate, seed=seed + 7919)
        out: list[dict[str, str]] = []
        for p in probs[:n_search]:
            trace, _ = self.solve(p, rng, max_nodes=rng.choice(self.config.sft_max_nodes))
            out.append({"prompt": self.search_prompt(p), "completion": trace, "kind": "search"})
        for p in probs[n_search:]:
            cands = [self._candidate(p, rng) for _ in range(set_size)]
            out.append({
                "prompt": self.aggregate_prompt(p, cands),
                "completion": self.aggregate_completion(p, cands, rng),
                "kind": "aggregate",
            })
        return out
