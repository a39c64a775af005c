"""Adapter over the `reasoning_gym` package's procedural datasets.

A problem carries everything needed to regenerate its entry in another process:
{"id", "question", "answer", "rg_dataset", "rg_config", "rg_seed", "rg_size", "rg_index"} so that
``create_dataset(rg_dataset, seed=rg_seed, size=rg_size, **rg_config)[rg_index]`` is the entry.

Splits: the train pool is dataset seed `seed` (size `size`), the eval pool is dataset seed
`seed + 10**8` (size `size * eval_fraction`), far enough apart that reasoning_gym's per-entry
seeds (seed + index) never meet; eval entries whose question also appears in the train pool are
dropped as well. `problems(split, n, seed)` draws from the pool with `random.Random(seed)`;
asking for more train problems than the pool holds cycles through reshuffled passes (epochs);
eval requests return at most the whole eval pool (no duplicates).

Scoring: the extracted answer is capped at `max_answer_chars` and then scored by the dataset's
own `score_answer` in a sandboxed worker process (see `_sandbox.py`), never in this process,
because some scorers evaluate strings.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import threading
from typing import Any, ClassVar, Literal

from pydantic import Field

from ._answers import extract_answer_text
from ._sandbox import SandboxScorer
from .base import TaskConfig, TaskError, candidate_view

EVAL_SEED_OFFSET = 100_000_000


class ReasoningGymConfig(TaskConfig):
    dataset: str
    dataset_config: dict[str, Any] = Field(default_factory=dict)
    size: int = Field(2000, ge=1, le=EVAL_SEED_OFFSET // 2)
    seed: int = Field(0, ge=0)
    eval_fraction: float = Field(0.1, gt=0.0, le=1.0)
    prompt_format: Literal["compact", "verbose"] = "verbose"
    agg_view: Literal["answer", "full"] = "full"
    agg_max_chars: int = Field(4000, ge=20)
    max_answer_chars: int = Field(1000, ge=1)
    score_timeout_s: float = Field(10.0, gt=0)
    sandbox_memory_mb: int = Field(4096, ge=256)


def _dataset_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


_VERBOSE_SUFFIX = (
    "\n\nThink step by step inside <think> </think> tags, then give only the final answer inside "
    "<answer> </answer> tags."
)


class ReasoningGymTask:
    """reasoning-gym procedural datasets, scored by their own scorers in a sandboxed subprocess."""

    name: ClassVar[str] = "reasoning_gym"
    description: ClassVar[str] = "any reasoning-gym procedural dataset, scored in a sandboxed subprocess"
    Config: ClassVar[type[TaskConfig]] = ReasoningGymConfig

    def __init__(self, config: ReasoningGymConfig) -> None:
        self.config = config
        names = _dataset_names()
        if config.dataset not in names:
            raise TaskError(
                f"task.dataset: unknown reasoning_gym dataset {config.dataset!r}; "
                f"e.g. {', '.join(names[:8])} ... ({len(names)} in all)"
            )
        self._pools: dict[str, Any] = {}
        self._eval_indices: list[int] | None = None
        self._scorer: SandboxScorer | None = None
        self._scorer_lock = threading.Lock()
        self._config_json = json.dumps(config.dataset_config, sort_keys=True)

    # ---------------------------------------------------------------- problems
    def _pool_spec(self, split: str) -> tuple[int, int]:
        c = self.config
        if split == "train":
            return c.seed, c.size
        return c.seed + EVAL_SEED_OFFSET, max(1, math.ceil(c.size * c.eval_fraction))

    def _pool(self, split: str) -> Any:
        if split not in self._pools:
            import reasoning_gym

            seed, size = self._pool_spec(split)
            try:
                self._pools[split] = reasoning_gym.create_dataset(
                    self.config.dataset, seed=seed, size=size, **self.config.dataset_config
                )
            except Exception as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise TaskError(f"task.dataset_config: {self.config.dataset}: {msg}") from None
        return self._pools[split]

    def _split_indices(self, split: str) -> list[int]:
        if split == "train":
            return list(range(self._pool_spec("train")[1]))
        if self._eval_indices is None:
            train = self._pool("train")
            train_q = {train[i]["question"] for i in range(len(train))}
            ev = self._pool("eval")
            self._eval_indices = [i for i in range(len(ev)) if ev[i]["question"] not in train_q]
        return self._eval_indices

    def _problem(self, split: str, index: int) -> dict[str, Any]:
        seed, size = self._pool_spec(split)
        entry = self._pool(split)[index]
        key = f"{self.config.dataset}|{self._config_json}|{seed}|{size}|{index}"
        return {
            "id": f"rg-{self.config.dataset}-{hashlib.sha256(key.encode()).hexdigest()[:12]}",
            "question": entry["question"],
            "answer": None if entry.get("answer") is None else str(entry["answer"]),
            "rg_dataset": self.config.dataset,
            "rg_config": dict(self.config.dataset_config),
            "rg_seed": seed,
            "rg_size": size,
            "rg_index": index,
        }

    def split_size(self, split: str) -> int:
        """How many distinct problems `split` holds (train requests beyond it repeat)."""
        return len(self._split_indices(split))

    def problems(self, split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
        if split not in ("train", "eval"):
            raise TaskError(f"split must be 'train' or 'eval', got {split!r}")
        idx = self._split_indices(split)
        if not idx:
            raise TaskError(f"task.eval_fraction: the {split} split of {self.config.dataset} is empty")
        rng = random.Random(f"rg/{split}/{seed}")
        if split == "eval":  # never repeat eval problems: at most the whole eval pool
            perm = list(idx)
            rng.shuffle(perm)
            return [self._problem(split, i) for i in perm[:n]]
        order: list[int] = []
        while len(order) < n:
            perm = list(idx)
            rng.shuffle(perm)
            order.extend(perm)
        return [self._problem(split, i) for i in order[:n]]

    def validate_problem(self, problem: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(problem, dict):
            raise TaskError("problem: expected a JSON object")
        for field in ("rg_dataset", "rg_seed", "rg_size", "rg_index"):
            if field not in problem:
                raise TaskError(f"{field}: missing (reasoning_gym problems come from `problems()`)")
        if problem["rg_dataset"] not in _dataset_names():
            raise TaskError(f"rg_dataset: unknown reasoning_gym dataset {problem['rg_dataset']!r}")
        for field in ("rg_seed", "rg_size", "rg_index"):
            v = problem[field]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TaskError(f"{field}: expected a non-negative integer")
        if problem["rg_index"] >= problem["rg_size"]:
            raise TaskError("rg_index: must be smaller than rg_size")
        if not isinstance(problem.get("rg_config", {}), dict):
            raise TaskError("rg_config: expected an object")
        if not isinstance(problem.get("question"), str):
            raise TaskError("question: expected a string")
        out = dict(problem)
        out.setdefault("rg_config", {})
        if "id" not in out:
            key = json.dumps([out[k] for k in ("rg_dataset", "rg_config", "rg_seed", "rg_size", "rg_index")])
            out["id"] = f"rg-{out['rg_dataset']}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        if isinstance(out["id"], bool) or not isinstance(out["id"], (str, int)):
            raise TaskError("id: expected a string or an integer")
        return out  # an id comes back as given (an integer stays an integer)

    # ---------------------------------------------------------------- prompts
    def search_prompt(self, problem: dict[str, Any]) -> str:
        q = problem["question"].rstrip()
        if self.config.prompt_format == "compact":
            return q + "\nEnd with a line 'answer: <your answer>'.\n"
        return q + _VERBOSE_SUFFIX + "\n"

    def _candidate_view(self, trace: str) -> str:
        return candidate_view(trace, self.config.agg_view, self.config.agg_max_chars, self.extract_answer)

    def aggregate_prompt(self, problem: dict[str, Any], traces: list[str]) -> str:
        parts = [problem["question"].rstrip(), f"Here are {len(traces)} candidate solutions:"]
        for i, t in enumerate(traces, 1):
            parts.append(f"Candidate {i}:\n{self._candidate_view(t)}")
        instruction = "Check the candidates carefully, keep what is right and fix what is wrong, then give one final answer"
        if self.config.prompt_format == "compact":
            parts.append(instruction + " on a last line 'answer: <your answer>'.")
            return "\n\n".join(parts) + "\n"
        return "\n\n".join(parts) + "\n\n" + instruction + ". " + _VERBOSE_SUFFIX.strip() + "\n"

    def stop_strings(self) -> list[str]:
        return [] if self.config.prompt_format == "compact" else ["</answer>"]

    # ---------------------------------------------------------------- scoring
    def extract_answer(self, text: str) -> str | None:
        ans = extract_answer_text(text)
        if ans is None or len(ans) > self.config.max_answer_chars:
            return None
        return ans

    def _get_scorer(self) -> SandboxScorer:
        with self._scorer_lock:
            if self._scorer is None:
                self._scorer = SandboxScorer(
                    preload=["reasoning_gym"],
                    timeout_s=self.config.score_timeout_s,
                    memory_mb=self.config.sandbox_memory_mb,
                )
            return self._scorer

    def score_answer(self, problem: dict[str, Any], answer: str | None) -> float:
        """The dataset's own score for an (already extracted) answer, computed in the sandbox."""
        if answer is None or len(answer) > self.config.max_answer_chars:
            return 0.0
        req = {
            "kind": "rg",
            "dataset": problem["rg_dataset"],
            "seed": problem["rg_seed"],
            "size": problem["rg_size"],
            "config": problem.get("rg_config") or {},
            "index": problem["rg_index"],
            "answer": answer,
        }
        return self._get_scorer().request(req)

    def reward(self, problem: dict[str, Any], text: str) -> float:
        return self.score_answer(problem, self.extract_answer(text))

    def is_correct(self, problem: dict[str, Any], text: str) -> bool:
        return self.reward(problem, text) >= 0.999

    def close(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
