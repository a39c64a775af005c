"""Run by tests/test_trainer.py under `torchrun --nproc_per_node 2` (and tests/test_multinode.py
under two single-process torchrun "nodes"): a short SPIRAL run, then each
rank writes a checksum of its weights (they must be identical after DDP's gradient reduction) and
whether the process group outlived the run (it must not: see processes.end_processes)."""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console

from spiral_cli.models import load_model
from spiral_cli.recipe import load_recipe
from spiral_cli.rl import trainer

if __name__ == "__main__":
    recipe_path, out_dir = sys.argv[1], Path(sys.argv[2])
    steps = sys.argv[3] if len(sys.argv) > 3 else "4"
    recipe = load_recipe(recipe_path, [f"train_set.steps={steps}"])
    init = load_model(recipe.model, source="scratch:nano", for_training=False, seed=recipe.seed).model
    captured = {}
    original = trainer._update

    def spy(model, *args, **kwargs):  # keep a handle on the trained module of this rank
        captured["model"] = getattr(model, "module", model)
        return original(model, *args, **kwargs)

    trainer._update = spy
    trainer.run_train_set(recipe, home=Path(os.environ["SPIRAL_HOME"]), model="scratch:nano",
                          console=Console(stderr=True, quiet=True))
    state = captured["model"].state_dict()
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().numpy().tobytes())
    changed = any(k in state and not torch.equal(state[k].float(), v.float()) for k, v in init.state_dict().items())
    rank = int(os.environ.get("RANK", "0"))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(
        {"checksum": h.hexdigest(), "world": int(os.environ.get("WORLD_SIZE", "1")), "changed": changed,
         "group_left": dist.is_initialized()}))
