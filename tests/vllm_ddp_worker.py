"""Run by tests/test_vllm_colocate.py under `torchrun --nproc_per_node 2` (gloo): a SPIRAL run
whose ranks each sample from a colocated vLLM engine (generation.backend=vllm). Every rank writes
`rank<R>.json`: a checksum of its trained weights, and what its own engine serves after the last
weight sync (greedy completions of fixed prompts with their log-probs, and the log-probs its
trainer's model gives the same tokens), so the test can check that both trainers and both engines
hold the same weights.

    vllm_ddp_worker.py RECIPE OUT_DIR STEPS [STALL_AT]

With STALL_AT = k, the k-th weight sync (the end of step k, before its checkpoint) writes
OUT_DIR/stalled<R> and sleeps: the test then kills the job with SIGKILL, mid-run, at a known step.
"""
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from spiral_cli.generation.vllm import VLLMGenerator
from spiral_cli.models import encode_prompts
from spiral_cli.recipe import load_recipe
from spiral_cli.rl.trainer import run_train_set

PROBES = ["q3:", "q10:", "a7:1|2:"]


def teacher_forced(model, prompt_ids: list[int], ids: list[int]) -> list[float]:
    with torch.no_grad():
        x = torch.tensor([prompt_ids + ids])
        logp = torch.log_softmax(model(input_ids=x).logits.float()[0], dim=-1)
        p = len(prompt_ids)
        return [float(logp[p - 1 + t, tok]) for t, tok in enumerate(ids)]


def main() -> None:
    recipe_path, out_dir, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    stall_at = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    rank = int(os.environ["RANK"])
    recipe = load_recipe(recipe_path, [f"train_set.steps={steps}"])
    syncs = {"n": 0}
    report: dict = {"rank": rank, "world": int(os.environ["WORLD_SIZE"])}
    original = VLLMGenerator.update_weights

    def update_weights(self, model=None):  # the trainer calls it once per step, after the update
        original(self, model)
        syncs["n"] += 1
        if syncs["n"] == stall_at:
            (out_dir / f"stalled{rank}").write_text(str(syncs["n"]))
            time.sleep(3600)
        inner = getattr(model, "module", model)
        report["engine_seed"] = self.llm.llm_engine.vllm_config.model_config.seed
        outs = self.generate(PROBES, max_new_tokens=8, temperature=0, seed=0)  # no draw from torch RNG
        probe_ids = encode_prompts(self.tokenizer, PROBES)
        was_training = inner.training
        inner.eval()
        report["probes"] = [
            {"ids": c.token_ids, "engine": c.logprobs, "trainer": teacher_forced(inner, p, c.token_ids)}
            for p, (c,) in zip(probe_ids, outs)]
        inner.train(was_training)
        h = hashlib.sha256()
        state = inner.state_dict()
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].detach().float().cpu().numpy().tobytes())
        report["checksum"] = h.hexdigest()
        report["syncs"] = syncs["n"]

    VLLMGenerator.update_weights = update_weights
    result = run_train_set(recipe, home=Path(os.environ["SPIRAL_HOME"]), model="scratch:nano",
                           console=Console(stderr=True))
    report["steps"] = result["steps"]
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
