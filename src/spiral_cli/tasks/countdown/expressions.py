"""Countdown's answers: a tokenizer, a recursive-descent parser (never ``eval``), exact evaluation,
and `check_answer`, which verifies an answer and writes the step-by-step check line an
aggregation completion carries for each candidate ("12*3=36 36-7=29 29+25=54 uses 29 no")."""
from __future__ import annotations

from collections import Counter
from fractions import Fraction
from typing import Any

MAX_ANSWER_CHARS = 200  # longer answers are rejected before parsing
_MAX_NUMBER_DIGITS = 12
_OPS = "+-*/"


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
