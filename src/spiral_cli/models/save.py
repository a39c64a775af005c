"""`save_checkpoint`: plain HF checkpoint directories (full model, or LoRA adapter with its base
bundled under ``base/`` or referenced by hub id) that load without spiral."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from spiral_cli.adapters import AGGREGATOR_ADAPTER
from spiral_cli.models.loaded import BASE_SUBDIR, LoadedModel, ModelError
from spiral_cli.models.scratch import SCRATCH_PREFIX

_BUNDLE_COPY_LIMIT = 2 * 1024**3  # copy (not hard-link) a local base only below this size


def _dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _bundle_local_base(src: Path, dst: Path) -> bool:
    """Hard-link (or copy, if small) a local base checkpoint into dst. False = too big to copy."""
    files = [f for f in src.rglob("*") if f.is_file()]
    try:
        for f in files:
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, out)
        return True
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
    if _dir_size(src) > _BUNDLE_COPY_LIMIT:
        return False
    shutil.copytree(src, dst)
    return True


def save_checkpoint(
    loaded: LoadedModel,
    path: Path,
    *,
    extra_files: dict[str, bytes] | None = None,
    final_path: Path | None = None,
) -> None:
    """Write a plain HF checkpoint directory at `path` (created if missing).

    Full models: ``config.json``, ``model.safetensors``, generation config, tokenizer.
    LoRA: the adapter (``adapter_config.json`` + ``adapter_model.safetensors``) and tokenizer;
    a scratch base, or a base loaded from a local directory, is bundled under ``<path>/base``
    (a local base is hard-linked, so this costs no space on the same filesystem) and
    ``base_model_name_or_path`` is set to the absolute path of that bundle *at `final_path`*
    (default: `path`) -- pass the checkpoint's final location when writing into a temporary
    directory that is renamed afterwards. A hub base is referenced by its id.
    `extra_files` maps relative file names to contents (e.g. a recipe snapshot).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    final = Path(final_path if final_path is not None else path).expanduser().absolute()
    model = loaded.model
    meta: dict[str, Any] = {"source": loaded.source, "scratch_preset": loaded.scratch_preset, "is_lora": loaded.is_lora}
    if loaded.is_lora:
        model.save_pretrained(str(path))
        base_ref = loaded.base_source or ""
        base_dir = path / BASE_SUBDIR
        if loaded.scratch_preset is not None and (base_ref.startswith(SCRATCH_PREFIX) or not Path(base_ref).is_dir()):
            base_model = model.get_base_model()
            base_model.save_pretrained(str(base_dir), state_dict=_base_state_dict(base_model))
            loaded.tokenizer.save_pretrained(str(base_dir))
            base_ref = str(final / BASE_SUBDIR)
        elif base_ref and Path(base_ref).is_dir():
            src = Path(base_ref).resolve()
            if _bundle_local_base(src, base_dir):
                base_ref = str(final / BASE_SUBDIR)
            else:
                base_ref = str(src)
        for cfg_file in (path / "adapter_config.json", path / AGGREGATOR_ADAPTER / "adapter_config.json"):
            if cfg_file.is_file():  # the aggregator adapter, when there is one, sits in a subdir
                cfg = json.loads(cfg_file.read_text())
                cfg["base_model_name_or_path"] = base_ref
                cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        meta["base"] = base_ref
    else:
        model.save_pretrained(str(path))
    loaded.tokenizer.save_pretrained(str(path))
    (path / "spiral_model.json").write_text(json.dumps(meta, indent=2))
    for name, data in (extra_files or {}).items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ModelError(f"extra file name {name!r} must be a relative path inside the checkpoint")
        out = path / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)


def _base_state_dict(base_model) -> dict[str, torch.Tensor]:
    """The base weights of a model with LoRA layers injected: no lora_* tensors, and
    ``x.base_layer.weight`` renamed back to ``x.weight`` (unmerged, i.e. the original base)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in base_model.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out
