"""Each lever's share of learned aggregation against the vote, over several training seeds (issue 13).

Reads the per-problem answer files that `spiral infer --eval E` writes on stdout (one JSONL file per
training seed) for each stage of a chain of checkpoints, e.g. SFT -> an aggregation-heavy
continuation -> train-agg, and prints two markdown tables:

- per stage: pass@1, pass@N, majority@N, the RSA population and the final answer, means over the
  seeds with 95% bootstrap intervals over problems (`metrics.bootstrap_accuracy`: the same problems
  drawn for every seed), and final answer - majority@N, population - majority@N and final answer -
  pass@N (issue 13's three bars) with their paired intervals;
- per stage against its base stage: the change in majority@N, final answer and final answer -
  majority@N (`metrics.paired_bootstrap_diff`), with each seed's change beside it.

    .venv/bin/python scripts/lever_effects.py sft=s0.jsonl,s1.jsonl cont=c0.jsonl,c1.jsonl \\
        "agg:cont=a0.jsonl,a1.jsonl" "set:cont=t0.jsonl" [--json out.json]

A stage is NAME=FILES or NAME:BASE=FILES; without BASE its base is the stage before it. Files are
positional per seed: a stage with fewer files than its base is compared with the base on the base's
first seeds only. Every file must hold the same problems (joined by id), as `spiral infer` gives
for one recipe and `--eval`. Intervals cover the choice of problems given the trained seeds; the
per-seed columns show how much the seeds themselves differ.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# column -> the per-problem field of `spiral infer`'s answer records
COLUMNS = {"pass@1": "trace_accuracy", "pass@N": "any_correct", "majority@N": "majority_correct",
           "population": "aggregation_accuracy", "final": "correct"}
_STAGE = re.compile(r"([A-Za-z0-9._-]+)(?::([A-Za-z0-9._-]+))?=(.+)")


class InputError(ValueError):
    """Bad arguments or files: reported in one line, exit 2."""


def parse_stage(spec: str, previous: str | None) -> tuple[str, str | None, list[Path]]:
    m = _STAGE.fullmatch(spec)
    if m is None:
        raise InputError(f"stage {spec!r}: give NAME=FILE[,FILE...] or NAME:BASE=FILE[,FILE...]")
    name, base, files = m.group(1), m.group(2) or previous, [Path(f) for f in m.group(3).split(",")]
    if any(not str(f) for f in files):
        raise InputError(f"stage {name}: an empty file name in {m.group(3)!r}")
    return name, base, files


def read_answers(path: Path) -> dict[str, dict]:
    """One `spiral infer` answer file: problem id -> record (only the fields this script reads)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    rows: dict[str, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            rows[str(r["id"])] = {col: float(r[key]) for col, key in COLUMNS.items()}
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}:{n}: not a `spiral infer --eval` answer record with "
                             f"{', '.join(COLUMNS.values())} ({type(e).__name__}: {e})") from None
    if not rows:
        raise InputError(f"{path}: no answer records")
    return rows


def load_stages(specs: list[str]) -> tuple[dict[str, dict], list[str]]:
    """{stage: {"base": name | None, "files": [...], "values": {column: (seeds, problems) list}}} and
    the problem ids every file shares, in the first file's order."""
    stages: dict[str, dict] = {}
    previous = None
    ids: list[str] | None = None
    first: Path | None = None
    for spec in specs:
        name, base, files = parse_stage(spec, previous)
        if name in stages:
            raise InputError(f"stage {name}: given twice")
        if base is not None and base not in stages:
            raise InputError(f"stage {name}: base {base!r} is not a stage given before it")
        per_seed = []
        for f in files:
            rows = read_answers(f)
            if ids is None:
                ids, first = list(rows), f
            elif set(rows) != set(ids):
                raise InputError(f"{f}: its problems differ from {first}'s ({len(set(rows) ^ set(ids))} ids in one "
                                 "only): evaluate every model on the same --eval problems")
            per_seed.append(rows)
        values = {col: [[rows[i][col] for i in ids] for rows in per_seed] for col in COLUMNS}
        stages[name] = {"base": base, "files": [str(f) for f in files], "values": values}
        previous = name
    return stages, ids or []


