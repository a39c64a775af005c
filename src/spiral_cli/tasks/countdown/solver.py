"""Countdown's solver: a depth-first search over pairs of numbers that writes what it tries as text,
one line per step ("20-6=14 (1 14)") and "back" per undo, for supervised warm-start data; and the
expression building (minimal parentheses, valid moves on a pair) the problem generator shares."""
from __future__ import annotations

import random
from typing import Any

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


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
