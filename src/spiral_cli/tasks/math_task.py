"""Math problems with reference answers, checked with math-verify.

Data: a local JSONL file (read directly), a local parquet/JSON file (via `datasets`), or a Hugging
Face dataset id (`datasets.load_dataset(data, split=hf_split)`). The default is a small packaged
sample (`tasks/data/math_sample.jsonl`, 42 problems).

Splits: a problem is in "eval" iff a stable hash of its id (or its problem text when there is no
id column) falls under `eval_fraction`. Train requests larger than the split cycle through
reshuffled passes; eval requests return at most the whole eval split (no duplicates).

Scoring: the prediction is the completion's last `<answer>...</answer>` / `answer:` line, else its
last `\\boxed{...}`; it is capped at `max_answer_chars` before parsing and compared with the gold
answer by math_verify (`parse` + `verify`). math-verify's own timeouts use SIGALRM, which works only
on the main thread; elsewhere the length cap is the guard, or set `sandbox: true` to score in a
time-limited subprocess.
"""
from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from .. import first_line
from ..jsonl import InputError, iter_jsonl
from ._answers import extract_answer_text, verify_math
from .base import TaskConfig, TaskError, candidate_view

SAMPLE_DATA = str(Path(__file__).parent / "data" / "math_sample.jsonl")
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")


def _stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    k = text.rfind("\\boxed")
    if k < 0:
        return None
    i = text.find("{", k)
    if i < 0 or text[k + 6 : i].strip():
        return None
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


class MathConfig(TaskConfig):
    data: str = SAMPLE_DATA
    hf_split: str = "train"
    hf_config: str | None = None
    problem_column: str = "problem"
    answer_column: str = "answer"
    id_column: str | None = None
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    prompt_format: Literal["compact", "verbose"] = "verbose"
    agg_view: Literal["answer", "full"] = "full"
    agg_max_chars: int = Field(4000, ge=20)
    max_answer_chars: int = Field(300, ge=1)
    sandbox: bool = False
    score_timeout_s: float = Field(10.0, gt=0)


_VERBOSE_SUFFIX = (
    "Think step by step inside <think> </think> tags, then give only the final answer inside "
    "<answer> </answer> tags."
)


