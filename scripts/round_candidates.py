"""How good the model's own candidates were at each self-aggregation round of a `spiral sft` run.

A run with `sft.self_aggregate_examples` samples sets of its own search traces at the start of each
round and keeps them, with the verifier's targets, in `runs/<name>/self_aggregate.jsonl`,
`self_aggregate-2.jsonl`, ... (for resume). The targets' verdict lines (countdown: one per
candidate, "k: <the check of its steps> ok", "... no", or "k: none" for a trace without an answer)
say what the model could do at that step of training, with no new sampling:

    .venv/bin/python scripts/round_candidates.py $SPIRAL_HOME/runs/r4-s1 $SPIRAL_HOME/runs/r4b-s1

prints one markdown row per run and round: sets, candidates, the share the verifier accepts, rejects
and that carry no answer, and the share of sets with at least one accepted candidate. Two runs of
one recipe that part ways show it here round by round (docs/results.md, session 25).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

VERDICT = re.compile(r"^(\d+): (.*)$")


def round_number(path: Path) -> int:
    """1 for self_aggregate.jsonl, k for self_aggregate-k.jsonl, 0 for any other file."""
    m = re.fullmatch(r"self_aggregate(?:-(\d+))?\.jsonl", path.name)
    return int(m.group(1) or 1) if m else 0


def round_files(run_dir: Path) -> list[Path]:
    """self_aggregate.jsonl, self_aggregate-2.jsonl, ... in round order."""
    return sorted((p for p in run_dir.glob("self_aggregate*.jsonl") if round_number(p)), key=round_number)


def count(path: Path) -> dict[str, int]:
    """Verdicts of one round's targets. Only the numbered verdict lines count: a target that
    rejects every candidate goes on to search again, and those step lines are not verdicts."""
    out = {"sets": 0, "candidates": 0, "accepted": 0, "rejected": 0, "no_answer": 0, "sets_with_accepted": 0}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            completion = json.loads(line)["completion"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a self-aggregation example ({e})") from None
        accepted = 0
        for verdict in (m.group(2) for m in map(VERDICT.match, completion.split("\n")) if m):
            out["candidates"] += 1
            if verdict == "none":
                out["no_answer"] += 1
            elif verdict.endswith(" ok") or verdict == "ok":
                out["accepted"] += 1
                accepted += 1
            else:
                out["rejected"] += 1
        out["sets"] += 1
        out["sets_with_accepted"] += accepted > 0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories ($SPIRAL_HOME/runs/<name>)")
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        files = round_files(run) if run.is_dir() else []
        if not files:
            print(f"error: {run}: no self_aggregate*.jsonl (not the run directory of an sft with "
                  "sft.self_aggregate_examples)", file=sys.stderr)
            return 2
        try:
            rows += [(run.name, round_number(f), count(f)) for f in files]
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print("| run | round | sets | candidates | accepted | rejected | no answer | sets with an accepted one |")
    print("|---|---|---|---|---|---|---|---|")
    for name, i, c in rows:
        accepted, rejected, no_answer = (f"{100 * c[k] / max(c['candidates'], 1):.1f}%"
                                         for k in ("accepted", "rejected", "no_answer"))
        print(f"| {name} | {i} | {c['sets']:,} | {c['candidates']:,} | {accepted} | {rejected} | {no_answer} | "
              f"{100 * c['sets_with_accepted'] / max(c['sets'], 1):.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
