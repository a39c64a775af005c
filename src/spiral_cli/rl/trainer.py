"""The RL loop of `spiral train-set` (SPIRAL set RL or GRPO) and `spiral train-agg`.

Read top to bottom, one optimizer step is:
    1. draw prompts (dynamic sampling: keep drawing until enough carry a non-zero advantage)
    2. roll out: generate, score, attach advantages            (rollout.py, advantages.py)
    3. update: micro-batched policy-gradient loss, one optimizer step per pass  (update.py, loss.py)
    4. tell the generator about the new weights (vLLM), log, evaluate, checkpoint      (run_io.py)

The run ends at `steps` or, with `max_generated_tokens`, after the step whose rollouts bring the
generated tokens (all ranks) to the budget, whichever comes first; the last step evaluates,
saves and registers like any final step.

Exact resume: the run's state (model, optimizer, scheduler, step, data cursor, token counters)
is written atomically every `save_every` steps; the randomness of step s is derived from
(seed, s, rank), so a resumed run replays exactly what an uninterrupted one would have done.
Rank-aware: every process draws its own prompts (dynamic sampling draws in rounds all ranks take
together, so the data cursor stays one number), accelerate reduces the gradients, and only
the main process writes checkpoints, the registry and the metrics file. Under FSDP (rl/fsdp.py)
the policy is sharded instead: sampling, evaluation and the generator's sync run on unsharded
weights, the update on equal micro-batch counts, checkpoints from gathered state dicts.
"""
from __future__ import annotations

import hashlib
import math
import random
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from spiral_cli.checkpoints import (
    ModelRef,
    clean_leftovers,
    load_trainer_state,
    prepare_run,
    resolve_model,
)
from spiral_cli.evaluate import evaluate_recipe
from spiral_cli.generation import close_generator, make_generator
from spiral_cli.generation.base import Completion
from spiral_cli.generation.roles import (
    AGGREGATOR_ADAPTER,
    SEARCH_ADAPTER,
    add_aggregator_adapter,
    attach_aggregator,
    for_aggregation,
    has_aggregator_adapter,
)
from spiral_cli.optim import adamw, full_determinism, resolve_full_determinism
from spiral_cli.paths import runs_dir
from spiral_cli.processes import (
    all_sum,
    check_shared_home,
    end_processes,
    is_main,
    make_accelerator,
    rank_world,
    share_failure,
)
from spiral_cli.progress import fmt_duration
from spiral_cli.recipe import Recipe, RecipeError, grpo_budget
from spiral_cli.registry import Registry
from spiral_cli.rl import fsdp as fsdp_
from spiral_cli.rl.rollout import (
    PromptRollout,
    RolloutConfig,
    grpo_rollouts,
    scale_batch,
    spiral_rollouts,
)
from spiral_cli.rl.run_io import (
    RLSpec,
    RunState,
    _budget_met,
    _checkpoint,
    _eval_due,
    _log,
    _register_missing,
    _step_metrics,
    _tensorboard,
    _truncate_metrics,
    _write_curves,
)
from spiral_cli.rl.update import (
    _compile_applies,
    _CompiledForward,
    _update,
    sampler_correction,
    shared_prefix_applies,
)
from spiral_cli.tasks import load_task

MAX_TRAIN_POOL = 50_000  # training problems drawn up front; a longer run sees them again


# ---------------------------------------------------------------- timing of generation vs scoring