class MathTask:
    """Math problems with reference answers (JSONL, parquet or HF datasets), checked by math-verify."""

    name: ClassVar[str] = "math"
    description: ClassVar[str] = "math word problems from JSONL/parquet/HF datasets, answers checked with math-verify"
    Config: ClassVar[type[TaskConfig]] = MathConfig

    def __init__(self, config: MathConfig | None = None) -> None:
        self.config = config if config is not None else MathConfig()
        self._rows: list[dict[str, Any]] | None = None
        self._scorer = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- data
    def _read_rows(self) -> list[dict[str, Any]]:
        c = self.config
        data = os.path.expanduser(c.data)
        if os.path.exists(data):
            if data.endswith(".jsonl") and os.path.isfile(data):
                try:
                    with open(data, encoding="utf-8") as f:
                        return [row for _, row in iter_jsonl(f, data)]
                except InputError as e:
                    raise TaskError(f"task.data: {e}") from None
            fmt = "parquet" if data.endswith(".parquet") else "json"
            return self._load_hf(fmt, data_files=data, split="train")
        if data.endswith(_LOCAL_SUFFIXES) or data.startswith((".", "/", "~")):
            raise TaskError(f"task.data: file not found: {c.data}")
        return self._load_hf(data, name=c.hf_config, split=c.hf_split)

    def _load_hf(self, path: str, **kwargs: Any) -> list[dict[str, Any]]:
        try:
            import datasets

            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            ds = datasets.load_dataset(path, **kwargs)
        except Exception as e:
            first = first_line(e)
            raise TaskError(f"task.data: cannot load {self.config.data!r}: {first}") from None
        return [dict(r) for r in ds]

    def _all(self) -> list[dict[str, Any]]:
        if self._rows is None:
            c = self.config
            raw = self._read_rows()
            if not raw:
                raise TaskError(f"task.data: {c.data} holds no rows")
            cols = sorted(raw[0].keys())
            for field, col in (("problem_column", c.problem_column), ("answer_column", c.answer_column),
                               ("id_column", c.id_column)):
                if col is not None and col not in raw[0]:
                    raise TaskError(f"task.{field}: column {col!r} not in {c.data} (columns: {', '.join(cols)})")
            rows, seen = [], set()
            for r in raw:
                problem, answer = r.get(c.problem_column), r.get(c.answer_column)
                if problem is None or answer is None:
                    continue
                pid = str(r[c.id_column]) if c.id_column else f"math-{_stable_hash(str(problem)):016x}"
                if pid in seen:
                    continue
                seen.add(pid)
                rows.append({"id": pid, "problem": str(problem), "answer": str(answer)})
            self._rows = rows
        return self._rows

    def split_of(self, problem_id: str) -> str:
        return "eval" if _stable_hash(problem_id) % 1_000_000 < self.config.eval_fraction * 1_000_000 else "train"

    def split_size(self, split: str) -> int:
        """How many distinct problems `split` holds (requests beyond it repeat train problems
        and are cut short on eval)."""
        return sum(self.split_of(r["id"]) == split for r in self._all())

    def problems(self, split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
        if split not in ("train", "eval"):
            raise TaskError(f"split must be 'train' or 'eval', got {split!r}")
        pool = [r for r in self._all() if self.split_of(r["id"]) == split]
        if not pool:
            raise TaskError(f"task.eval_fraction: the {split} split of {self.config.data} is empty")
        rng = random.Random(f"math/{split}/{seed}")
        if split == "eval":
            pool = list(pool)
            rng.shuffle(pool)
            return [dict(r) for r in pool[:n]]
        out: list[dict[str, Any]] = []
        while len(out) < n:
            perm = list(pool)
            rng.shuffle(perm)
            out.extend(dict(r) for r in perm[: n - len(out)])
        return out

    def validate_problem(self, problem: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(problem, dict):
            raise TaskError("problem: expected a JSON object")
        c = self.config
        p = problem.get("problem", problem.get(c.problem_column))
        a = problem.get("answer", problem.get(c.answer_column))
        if not isinstance(p, str) or not p.strip():
            raise TaskError("problem: expected a non-empty string")
        if a is None or isinstance(a, (dict, list)):
            raise TaskError("answer: expected a string or a number")
        pid = problem.get("id")
        if isinstance(pid, bool) or not isinstance(pid, (str, int, type(None))):
            raise TaskError("id: expected a string or an integer")
        # an id comes back as given (an integer stays an integer)
        return {**problem, "id": pid if pid is not None else f"math-{_stable_hash(p):016x}",
                "problem": p, "answer": str(a)}

    # ---------------------------------------------------------------- prompts
    def search_prompt(self, problem: dict[str, Any]) -> str:
        q = problem["problem"].rstrip()
        if self.config.prompt_format == "compact":
            return q + "\nEnd with a line 'answer: <your answer>'.\n"
        return q + "\n\n" + _VERBOSE_SUFFIX + "\n"

    def _candidate_view(self, trace: str) -> str:
        return candidate_view(trace, self.config.agg_view, self.config.agg_max_chars, self.extract_answer)

    def aggregate_prompt(self, problem: dict[str, Any], traces: list[str]) -> str:
        parts = [problem["problem"].rstrip(), f"Here are {len(traces)} candidate solutions:"]
        for i, t in enumerate(traces, 1):
            parts.append(f"Candidate {i}:\n{self._candidate_view(t)}")
        instruction = "Check the candidates carefully, keep what is right and fix what is wrong, then give one final answer"
        if self.config.prompt_format == "compact":
            parts.append(instruction + " on a last line 'answer: <your answer>'.")
        else:
            parts.append(instruction + ". " + _VERBOSE_SUFFIX)
        return "\n\n".join(parts) + "\n"

    def stop_strings(self) -> list[str]:
        return [] if self.config.prompt_format == "compact" else ["</answer>"]

    # ---------------------------------------------------------------- scoring
    def extract_answer(self, text: str) -> str | None:
        if not text:
            return None
        ans = extract_answer_text(text)
        if ans is None:
            ans = last_boxed(text)
            ans = " ".join(ans.split()) if ans is not None else None
        if ans is None or not ans or len(ans) > self.config.max_answer_chars:
            return None
        return ans

    def check_answer(self, problem: dict[str, Any], answer: str | None) -> bool:
        if answer is None or len(answer) > self.config.max_answer_chars:
            return False
        gold = str(problem["answer"])
        if self.config.sandbox:
            with self._lock:
                if self._scorer is None:
                    from ._sandbox import SandboxScorer

                    self._scorer = SandboxScorer(
                        preload=["spiral_cli.tasks.math_task", "math_verify"], timeout_s=self.config.score_timeout_s
                    )
            return self._scorer.request({"kind": "math", "gold": gold, "pred": answer}) >= 1.0
        try:
            return verify_math(gold, answer)
        except Exception:
            return False

    def reward(self, problem: dict[str, Any], text: str) -> float:
        return 1.0 if self.check_answer(problem, self.extract_answer(text)) else 0.0

    def is_correct(self, problem: dict[str, Any], text: str) -> bool:
        return self.reward(problem, text) >= 1.0

    def close(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
