"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2`: a short train-set run (FSDP when
the recipe or the overrides say model.fsdp=true, DDP otherwise). Each rank writes rank<r>.json:
a checksum of the full weights it ends with (gathered from the shards under FSDP), the step, and
how many all-gathers FSDP ran inside the sampler's generate calls (must be 0: sampling runs on
unsharded weights) and overall, and how many filler micro-batches it ran; rank 0 also writes
weights.pt (the full weights).
It also lists, per step, the training questions this rank drew (all dynamic-sampling rounds).
SPIRAL_TEST_KILL_AT=<step>: every rank SIGKILLs itself right after that step's checkpoint."""
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from spiral_cli.generation import hf
from spiral_cli.recipe import load_recipe
from spiral_cli.rl import trainer, update
from spiral_cli.rl.fsdp import fsdp_requested

if __name__ == "__main__":
    recipe_path, out_dir, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    recipe = load_recipe(recipe_path, overrides)
    gathers = {"total": 0, "in_generate": 0}
    all_gather_single = dist.all_gather_single  # what FSDP2's DefaultAllGather calls (torch 2.13)

    def counted(*args, **kwargs):
        gathers["total"] += 1
        return all_gather_single(*args, **kwargs)

    dist.all_gather_single = counted
    generate = hf.HFGenerator.generate

    def counted_generate(self, *args, **kwargs):
        before = gathers["total"]
        try:
            return generate(self, *args, **kwargs)
        finally:
            gathers["in_generate"] += gathers["total"] - before

    hf.HFGenerator.generate = counted_generate
    captured = {}
    trainer_update = trainer._update

    def spy(model, *args, **kwargs):  # keep a handle on the trained module of this rank
        captured["model"] = getattr(model, "module", model)
        return trainer_update(model, *args, **kwargs)

    trainer._update = spy
    fillers = {"n": 0}
    filler_loss = update.filler_loss

    def counted_filler(*args, **kwargs):
        fillers["n"] += 1
        return filler_loss(*args, **kwargs)

    update.filler_loss = counted_filler
    drawn = []  # per step: this rank's questions
    collect = trainer._collect
    take = trainer._take

    def recorded_collect(run, *args, **kwargs):
        drawn.append([])
        return collect(run, *args, **kwargs)

    def recorded_take(pool, start, n):
        problems = take(pool, start, n)
        drawn[-1] += [p["q"] for p in problems]
        return problems

    trainer._collect, trainer._take = recorded_collect, recorded_take
    kill_at = int(os.environ.get("SPIRAL_TEST_KILL_AT", "0"))
    checkpoint = trainer._checkpoint

    def checkpoint_then_die(*args, **kwargs):
        checkpoint(*args, **kwargs)
        if args[5].step == kill_at:  # the RunState
            os.kill(os.getpid(), signal.SIGKILL)

    trainer._checkpoint = checkpoint_then_die
    final = {}
    close_generator = trainer.close_generator

    def gather_then_close(generator):  # a vLLM engine's shutdown takes the process group down with it
        model = captured["model"]
        if fsdp_requested(recipe):
            final["state"] = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # every rank
        else:
            final["state"] = model.state_dict()
        final["world"] = dist.get_world_size()
        final["sharded"] = any(type(p).__name__ == "DTensor" for p in model.parameters())
        close_generator(generator)

    trainer.close_generator = gather_then_close
    result = trainer.run_train_set(recipe, home=Path(os.environ["SPIRAL_HOME"]), model="scratch:nano",
                                   console=Console(stderr=True, quiet=True))
    state = final["state"]
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().numpy().tobytes())
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, out_dir / "weights.pt")
    (out_dir / f"rank{rank}.json").write_text(json.dumps(
        {"checksum": h.hexdigest(), "world": final["world"], "steps": result["steps"],
         "gathers_in_generate": gathers["in_generate"], "gathers": gathers["total"], "fillers": fillers["n"],
         "sharded": final["sharded"], "drawn": drawn}))