class TimedGenerator:
    """Wraps a generator to measure generation seconds and tokens separately from scoring."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0

    def generate(self, prompts, **kw) -> list[list[Completion]]:
        t = time.perf_counter()
        try:
            return self.inner.generate(prompts, **kw)
        finally:
            self.seconds += time.perf_counter() - t

    def update_weights(self, model) -> None:
        self.inner.update_weights(model)


# ---------------------------------------------------------------- a saved run's layout


def _check_saved_layout(saved: dict[str, Any] | None, fsdp: bool, state_dir: Path) -> None:
    """The optimizer state of an FSDP run is keyed by parameter name, a DDP run's by position: a
    run resumes the way it started."""
    if saved is None or bool(saved.get("fsdp")) == fsdp:
        return
    how = ("under FSDP: resume it under FSDP (several processes, model.fsdp or the accelerate FSDP config)"
           if saved.get("fsdp") else "without FSDP: resume it without (no model.fsdp, no accelerate FSDP config)")
    raise RecipeError(f"the run's state in {state_dir} was saved {how}, or give --name NEW to start a new run")


def run_train_set(recipe: Recipe, *, home: Path, name: str | None = None, model: str | None = None,
                  console: Console | None = None) -> dict[str, Any]:
    ts = recipe.train_set
    gen = recipe.generation
    grpo = ts.objective == "grpo"
    stage = "grpo" if grpo else "set"
    name = name or f"{recipe.name}-{stage}"
    prepare_run(recipe, home=home, name=name, stage=stage, model_ref=model or f"{recipe.name}-sft",
                also_resolve=(ts.aggregator.checkpoint if ts.aggregator.mode == "frozen" else None,))
    rcfg = RolloutConfig(
        num_search=ts.num_generations if grpo else ts.num_search,
        num_sets=ts.num_sets, set_size=ts.set_size, num_aggregations=ts.num_aggregations,
        max_new_tokens=grpo_budget(recipe) if grpo else gen.max_new_tokens,
        agg_max_new_tokens=gen.agg_max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
        top_k=gen.top_k, scale_rewards=ts.effective_scale_rewards, length_target=ts.length_target, agg_fit=gen.agg_fit,
    )
    if grpo:
        def collect(task, policy_gen, agg_gen, problems, rng, seed):
            return grpo_rollouts(task, policy_gen, problems, rcfg, seed)
    else:
        frozen_aggregator = ts.aggregator.mode == "frozen"  # its aggregations score sets, never train

        def collect(task, policy_gen, agg_gen, problems, rng, seed):
            return spiral_rollouts(task, policy_gen, agg_gen, problems, rcfg, rng, seed,
                                   train_aggregate=not frozen_aggregator)
    spec = RLSpec(stage=stage, name=name, section=ts, collect=collect, scale_rewards=rcfg.scale_rewards,
                  dynamic_sampling=ts.dynamic_sampling, max_prompt_draws=ts.max_prompt_draws,
                  updates_per_batch=ts.updates_per_batch, aggregator_mode=ts.aggregator.mode)
    return _run(recipe, spec, home=home, model_ref=model or f"{recipe.name}-sft", console=console)


def run_train_agg(recipe: Recipe, *, home: Path, name: str | None = None, model: str | None = None,
                  console: Console | None = None) -> dict[str, Any]:
    ta = recipe.train_agg
    gen = recipe.generation
    name = name or f"{recipe.name}-agg"
    prepare_run(recipe, home=home, name=name, stage="agg", model_ref=model or f"{recipe.name}-sft",
                also_resolve=(ta.search_model,))
    rcfg = RolloutConfig(
        num_search=ta.num_search, num_sets=ta.num_sets, set_size=ta.set_size, num_aggregations=ta.num_aggregations,
        max_new_tokens=gen.max_new_tokens, agg_max_new_tokens=gen.agg_max_new_tokens,
        temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k, balance=ta.balance, agg_fit=gen.agg_fit,
        scale_rewards=ta.effective_scale_rewards,
    )

    def collect(task, policy_gen, search_gen, problems, rng, seed):
        # the policy is the aggregator here; search traces come from the frozen search policy
        return spiral_rollouts(task, search_gen, policy_gen, problems, rcfg, rng, seed, train_search=False)

    spec = RLSpec(stage="agg", name=name, section=ta, collect=collect, scale_rewards=rcfg.scale_rewards)
    return _run(recipe, spec, home=home, model_ref=model or f"{recipe.name}-sft", console=console,
                frozen_search_ref=ta.search_model)


# ---------------------------------------------------------------- the loop


@dataclass
class RLRun:
    """What the RL loop needs, built by `_setup_rl`."""

    recipe: Recipe
    spec: RLSpec
    home: Path
    registry: Registry
    task: Any
    start_ref: ModelRef
    run_dir: Path
    state_dir: Path
    loaded: Any  # LoadedModel of the policy, training mode
    model: Any  # the policy's module (DDP-wrapped in a multi-process run)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    accelerator: Any  # None in a single process
    rank: int
    world: int
    adapter_roles: dict[str, str] | None
    generator: Any  # the policy's sampler (evaluation uses it as is: both roles)
    policy_gen: TimedGenerator  # samples the role being trained
    other_gen: TimedGenerator | None  # a frozen model, or the aggregator adapter, for the other role
    ref_model: Any  # KL reference: None, "adapter-disabled" or a frozen model
    state: RunState
    resumed: bool  # the state came from a saved run
    budget: int | None  # max_generated_tokens
    train_pool: list[dict[str, Any]]
    eval_problems: list[dict[str, Any]]
    compiled: Any  # _CompiledForward | None
    tb: Any  # tensorboard writer | None
    console: Console
    fsdp: bool = False  # the policy is sharded with FSDP2 (rl/fsdp.py)
    shared_prefix: bool = False  # micro-batches laid out with shared prefixes (train_set.shared_prefix)
    prompt_cache: dict[str, list[int]] = field(default_factory=dict)

    @property
    def second_gen(self) -> TimedGenerator:
        return self.other_gen or self.policy_gen

    @property
    def main(self) -> bool:
        return is_main(self.accelerator)

    def sampling_weights(self) -> AbstractContextManager:
        """Under FSDP: the policy unsharded on every rank for the block (sampling, evaluation, the
        generator's sync), so decoding runs no collective. Entered by all ranks together."""
        return fsdp_.full_weights(self.loaded.model) if self.fsdp else nullcontext()


def _run(recipe: Recipe, spec: RLSpec, *, home: Path, model_ref: str, console: Console | None,
         frozen_search_ref: str | None = None) -> dict[str, Any]:
    run = _setup_rl(recipe, spec, home=home, model_ref=model_ref, console=console or Console(stderr=True),
                    frozen_search_ref=frozen_search_ref)
    result = _train(run, recipe, spec)
    end_processes(run.accelerator)  # on success only: a failed rank may have left the others in a collective
    return result


def _train(run: RLRun, recipe: Recipe, spec: RLSpec) -> dict[str, Any]:
    """The loop: rollouts, update, sync, log, evaluate and save, until the steps or the token budget."""
    state, sec = run.state, spec.section
    if not run.resumed and run.eval_problems:
        _evaluate_on_main(run)
    else:
        _join_generation(run)
    run.model.train()
    correction = sampler_correction(recipe, sec)
    loop_start = (time.perf_counter(), state.step, state.generated_tokens)  # for the ETA
    # a compiled update on the CPU runs under deterministic algorithms, as sft.full_determinism's
    # "auto" (optim.py): else the compiled embedding gradient's atomic adds make reruns drift apart
    deterministic = run.compiled is not None and resolve_full_determinism("auto", run.loaded.device.type)
    while state.step < sec.steps and not _budget_met(state, run.budget):
        step_seed = derive_seed(recipe.seed, state.step, run.rank)
        rng = random.Random(step_seed)
        tokens_before = state.generated_tokens
        t_step = time.perf_counter()
        # 1-2. rollouts with dynamic sampling
        with run.sampling_weights():
            kept, drawn, gen_seconds, rollout_seconds = _collect(run, rng, step_seed)
        # 3. update
        t_upd = time.perf_counter()
        samples = [s for r in kept for s in r.samples]
        with full_determinism(deterministic):  # the compile (in the first update) and every update it serves
            loss_stats = _update(run.model, run.ref_model, run.optimizer, run.scheduler, samples, sec, run.loaded,
                                 run.prompt_cache, run.accelerator, run.adapter_roles, run.compiled,
                                 passes=spec.updates_per_batch, correction=correction, fsdp=run.fsdp,
                                 shared_prefix=run.shared_prefix)
        update_seconds = time.perf_counter() - t_upd
        # 4. the generator samples from the new weights
        t_sync = time.perf_counter()
        with run.sampling_weights():
            run.policy_gen.update_weights(run.loaded.model)
        sync_seconds = time.perf_counter() - t_sync
        state.step += 1
        last = state.step == sec.steps or _budget_met(state, run.budget)

        state.steps_without_signal += not kept
        row = _step_metrics(state, kept, drawn, loss_stats, {
            "generation": gen_seconds, "scoring": rollout_seconds - gen_seconds,
            "update": update_seconds, "sync": sync_seconds, "total": time.perf_counter() - t_step,
        })
        if (_eval_due(sec, state, tokens_before) or last) and run.eval_problems:
            if (point := _evaluate_on_main(run)) is not None:
                row["eval"] = point
        else:
            _join_generation(run)
        if run.main:
            _log(run.run_dir / "metrics.jsonl", row, run.tb)
            _print_step(run, row, kept, drawn, loop_start)
        if state.step % sec.save_every == 0 or last:
            _checkpoint(recipe, spec, run.loaded, run.optimizer, run.scheduler, state, run.registry, run.home,
                        run.state_dir, run.start_ref, run.accelerator, fsdp=run.fsdp)

    close_generator(run.generator)
    final = run.registry.latest(spec.name)
    if run.main:
        _warn_no_signal(run.console, spec, state)
    return {"name": spec.name, "stage": spec.stage, "steps": state.step,
            "generated_tokens": state.generated_tokens, "total_tokens": state.total_tokens,
            "steps_without_signal": state.steps_without_signal,
            "stopped_on": "token_budget" if _budget_met(state, run.budget) else "steps",
            "path": str(final.path) if final else None, "history": state.history}


def _setup_rl(recipe: Recipe, spec: RLSpec, *, home: Path, model_ref: str, console: Console,
              frozen_search_ref: str | None) -> RLRun:
    """The policy (from the run's state when resuming), its optimizer and generators, the frozen
    models a stage needs, the resumed run state, the problem pools. The order of the seeded steps
    is the order they consume randomness in: keep it."""
    from spiral_cli.models import count_parameters, load_model

    sec = spec.section
    registry = Registry(home)
    task = load_task(recipe.task.name, recipe.task.options())
    start_ref: ModelRef = resolve_model(model_ref, registry)
    run_dir = runs_dir(home) / spec.name
    state_dir = run_dir / "state"
    clean_leftovers(home, spec.name, run_dir)
    resuming = (state_dir / "trainer_state.pt").is_file()

    # -- models: the policy (trained), and optionally a frozen aggregator or search policy
    fsdp = fsdp_.fsdp_requested(recipe)
    if fsdp:
        fsdp_.check_recipe(recipe)
    loaded = load_model(recipe.model, source=str(state_dir / "model") if resuming else start_ref.source,
                        for_training=True, seed=recipe.seed)
    if fsdp:
        fsdp_.check_loaded(recipe, loaded)
    agg_mode = spec.aggregator_mode
    adapter_roles = _aggregator_adapter_roles(loaded, spec.stage, agg_mode)
    accelerator = make_accelerator(loaded.device)
    rank, world = rank_world(accelerator)
    if fsdp and world == 1:
        console.print("  [yellow]note:[/] FSDP with one process: nothing to shard, training unsharded")
        fsdp = False
    check_shared_home(accelerator, resuming, state_dir)
    saved = load_trainer_state(state_dir) if resuming else None
    _check_saved_layout(saved, fsdp, state_dir)
    model = loaded.model
    warmup = sec.warmup_steps
    if fsdp:
        if resuming and is_main(accelerator):  # the loaded weights are the state's, still whole
            _register_missing(recipe, spec, loaded, RunState(**saved["run"]), registry, home, start_ref)
        optimizer, generator = _fsdp_policy(recipe, loaded, accelerator, sec.lr)
    else:
        optimizer = _policy_optimizer(model, sec.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    if accelerator is not None and not fsdp:
        model, optimizer = accelerator.prepare(model, optimizer)
    if not fsdp:
        generator = make_generator(loaded, recipe.generation)
    # train-agg trains the aggregation role: with an aggregator adapter, that adapter samples
    policy_gen = TimedGenerator(for_aggregation(generator) if spec.stage == "agg" else generator)
    other_gen = _other_generator(recipe, spec, registry, generator, adapter_roles, agg_mode, frozen_search_ref)
    ref_model = _reference(recipe, sec, loaded, start_ref)

    state = RunState()
    if saved is not None:
        if fsdp:  # every rank keeps its shards of the full state
            fsdp_.load_optimizer_state(loaded.model, optimizer, saved["optimizer"])
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = RunState(**saved["run"])
        if is_main(accelerator):  # the main rank alone writes metrics.jsonl (two ranks raced on its rewrite)
            _truncate_metrics(run_dir / "metrics.jsonl", state.step)
        if is_main(accelerator) and not fsdp:
            _register_missing(recipe, spec, loaded, state, registry, home, start_ref)
    budget = sec.max_generated_tokens
    if is_main(accelerator):
        _print_start(console, spec, start_ref, loaded, count_parameters(loaded.model), world,
                     state if resuming else None, budget, fsdp)
    # capped: a token budget comes with a large `steps` cap, and `_take` wraps around the pool
    train_pool = task.problems("train", min(MAX_TRAIN_POOL, max(2000, sec.steps * sec.prompts_per_step * 4 * world)),
                               seed=recipe.seed + 17)
    eval_problems = task.problems("eval", sec.eval_problems, seed=recipe.seed) if sec.eval_problems else []
    compiled = _CompiledForward(loaded, console) if _compile_applies(sec, accelerator, adapter_roles, console) else None
    shared_prefix = shared_prefix_applies(sec, loaded, accelerator, fsdp, console if is_main(accelerator) else Console(quiet=True))
    tb = _tensorboard(run_dir) if sec.tensorboard and is_main(accelerator) else None
    return RLRun(recipe=recipe, spec=spec, home=home, registry=registry, task=task, start_ref=start_ref,
                run_dir=run_dir, state_dir=state_dir, loaded=loaded, model=model, optimizer=optimizer,
                scheduler=scheduler, accelerator=accelerator, rank=rank, world=world, adapter_roles=adapter_roles,
                generator=generator, policy_gen=policy_gen, other_gen=other_gen, ref_model=ref_model, state=state,
                resumed=resuming, budget=budget, train_pool=train_pool, eval_problems=eval_problems, compiled=compiled, tb=tb,
                console=console, fsdp=fsdp, shared_prefix=shared_prefix)


def _fsdp_policy(recipe: Recipe, loaded, accelerator, lr: float):
    """Under FSDP: the generator is built from the whole model (a vLLM engine or the lean sampler
    copies its weights; later syncs read them unsharded), then the model is sharded and the
    optimizer built over the shards."""
    if loaded.device.type == "cuda":  # this rank's GPU, as accelerate's prepare would
        loaded.model.to(accelerator.device)
    generator = make_generator(loaded, recipe.generation)
    fsdp_.shard(loaded.model, accelerator.device)
    return _policy_optimizer(loaded.model, lr), generator


def _policy_optimizer(model, lr: float):
    """AdamW over the trainable parameters (the shards, under FSDP): the RL stages' one optimizer."""
    return adamw([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.99), weight_decay=0.0)


def _other_generator(recipe: Recipe, spec: RLSpec, registry: Registry, generator, adapter_roles, agg_mode: str,
                     frozen_search_ref: str | None) -> TimedGenerator | None:
    """The sampler of the role that is not trained from the policy's own weights, or None."""
    from spiral_cli.models import load_model

    sec = spec.section
    if adapter_roles and spec.stage == "set":  # the aggregator adapter plays the aggregation role
        return TimedGenerator(for_aggregation(generator))
    if spec.stage == "agg" and frozen_search_ref:
        frozen = load_model(recipe.model, source=resolve_model(frozen_search_ref, registry).source, for_training=False)
        return TimedGenerator(_frozen_generator(recipe, frozen))
    if spec.stage == "set" and agg_mode == "frozen":
        if not sec.aggregator.checkpoint:
            raise RecipeError("train_set.aggregator.checkpoint: required when aggregator.mode is frozen")
        frozen = load_model(recipe.model, source=resolve_model(sec.aggregator.checkpoint, registry).source, for_training=False)
        return TimedGenerator(for_aggregation(_frozen_generator(recipe, frozen)))
    return None


def _print_start(console: Console, spec: RLSpec, start_ref: ModelRef, loaded, counts: tuple[int, int], world: int,
                 resumed: RunState | None, budget: int | None, fsdp: bool = False) -> None:
    total, trainable = counts
    console.print(
        f"[bold]{spec.stage}[/] {spec.name}: from {start_ref.ref} ({total / 1e6:.2f}M params, "
        f"{trainable / 1e6:.2f}M trainable) on {loaded.device}, {world} process(es)" + (" sharded (FSDP)" if fsdp else "")
        + (f"; resumed at step {resumed.step} ({resumed.generated_tokens:,} generated tokens)" if resumed else "")
        + (f"; stops at {budget:,} generated tokens or step {spec.section.steps}" if budget else "")
    )
    if resumed and _budget_met(resumed, budget):
        console.print(f"  token budget already met: {resumed.generated_tokens:,} >= {budget:,} generated tokens "
                      f"at step {resumed.step}; no more steps (raise max_generated_tokens to go on)")


def derive_seed(*parts: int) -> int:
    """A 62-bit sampling seed from integers (recipe seed, step, rank; a step seed and its draw):
    distinct tuples give unrelated seeds. A rollout samples its search with `seed` and its
    aggregation with `seed + 1`, so seeds made by adding small integers (as before 2026-12-02:
    `seed * 1_000_003 + step * 7919 + rank`, then `+ drawn`) gave rank r + 1's search the
    random stream of rank r's aggregation, and a second dynamic-sampling draw the stream of the
    first draw's aggregation."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def _draw_round(need: int, uniform: bool, run: RLRun) -> list[int]:
    """How many prompts each rank draws in this round of a step (`need` is this rank's). The
    first round of a step, and every round without dynamic sampling, asks the same of every rank,
    so no collective is needed; later rounds share the counts (one small all-reduce)."""
    if run.world == 1 or uniform:
        return [need] * run.world
    _join_generation(run)  # a rank with a tensor-parallel engine serves the others' rounds first
    counts = [0.0] * run.world
    counts[run.rank] = float(need)
    return [int(c) for c in all_sum(counts, run.accelerator)]


def _collect(run: RLRun, rng: random.Random, step_seed: int) -> tuple[list[PromptRollout], int, float, float]:
    """One step's rollouts: prompts drawn (with dynamic sampling, until enough carry signal or the
    draw cap is hit), generated, scored and given advantages; the token counters advanced over all
    ranks. Returns (kept rollouts, prompts drawn, generation seconds, rollout seconds)."""
    sec, state, spec = run.spec.section, run.state, run.spec
    run.policy_gen.seconds = 0.0
    if run.other_gen:
        run.other_gen.seconds = 0.0
    run.model.eval()
    kept: list[PromptRollout] = []
    drawn = 0
    max_draws = sec.prompts_per_step * spec.max_prompt_draws
    dynamic = spec.dynamic_sampling
    t_roll = time.perf_counter()
    local_generated = local_total = 0
    while True:
        # one draw round, taken by all ranks together: each says how many prompts it still needs,
        # and takes its own slice of the pool after the slices of the ranks before it. A rank
        # whose prompts all had signal needs none, and the cursor advances by the round's total
        # on every rank, so the one cursor a checkpoint saves is every rank's (exact resume)
        need = sec.prompts_per_step - len(kept) if drawn < max_draws else 0
        needs = _draw_round(need, drawn == 0 or not dynamic, run)
        if not any(needs):
            break
        problems = _take(run.train_pool, state.cursor + sum(needs[: run.rank]), need)
        state.cursor += sum(needs)
        if need:
            drawn += need
            rollouts = spec.collect(run.task, run.policy_gen, run.second_gen, problems, rng,
                                    derive_seed(step_seed, drawn))
            for r in rollouts:
                local_generated += r.generated_tokens
                local_total += r.prompt_tokens + r.generated_tokens
            kept += [r for r in rollouts if r.has_signal] if dynamic else rollouts
        if not dynamic:
            break
    _join_generation(run)
    # exact counts over all ranks, so every rank takes the same decision on the token budget
    generated, total_tokens = all_sum([local_generated, local_total], run.accelerator)
    state.generated_tokens += int(generated)
    state.total_tokens += int(total_tokens)
    if spec.scale_rewards == "batch":  # TRL's batch std: over the whole step's batch, all ranks
        scale_batch(kept, spec.stage == "grpo", lambda xs: all_sum(xs, run.accelerator))
    rollout_seconds = time.perf_counter() - t_roll
    gen_seconds = run.policy_gen.seconds + (run.other_gen.seconds if run.other_gen else 0.0)
    run.model.train()
    return kept, drawn, gen_seconds, rollout_seconds


def _join_generation(run: RLRun) -> None:
    """Colocated vLLM engines sharded over several ranks (generation.vllm.tensor_parallel_size > 1)
    generate in collective rounds: a rank done with sampling serves the others' rounds until all are
    done (VLLMGenerator.join). Every rank calls this before its next other collective; generators
    without a group return at once."""
    join = getattr(run.generator, "join", None)
    if callable(join):
        join()


def _evaluate_on_main(run: RLRun) -> dict[str, float] | None:
    """Rank 0 evaluates (None on the others): the policy whole on every rank under FSDP, ranks with
    a tensor-parallel engine serve its rounds (_join_generation). If it fails, every rank stops
    with its reason rather than waiting in the next collective for the process-group timeout."""
    point, failure = None, None
    with run.sampling_weights():
        if run.main:
            try:
                point = _eval_point(run)
            except Exception as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
                failure = e
    _join_generation(run)
    share_failure(run.accelerator, failure)
    return point


def _eval_point(run: RLRun) -> dict[str, float]:
    """Evaluate the current weights, add the point to the history and the curves, print it."""
    state = run.state
    run.model.eval()
    m = evaluate_recipe(run.task, run.generator, run.eval_problems, run.recipe)  # the generator holds the current weights
    run.model.train()
    state.history.append({"step": state.step, "generated_tokens": state.generated_tokens, **m})
    _write_curves(run.run_dir, run.spec.name, state.history)
    run.console.print(f"  eval step {state.step}: " + _fmt_eval(m))
    return m


def _print_step(run: RLRun, row: dict[str, Any], kept: list[PromptRollout], drawn: int,
                loop_start: tuple[float, int, int]) -> None:
    state, budget, secs = run.state, run.budget, row["seconds"]
    run.console.print(
        f"  step {state.step}/{run.spec.section.steps} reward {row['reward_search']:.3f}"
        + (f" agg {row['reward_aggregate']:.3f}" if row.get("reward_aggregate") is not None else "")
        + f" kept {len(kept)}/{drawn}"
        + (f" entropy {row['entropy_search']:.3f}" if row.get("entropy_search") is not None else "") + _fmt_mismatch(row)
        + f" | {secs['total']:.1f}s (gen {secs['generation']:.1f}, score {secs['scoring']:.2f}, "
        f"update {secs['update']:.1f}, sync {secs['sync']:.2f}) | tokens {state.generated_tokens:,}"
        + (f"/{budget:,}" if budget else "") + f" generated, {state.total_tokens:,} total"
        + f", ETA {_eta(state, run.spec.section.steps, budget, loop_start)}"
    )
    if _budget_met(state, budget):
        run.console.print(f"  token budget reached: {state.generated_tokens:,} >= {budget:,} generated tokens "
                          f"at step {state.step}")


def _fmt_mismatch(row: dict[str, Any]) -> str:
    """The sampler mismatch in a few characters: its KL estimate and the largest raw weight."""
    kl = row.get("sampling/kl_sampler_trainer")
    if kl is None:
        return ""
    return f" mismatch kl {kl:.1e} max ratio {row['sampling/raw_importance_sampling_ratio/max']:.3f}"


def _fmt_eval(m: dict[str, float]) -> str:
    keys = [k for k in m if ("pass@" in k or "majority" in k or "learned_agg" in k)]
    return ", ".join(f"{k} {m[k]:.3f}" for k in keys)


def _warn_no_signal(console: Console, spec: RLSpec, state: RunState) -> None:
    """A run whose steps kept no prompt learned nothing from them: say so (the registry entry
    records `steps_without_signal`)."""
    empty = state.steps_without_signal
    if not empty:
        return
    if empty == state.step:
        console.print(
            f"[bold yellow]warning:[/] all {empty} steps of {spec.name} kept 0 prompts (every prompt's samples got "
            f"the same reward, so there was nothing to learn; entropy nan): its checkpoint is the starting model, "
            f"untrained. Start from a stronger model, or raise "
            + ("train_set.max_prompt_draws / " if spec.stage != "agg" else "") + "generation.max_new_tokens",
            highlight=False, soft_wrap=True)
    else:
        console.print(f"[yellow]note:[/] {empty} of {state.step} steps of {spec.name} kept 0 prompts (no reward signal)",
                      highlight=False, soft_wrap=True)


def _eta(state: RunState, steps: int, budget: int | None, loop_start: tuple[float, int, int]) -> str:
    """Time left at this process's pace: by steps, or by generated tokens when a budget will end
    the run first."""
    t0, step0, tokens0 = loop_start
    done = state.step - step0
    if done <= 0:
        return "?"
    per_step = (time.perf_counter() - t0) / done
    left = steps - state.step
    if budget:
        tokens_per_step = (state.generated_tokens - tokens0) / done
        if tokens_per_step > 0:
            left = min(left, max(0, math.ceil((budget - state.generated_tokens) / tokens_per_step)))
    return fmt_duration(left * per_step)


def _aggregator_adapter_roles(loaded, stage: str, agg_mode: str) -> dict[str, str] | None:
    """Which LoRA adapter each trained role updates, or None (one set of weights for all).

    aggregator.mode=adapter: a second adapter (a copy of the policy's at the start) learns from
    the aggregation samples, the default adapter from the search samples. A starting checkpoint
    that already carries an aggregator adapter keeps that form in set RL (mode shared) and in
    train-agg (which then trains the aggregator adapter); GRPO trains the search adapter only."""
    carries = has_aggregator_adapter(loaded.model)
    if stage == "set" and (agg_mode == "adapter" or (carries and agg_mode == "shared")):
        return _setup_aggregator_adapter(loaded)
    if stage == "agg" and carries:
        return {"aggregate": AGGREGATOR_ADAPTER}
    return None


def _setup_aggregator_adapter(loaded) -> dict[str, str]:
    if not loaded.is_lora:
        raise RecipeError("train_set.aggregator.mode=adapter: needs a LoRA policy (set model.lora, "
                          "or start from a LoRA checkpoint)")
    if not has_aggregator_adapter(loaded.model):  # resumed runs and adapter checkpoints carry it
        add_aggregator_adapter(loaded.model)
    return {"search": SEARCH_ADAPTER, "aggregate": AGGREGATOR_ADAPTER}


def _frozen_generator(recipe: Recipe, frozen):
    """A frozen model samples through the hf backend (one vLLM engine per process: the
    policy's); a frozen checkpoint with an aggregator adapter aggregates with it."""
    from spiral_cli.generation.hf import HFGenerator

    gen = HFGenerator(frozen, batch_size=recipe.generation.batch_size, fast_decode=recipe.generation.fast_decode,
                        compile=recipe.generation.compile)
    attach_aggregator(frozen, gen)
    return gen


def _take(pool: list[dict[str, Any]], start: int, n: int) -> list[dict[str, Any]]:
    return [pool[(start + i) % len(pool)] for i in range(n)]


def _reference(recipe: Recipe, sec, loaded, start_ref: ModelRef):
    """The KL reference: with LoRA, the model with its adapter disabled (no second copy);
    with full fine-tuning, a frozen copy of the starting model."""
    if sec.beta <= 0:
        return None
    if loaded.is_lora:
        return "adapter-disabled"
    from spiral_cli.models import load_model

    ref = load_model(recipe.model, source=start_ref.source, for_training=False)
    return ref.model
