"""Recipes: the YAML that describes one task end to end, validated with pydantic.

A recipe has one section per stage (sft, train_set, train_agg, infer, sweep) plus the task,
the model and the generation settings they share. Defaults follow the SPIRAL paper where it
gives them (N1=8, K=4, n=4, N2=4, temperature 1.0, KL 0). Any field can be overridden from the
command line with `--set section.field=value` (the value is parsed as YAML).
"""
from __future__ import annotations

import copy
import hashlib
import re
import types
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from spiral_cli.jsonl import canonical_json


class RecipeError(ValueError):
    """A user mistake in a recipe or an override; the message is one line naming the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DEFAULT_TASK = "countdown"


class TaskSection(BaseModel):
    """`name` picks the task; every other key is validated by that task's own Config."""

    model_config = ConfigDict(extra="allow")
    name: str = DEFAULT_TASK

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LoraSection(_Section):
    r: int = Field(32, gt=0)
    alpha: int = Field(64, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


# keys apply_chat_template sets itself (or that change what it returns): never template kwargs
_CHAT_RESERVED = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                            "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                            "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


class ChatTemplateSection(_Section):
    """Prompts through the tokenizer's chat template (models.encode_prompts, the one place prompts
    become token ids: sft, rollouts, infer and sweep alike). auto = when the tokenizer has a
    template (hub instruct models; the scratch byte tokenizer has none and keeps the compact
    format), on = required, off = the raw prompt text."""

    use: Literal["auto", "on", "off"] = "auto"
    system_prompt: str | None = None  # a system message before the prompt (None = none)
    # extra template variables, e.g. {enable_thinking: false} for Qwen3
    kwargs: dict[str, str | int | float | bool | None] = {}

    @field_validator("kwargs")
    @classmethod
    def _no_reserved(cls, v: dict) -> dict:
        bad = sorted(set(v) & _CHAT_RESERVED)
        if bad:
            raise ValueError(f"{', '.join(bad)} cannot be set here (apply_chat_template's own argument)")
        return v


class ModelSection(_Section):
    # scratch:<preset> | hub id | local directory | registry name (name, name@step, name:tag)
    name: str = "scratch:tiny"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # bf16 autocast for the forward/backward pass; "auto" = on for CUDA with bf16; on a CPU, timed
    # at load and on only where faster (models.resolve_autocast, models.measure_cpu_autocast)
    autocast: Literal["auto", "on", "off"] = "auto"
    lora: LoraSection | None = None
    quantization: Literal["none", "4bit", "8bit"] = "none"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    max_seq_len: int = Field(1024, gt=0)  # context of a scratch model; prompt+completion cap otherwise
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # train-set / train-agg under torchrun or accelerate launch: shard the full model over the
    # processes with torch's FSDP2 (fully_shard) instead of DDP; an accelerate FSDP config turns it
    # on too. Full fine-tuning only (no lora, no quantization); one process trains unsharded
    # (docs/scaling.md#fsdp)
    fsdp: bool = False
    chat_template: ChatTemplateSection = ChatTemplateSection()


class VllmServerSection(_Section):
    """generation.backend=vllm_server: sampling from a vLLM server started on its own (`vllm serve`,
    other GPUs or another node), through its OpenAI-compatible HTTP API (docs/scaling.md)."""

    url: str | None = None  # http(s)://host:port of the server (a trailing /v1 is dropped)
    timeout: float = Field(600.0, gt=0)  # seconds one request may take (a whole generation: not streamed)
    retries: int = Field(3, ge=0)  # further tries of a request that found no server or got a 5xx (2, 4, 8 s apart)
    # where LoRA adapters (and full weights) are written for the server to load: a directory the
    # server sees at the same path. None = a temporary directory here (a server on this machine)
    shared_dir: str | None = None
    # at start and after each weight sync: the server's log-probs of a probe vs the model's own
    verify: bool = True

    @field_validator("url")
    @classmethod
    def _url_ok(cls, v: str | None) -> str | None:
        if v is None:
            return None
        from urllib.parse import urlsplit

        u = v.strip().rstrip("/")
        if u.endswith("/v1"):
            u = u[: -len("/v1")]
        try:
            parts = urlsplit(u)
            port = parts.port  # a bad port raises here
        except ValueError:
            parts, port = None, None
        if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
                or parts.path not in ("", "/") or parts.query or parts.fragment):
            raise PydanticCustomError("server_url", "must be the server's address, e.g. http://127.0.0.1:8000")
        del port
        return u


