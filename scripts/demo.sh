#!/usr/bin/env bash
# The main job on the built-in default: countdown with a small from-scratch model.
#   1. spiral sft   -- supervised warm start (search + aggregation formats), evaluated and registered
#   2. spiral infer -- held-out problems through N=8 parallel traces + learned aggregation
# Checkpoints and the registry live in $SPIRAL_HOME (default ~/.spiral); outputs in ./out/.
set -euo pipefail
cd "$(dirname "$0")/.."
SPIRAL=.venv/bin/spiral
RECIPE=${RECIPE:-recipes/countdown.yaml}
mkdir -p out
$SPIRAL sft "$RECIPE" "$@" > out/sft.json
$SPIRAL tasks sample countdown -n 100 --split eval --seed 1 --recipe "$RECIPE" > out/problems.jsonl
$SPIRAL infer --model countdown-sft --parallel 8 --seq-budget 256 --agg-rounds 1 \
    < out/problems.jsonl > out/answers.jsonl
.venv/bin/python - <<'PY'
import json
rows = [json.loads(l) for l in open("out/answers.jsonl")]
sft = json.load(open("out/sft.json"))
acc = sum(r["correct"] for r in rows) / len(rows)
tok = sum(r["tokens"]["total"]["generated"] for r in rows) / len(rows)
print(f"sft: {sft['steps']} steps in {sft['train_seconds']:.0f}s; held-out metrics:")
for k, v in sft["metrics"].items():
    if "/" in k and "tokens" not in k:
        print(f"  {k:32s} {v:.3f}")
print(f"infer (N=8, T=256, 1 aggregation round) on 100 new problems: accuracy {acc:.1%}, {tok:.0f} generated tokens/problem")
print("answers in out/answers.jsonl; registry: .venv/bin/spiral registry ls")
PY
