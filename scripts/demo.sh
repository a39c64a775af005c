#!/usr/bin/env bash
# The main job on the built-in default: countdown with a small from-scratch model, on a CPU.
#   1. spiral sft       -- supervised warm start (search + aggregation formats), evaluated, registered
#   2. spiral train-set -- SPIRAL set RL from that checkpoint until its generated-token budget
#   3. spiral infer     -- 500 held-out problems per model at the recipe's infer settings (the default:
#                          N=8 traces of up to T=256 tokens, R=1 round of learned aggregation), with
#                          pass@1, pass@N, majority@N and learned aggregation side by side (95% intervals)
# Checkpoints and the registry live in $SPIRAL_HOME (default ~/.spiral); outputs in ./out/.
# Extra arguments go to every stage, e.g. `make demo ARGS="--set seed=1"` or `bash scripts/demo.sh --set seed=1`;
# another recipe: `make demo RECIPE=recipes/countdown-rounds.yaml` (its checkpoints are named after it).
set -euo pipefail
cd "$(dirname "$0")/.."
SPIRAL=.venv/bin/spiral
RECIPE=${RECIPE:-recipes/countdown.yaml}
EVAL=${EVAL:-500}
mkdir -p out
start=$(date +%s)
$SPIRAL sft "$RECIPE" "$@" > out/sft.json
$SPIRAL train-set "$RECIPE" "$@" > out/train-set.json
# the names the two stages registered their checkpoints under (<recipe name>-sft, <recipe name>-set)
MODELS=$(.venv/bin/python -c 'import json; print(*(json.load(open(f"out/{s}.json"))["name"] for s in ("sft", "train-set")))')
for model in $MODELS; do
    $SPIRAL infer "$RECIPE" "$@" --model "$model" --eval "$EVAL" \
        > "out/answers-$model.jsonl" 2> >(tee "out/infer-$model.log" >&2)
done
wait
DEMO_SECONDS=$(( $(date +%s) - start )) .venv/bin/python - <<'PY'
import json, os, re

from spiral_cli.machine import describe, summary_line

sft = json.load(open("out/sft.json"))
rl = json.load(open("out/train-set.json"))
models = [sft["name"], rl["name"]]
print(f"\nsft: {sft['step']} steps in {sft['train_seconds']:.0f}s" + (" (STOPPED BY THE TIME BUDGET)" if sft.get("stopped_early") else ""))
print(f"train-set: {rl['steps']} steps, {rl['generated_tokens']:,} generated tokens (stopped on {rl.get('stopped_on', 'steps')})")
figures = {}
for model in models:
    log = open(f"out/infer-{model}.log").read().splitlines()
    done = [l for l in log if l.startswith("done: ")]
    figures[model] = json.loads(done[-1][len("done: "):])["held_out"]
    # the settings line `spiral infer` starts with, e.g. "infer countdown-sft: N=8 T=256 R=1 aggregate=learned ..."
    settings = next((m.group(1) for l in log if (m := re.match(r"infer \S+: (N=\d+ T=\d+ R=\d+)", l))), "")
rows = [k for k in figures[models[0]] if isinstance(figures[models[0]][k], dict)]
n = figures[models[0]]["problems"]
print(f"\nheld-out, {n} problems, {settings.replace(' ', ', ')} (95% bootstrap intervals over problems):")
print(f"  {'':40s} " + " ".join(f"{m:>24s}" for m in models))
for k in rows:
    cells = []
    for model in figures:
        v = figures[model].get(k)
        if v is None:
            cells.append(f"{'-':>24s}")
            continue
        x = v.get("accuracy", v.get("difference"))
        sign = "+" if "difference" in v else ""
        cells.append(f"{x:{sign}6.1%} [{v['interval'][0]:{sign}.1%}, {v['interval'][1]:{sign}.1%}]".rjust(24))
    print(f"  {k:40s} " + " ".join(cells))
# our 2-core machines differ up to 3x in speed: a time says which machine it is from
print(f"\nmake demo: {int(os.environ['DEMO_SECONDS']) // 60} min {int(os.environ['DEMO_SECONDS']) % 60} s end to end "
      f"on a {summary_line(describe())}")
print("answers in out/; checkpoints: .venv/bin/spiral registry ls")
PY
