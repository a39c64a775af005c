"""Countdown's problems: a seeded generator whose problems are solvable by construction (a random
expression over some of the numbers gives the target), a stable hash that puts each problem in
the train or the eval split, and the checks on problems read from a file or typed by hand."""
from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

from ..base import TaskError
from .config import MAX_TARGET, CountdownConfig
from .solver import _combine, _moves


def stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big")


class CountdownProblems:
    """The problems part of `CountdownTask` (task.py): generating, splitting and validating."""

    config: CountdownConfig

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
