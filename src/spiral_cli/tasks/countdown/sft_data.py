"""Countdown's supervised warm-start data: solver traces in the task's format, and aggregation
examples over mixed candidates (honest traces, corrupted answers, failed searches that claim their
closest expression) with the target completion that checks each candidate."""
from __future__ import annotations

import random
from typing import Any

from .config import CountdownConfig
from .expressions import _OPS, _evaluate, _tokenize, parse_expression
from .solver import _moves, _search
from .steps import Step, parse_step, path_expression


class CountdownSftData:
    """The SFT-data part of `CountdownTask` (task.py); uses the task's problems, prompts, `check`
    and `_finish`."""

    config: CountdownConfig

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
        if c.agg_view == "steps":
            return self._steps_candidate(problem, rng)
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

    def _steps_candidate(self, problem: dict[str, Any], rng: random.Random) -> str:
        """A candidate for the steps view, where the steps are what gets checked: an honest solver
        trace (40%), a solved path with one step's value, operand or operator slipped (45%: the
        answer is what the slipped path builds), another honest trace (15%); `task.sft_cut_short`
        draws that share (from the last 15% first, then from the slipped 45%) as searches cut short,
        each claiming the path it holds: right steps that end off the target, or the whole trace
        where it has no such point. Measured worse as SFT data (docs/results.md, session 17), so 0
        by default; at 0 the data is the same as before the option existed."""
        c = self.config
        nums, target = list(problem["numbers"]), int(problem["target"])

        def search(budget: int) -> tuple[list[str], str | None]:
            lines, ans, _ = _search(nums, target, rng, budget, c.solver_order, c.solver_moves_per_node, c.number_rule)
            return lines, ans

        kind = rng.random()
        lines, ans = search(rng.randint(1, 2 * c.solver_max_nodes))
        if kind < 0.4:
            return self._finish(lines, ans)
        if kind >= 1.0 - c.sft_cut_short:
            return self._cut_short(problem, lines, ans, rng)
        slipped = kind < 0.85
        if slipped and ans is None:
            lines, ans = search(4 * c.solver_max_nodes)
        kept = _kept(lines)
        if slipped:
            if ans is None or not kept:
                return self._finish(lines, ans)
            i = rng.choice(kept)
            lines[i] = _slip(parse_step(lines[i]), nums, rng).text()  # a line replaced: `kept` still holds
        elif ans is not None or not kept:
            return self._finish(lines, ans)
        return self._finish(lines, path_expression([parse_step(lines[k]) for k in kept]))

    def _cut_short(self, problem: dict[str, Any], lines: list[str], ans: str | None, rng: random.Random) -> str:
        """The search `lines` stopped after a random line that leaves steps on its path short of the
        target, claiming the expression they build (a whole failed search has backtracked its path
        by its end, so it shows as `none`); the whole trace where no such line exists."""
        cuts = []
        for end in range(1, len(lines) + 1):
            kept = _kept(lines[:end])
            if kept:
                claim = path_expression([parse_step(lines[k]) for k in kept])
                if claim is not None and not self.check(problem, claim)[0]:
                    cuts.append((end, claim))
        if not cuts:
            return self._finish(lines, ans)
        end, claim = rng.choice(cuts)
        return self._finish(lines[:end], claim)

    def aggregate_completion(self, problem: dict[str, Any], traces: list[str], rng: random.Random) -> str:
        """The target aggregation completion: check the candidates in the order the prompt numbers
        them (distinct answers in the grouped view), answer from the first that verifies (checking
        the rest first unless `agg_checks` is until_ok), by writing it or, with `agg_answer:
        select`, naming it; if none does, search (a solver trace) and end with its answer or fail."""
        checks = []
        chosen = None
        answers = self.candidate_answers(traces)
        for i, (ans, (ok, line)) in enumerate(zip(answers, self.candidate_checks(problem, traces)), 1):
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


def _kept(lines: list[str]) -> list[int]:
    """Indices of the solver's step lines still on its path at the end (each "back" undoes one)."""
    stack: list[int] = []
    for i, line in enumerate(lines):
        if line == "back":
            stack.pop()
        else:
            stack.append(i)
    return stack


def _slip(step: Step, numbers: list[int], rng: random.Random) -> Step:
    """`step` with one plausible slip: a wrong value, a wrong operand, or a wrong operator."""
    kind = rng.random()
    if kind < 0.4:  # a wrong value: off by a little, or another operator's value
        others = [r for r, _op, _a, _b in _moves(step.a, step.b, "at_most_once")]
        wrong = [v for v in [step.result + d for d in (-2, -1, 1, 2)] + others if v != step.result and v > 0]
        v = rng.choice(wrong)
        rest = None if step.rest is None else step.rest[:-1] + (v,)
        return Step(step.a, step.op, step.b, v, rest)
    if kind < 0.75:  # a wrong operand: a near number or another given one
        side = rng.random() < 0.5
        x = step.a if side else step.b
        near = [y for y in [x + d for d in (-2, -1, 1, 2)] + list(numbers) if y != x and y > 0]
        y = rng.choice(near)
        return Step(y, step.op, step.b, step.result, step.rest) if side else Step(step.a, step.op, y, step.result, step.rest)
    op = rng.choice([o for o in "+-*/" if o != step.op])
    return Step(step.a, op, step.b, step.result, step.rest)
