"""Countdown's prompts and completions, compact and verbose: the search prompt, the aggregation
prompt in its four views (answer, full, grouped, steps), how a completion ends (answer line or
tags), and the substitution of a `select` answer ("answer: #2") by the candidate it names."""
from __future__ import annotations

import re
from typing import Any

from .._answers import vote_key
from .config import CountdownConfig
from .steps import check_path, path_expression, step_path

_SELECT = re.compile(r"#\s*(\d{1,3})")  # "answer: #2": the aggregator names candidate 2

_VERBOSE_RULE = {
    "at_most_once": "each number can be used at most once",
    "exactly_once": "each number must be used exactly once",
}


class CountdownFormats:
    """The format part of `CountdownTask` (task.py); reads answers with the task's `extract_answer`."""

    config: CountdownConfig

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

    def _steps(self, trace: str) -> list:
        """The step path of a candidate that has an answer line (steps.py); [] for one without."""
        return step_path(trace) if self.extract_answer(trace) is not None else []

    def _candidate_view(self, trace: str) -> str:
        if self.config.agg_view == "answer":
            ans = self.extract_answer(trace)
            return ans if ans is not None else "none"
        if self.config.agg_view == "steps":
            text = " ".join(s.text() for s in self._steps(trace)) or "none"
            return text if len(text) <= self.config.agg_max_chars else text[: self.config.agg_max_chars - 3] + "..."
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
        one): one per candidate, or one per distinct answer in the grouped view; in the steps view
        the expression each candidate's steps build (what its steps, not its answer line, claim)."""
        if self.config.agg_view == "grouped":
            return [a for a, _ in self._answer_groups(traces)[0]]
        if self.config.agg_view == "steps":
            return [path_expression(self._steps(t)) for t in traces]
        return [self.extract_answer(t) for t in traces]

    def candidate_checks(self, problem: dict[str, Any], traces: list[str]) -> list[tuple[bool, str]]:
        """The verifier's verdict and check line for each candidate the aggregation prompt numbers,
        in that order: the check of its answer, or in the steps view the re-done steps."""
        if self.config.agg_view == "steps":
            c = self.config
            return [check_path(self._steps(t), list(problem["numbers"]), int(problem["target"]), c.number_rule)
                    for t in traces]
        return [self.check(problem, a) for a in self.candidate_answers(traces)]

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
                if c.agg_view in ("answer", "steps"):
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
        candidate's answer appended as its final answer (in the steps view after the steps that
        build it); anything else is returned unchanged (a number with no answer behind it stays an
        unscorable answer)."""
        if self.config.agg_answer != "select":
            return completion
        m = _SELECT.fullmatch(self.extract_answer(completion) or "")
        if m is None:
            return completion
        answers = self.candidate_answers(traces)
        i = int(m.group(1))
        if not 1 <= i <= len(answers) or answers[i - 1] is None:
            return completion
        steps = ""
        if self.config.agg_view == "steps":  # its steps too, for the next RSA round's view of this one
            steps = "".join(s.text() + "\n" for s in self._steps(traces[i - 1]))
            steps = steps if self.config.prompt_format == "compact" else f"<think>\n{steps}</think>\n"
        tail = f"answer: {answers[i - 1]}\n" if self.config.prompt_format == "compact" else f"<answer>{answers[i - 1]}</answer>"
        return completion.rstrip("\n") + "\n" + steps + tail

    def stop_strings(self) -> list[str]:
        return [] if self.config.prompt_format == "compact" else ["</answer>"]

    def _finish(self, lines: list[str], ans: str | None) -> str:
        if self.config.prompt_format == "compact":
            lines = lines + [f"answer: {ans}" if ans is not None else "fail"]
            return "".join(line + "\n" for line in lines)
        body = "".join(line + "\n" for line in lines) + ("" if ans is not None else "fail\n")
        tail = f"<answer>{ans}</answer>" if ans is not None else ""
        return f"<think>\n{body}</think>\n{tail}"
