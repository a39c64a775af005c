"""Learned aggregation against model size: the lever issue 13 left unmeasured on the CPU.

For each scratch preset, the countdown recipe's own pipeline with only `model.name` changed:

    spiral sft RECIPE --set model.name=scratch:<preset> --name ladder-<preset>-sft
    spiral train-set RECIPE --model ladder-<preset>-sft --name ladder-<preset>-set
    spiral infer RECIPE --model <each> --eval E --parallel 8 --seq-budget 256 --agg-rounds 1
    scripts/agg_diagnosis.py <each> 1.0 D       (how sharp the aggregator's verdicts are)

then one table (markdown and JSON) of pass@1, pass@8, majority@8, learned aggregation (population
and final answer, each against majority@8 with its paired interval) and the verdict rates, per
preset and stage, with each stage's wall time and the machine it ran on.

    .venv/bin/python scripts/size_ladder.py --out out/ladder --presets tiny,tiny-deep,small \\
        [--recipe recipes/countdown.yaml] [--eval 500] [--diagnosis 100] [--set task.agg_view=grouped ...]

Reruns skip what is done: an SFT already registered at its planned step, an RL run whose budget is
met (the trainer resumes and stops at once), infer and diagnosis results already in --out. Budgets
count steps and tokens, so a preset's model is the same on a CPU and on a GPU; a GPU only makes it
quicker (scratch:small is ~8x tiny's compute per token; docs/results.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
ROWS = ("pass@1", "pass@8", "majority@8", "learned population@8 (R=1)", "final answer",
        "learned population@8 (R=1) - majority@8", "final answer - majority@8")


def _spiral(args: list[str], home: Path, log: Path) -> tuple[str, float]:
    """Run one spiral command; its stderr goes to `log`. Returns (stdout, wall seconds)."""
    t0 = time.time()
    with log.open("w") as err:
        p = subprocess.run([sys.executable, "-m", "spiral_cli", *args], stdout=subprocess.PIPE, stderr=err, text=True,
                           env={**os.environ, "SPIRAL_HOME": str(home)}, cwd=REPO)
    if p.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"error: spiral {' '.join(args[:2])} failed (exit {p.returncode}): {' | '.join(tail)}")
    return p.stdout, time.time() - t0


def _held_out(log: Path) -> dict:
    done = [line for line in log.read_text().splitlines() if line.startswith("done: ")]
    return json.loads(done[-1][len("done: "):])["held_out"]


def _sft_done(home: Path, name: str, recipe: str, sets: list[str]) -> bool:
    from spiral_cli.recipe import load_recipe
    from spiral_cli.registry import Registry

    entry = Registry(home).latest(name)
    return entry is not None and entry.step >= load_recipe(recipe, sets).sft.steps


def run_preset(preset: str, a: argparse.Namespace, home: Path, out: Path, sets: list[str]) -> dict:
    sft, rl = f"ladder-{preset}-sft", f"ladder-{preset}-set"
    opts = [x for s in [*sets, f"model.name=scratch:{preset}"] for x in ("--set", s)]
    row: dict = {"preset": preset, "seconds": {}, "models": {}}
    if not _sft_done(home, sft, a.recipe, [*sets, f"model.name=scratch:{preset}"]):
        print(f"[{preset}] spiral sft ... --name {sft}", flush=True)
        _, row["seconds"]["sft"] = _spiral(["sft", a.recipe, *opts, "--name", sft], home, out / f"{sft}.log")
    if "set" in a.stages:
        print(f"[{preset}] spiral train-set ... --name {rl}", flush=True)
        _, row["seconds"]["train-set"] = _spiral(["train-set", a.recipe, *opts, "--model", sft, "--name", rl], home,
                                                 out / f"{rl}.log")
    for model in [sft, rl] if "set" in a.stages else [sft]:
        figures = out / f"{model}.held_out.json"
        if not figures.is_file():
            print(f"[{preset}] spiral infer --model {model} --eval {a.eval}", flush=True)
            log = out / f"{model}.infer.log"
            _, row["seconds"][f"infer {model}"] = _spiral(
                ["infer", a.recipe, *opts, "--model", model, "--eval", str(a.eval), "--parallel", "8",
                 "--seq-budget", "256", "--agg-rounds", "1"], home, log)
            figures.write_text(json.dumps(_held_out(log), indent=1))
        verdicts = out / f"{model}.verdicts.json"
        if a.diagnosis and not verdicts.is_file():
            print(f"[{preset}] scripts/agg_diagnosis.py {model} 1.0 {a.diagnosis}", flush=True)
            sys.path.insert(0, str(SCRIPTS))
            from agg_diagnosis import main as diagnose

            from spiral_cli.registry import Registry

            os.environ["SPIRAL_HOME"] = str(home)
            t0 = time.time()
            ckpt = str(Registry(home).resolve(model).path)
            rates = diagnose(ckpt, 1.0, a.diagnosis, sets, recipe_path=a.recipe)
            row["seconds"][f"diagnosis {model}"] = time.time() - t0
            verdicts.write_text(json.dumps(rates, indent=1))
        row["models"][model] = {"held_out": json.loads(figures.read_text()),
                                "verdicts": json.loads(verdicts.read_text()) if verdicts.is_file() else None}
    return row


def table(rows: list[dict]) -> str:
    def cell(v: dict | None) -> str:
        if not v:
            return "–"
        x = v.get("accuracy", v.get("difference"))
        sign = "+" if "difference" in v else ""
        return f"{x * 100:{sign}.1f} [{v['interval'][0] * 100:{sign}.1f}, {v['interval'][1] * 100:{sign}.1f}]"

    models = [(r["preset"], m, d) for r in rows for m, d in r["models"].items()]
    lines = ["| | " + " | ".join(m for _, m, _ in models) + " |", "|---" * (len(models) + 1) + "|"]
    for name in ROWS:
        lines.append(f"| {name} | " + " | ".join(cell(d["held_out"].get(name)) for _, _, d in models) + " |")
    for key, label in (("accepts_right", "verdicts: accepts right"), ("accepts_wrong", "verdicts: accepts wrong"),
                       ("faithful_verdict_lines", "verdict lines = the verifier's check")):
        lines.append(f"| {label} | " + " | ".join(f"{d['verdicts'][key]:.0%}" if d["verdicts"] else "–"
                                                  for _, _, d in models) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="where the logs, figures and ladder.md/json go")
    ap.add_argument("--presets", default="tiny,tiny-deep,small")
    ap.add_argument("--recipe", default="recipes/countdown.yaml")
    ap.add_argument("--eval", type=int, default=500, help="held-out problems per model")
    ap.add_argument("--diagnosis", type=int, default=100, help="problems for the verdict diagnosis (0: none)")
    ap.add_argument("--stages", default="sft,set", help="sft, or sft,set (with SPIRAL set RL)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override for every stage")
    a = ap.parse_args(argv)
    from spiral_cli.machine import describe, summary_line
    from spiral_cli.models import SCRATCH_PRESETS
    from spiral_cli.paths import spiral_home

    presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in SCRATCH_PRESETS]
    if unknown or not presets:
        raise SystemExit(f"error: --presets: unknown {unknown or 'none given'} (choose from {', '.join(SCRATCH_PRESETS)})")
    if a.out.exists() and not a.out.is_dir():
        raise SystemExit(f"error: --out {a.out} is a file")
    a.out.mkdir(parents=True, exist_ok=True)
    home = spiral_home()
    machine = describe()
    rows = []
    for preset in presets:
        rows.append(run_preset(preset, a, home, a.out, a.sets))
        summary = {"machine": machine, "recipe": a.recipe, "overrides": a.sets, "eval": a.eval, "rows": rows}
        (a.out / "ladder.json").write_text(json.dumps(summary, indent=1))
        (a.out / "ladder.md").write_text(f"Machine: {summary_line(machine)}; recipe {a.recipe} {' '.join(a.sets)}; "
                                         f"{a.eval} held-out problems, N = 8, T = 256, R = 1\n\n{table(rows)}\n")
    print((a.out / "ladder.md").read_text())


if __name__ == "__main__":
    main()
