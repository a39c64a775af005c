"""Recipes: the YAML that describes one task end to end, validated with pydantic.

A recipe has one section per stage (sft, train_set, train_agg, infer, sweep) plus the task,
the model and the generation settings they share. Defaults follow the SPIRAL paper where it
gives them (N1=8, K=4, n=4, N2=4, temperature 1.0, KL 0). Any field can be overridden from the
command line with `--set section.field=value` (the value is parsed as YAML).
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RecipeError(ValueError):
    """A user mistake in a recipe or an override; the message is one line naming the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskSection(BaseModel):
    """`name` picks the task; every other key is validated by that task's own Config."""

    model_config = ConfigDict(extra="allow")
    name: str = "countdown"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LoraSection(_Section):
    r: int = Field(32, gt=0)
    alpha: int = Field(64, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class ModelSection(_Section):
    # scratch:<preset> | hub id | local directory | registry name (name, name@step, name:tag)
    name: str = "scratch:tiny"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # bf16 autocast for the forward/backward pass; "auto" = on where it is fast (CUDA with bf16, CPU)
    autocast: Literal["auto", "on", "off"] = "auto"
    lora: LoraSection | None = None
    quantization: Literal["none", "4bit", "8bit"] = "none"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    max_seq_len: int = Field(1024, gt=0)  # context of a scratch model; prompt+completion cap otherwise
    device: str = "auto"  # auto | cpu | cuda | cuda:N


class VllmSection(_Section):
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_sleep_mode: bool = False


class GenerationSection(_Section):
    backend: Literal["hf", "vllm"] = "hf"
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = off
    max_new_tokens: int = Field(256, gt=0)  # sequential budget T of a search trace
    agg_max_new_tokens: int = Field(256, gt=0)  # budget of an aggregation trace
    batch_size: int = Field(64, gt=0)  # sequences (prompts x samples) per decoding batch
    # hf backend: sample plain Qwen2 models through spiral's lean forward (same math, ~1.7x faster
    # decoding at small scale on the CPU). auto = on the CPU only (not yet measured on a GPU);
    # on = any device; off = always transformers' forward. true/false mean on/off.
    fast_decode: Literal["auto", "on", "off"] | bool = "auto"
    vllm: VllmSection = VllmSection()


class SftSection(_Section):
    data: str | None = None  # JSONL of {"prompt","completion"}; None = the task's own examples
    num_search_examples: int = Field(20000, ge=0)
    num_aggregate_examples: int = Field(8000, ge=0)
    set_size: int = Field(4, gt=0)  # candidates per aggregation example
    steps: int = Field(1000, gt=0)
    time_budget_minutes: float | None = Field(None, gt=0)  # stop early (and save) after this long
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
    # fraction of the steps trained on search examples alone before the task's aggregation
    # examples join (0 = mixed from the start)
    aggregate_after: float = Field(0.0, ge=0.0, lt=1.0)
    # aggregation examples over the model's OWN sampled candidates (targets from the task's
    # verifier), built when `self_aggregate_after` of the steps are done, then mixed in; 0 = off
    self_aggregate_examples: int = Field(0, ge=0)
    self_aggregate_after: float = Field(0.5, gt=0.0, lt=1.0)


class AggregatorSection(_Section):
    # shared: one policy plays both roles (the paper); frozen: a fixed registry checkpoint
    # aggregates; adapter: a separate LoRA adapter on the same base is trained as aggregator
    mode: Literal["shared", "frozen", "adapter"] = "shared"
    checkpoint: str | None = None


class TrainSetSection(_Section):
    objective: Literal["spiral", "grpo"] = "spiral"
    steps: int = Field(200, gt=0)
    prompts_per_step: int = Field(8, gt=0)
    num_search: int = Field(8, gt=0)  # N1
    num_sets: int = Field(4, gt=0)  # K
    set_size: int = Field(4, gt=0)  # n
    num_aggregations: int = Field(4, gt=0)  # N2 per set
    num_generations: int = Field(12, gt=0)  # G for --objective grpo
    grpo_max_new_tokens: int | None = None  # GRPO's sequential budget (paper: 2x SPIRAL's)
    lr: float = Field(2e-5, gt=0)
    beta: float = Field(0.0, ge=0)  # KL coefficient
    loss_type: Literal["is", "ppo_clip"] = "ppo_clip"
    epsilon_low: float = Field(0.2, ge=0)
    epsilon_high: float = Field(0.28, ge=0)
    loss_aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    scale_std: bool = False
    length_target: int | None = Field(None, gt=0)  # L_target of the length gate; None = off
    dynamic_sampling: bool = True
    max_prompt_draws: int = Field(3, gt=0)  # cap on dynamic sampling, as a multiple of prompts_per_step
    updates_per_batch: int = Field(1, gt=0)
    micro_batch_size: int = Field(16, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    eval_every: int = Field(25, gt=0)
    eval_problems: int = Field(100, ge=0)
    save_every: int = Field(25, gt=0)
    tensorboard: bool = False
    aggregator: AggregatorSection = AggregatorSection()


class TrainAggSection(_Section):
    search_model: str | None = None  # frozen search policy (registry name); None = the model itself
    steps: int = Field(200, gt=0)
    prompts_per_step: int = Field(8, gt=0)
    num_search: int = Field(8, gt=0)
    set_size: int = Field(4, gt=0)
    num_sets: int = Field(4, gt=0)
    num_aggregations: int = Field(4, gt=0)
    balance: bool = False  # balance easy (majority right) and hard (majority wrong) sets
    lr: float = Field(2e-5, gt=0)
    beta: float = Field(0.0, ge=0)
    loss_type: Literal["is", "ppo_clip"] = "ppo_clip"
    epsilon_low: float = Field(0.2, ge=0)
    epsilon_high: float = Field(0.28, ge=0)
    loss_aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    micro_batch_size: int = Field(16, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    eval_every: int = Field(25, gt=0)
    eval_problems: int = Field(100, ge=0)
    save_every: int = Field(25, gt=0)
    tensorboard: bool = False


class InferSection(_Section):
    parallel: int = Field(8, gt=0)  # N search traces per problem
    seq_budget: int | None = Field(None, gt=0)  # T; None = generation.max_new_tokens
    agg_rounds: int = Field(1, ge=0)  # R; 0 = no aggregator
    population: int = Field(8, gt=0)  # RSA population P
    agg_set_size: int = Field(4, gt=0)  # RSA subset size k
    aggregate: Literal["learned", "majority", "none"] = "learned"
    eval_problems: int = Field(200, gt=0)


class SweepSection(_Section):
    parallel: list[int] = [1, 2, 4, 8]
    seq_budget: list[int] = [128, 256]
    agg_rounds: list[int] = [0, 1, 2]
    methods: list[Literal["pass", "majority", "learned"]] = ["pass", "majority", "learned"]
    max_problems: int = Field(100, gt=0)
    seed: int = 0
    baseline: str | None = None  # the model others are compared with (default: the first)


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

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or any(c in v for c in "@:/ "):
            raise ValueError("must be non-empty without '@', ':', '/' or spaces")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        ts = self.train_set
        if ts.set_size > ts.num_search:
            raise ValueError(f"train_set.set_size ({ts.set_size}) must be <= train_set.num_search ({ts.num_search})")
        return self

    def snapshot(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        return recipe_hash(self.snapshot())


def recipe_hash(snapshot: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(snapshot, sort_keys=True).encode()).hexdigest()[:16]


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "recipe"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
        allowed = _allowed_fields(first["loc"][:-1])
        if allowed:
            msg += f" (allowed: {', '.join(allowed)})"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], (dict, list)):
        msg += f" (got {first['input']!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
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
    return sorted(getattr(model, "model_fields", {}).keys())


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], yaml-parsed value)."""
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected FIELD=VALUE, e.g. train_set.lr=1e-5")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise RecipeError(f"override {item!r}: empty field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-5 as a string (it wants 1.0e-5); accept what a user types.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
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
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise RecipeError(f"{p}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{p}: a recipe must be a mapping of sections, got {type(data).__name__}")
        data.setdefault("name", p.stem)
    return recipe_from_dict(apply_overrides(data, overrides or []), where=path)


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