def _difference(a, b) -> dict:
    """a - b on the same problems with its paired interval, and each seed's own difference."""
    from spiral_cli.metrics import paired_bootstrap_diff

    d = paired_bootstrap_diff(a, b)
    return {"estimate": d["estimate"], "interval": list(d["interval"]),
            "per_seed": [x - y for x, y in zip(d["per_seed_a"], d["per_seed_b"])]}


def summarise(stages: dict[str, dict]) -> dict[str, dict]:
    """The figures of both tables (fractions, not percent)."""
    import numpy as np

    from spiral_cli.metrics import bootstrap_accuracy

    out: dict[str, dict] = {}
    for name, st in stages.items():
        v = {col: np.asarray(x) for col, x in st["values"].items()}
        row: dict = {"seeds": len(st["files"]), "files": st["files"], "base": st["base"]}
        for col in COLUMNS:
            b = bootstrap_accuracy(v[col])
            row[col] = {"estimate": b["estimate"], "interval": list(b["interval"]), "per_seed": b["per_seed"]}
        row["final - majority@N"] = _difference(v["final"], v["majority@N"])
        # issue 13's other two bars: the RSA population against the vote, the final answer against the oracle
        row["population - majority@N"] = _difference(v["population"], v["majority@N"])
        row["final - pass@N"] = _difference(v["final"], v["pass@N"])
        if st["base"] is not None:
            base = {col: np.asarray(x) for col, x in stages[st["base"]]["values"].items()}
            k = min(len(st["files"]), len(stages[st["base"]]["files"]))
            changes = {}
            for label, here, there in (
                ("majority@N", v["majority@N"][:k], base["majority@N"][:k]),
                ("final", v["final"][:k], base["final"][:k]),
                ("final - majority@N", (v["final"] - v["majority@N"])[:k], (base["final"] - base["majority@N"])[:k]),
            ):
                changes[label] = _difference(here, there)
            row["change"] = {"seeds": k, **changes}
        out[name] = row
    return out


def _pct(x: float, signed: bool = False) -> str:
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _cell(fig: dict, signed: bool = False) -> str:
    lo, hi = fig["interval"]
    return f"{_pct(fig['estimate'], signed)} [{_pct(lo, signed)}, {_pct(hi, signed)}]"


def markdown(summary: dict[str, dict], n_problems: int) -> str:
    lines = [f"Held-out, {n_problems} problems; means over seeds, 95% bootstrap intervals over problems (points).", "",
             "| stage | seeds | " + " | ".join(COLUMNS) + " | final − majority@N | (per seed) "
             "| population − majority@N | final − pass@N |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|---|---|---|"]
    for name, row in summary.items():
        gap = row["final - majority@N"]
        lines.append(f"| {name} | {row['seeds']} | " + " | ".join(_cell(row[c]) for c in COLUMNS)
                     + f" | {_cell(gap, True)} | {', '.join(_pct(x, True) for x in gap['per_seed'])} "
                     f"| {_cell(row['population - majority@N'], True)} | {_cell(row['final - pass@N'], True)} |")
    changed = {n: r for n, r in summary.items() if "change" in r}
    if changed:
        lines += ["", "| stage − its base | seeds | Δ majority@N | Δ final | Δ (final − majority@N) | per seed |",
                  "|---|---|---|---|---|---|"]
        for name, row in changed.items():
            c = row["change"]
            lines.append(f"| {name} − {row['base']} | {c['seeds']} | {_cell(c['majority@N'], True)} | "
                         f"{_cell(c['final'], True)} | {_cell(c['final - majority@N'], True)} | "
                         f"{', '.join(_pct(x, True) for x in c['final - majority@N']['per_seed'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stages", nargs="+", help="NAME=FILES or NAME:BASE=FILES (comma-separated, one file per seed)")
    p.add_argument("--json", type=Path, help="also write the figures here (fractions)")
    args = p.parse_args(argv)
    try:
        if args.json is not None and args.json.is_dir():
            raise InputError(f"--json {args.json}: is a directory")
        stages, ids = load_stages(args.stages)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarise(stages)
    print(markdown(summary, len(ids)), end="")
    if args.json is not None:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps({"problems": len(ids), "stages": summary}, indent=1) + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
