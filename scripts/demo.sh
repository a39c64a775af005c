#!/usr/bin/env bash
# The main job on the built-in default: countdown with a small from-scratch model, on a CPU.
#   1. spiral sft       -- supervised warm start (search + aggregation formats), evaluated, registered
#   2. spiral train-set -- SPIRAL set RL from that checkpoint, evaluated every few steps
#   3. spiral infer     -- 100 new held-out problems: N=8 parallel traces + 1 round of learned aggregation
# Checkpoints and the registry live in $SPIRAL_HOME (default ~/.spiral); outputs in ./out/.
# Extra arguments go to every stage, e.g. `make demo ARGS="--set seed=1"` or `bash scripts/demo.sh --set seed=1`.
set -euo pipefail
cd "$(dirname "$0")/.."
SPIRAL=.venv/bin/spiral
RECIPE=${RECIPE:-recipes/countdown.yaml}
mkdir -p out
$SPIRAL sft "$RECIPE" "$@" > out/sft.json
$SPIRAL train-set "$RECIPE" "$@" > out/train-set.json
$SPIRAL tasks sample countdown -n 100 --split eval --seed 1 --recipe "$RECIPE" > out/problems.jsonl
for model in countdown-sft countdown-set; do
    $SPIRAL infer --model "$model" --parallel 8 --seq-budget 256 --agg-rounds 1 \
        < out/problems.jsonl > "out/answers-$model.jsonl"
done
.venv/bin/python - <<'PY'
import json
sft = json.load(open("out/sft.json"))
rl = json.load(open("out/train-set.json"))
print(f"\nsft: {sft['step']} steps in {sft['train_seconds']:.0f}s; held-out (200 problems):")
for k, v in sft["metrics"].items():
    if "/" in k and "tokens" not in k:
        print(f"  {k:32s} {v:.3f}")
print(f"train-set: {rl['steps']} steps, {rl['generated_tokens']:,} generated tokens; held-out by step:")
for h in rl["history"]:
    keys = [k for k in h if k.endswith(("pass@1", "learned_agg@8", "majority@8"))]
    print(f"  step {h['step']:4d}: " + ", ".join(f"{k.split('/')[-1]} {h[k]:.3f}" for k in keys))
for model in ("countdown-sft", "countdown-set"):
    rows = [json.loads(l) for l in open(f"out/answers-{model}.jsonl")]
    acc = sum(r["correct"] for r in rows) / len(rows)
    tok = sum(r["tokens"]["total"]["generated"] for r in rows) / len(rows)
    print(f"infer {model} (N=8, T=256, R=1) on 100 new problems: accuracy {acc:.1%}, {tok:.0f} generated tokens/problem")
print("answers in out/; checkpoints: .venv/bin/spiral registry ls")
PY
