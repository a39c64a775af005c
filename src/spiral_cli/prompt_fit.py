"""Aggregation prompts fitted to the context the sampler actually has (`generation.agg_fit`).

An aggregation prompt holds k candidate traces; with real budgets (T = 4096, k = 4 in the full
view) it can outgrow the model's context, and vLLM refuses such a prompt with a traceback. Every
place that builds aggregation prompts builds them through `AggregationFit.prompts`: the RSA rounds
of infer, sweep and evaluation (pipeline.aggregate_rounds), the set-RL rollouts of train-set and
train-agg (rl/rollout.py) and sft's self-aggregation examples, so training and inference see the
same prompts.

- The context is the smallest of the limits the aggregating sampler knows (`context_limits`):
  the model's max positions (`config.max_position_embeddings`), the recipe's `model.max_seq_len`,
  and the engine's `max_model_len` where the backend has one (vLLM: `generation.vllm.max_model_len`,
  else what the engine derived from the model). A prompt may use the context minus
  `generation.agg_max_new_tokens`, so the aggregation keeps its whole budget.
- Tokens are counted with the aggregating model's tokenizer exactly as the generators encode
  (`models.encode_prompts`: the chat template's tokens included).
- A prompt that fits is returned unchanged, byte for byte. One that does not is, with
  `agg_fit: trim_middle` (the default), rebuilt from candidate texts cut in the middle: the
  longest candidates first and evenly (every candidate longer than a common token cap is cut to
  it, the largest cap that fits), each cut marked "…[N tokens cut]…", each candidate's last line
  (its final answer) kept whole where the cap allows. The texts are cut before the task formats
  them, so views that show only answers are unaffected. `agg_fit: error` stops instead.
- A prompt that cannot fit even with every candidate cut away is a one-line RecipeError naming
  the fields to change, checked before any sampling where the problems are known (`check`).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from spiral_cli.recipe import RecipeError
from spiral_cli.tasks.base import Task

MARKER = "…[{n} tokens cut]…"
POLICIES = ("trim_middle", "error")

# the limits a context can come from, as the messages name them, and the field that raises each
# (in this order where several have the context's value)
_LIMITS = {
    "max_positions": ("the model's max_position_embeddings", None),
    "max_seq_len": ("model.max_seq_len", "model.max_seq_len"),
    "max_model_len": ("the vLLM engine's max_model_len", "generation.vllm.max_model_len"),
}


def _chain(generator) -> list[Any]:
    """The generator and those it wraps (timing, progress and adapter wrappers hold theirs in `inner`)."""
    out: list[Any] = []
    g = generator
    while g is not None and len(out) < 16 and all(g is not seen for seen in out):
        out.append(g)
        g = getattr(g, "inner", None)
    return out


def _positive_int(v) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", None)
    if callable(text):
        config = text()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = _positive_int(getattr(config, name, None))
        if v is not None:
            return v
    return None


def context_limits(generator) -> dict[str, int]:
    """What bounds the context of `generator` (prompt + completion tokens): keys of `_LIMITS`,
    the first value found along the wrapper chain for each; empty when nothing is known (a test
    double), and then prompts are not fitted."""
    limits: dict[str, int] = {}
    for g in _chain(generator):
        engine = _positive_int(getattr(g, "max_model_len", None))
        if engine is not None:
            limits.setdefault("max_model_len", engine)
        loaded = getattr(g, "loaded", None)
        if loaded is not None:
            pos = _max_positions(getattr(loaded, "model", None))
            if pos is not None:
                limits.setdefault("max_positions", pos)
            cap = _positive_int(getattr(loaded, "max_seq_len", None))
            if cap is not None:
                limits.setdefault("max_seq_len", cap)
    return limits


def _tokenizer(generator):
    for g in _chain(generator):
        tok = getattr(g, "tokenizer", None)
        if tok is None:
            tok = getattr(getattr(g, "loaded", None), "tokenizer", None)
        if tok is not None and callable(tok):
            return tok
    return None


class _Candidate:
    """A candidate trace with its tokens' character spans, cut to a token cap on demand."""

    def __init__(self, text: str, tokenizer):
        self.text = text
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            self.spans: list[tuple[int, int]] | None = [tuple(s) for s in enc["offset_mapping"]]
            self.ids = list(enc["input_ids"])
        except (NotImplementedError, ValueError, TypeError, KeyError):  # a slow tokenizer: no offsets
            self.spans = None
            self.ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        self.tokenizer = tokenizer
        self.n = len(self.ids)
        # the last non-empty line (the final answer): tokens that end inside it or after it
        self.start = start = text.rstrip().rfind("\n") + 1
        if self.spans is not None:
            self.last_line = sum(1 for _, end in self.spans if end > start)
        else:
            self.last_line = len(tokenizer(text[start:], add_special_tokens=False)["input_ids"])

    def cut(self, keep: int) -> str:
        """The text with all but `keep` of its tokens cut from the middle (unchanged when it has
        no more): the last line whole where `keep` holds it, else its end; the rest of `keep`
        split between the head and a tail of at least half."""
        if self.n <= keep:
            return self.text
        tail = keep if self.last_line > keep else max(self.last_line, keep - keep // 2)
        head = keep - tail
        marker = MARKER.format(n=self.n - keep)
        if self.spans is None:
            dec = self.tokenizer.decode
            line = "\n" if tail == self.last_line and self.start > 0 else ""
            return (dec(self.ids[:head], skip_special_tokens=True) if head else "") + marker + line + (
                dec(self.ids[self.n - tail:], skip_special_tokens=True) if tail else "")
        a = self.spans[head - 1][1] if head else 0
        b = max(a, self.spans[self.n - tail][0] if tail else len(self.text))
        line = "\n" if 0 < b < len(self.text) and self.text[b - 1] == "\n" else ""  # the tail starts a line: so it stays
        return self.text[:a] + marker + line + self.text[b:]


class AggregationFit:
    """Builds a task's aggregation prompts fitted to `generator`'s context (module docstring).

    `generator` is the one that samples the aggregations (its tokenizer and limits count), and
    `max_new_tokens` their budget. Without a tokenizer or a known context (test doubles) the
    prompts are the task's own. `trimmed` and `tokens_cut` add up over the calls."""

    def __init__(self, task: Task, generator, max_new_tokens: int, policy: str = "trim_middle"):
        if policy not in POLICIES:
            raise RecipeError(f"generation.agg_fit: {policy!r} is not a policy ({' or '.join(POLICIES)})")
        self.task = task
        self.policy = policy
        self.max_new_tokens = int(max_new_tokens)
        self.tokenizer = _tokenizer(generator)
        self.limits = context_limits(generator) if self.tokenizer is not None else {}
        self.context = min(self.limits.values()) if self.limits else None
        self.binding = [k for k in _LIMITS if self.limits.get(k) == self.context]  # the limits at that value
        self.budget = self.context - self.max_new_tokens if self.context is not None else None
        self.trimmed = 0
        self.tokens_cut = 0

    @property
    def active(self) -> bool:
        return self.budget is not None

    def count(self, prompts: list[str]) -> list[int]:
        """Tokens of each prompt as the generators encode it (chat template included)."""
        from spiral_cli.models import encode_prompts

        return [len(ids) for ids in encode_prompts(self.tokenizer, prompts)] if prompts else []

    # -- the checks --------------------------------------------------------------------------

    def _context_words(self) -> str:
        names = ", ".join(_LIMITS[k][0] for k in self.binding)
        return (f"the context is {self.context} tokens ({names}) and generation.agg_max_new_tokens="
                f"{self.max_new_tokens} leaves {self.budget} for the prompt")

    def _too_small(self, tokens: int, k: int) -> RecipeError:
        # a field to raise only where the model's own positions do not bind too
        raisable = [_LIMITS[b][1] for b in self.binding if "max_positions" not in self.binding]
        more = f", or raise {' and '.join(raisable)}" if raisable else ""
        return RecipeError(
            f"aggregation prompts cannot fit: with {k} candidate{'s' if k != 1 else ''} cut to nothing a prompt still "
            f"takes {tokens} tokens, but {self._context_words()}; lower generation.agg_max_new_tokens or the candidates "
            f"per set (infer.agg_set_size, train_set.set_size, train_agg.set_size, sft.set_size){more}")

    @classmethod
    def before_start(cls, task: Task, loaded, generation) -> AggregationFit:
        """A fit from a loaded model and the recipe's `generation` section alone, for a check
        before the sampler starts (a vLLM engine takes minutes): the engine's own limit is
        `generation.vllm.max_model_len` when set (else it follows the model, counted already)."""
        engine = generation.vllm.max_model_len if generation.backend == "vllm" else None
        shim = SimpleNamespace(loaded=loaded, tokenizer=loaded.tokenizer, max_model_len=engine)
        return cls(task, shim, generation.agg_max_new_tokens, generation.agg_fit)

    def check(self, problems: list[dict[str, Any]], set_size: int) -> None:
        """Before sampling: each problem's aggregation prompt with `set_size` empty candidates
        must fit, or a RecipeError says what to change (nothing would otherwise)."""
        if not self.active or set_size < 1 or not problems:
            return
        lengths = self.count([self.task.aggregate_prompt(p, [""] * set_size) for p in problems])
        if max(lengths) > self.budget:  # type: ignore[operator]
            raise self._too_small(max(lengths), set_size)

    # -- fitting -----------------------------------------------------------------------------

    def prompts(self, problems: list[dict[str, Any]], candidates: list[list[str]]) -> tuple[list[str], list[int]]:
        """The aggregation prompt of each (problem, candidate texts) pair, fitted; and the
        candidate tokens cut from each (0: the task's own prompt, unchanged)."""
        out = [self.task.aggregate_prompt(p, list(c)) for p, c in zip(problems, candidates)]
        cut = [0] * len(out)
        if not self.active:
            return out, cut
        for i, n in enumerate(self.count(out)):
            if n > self.budget:  # type: ignore[operator]
                if self.policy == "error":
                    raise RecipeError(
                        f"generation.agg_fit=error: an aggregation prompt takes {n} tokens, but {self._context_words()}; "
                        "set generation.agg_fit=trim_middle to cut its candidates to fit, or shorten them "
                        "(generation.max_new_tokens, task.agg_max_chars where the task has it)")
                out[i], cut[i] = self._trim(problems[i], list(candidates[i]), n)
                self.trimmed += 1
                self.tokens_cut += cut[i]
        return out, cut

    def _trim(self, problem: dict[str, Any], texts: list[str], n0: int) -> tuple[str, int]:
        """The prompt with every candidate cut to the largest common token cap that fits."""
        budget: int = self.budget  # type: ignore[assignment]
        cands = [_Candidate(t, self.tokenizer) for t in texts]
        lengths = [c.n for c in cands]
        tried: dict[int, tuple[str, int]] = {}

        def build(cap: int) -> tuple[str, int]:
            if cap not in tried:
                prompt = self.task.aggregate_prompt(problem, [c.cut(cap) for c in cands])
                tried[cap] = (prompt, self.count([prompt])[0])
            return tried[cap]

        hi = max(lengths, default=0) - 1  # the largest cap that cuts anything
        if hi < 0 or build(0)[1] > budget:
            raise self._too_small(build(0)[1] if hi >= 0 else n0, len(texts))
        lo = 0  # the largest cap known to fit
        guess = _water_level(lengths, n0 - budget, len(self.tokenizer(MARKER.format(n=max(lengths)),
                                                                       add_special_tokens=False)["input_ids"]))
        if 0 < guess <= hi:
            if build(guess)[1] <= budget:
                lo = guess
            else:
                hi = guess - 1
        while hi - lo > max(2, lo // 64):  # within ~1.5% of the largest cap that fits
            mid = (lo + hi + 1) // 2
            if build(mid)[1] <= budget:
                lo = mid
            else:
                hi = mid - 1
        return build(lo)[0], sum(max(0, n - lo) for n in lengths)


def _water_level(lengths: list[int], excess: int, marker: int) -> int:
    """The largest cap c for which cutting every length above c down to c (each cut adding a
    `marker` of tokens back) removes at least `excess` tokens: a first guess, in candidate tokens."""
    def removed(c: int) -> int:
        return sum(n - c - marker for n in lengths if n > c)

    lo, hi = 0, max(lengths, default=0)
    if removed(0) < excess:
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if removed(mid) >= excess:
            lo = mid
        else:
            hi = mid - 1
    return lo
