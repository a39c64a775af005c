"""Where models come from and where they go: registry references in, registered checkpoints out."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spiral_cli.paths import checkpoint_path, checkpoints_dir, cleanup_stale_tmp
from spiral_cli.registry import Entry, Registry, atomic_dir


@dataclass
class ModelRef:
    """A resolved model: `source` is what load_model takes (dir, hub id or scratch:<preset>)."""

    ref: str
    source: str
    entry: Entry | None = None

    @property
    def lineage(self) -> str | None:
        """The parent reference recorded for checkpoints trained from this model."""
        if self.entry is not None:
            return f"{self.entry.name}@{self.entry.step}"
        return self.ref


def resolve_model(ref: str, registry: Registry) -> ModelRef:
    """Resolve a model reference without loading anything; an unknown scratch preset, a missing
    registry entry or a registered entry whose directory is gone fail here, before any work."""
    resolved = registry.resolve(ref)
    if resolved.entry is not None:
        return ModelRef(ref=ref, source=str(resolved.entry.path), entry=resolved.entry)
    if resolved.kind == "scratch":
        _check_preset(resolved.preset)
        return ModelRef(ref=ref, source=f"scratch:{resolved.preset}")
    return ModelRef(ref=ref, source=str(resolved.path_or_id))


def _check_preset(preset: str | None) -> None:
    try:
        from spiral_cli.models import SCRATCH_PRESETS, ModelError
    except ImportError:  # torch missing: load_model says so later
        return
    if preset not in SCRATCH_PRESETS:
        raise ModelError(f"unknown scratch preset {preset!r} (choose from: {', '.join(SCRATCH_PRESETS)})")


# ---------------------------------------------------------------- early checks of a training run

# What a rerun may change and still continue the same run (resume, or re-register its last step):
# how long it trains (steps, token budget, time budget), how it logs, saves, evaluates and where it
# runs -- never what is trained (task, data, model, seed, optimisation, sampling). A section
# name frees all of its fields. Everything else that differs from the registered recipe refuses
# the rerun.
RERUN_MAY_CHANGE_ALWAYS: tuple[str, ...] = (
    "name", "infer", "sweep", "compare", "model.device", "model.autocast", "generation.backend",
    "generation.batch_size", "generation.fast_decode", "generation.compile", "generation.vllm",
)
RERUN_MAY_CHANGE: dict[str, tuple[str, ...]] = {
    "sft": ("train_set", "train_agg", "sft.steps", "sft.time_budget_minutes", "sft.save_every",
            "sft.log_every", "sft.eval_problems", "sft.compile", "sft.full_determinism"),
    "set": ("sft", "train_agg", "train_set.steps", "train_set.max_generated_tokens", "train_set.save_every",
            "train_set.eval_every", "train_set.eval_every_tokens", "train_set.eval_problems", "train_set.tensorboard", "train_set.compile",
            "train_set.shared_prefix"),
    "agg": ("sft", "train_set", "train_agg.steps", "train_agg.max_generated_tokens", "train_agg.save_every",
            "train_agg.eval_every", "train_agg.eval_every_tokens", "train_agg.eval_problems", "train_agg.tensorboard", "train_agg.compile",
            "train_agg.shared_prefix"),
}
RERUN_MAY_CHANGE["grpo"] = RERUN_MAY_CHANGE["set"]
RUN_RECIPE_FILE = "recipe.json"  # <home>/runs/<name>/recipe.json: what the run started with


def _normalised(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A stored snapshot with the defaults of fields added since filled in (as is if it no longer validates)."""
    from spiral_cli.recipe import Recipe

    try:
        return Recipe.model_validate(snapshot).snapshot()
    except Exception:  # noqa: BLE001 - an old snapshot: compare what it has
        return snapshot


def recipe_differences(old: dict[str, Any], new: dict[str, Any], stage: str) -> list[str]:
    """Dotted fields whose values differ between two recipe snapshots, except those a rerun of
    `stage` may change (RERUN_MAY_CHANGE), each as "field (old -> new)"."""
    from spiral_cli.recipe import snapshot_differences

    free = RERUN_MAY_CHANGE_ALWAYS + RERUN_MAY_CHANGE.get(stage, ())
    return [f"{key} ({_short(va)} -> {_short(vb)})"
            for key, va, vb in snapshot_differences(_normalised(old), _normalised(new), free)]


