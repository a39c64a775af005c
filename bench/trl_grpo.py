"""Time per step of TRL's GRPOTrainer on the same work as bench/grpo_step.py.

Run it in a separate environment with TRL installed (not a spiral dependency):

    python3 -m venv /tmp/trlenv && /tmp/trlenv/bin/pip install torch==2.13.0 'trl==1.16.0' 'transformers<5.20' datasets accelerate
    /tmp/trlenv/bin/python bench/trl_grpo.py /tmp/bench --steps 6     # after grpo_step.py prepare
    /tmp/trlenv/bin/python bench/trl_grpo.py /tmp/bench --steps 8 --torch-compile   # beside grpo_step.py --compile

Same model directory, same prompts, same reward (first byte even), 8 prompts x 8 generations x
128 max completion tokens per optimizer step, bf16 autocast on CPU like spiral's default.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path


def first_byte_even(text: str) -> float:
    b = text.encode("utf-8")[:1]
    return float(bool(b) and b[0] % 2 == 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--steps", type=int, default=6)
    # bf16 as spiral's bench default; --no-bf16 with grpo_step.py --fp32 on a CPU without native bf16
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    # TrainingArguments.torch_compile: TRL's side of grpo_step.py --compile
    ap.add_argument("--torch-compile", action="store_true")
    a = ap.parse_args()

    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    prompts = [json.loads(l)["prompt"] for l in (a.dir / "prompts.jsonl").read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": p} for p in prompts[: 8 * a.steps]])
    tok = AutoTokenizer.from_pretrained(a.dir / "model")
    model = AutoModelForCausalLM.from_pretrained(a.dir / "model")

    def reward(completions, **kw):
        return [first_byte_even(c) for c in completions]

    class Timer(TrainerCallback):
        def __init__(self):
            self.t = []
            self.start = None

        def on_step_begin(self, *args, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kw):
            self.t.append(time.perf_counter() - self.start)

    cfg = GRPOConfig(
        output_dir="/tmp/trl-bench-out", per_device_train_batch_size=64, num_generations=8,
        max_completion_length=128, learning_rate=1e-5, max_steps=a.steps, logging_steps=1,
        report_to="none", use_cpu=True, bf16=a.bf16, beta=0.0, temperature=1.0, save_strategy="no",
        gradient_accumulation_steps=1, shuffle_dataset=False, seed=0, torch_compile=a.torch_compile,
    )
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[timer])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h or "completions/mean_length" in h]
    timed = timer.t[1:] if len(timer.t) > 1 else timer.t
    lengths = [h.get("completions/mean_length") for h in logs if h.get("completions/mean_length")]
    print(json.dumps({"impl": f"trl {trl.__version__}" + (" bf16" if a.bf16 else " fp32")
                      + (" torch_compile" if a.torch_compile else ""), "steps_timed": len(timed),
                      "sec_per_step": round(statistics.median(timed), 3),
                      "generated_tokens_per_step": round(64 * statistics.median(lengths)) if lengths else None,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


if __name__ == "__main__":
    main()