class VllmSection(_Section):
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_sleep_mode: bool = False
    # backend vllm under torchrun / accelerate launch: each group of this many consecutive ranks
    # shares one engine sharded over their devices (vLLM's external launcher); 1 = one engine per
    # rank. Must divide the number of processes; a single process runs 1 (docs/scaling.md)
    tensor_parallel_size: int = Field(1, ge=1)
    server: VllmServerSection = VllmServerSection()  # backend vllm_server only


class GenerationSection(_Section):
    # hf: transformers in this process; vllm: an in-process vLLM engine; vllm_server: a vLLM server
    # started separately (generation.vllm.server.url)
    backend: Literal["hf", "vllm", "vllm_server"] = "hf"
    temperature: float = Field(1.0, ge=0.0)
    # aggregation traces at inference (infer, sweep, compare, the stages' evaluations); None = temperature.
    # RL always samples its aggregations at `temperature`: the policy gradient needs the policy's samples
    agg_temperature: float | None = Field(None, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = off
    max_new_tokens: int = Field(256, gt=0)  # sequential budget T of a search trace
    agg_max_new_tokens: int = Field(256, gt=0)  # budget of an aggregation trace
    # an aggregation prompt longer than the context minus agg_max_new_tokens (prompt_fit.py):
    # trim_middle = cut its longest candidates in the middle, marked "…[N tokens cut]…"; error = stop
    agg_fit: Literal["trim_middle", "error"] = "trim_middle"
    batch_size: int = Field(64, gt=0)  # sequences (prompts x samples) per decoding batch
    # hf backend: sample plain Qwen2 models through spiral's lean forward (same math; generation
    # 0.80 s -> 0.42 s per GRPO step on the CPU, bench/README.md). auto = on the CPU only (not yet
    # measured on a GPU); on = any device; off = always transformers' forward. true/false: on/off.
    fast_decode: Literal["auto", "on", "off"] | bool = "auto"
    # lean engine on the CPU: torch.compile its decoding step (C++ wrapper, fused elementwise work):
    # generation 0.64-0.74x on the 2-core CPU after a one-off 5-16 s compile (bench/README.md), so
    # for long runs; samples differ from the uncompiled step's by bf16 rounding; falls back if it
    # cannot compile
    compile: bool = False
    vllm: VllmSection = VllmSection()

    @model_validator(mode="after")
    def _server_url(self) -> GenerationSection:
        if self.backend == "vllm_server" and not self.vllm.server.url:
            raise PydanticCustomError("server_url", "backend vllm_server needs vllm.server.url, the address of a running "
                                      "vLLM server (e.g. http://127.0.0.1:8000)")
        return self


class SftSection(_Section):
    data: str | None = None  # JSONL of {"prompt","completion"}; None = the task's own examples
    num_search_examples: int = Field(20000, ge=0)
    num_aggregate_examples: int = Field(8000, ge=0)
    set_size: int = Field(4, gt=0)  # candidates per aggregation example
    steps: int = Field(1000, gt=0)
    # a safety net, not a budget: `steps` defines the run. Past this many minutes the run saves,
    # stops and says loudly that its model is not the recipe's (the registry records it)
    time_budget_minutes: float | None = Field(None, gt=0)
    batch_size: int = Field(32, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_len: int = Field(512, gt=0)  # prompt+completion tokens; longer examples are dropped
    save_every: int = Field(200, gt=0)
    eval_problems: int = Field(200, ge=0)
    log_every: int = Field(20, gt=0)
    # torch.compile the training forward: ~1.4x the tokens/s on the CPU after a one-off compile
    # (~60 s on 2 cores), so it pays on runs of minutes, not on short ones; falls back if it cannot run
    compile: bool = False
    # torch.use_deterministic_algorithms while training (transformers' `full_determinism`): a
    # compiled CPU run repeats bit for bit (it did not without); "auto" = on for the CPU, off on CUDA
    full_determinism: Literal["auto", True, False] = "auto"
    # fraction of the steps trained on search examples alone before the task's aggregation
    # examples join (0 = mixed from the start)
    aggregate_after: float = Field(0.0, ge=0.0, lt=1.0)
    # aggregation examples over the model's OWN sampled candidates (targets from the task's
    # verifier), built when `self_aggregate_after` of the steps are done, then mixed in; 0 = off.
    # A list of fractions makes rounds: at each, the examples are built anew from the model of
    # that step and replace the previous round's (its candidates change as it trains)
    self_aggregate_examples: int = Field(0, ge=0)
    self_aggregate_after: float | list[float] = 0.5
    # the share of a round's pool that is its own-candidates examples: the rest is a draw from the
    # other examples (None: all of them). 0.2 is what a 2000-step continuation run with 6,000 such
    # examples over 24,000 others trained on, the path measured in docs/results.md (session 18)
    self_aggregate_share: float | None = Field(None, gt=0.0, lt=1.0)
    # what a round's other examples are drawn from: all the examples (search and the task's
    # aggregation examples), or the search examples alone, so the aggregation a round trains is
    # its own candidates' and its steps are shorter (a task aggregation example is ~3x a search one)
    self_aggregate_others: Literal["all", "search"] = "all"
    # start the learning-rate schedule (warm-up, cosine) again at each self-aggregation round, as
    # a continuation run from the round's model would (warm restarts); the optimizer state is kept
    restart_lr_each_round: bool = False

    @field_validator("self_aggregate_after")
    @classmethod
    def _rounds_in_order(cls, v: float | list[float]) -> float | list[float]:
        fractions = v if isinstance(v, list) else [v]
        if not fractions or any(not 0.0 < f < 1.0 for f in fractions):
            raise ValueError("one fraction or a list of them, each strictly between 0 and 1")
        if any(b <= a for a, b in zip(fractions, fractions[1:])):
            raise ValueError("the rounds' fractions must increase")
        return v

    @model_validator(mode="after")
    def _round_options_need_rounds(self) -> SftSection:
        if not self.self_aggregate_examples:
            for name, on in (("self_aggregate_share", self.self_aggregate_share is not None),
                             ("self_aggregate_others", self.self_aggregate_others != "all"),
                             ("restart_lr_each_round", self.restart_lr_each_round)):
                if on:
                    raise ValueError(f"sft.{name} acts on self-aggregation rounds: set sft.self_aggregate_examples too")
        if self.self_aggregate_others == "search" and not self.num_search_examples and not self.data:
            raise ValueError("sft.self_aggregate_others=search draws from the search examples: sft.num_search_examples is 0")
        return self

    def self_aggregate_rounds(self) -> list[float]:
        """The fractions of the steps at which the self-aggregation examples are (re)built."""
        return list(self.self_aggregate_after) if isinstance(self.self_aggregate_after, list) else [self.self_aggregate_after]


class AggregatorSection(_Section):
    # shared: one policy plays both roles (the paper); frozen: a fixed registry checkpoint
    # aggregates; adapter: a separate LoRA adapter on the same base is trained as aggregator
    mode: Literal["shared", "frozen", "adapter"] = "shared"
    checkpoint: str | None = None


# TRL's GRPOConfig.loss_type names for the normalisations spiral has: each maps to our
# loss_aggregation with the ppo_clip ratio form, so a TRL user's config means what it meant there.
# bnpo and dapo both divide by the token count; spiral always counts the whole step's batch, which
# is dapo's normaliser (bnpo's local count equals it when the batch is not split).
TRL_LOSS_TYPES = {"grpo": "seq_mean", "bnpo": "token_mean", "dapo": "token_mean", "dr_grpo": "dr_grpo"}
ScaleRewards = Literal["group", "batch", "none"]


def _trl_names(data: Any, handler, *, deprecated_scale_std: bool):
    """Map TRL's spellings (and the deprecated `scale_std`) onto the canonical fields before
    validation, so snapshots and hashes only ever hold the canonical form."""
    notes: list[str] = []
    if isinstance(data, dict):
        data = dict(data)
        if deprecated_scale_std and "scale_std" in data:
            old = data.pop("scale_std")
            if not isinstance(old, bool):
                raise PydanticCustomError("scale_std", "scale_std: must be true or false (got {old})", {"old": repr(old)})
            mapped = "group" if old else "none"
            if data.get("scale_rewards") not in (None, mapped, old):
                raise PydanticCustomError(
                    "scale_std", "scale_std ({old}) contradicts scale_rewards ({new}): set scale_rewards only",
                    {"old": str(old).lower(), "new": repr(data["scale_rewards"])})
            data["scale_rewards"] = mapped
            notes.append(f"scale_std is deprecated: use scale_rewards: {mapped} (TRL's name)")
        if isinstance(data.get("scale_rewards"), bool):  # TRL accepts True/False too
            data["scale_rewards"] = "group" if data["scale_rewards"] else "none"
        _trl_importance_sampling(data)
        lt = data.get("loss_type")
        if isinstance(lt, str) and lt not in ("is", "ppo_clip"):
            if lt not in TRL_LOSS_TYPES:
                raise PydanticCustomError(
                    "loss_type", "loss_type: {lt} is not supported; use is | ppo_clip, or TRL's {trl}",
                    {"lt": repr(lt), "trl": " | ".join(TRL_LOSS_TYPES)})
            agg = TRL_LOSS_TYPES[lt]
            if data.get("loss_aggregation", agg) != agg:
                raise PydanticCustomError(
                    "loss_type", "loss_type {lt} means loss_aggregation {agg}, not {got}: set one of the two",
                    {"lt": lt, "agg": agg, "got": data["loss_aggregation"]})
            data["loss_type"], data["loss_aggregation"] = "ppo_clip", agg
    section = handler(data)
    if notes:
        section._deprecations = notes
    return section


def _trl_importance_sampling(data: dict) -> None:
    """TRL's later spellings of the sampler-mismatch fields, in place: `vllm_importance_sampling_clip_max`
    (TRL >= 1.6) is our cap, and `vllm_importance_sampling_mode` may only name the mode spiral has,
    token_truncate (dropped: the snapshot holds the canonical form)."""
    mode = data.pop("vllm_importance_sampling_mode", "token_truncate")
    if mode != "token_truncate":
        raise PydanticCustomError(
            "vllm_importance_sampling_mode", "vllm_importance_sampling_mode: {mode} is not implemented; spiral "
            "applies token_truncate (per-token weight, truncated at vllm_importance_sampling_cap)", {"mode": repr(mode)})
    if "vllm_importance_sampling_clip_max" in data:
        clip_max = data.pop("vllm_importance_sampling_clip_max")
        if data.get("vllm_importance_sampling_cap", clip_max) != clip_max:
            raise PydanticCustomError(
                "vllm_importance_sampling_cap", "vllm_importance_sampling_clip_max ({new}) contradicts "
                "vllm_importance_sampling_cap ({old}): set one of the two", {"new": clip_max,
                                                                           "old": data["vllm_importance_sampling_cap"]})
        data["vllm_importance_sampling_cap"] = clip_max


class _RLSection(_Section):
    """What `train_set` and `train_agg` share: the step, budget, set shape, loss, optimiser and
    bookkeeping fields (docs/method.md). TRL's spellings are accepted where spiral's names differ
    (`_trl_names`)."""

    _accepts_scale_std: ClassVar[bool] = False  # the deprecated alias predates train_agg's field
    steps: int = Field(200, gt=0)  # a cap: the run ends at `steps` or `max_generated_tokens`, first reached
    # training budget in generated tokens (all ranks, search + aggregation); the run stops after the
    # optimizer step that reaches it. None = off. Give a SPIRAL run and its GRPO twin the same value.
    max_generated_tokens: int | None = Field(None, gt=0)
    prompts_per_step: int = Field(8, gt=0)
    num_search: int = Field(8, gt=0)  # N1
    num_sets: int = Field(4, gt=0)  # K
    set_size: int = Field(4, gt=0)  # n
    num_aggregations: int = Field(4, gt=0)  # N2 per set
    lr: float = Field(2e-5, gt=0)
    beta: float = Field(0.0, ge=0)  # KL coefficient
    # ratio form; TRL's loss_type names (grpo, bnpo, dapo, dr_grpo) are accepted and mapped to
    # ppo_clip + their loss_aggregation (TRL_LOSS_TYPES)
    loss_type: Literal["is", "ppo_clip"] = "ppo_clip"
    epsilon_low: float = Field(0.2, ge=0)
    epsilon_high: float = Field(0.28, ge=0)
    # token_mean = TRL's dapo/bnpo, seq_mean = TRL's grpo, dr_grpo = Dr. GRPO's constant normaliser
    loss_aggregation: Literal["token_mean", "seq_mean", "dr_grpo"] = "token_mean"
    # TRL's scale_rewards: divide advantages by the group's std, the step batch's std, or not at
    # all; None = the stage's default (`effective_scale_rewards`)
    scale_rewards: ScaleRewards | None = None
    # sampler-mismatch correction (TRL's names and defaults; docs/method.md, "Sampler mismatch"):
    # each token's loss is weighted by min(exp(logp_trainer - logp_sampler), cap). On for both
    # backends: the mismatch follows the precision, not the backend (bf16 hf ~ bf16 vLLM, fp32 ~1e-6
    # for both, where the weight is 1); the mismatch metrics are logged either way
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_cap: float = Field(2.0, gt=0)  # TRL's token_truncate default
    micro_batch_size: int = Field(16, gt=0)
    # torch.compile the policy's training forward at the first update (single process, one adapter);
    # on the CPU under deterministic algorithms. Pays on long runs only: ~20% off the update on an AMX
    # CPU after a one-off 30-80 s compile (bench/README.md)
    compile: bool = False
    # each distinct prompt of a micro-batch forward once, its keys/values shared by the rows that
    # continue it (GRPO's num_generations, SPIRAL's N1 searches and N2 aggregations per set): the
    # same log-probs and gradients, the prompts' share of the update once per prompt. Where the
    # model allows it (a single process, sdpa attention, full-attention layers, positions from
    # position_ids, no gradient checkpointing: rl/update._shared_prefix_blocker); measured in
    # bench/README.md, session 31. Off: one prompt + completion row per sample
    shared_prefix: bool = True
    max_grad_norm: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    eval_every: int = Field(25, gt=0)
    # evaluate each time the generated training tokens pass a multiple of this, instead of every
    # `eval_every` steps: SPIRAL and GRPO runs are then evaluated at the same token counts
    eval_every_tokens: int | None = Field(None, gt=0)
    eval_problems: int = Field(100, ge=0)
    save_every: int = Field(25, gt=0)
    tensorboard: bool = False
    _deprecations: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _trl_aliases(cls, data: Any, handler):
        return _trl_names(data, handler, deprecated_scale_std=cls._accepts_scale_std)

    @property
    def deprecations(self) -> list[str]:
        """One-line notes about deprecated keys this section was loaded with (the CLI prints them)."""
        return list(self._deprecations)


class TrainSetSection(_RLSection):
    """Set RL (or GRPO). scale_rewards None = by objective: "group" for grpo (TRL's default),
    "none" for spiral (the paper's); the deprecated `scale_std: true/false` loads as group/none."""

    _accepts_scale_std: ClassVar[bool] = True
    objective: Literal["spiral", "grpo"] = "spiral"
    num_generations: int = Field(12, gt=0)  # G for --objective grpo (TRL's name)
    # GRPO's sequential budget; None = 2 x generation.max_new_tokens, the paper's compute matching
    # (12 x 2T = SPIRAL's 8T + 16T)
    grpo_max_new_tokens: int | None = Field(None, gt=0)
    length_target: int | None = Field(None, gt=0)  # L_target of the length gate; None = off
    dynamic_sampling: bool = True
    max_prompt_draws: int = Field(3, gt=0)  # cap on dynamic sampling, as a multiple of prompts_per_step
    updates_per_batch: int = Field(1, gt=0)
    aggregator: AggregatorSection = AggregatorSection()

    @property
    def effective_scale_rewards(self) -> str:
        return self.scale_rewards or ("group" if self.objective == "grpo" else "none")


class TrainAggSection(_RLSection):
    search_model: str | None = None  # frozen search policy (registry name); None = the model itself
    balance: bool = False  # balance easy (majority right) and hard (majority wrong) sets

    @property
    def effective_scale_rewards(self) -> str:
        # the aggregation advantage r - f_i divided by the std of r within its set ("group"), over
        # the step's batch ("batch"), or not at all: "none" by default, the paper's
        return self.scale_rewards or "none"


class InferSection(_Section):
    parallel: int = Field(8, gt=0)  # N search traces per problem
    seq_budget: int | None = Field(None, gt=0)  # T; None = generation.max_new_tokens
    agg_rounds: int = Field(1, ge=0)  # R; 0 = no aggregator
    population: int = Field(8, gt=0)  # RSA population P
    agg_set_size: int = Field(4, gt=0)  # RSA subset size k
    aggregate: Literal["learned", "majority", "none"] = "learned"
    eval_problems: int = Field(200, gt=0)
    # a separate aggregator checkpoint (registry name or path): the two-model form of
    # docs/method.md, search by --model and aggregation by this one; None = the model aggregates
    # its own traces (the paper's experiments)
    aggregator: str | None = None


class SweepSection(_Section):
    parallel: list[int] = [1, 2, 4, 8]
    seq_budget: list[int] = [128, 256]
    agg_rounds: list[int] = [0, 1, 2]
    methods: list[Literal["pass", "majority", "learned"]] = ["pass", "majority", "learned"]
    max_problems: int = Field(100, gt=0)
    seed: int = 0
    baseline: str | None = None  # the model others are compared with (default: the first)


class CompareSection(_Section):
    """`spiral compare`: SPIRAL and GRPO arms per seed at one budget of generated training tokens
    (`train_set.max_generated_tokens`), swept on a grid cheaper than `sweep`'s (every arm is swept)."""

    seeds: int = Field(3, gt=0)
    problems: int = Field(500, gt=0)  # held-out problems of the sweep
    parallel: list[int] = [1, 2, 4, 8]
    seq_budget: list[int] | None = None  # None = the largest of sweep.seq_budget
    agg_rounds: list[int] = [0, 1]


class Recipe(_Section):
    name: str = "recipe"
    seed: int = 0
    task: TaskSection = TaskSection()
    model: ModelSection = ModelSection()
    generation: GenerationSection = GenerationSection()
    sft: SftSection = SftSection()
    train_set: TrainSetSection = TrainSetSection()
    train_agg: TrainAggSection = TrainAggSection()
    infer: InferSection = InferSection()
    sweep: SweepSection = SweepSection()
    compare: CompareSection = CompareSection()

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or any(c in v for c in "@:/ "):
            raise ValueError("must be non-empty without '@', ':', '/' or spaces")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        ts = self.train_set
        if ts.set_size > ts.num_search:
            raise ValueError(f"train_set.set_size ({ts.set_size}) must be <= train_set.num_search ({ts.num_search})")
        return self

    def snapshot(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        return recipe_hash(self.snapshot())


MISSING: Any = object()  # snapshot_differences' value for a field one snapshot lacks


def snapshot_differences(old: dict[str, Any], new: dict[str, Any],
                         ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """(dotted field, old value, new value) for every leaf where two recipe snapshots differ, in
    field order, skipping each field of `ignore` and everything under it (a section); a field one
    snapshot lacks has the value MISSING there."""
    a, b = _flat(old or {}), _flat(new or {})
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == f or key.startswith(f + ".") for f in ignore):
            continue
        va, vb = a.get(key, MISSING), b.get(key, MISSING)
        if va != vb:
            out.append((key, va, vb))
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def grpo_budget(recipe: Recipe) -> int:
    """GRPO's sequential budget: `grpo_max_new_tokens`, by default 2T, the paper's compute matching
    (G = 12 traces of 2T generate at most what SPIRAL's 8 search traces of T and 16 aggregations do)."""
    return recipe.train_set.grpo_max_new_tokens or 2 * recipe.generation.max_new_tokens


def recipe_hash(snapshot: dict[str, Any] | None) -> str | None:
    """First 16 hex digits of the sha256 of a recipe snapshot's canonical JSON (key order ignored):
    the hash the registry stores, sweep and compare report."""
    if snapshot is None:
        return None
    return hashlib.sha256(canonical_json(snapshot).encode("utf-8")).hexdigest()[:16]


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "recipe"
    msg = first["msg"].removeprefix("Value error, ")  # our validators' messages are whole sentences
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
        allowed = _allowed_fields(first["loc"][:-1])
        if allowed:
            msg += f" (allowed: {', '.join(allowed)})"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], (dict, list)):
        msg += f" (got {first['input']!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    if msg.startswith(f"{loc}."):  # a section's validator that names the field itself
        return f"{msg}{more}"
    return f"{loc}: {msg}{more}"


def _allowed_fields(loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        # unwrap Optional[Section]
        args = getattr(ann, "__args__", None)
        if args:
            ann = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        model = ann
    fields = set(getattr(model, "model_fields", {}))
    return sorted(fields | {"extends"} if not loc else fields)  # `extends` is read before validation


class _CoreLoader(yaml.SafeLoader):
    """YAML with the YAML 1.2 core schema's scalars: only true/false are booleans (on, off, yes,
    no, y, n stay strings, so `autocast: off` means "off"), integers are decimal, 0o or 0x (010
    is ten, not eight), 1e-5 is a float, and there are no sexagesimals (1:30) or dates."""


_CoreLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                           "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_CoreLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_CoreLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_CoreLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _core_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    v = loader.construct_scalar(node)
    if v.startswith("0o"):
        return int(v[2:], 8)
    if v.startswith("0x"):
        return int(v[2:], 16)
    return int(v, 10)


def _core_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    v = loader.construct_scalar(node).lower()
    if v.endswith(".inf"):
        return float("-inf") if v.startswith("-") else float("inf")
    if v == ".nan":
        return float("nan")
    return float(v)


_CoreLoader.add_constructor("tag:yaml.org,2002:int", _core_int)
_CoreLoader.add_constructor("tag:yaml.org,2002:float", _core_float)


def yaml_load(text: str) -> Any:
    """Parse YAML text with the core schema (see `_CoreLoader`): recipes and --set values alike."""
    return yaml.load(text, Loader=_CoreLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML with the core schema: only
    true/false are booleans, so `model.autocast=off` is the string "off")."""
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected FIELD=VALUE, e.g. train_set.lr=1e-5")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise RecipeError(f"override {item!r}: empty field name")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def _leaf_types(annotation: Any) -> set[type]:
    """The scalar types a field annotation accepts (Literal values by their type)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return {type(a) for a in get_args(annotation)}
    if origin in (Union, types.UnionType):
        return set().union(*(_leaf_types(a) for a in get_args(annotation)))
    if isinstance(annotation, type):
        return {annotation}
    return {object}  # containers and anything else: leave the parsed value alone


def field_annotation(model: Any, path: list[str]) -> Any:
    """The annotation of the field at `path` under a pydantic model class, or None if unknown."""
    ann: Any = None
    for part in path:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        ann = fields[part].annotation
        args = [a for a in (get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = args[0] if args else None
    return ann


def coerce_text_field(annotation: Any, value: Any, raw: str) -> Any:
    """A scalar YAML read as a number or boolean goes to a text-only field (a name, a path, a
    string enum) as the text the user typed: `--set name=1e3` is "1e3", `--set sft.data=2024` "2024"."""
    if annotation is None or isinstance(value, (str, dict, list)) or value is None:
        return value
    leaves = _leaf_types(annotation)
    if str not in leaves or leaves & {int, float, bool, object}:
        return value
    if isinstance(value, bool) and not _plain_str(annotation):
        return value  # true/false on a string enum: its validator may map them (scale_rewards)
    return raw.strip()


def _plain_str(annotation: Any) -> bool:
    """Whether `str` itself (not only string Literals) is among the types the annotation accepts."""
    if annotation is str:
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_plain_str(a) for a in get_args(annotation))
    return False


def _task_config(data: dict[str, Any]) -> Any:
    task = data.get("task") if isinstance(data.get("task"), dict) else {}
    try:
        from spiral_cli.tasks import resolve_task_class

        return resolve_task_class(task.get("name", DEFAULT_TASK)).Config
    except Exception:  # noqa: BLE001 - an unknown task is reported by the validation
        return None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        raw = item.split("=", 1)[1]
        if path[0] == "task" and len(path) == 2:
            value = coerce_text_field(field_annotation(_task_config(data), path[1:]), value, raw)
        else:
            value = coerce_text_field(field_annotation(Recipe, path), value, raw)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; RecipeError (one line) on any user mistake."""
    data: dict[str, Any] = {}
    where: str | Path | None = path
    if path is not None:
        bases: list[str] = []
        data = _read_recipe_file(Path(path), chain=(), bases=bases)
        data.setdefault("name", Path(path).stem)
        if bases:  # a field's value may come from a base file: name them
            where = f"{path} (extends {' -> '.join(bases)})"
    return recipe_from_dict(apply_overrides(data, overrides or []), where=where)


def _read_recipe_file(p: Path, chain: tuple[Path, ...], bases: list[str]) -> dict[str, Any]:
    """A recipe file's mapping, with `extends: other.yaml` (relative to the file) resolved: the
    other recipe's sections, then this file's fields over them, section by section."""
    if p.is_dir():
        raise RecipeError(f"recipe {p} is a directory, not a YAML file")
    if not p.is_file():
        raise RecipeError(f"recipe file not found: {p}" + (f" (extended by {chain[-1]})" if chain else ""))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise RecipeError(f"{p}: line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save it as UTF-8") from None
    except OSError as e:
        raise RecipeError(f"recipe {p} cannot be read ({e.strerror or e})") from None
    try:
        data = yaml_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{p}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe must be a mapping of sections, got {type(data).__name__}")
    if "extends" not in data:
        return data
    base_name = data.pop("extends")
    if not isinstance(base_name, str) or not base_name.strip():
        raise RecipeError(f"{p}: extends: expected the path of another recipe file, got {base_name!r}")
    base_path, chain = (p.parent / base_name).resolve(), (*chain, p.resolve())
    if base_path in chain:
        raise RecipeError(f"{p}: extends: {base_name} extends this recipe again (a cycle)")
    bases.append(base_name)
    base = _read_recipe_file(base_path, chain, bases)
    base.pop("name", None)  # a recipe is named by its own file (or its own `name:`)
    return _merge_sections(base, data)


def _merge_sections(base: dict[str, Any], over: dict[str, Any], top: bool = True) -> dict[str, Any]:
    """`over`'s fields over `base`'s, mappings merged key by key, lists and values replaced. A task
    section naming another task replaces the base's whole: its options belong to the other task."""
    out = dict(base)
    for key, value in over.items():
        other_task = top and key == "task" and isinstance(value, dict) and isinstance(base.get(key), dict) \
            and value.get("name", DEFAULT_TASK) != base[key].get("name", DEFAULT_TASK)
        if isinstance(value, dict) and isinstance(base.get(key), dict) and not other_task:
            out[key] = _merge_sections(base[key], value, top=False)
        else:
            out[key] = value
    return out


def recipe_from_dict(data: dict[str, Any], where: str | Path | None = None) -> Recipe:
    """Validate a recipe mapping (a file's, or a checkpoint's snapshot); RecipeError on mistakes."""
    prefix = f"{where}: " if where else ""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(prefix + _format_validation_error(e)) from None
    _check_task_options(recipe, where)
    return recipe


def _check_task_options(recipe: Recipe, path: str | Path | None) -> None:
    """Validate the task section with the task's own Config, so typos fail at load time."""
    from spiral_cli.tasks import TaskError, load_task

    try:
        load_task(recipe.task.name, recipe.task.options())
    except TaskError as e:
        where = f"{path}: " if path else ""
        raise RecipeError(where + str(e)) from None
