"""Where models come from and where they go: registry references in, registered checkpoints out."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spiral_cli.paths import checkpoint_path
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
