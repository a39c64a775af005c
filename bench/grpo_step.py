"""Time per GRPO optimizer step in spiral, on the same work as bench/trl_grpo.py.

Work per step: 8 prompts x 8 samples x up to 128 generated tokens, a ~4M-parameter scratch Qwen2
(scratch:tiny), CPU. Usage (from the repo root, spiral's venv):

    .venv/bin/python bench/grpo_step.py prepare /tmp/bench     # model dir + prompts.jsonl (shared with TRL)
    .venv/bin/python bench/grpo_step.py run /tmp/bench --steps 6 [--compile] [--compile-generation] [--objective spiral] [--fp32]

bf16 autocast by default, as TRL's bf16=True; `--fp32` (with trl_grpo.py `--no-bf16`) on a CPU
without native bf16 matrix products (AVX2 only), where bf16 runs a scalar fallback ~9.5x slower.

`--compile`: train_set.compile (the update's forward compiled); `--compile-generation`:
generation.compile (the lean engine's decoding step compiled). Both compile in step 1.

Prints seconds per step (median of steps 2.., the first is warm-up) split into generation,
scoring and update, generated tokens per step, seconds per 1,000 generated tokens and peak RSS.

`--objective spiral`: a SPIRAL step on the same prompts and model instead (no TRL counterpart):
8 prompts x N1 = 8 search traces of up to 128 tokens, K = 4 sets of n = 4 traces per prompt,
N2 = 4 aggregations of up to 128 tokens per set (countdown's default aggregation view: each
candidate's answer line), all 192 sequences trained; its cost per generated token stands beside
GRPO's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


def prepare(out: Path) -> None:
    from toy_reward_task import BenchTask

    from spiral_cli.models import load_model, save_checkpoint
    from spiral_cli.recipe import ModelSection

    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(ModelSection(name="scratch:tiny"), for_training=False, seed=0)
    save_checkpoint(loaded, out / "model")
    task = BenchTask()
    with (out / "prompts.jsonl").open("w") as f:
        for p in task.problems("train", 512, seed=0):
            f.write(json.dumps({"prompt": task.search_prompt(p)}) + "\n")
    print(f"wrote {out / 'model'} and {out / 'prompts.jsonl'}")


def run(out: Path, steps: int, compile_update: bool = False, objective: str = "grpo", fp32: bool = False,
        compile_generation: bool = False) -> None:
    from rich.console import Console

    from spiral_cli.recipe import Recipe
    from spiral_cli.rl.trainer import run_train_set

    recipe = Recipe.model_validate({
        "name": "bench", "seed": 0,
        "task": {"name": "toy_reward_task:BenchTask"},
        # bf16 as TRL's bf16=True (fp32 with --fp32); "auto" times the CPU at load, and a busy
        # machine can tip it either way
        "model": {"name": str(out / "model"), "autocast": "off" if fp32 else "on"},
        "generation": {"max_new_tokens": 128, "agg_max_new_tokens": 128, "batch_size": 64, "temperature": 1.0,
                       "compile": compile_generation},
        "train_set": {"objective": objective, "steps": steps, "prompts_per_step": 8, "num_generations": 8,
                      "num_search": 8, "num_sets": 4, "set_size": 4, "num_aggregations": 4,
                      "grpo_max_new_tokens": 128, "dynamic_sampling": False, "eval_problems": 0,
                      "save_every": 10_000, "eval_every": 10_000, "micro_batch_size": 64, "lr": 1e-5,
                      "loss_type": "ppo_clip", "beta": 0.0, "compile": compile_update},
    })
    home = Path(tempfile.mkdtemp(prefix="spiral-bench-"))
    run_train_set(recipe, home=home, model=str(out / "model"), console=Console(stderr=True, quiet=True))
    run_name = "bench-grpo" if objective == "grpo" else "bench-set"
    rows = [json.loads(l) for l in (home / "runs" / run_name / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] if len(rows) > 1 else rows  # step 1 is warm-up (and the compile, with --compile)
    med = {k: statistics.median(r["seconds"][k] for r in timed) for k in ("total", "generation", "scoring", "update")}
    gen_per_step = statistics.median(b["generated_tokens"] - a["generated_tokens"] for a, b in zip(rows, rows[1:])) if len(rows) > 1 else rows[0]["generated_tokens"]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    impl = ("spiral" + ("" if objective == "grpo" else " --objective spiral") + (" compiled update" if compile_update else "")
            + (" compiled decoding" if compile_generation else "")
            + (" fp32" if fp32 else " bf16"))
    print(json.dumps({"impl": impl, "steps_timed": len(timed), "sec_per_step": round(med["total"], 3),
                      "generation_s": round(med["generation"], 3), "scoring_s": round(med["scoring"], 3),
                      "update_s": round(med["update"], 3),
                      # step 1 holds the warm-up and, with --compile, the compile: what a run pays once
                      "first_step_s": round(rows[0]["seconds"]["total"], 3),
                      "first_update_s": round(rows[0]["seconds"]["update"], 3),
                      "first_generation_s": round(rows[0]["seconds"]["generation"], 3), "generated_tokens_per_step": gen_per_step,
                      "sec_per_1k_generated_tokens": round(1000 * med["total"] / gen_per_step, 3),
                      "peak_rss_mb": round(rss_mb), "threads": os.environ.get("OMP_NUM_THREADS", "default")}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["prepare", "run"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--compile", action="store_true", help="train_set.compile: the update's forward compiled")
    ap.add_argument("--compile-generation", action="store_true",
                    help="generation.compile: the lean engine's decoding step compiled")
    ap.add_argument("--objective", choices=["grpo", "spiral"], default="grpo",
                    help="grpo (TRL's work, the default) or a SPIRAL step on the same prompts")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast (compare with trl_grpo.py --no-bf16)")
    a = ap.parse_args()
    prepare(a.dir) if a.what == "prepare" else run(a.dir, a.steps, a.compile, a.objective, a.fp32, a.compile_generation)
