"""What an RL run is and keeps: what distinguishes its command (RLSpec), the state that survives
a crash (RunState), the metrics lines, eval curves and tensorboard it writes, and its checkpoints
(resume state, then the registry entry)."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spiral_cli.checkpoints import ModelRef, save_registered, save_run_state
from spiral_cli.metrics import mean
from spiral_cli.paths import atomic_write_text
from spiral_cli.processes import run_on_main
from spiral_cli.recipe import RecipeError, TrainAggSection, TrainSetSection
from spiral_cli.registry import Registry
from spiral_cli.rl.fsdp import gathered_model, optimizer_state
from spiral_cli.rl.rollout import PromptRollout

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the run and its state that survives a crash


@dataclass
class RunState:
    step: int = 0
    cursor: int = 0  # next training problem index (data position)
    generated_tokens: int = 0
    total_tokens: int = 0
    steps_without_signal: int = 0  # steps that kept no prompt (nothing to learn from)
    history: list[dict[str, Any]] = field(default_factory=list)  # eval points

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RLSpec:
    """What distinguishes the three RL commands; the loop itself is shared."""

    stage: str  # "set" | "grpo" | "agg"
    name: str
    section: TrainSetSection | TrainAggSection  # the shared fields come from their common base
    collect: Callable[..., list[PromptRollout]]
    scale_rewards: str = "none"  # resolved; "batch" is applied by the loop once the step's batch is complete
    # train_set only; train-agg draws its prompts once and updates once per batch, one policy
    dynamic_sampling: bool = False
    max_prompt_draws: int = 1  # as a multiple of prompts_per_step
    updates_per_batch: int = 1
    aggregator_mode: str = "shared"


def _budget_met(state: RunState, budget: int | None) -> bool:
    return budget is not None and state.generated_tokens >= budget


def _eval_due(sec, state: RunState, tokens_before: int) -> bool:
    """After a step: every `eval_every` steps, or, with `eval_every_tokens`, when the step's
    generated tokens passed a multiple of it (runs whose steps generate different amounts, SPIRAL
    and GRPO, are then evaluated at the same token counts). The counts are global under DDP, so
    every rank decides alike."""
    if sec.eval_every_tokens:
        every = sec.eval_every_tokens
        return state.generated_tokens // every > tokens_before // every
    return state.step % sec.eval_every == 0


# ---------------------------------------------------------------- what the run writes


def _step_metrics(state: RunState, kept: list[PromptRollout], drawn: int, loss_stats: dict[str, float],
                  seconds: dict[str, float]) -> dict[str, Any]:
    samples = [s for r in kept for s in r.samples]
    advs = [s.advantage for s in samples]
    # None where a figure has no values (no aggregation in GRPO), 0.0 where zero is the honest figure
    return {
        "step": state.step,
        "reward_search": mean(x for r in kept for x in r.search_rewards),
        "reward_aggregate": mean((x for r in kept for x in r.agg_rewards), None),
        "set_score": mean((x for r in kept for x in r.set_scores), None),
        "prompts_drawn": drawn,
        "prompts_kept": len(kept),
        "adv_mean": mean(advs),
        "adv_abs_mean": mean(abs(a) for a in advs),
        "adv_nonzero_frac": mean(a != 0 for a in advs),
        "len_search": mean(x for r in kept for x in r.search_lengths),
        "len_aggregate": mean((len(s.completion_ids) for s in samples if s.role == "aggregate"), None),
        "agg_prompts_trimmed": sum(r.agg_prompts_trimmed for r in kept),  # cut to fit the context (prompt_fit)
        "generated_tokens": state.generated_tokens,
        "total_tokens": state.total_tokens,
        **loss_stats,
        "seconds": seconds,
    }


def _write_curves(run_dir: Path, name: str, history: list[dict[str, Any]]) -> None:
    """runs/<name>/eval.jsonl (every eval point so far, step 0 included) and curves.png."""
    from spiral_cli.plots import plot_training_curves

    run_dir.mkdir(parents=True, exist_ok=True)
    # atomic: a resumed run rewrites it from its state
    atomic_write_text(run_dir / "eval.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    try:
        plot_training_curves({name: history}, run_dir / "curves.png", title=name)
    except Exception as e:  # noqa: BLE001 - a plot must never stop training
        log.warning("could not draw %s/curves.png: %s", run_dir, e)


def _log(path: Path, row: dict[str, Any], tb) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    if tb is not None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and v is not None:
                tb.add_scalar(k, v, row["step"])


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RecipeError("tensorboard: pip install tensorboard") from None
    return SummaryWriter(str(run_dir / "tb"))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines of steps after the checkpoint we resume from (they will be redone)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _checkpoint(recipe, spec: RLSpec, loaded, optimizer, scheduler, state: RunState, registry: Registry, home: Path,
                state_dir: Path, start_ref: ModelRef, accelerator, fsdp: bool = False) -> None:
    """Resume state first, then the registered checkpoint. Each is written atomically; a crash
    between the two leaves a state whose checkpoint is missing, which the resumed run registers
    before it goes on (`_register_missing`), so at most the steps since the last state are redone.
    Under FSDP every rank gathers the full model and optimizer state; rank 0 writes them (the
    optimizer's keyed by parameter name, marked "fsdp": a resume reshards it)."""
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if fsdp:
        sharded = loaded.model
        loaded = gathered_model(loaded)  # None on the other ranks
        trainer_state = {"optimizer": optimizer_state(sharded, optimizer), "fsdp": True}
    else:
        trainer_state = None

    def write() -> None:
        nonlocal trainer_state
        if trainer_state is None:
            trainer_state = {"optimizer": optimizer.state_dict()}
        save_run_state(loaded, state_dir, {**trainer_state, "scheduler": scheduler.state_dict(), "run": state.to_dict()})
        _register(recipe, spec, loaded, state, registry, home, start_ref)

    run_on_main(accelerator, write)  # a failed write (a full disk) stops every rank, not rank 0 alone


def _register(recipe, spec: RLSpec, loaded, state: RunState, registry: Registry, home: Path, start_ref: ModelRef) -> None:
    last_eval = state.history[-1] if state.history else {}
    metrics = {k: v for k, v in last_eval.items() if isinstance(v, (int, float))}
    metrics.update({"generated_tokens": state.generated_tokens, "total_tokens": state.total_tokens})
    if state.steps_without_signal:
        metrics["steps_without_signal"] = state.steps_without_signal
    budget = spec.section.max_generated_tokens
    if budget is not None:
        metrics["max_generated_tokens"] = budget
        if _budget_met(state, budget):
            metrics["stopped_on"] = "token_budget"
    save_registered(loaded, registry, home, name=spec.name, stage=spec.stage, step=state.step,
                    parent=start_ref.lineage, recipe=recipe.snapshot(), metrics=metrics)


def _register_missing(recipe, spec: RLSpec, loaded, state: RunState, registry: Registry, home: Path,
                      start_ref: ModelRef) -> None:
    """After a crash between writing the state and registering it: register it now."""
    latest = registry.latest(spec.name)
    if state.step > 0 and (latest is None or latest.step < state.step):
        _register(recipe, spec, loaded, state, registry, home, start_ref)
