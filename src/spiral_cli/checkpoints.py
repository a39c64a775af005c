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
    resolved = registry.resolve(ref)
    if resolved.entry is not None:
        return ModelRef(ref=ref, source=str(resolved.entry.path), entry=resolved.entry)
    if resolved.kind == "scratch":
        return ModelRef(ref=ref, source=f"scratch:{resolved.preset}")
    return ModelRef(ref=ref, source=str(resolved.path_or_id))


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

    final = checkpoint_path(home, name, step)
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
