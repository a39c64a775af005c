"""scripts/round_candidates.py: the verdict counts of each self-aggregation round against hand
counting; search lines after a rejection are not verdicts; bad input is one line and exit 2."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("round_candidates", REPO / "scripts" / "round_candidates.py")
round_candidates = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(round_candidates)


def _round(path: Path, completions: list[str]) -> None:
    path.write_text("".join(json.dumps({"prompt": "agg ...\n--\n", "completion": c, "kind": "self_aggregate"}) + "\n"
                            for c in completions))


def test_counts_each_round_in_order(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    # round 1: one set with 2 accepted, 1 rejected, 1 without an answer; one set rejecting all, then searching
    _round(run / "self_aggregate.jsonl", [
        "1: 24*3=72 (17 72) ok\n2: 24*3=72 (17 72) ok\n3: none\n4: 24+3=27 (17 27) 27+17=44 (44) no\nanswer: #1\n",
        "1: 5-1=4 (15 19 4) no\n2: none\n3: none\n4: 15/5=3 (1 19 3) uses 15 no\n"
        "17+12=29 (23 3 29)\n29+3=32 (23 32)\nback\nfail\n",
    ])
    # round 2 (written after round 10 would sort before it as text): every candidate accepted
    _round(run / "self_aggregate-2.jsonl", ["1: 2+2=4 (4) ok\n2: 2*2=4 (4) ok\nanswer: #1\n"])
    _round(run / "self_aggregate-10.jsonl", ["1: none\n2: none\nfail\n"])
    (run / "self_aggregate.jsonl.tmp").write_text("not a round")
    assert [p.name for p in round_candidates.round_files(run)] == [
        "self_aggregate.jsonl", "self_aggregate-2.jsonl", "self_aggregate-10.jsonl"]
    assert round_candidates.count(run / "self_aggregate.jsonl") == {
        "sets": 2, "candidates": 8, "accepted": 2, "rejected": 3, "no_answer": 3, "sets_with_accepted": 1}
    assert round_candidates.main([str(run)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert rows == [
        "| r | 1 | 2 | 8 | 25.0% | 37.5% | 37.5% | 50.0% |",
        "| r | 2 | 1 | 2 | 100.0% | 0.0% | 0.0% | 100.0% |",
        "| r | 10 | 1 | 2 | 0.0% | 0.0% | 100.0% | 0.0% |",
    ]


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert round_candidates.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no self_aggregate" in err
    run = tmp_path / "r"
    run.mkdir()
    (run / "self_aggregate.jsonl").write_text("{not json\n")
    assert round_candidates.main([str(run)]) == 2
    err = capsys.readouterr()
    assert err.out == "" and err.err.count("\n") == 1 and "self_aggregate.jsonl:1" in err.err