def _short(v: Any) -> str:
    from spiral_cli.recipe import MISSING

    s = "<unset>" if v is MISSING else repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def prepare_run(
    recipe: Any, *, home: Path, name: str, stage: str, model_ref: str, resume: bool = True,
    also_resolve: tuple[str | None, ...] = (),
) -> None:
    """Everything a training run can check before it loads a model, builds examples or trains:

    - the run name (it names <home>/runs/<name> and <home>/checkpoints/<name>, so it can never
      leave the spiral home);
    - the starting model (and `also_resolve`: frozen models), the SFT data file;
    - a rerun: its recipe and starting model against the registered entry of `name` (or, before
      the first registration, against <home>/runs/<name>/recipe.json). A rerun may change only
      RERUN_MAY_CHANGE; any other difference refuses it with one line naming the fields;
    - that the home is writable.
    Writes <home>/runs/<name>/recipe.json when the run starts afresh. RegistryError/InputError."""
    import json

    from spiral_cli.jsonl import check_input_file
    from spiral_cli.paths import atomic_write_text, runs_dir
    from spiral_cli.registry import RESERVED_NAMES, RegistryError, validate_name

    validate_name(name, "run name (--name)")
    if name in RESERVED_NAMES:
        raise RegistryError(f"invalid run name (--name) {name!r}: reserved (scratch:<preset>)")
    registry = Registry(home)
    base = resolve_model(model_ref, registry)
    for ref in also_resolve:
        if ref:
            resolve_model(ref, registry)
    data = getattr(getattr(recipe, "sft", None), "data", None)
    if stage == "sft" and data:
        check_input_file(data, "sft.data")

    run_dir = runs_dir(home) / name
    snapshot = recipe.snapshot()
    existing = registry.latest(name)
    resuming = resume and (run_dir / "state" / "trainer_state.pt").is_file()
    started = run_dir / RUN_RECIPE_FILE
    if existing is not None:
        if existing.stage != stage:
            raise RegistryError(
                f"{name!r} is registered already as a {existing.stage} checkpoint ({existing.ref}), "
                f"not a {stage} run: give this run another --name"
            )
        # an entry registered without a recipe (by hand, or by an old version): only its parent is known
        against, what, parent = existing.recipe or {}, f"the registered {existing.ref}", existing.parent
    elif resuming and started.is_file():
        try:
            saved = json.loads(started.read_text())
            against, parent = saved["recipe"], saved.get("parent")
        except (OSError, ValueError, KeyError, TypeError):
            against, parent = None, None
        what = f"the interrupted run in {run_dir}"
    else:
        against = parent = None
    if against is not None:
        diffs = recipe_differences(against, snapshot, stage) if against else []
        if parent is not None and parent != base.lineage and not any(d.startswith("model.name ") for d in diffs):
            diffs.insert(0, f"starting model ({parent} -> {base.lineage})")
        if diffs:
            shown = ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
            raise RegistryError(
                f"{name} differs from {what}: {shown}; rerun with the same values to continue it, "
                f"or give --name NEW to start a new run"
            )
    try:
        if not resuming or not started.is_file():
            atomic_write_text(started, json.dumps({"recipe": snapshot, "parent": base.lineage}, indent=1) + "\n")
    except OSError as e:
        raise RegistryError(
            f"cannot write in the spiral home {home} ({e.strerror or e}): is it writable?"
        ) from None


def save_registered(
    loaded: Any,
    registry: Registry,
    home: Path,
    *,
    name: str,
    stage: str,
    step: int,
    parent: str | None,
    recipe: dict[str, Any] | None,
    metrics: dict[str, Any] | None = None,
) -> Entry:
    """Write the model atomically under the spiral home, then register it (in that order, so a
    registered entry always points at a complete directory)."""
    from spiral_cli.models import save_checkpoint
    from spiral_cli.registry import validate_name

    final = checkpoint_path(home, validate_name(name), step)  # a valid name stays inside the home
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as tmp:
        save_checkpoint(loaded, tmp, final_path=final)
    return registry.register(
        name, stage, str(final), step=step, parent=parent, recipe=recipe, metrics=metrics or {}
    )


def save_run_state(loaded: Any, state_dir: Path, trainer_state: dict[str, Any]) -> None:
    """The resume state of a run (model + `trainer_state.pt`), written atomically as one directory."""
    import torch

    from spiral_cli.models import save_checkpoint

    with atomic_dir(state_dir) as tmp:
        save_checkpoint(loaded, tmp / "model", final_path=state_dir / "model")
        torch.save(trainer_state, tmp / "trainer_state.pt")


def load_trainer_state(state_dir: Path) -> dict[str, Any]:
    import torch

    # our own file, but never unpickle arbitrary objects
    return torch.load(state_dir / "trainer_state.pt", weights_only=True)


def clean_leftovers(home: Path, name: str, run_dir: Path) -> None:
    """Remove temporary directories a killed run left behind (their writers are dead)."""
    for parent in (run_dir, checkpoints_dir(home) / name):
        if parent.is_dir():
            cleanup_stale_tmp(parent)
