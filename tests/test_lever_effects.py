"""scripts/lever_effects.py: each stage's figures over seeds and its change over its base stage,
against hand computation; bad input is one line and exit 2."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lever_effects", REPO / "scripts" / "lever_effects.py")
lever_effects = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lever_effects)


def _answers(path: Path, final: list[int], majority: list[int], ids=("a", "b", "c", "d")) -> str:
    """An answer file as `spiral infer --eval` writes it (the fields the script reads, and others)."""
    rows = [{"id": i, "problem": {"id": i}, "answer": "1+2", "correct": bool(f), "majority_correct": bool(m),
             "trace_accuracy": 0.25, "any_correct": True, "aggregation_accuracy": 0.5, "tokens": {}}
            for i, f, m in zip(ids, final, majority)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = lever_effects.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_stage_figures_and_changes_match_hand_computation(tmp_path, capsys):
    # seed 0 / seed 1 of two stages, four problems
    s0 = _answers(tmp_path / "s0", final=[1, 0, 0, 1], majority=[1, 1, 0, 0])  # final - majority: 0, -1, 0, +1
    s1 = _answers(tmp_path / "s1", final=[0, 0, 1, 1], majority=[1, 0, 1, 1])  # -1, 0, 0, 0
    c0 = _answers(tmp_path / "c0", final=[1, 1, 0, 1], majority=[1, 1, 0, 0])  # 0, 0, 0, +1
    c1 = _answers(tmp_path / "c1", final=[1, 0, 1, 1], majority=[1, 0, 1, 1])  # 0, 0, 0, 0
    rc, out, err = _run(capsys, f"sft={s0},{s1}", f"cont={c0},{c1}", "--json", str(tmp_path / "f.json"))
    assert rc == 0, err
    stages = json.loads((tmp_path / "f.json").read_text())["stages"]
    sft, cont = stages["sft"], stages["cont"]
    assert sft["final"]["estimate"] == pytest.approx(0.5) and sft["final"]["per_seed"] == [0.5, 0.5]
    assert sft["majority@N"]["per_seed"] == [0.5, 0.75]
    assert sft["final - majority@N"]["estimate"] == pytest.approx(-0.125)
    assert sft["final - majority@N"]["per_seed"] == [0.0, -0.25]
    assert sft["pass@1"]["estimate"] == pytest.approx(0.25) and sft["population"]["estimate"] == pytest.approx(0.5)
    # population 0.5 on every problem against majority 0.5 (seed 0) and 0.75 (seed 1); pass@N is 1
    assert sft["population - majority@N"]["per_seed"] == [0.0, -0.25]
    assert sft["population - majority@N"]["estimate"] == pytest.approx(-0.125)
    assert sft["final - pass@N"]["per_seed"] == [-0.5, -0.5] and sft["final - pass@N"]["estimate"] == pytest.approx(-0.5)
    assert cont["base"] == "sft" and "change" not in sft
    change = cont["change"]
    assert change["seeds"] == 2
    assert change["final"]["estimate"] == pytest.approx(0.25) and change["final"]["per_seed"] == [0.25, 0.25]
    assert change["majority@N"]["estimate"] == pytest.approx(0.0)
    assert change["final - majority@N"]["estimate"] == pytest.approx(0.25)
    assert change["final - majority@N"]["per_seed"] == [0.25, 0.25]
    # the interval, replayed by hand: per problem, the seed-mean change of (final - majority) is
    # 0.5, 0.5, 0, 0; 2000 resamples of the 4 problems from default_rng(0), percentiles 2.5 / 97.5
    per_problem = np.array([0.5, 0.5, 0.0, 0.0])
    draws = np.random.default_rng(0).integers(0, 4, size=(2000, 4))
    lo, hi = np.quantile(per_problem[draws].mean(axis=1), [0.025, 0.975])
    assert change["final - majority@N"]["interval"] == pytest.approx([lo, hi])
    # the markdown says the same, in points
    assert "| sft | 2 | 25.0 [25.0, 25.0] | 100.0 [100.0, 100.0] | 62.5" in out
    assert "| cont − sft | 2 | +0.0" in out and "| +25.0, +25.0 |" in out
    assert "| +0.0, -25.0 | -12.5 [" in out and "] | -50.0 [" in out


def test_a_branch_names_its_base_and_fewer_seeds_compare_on_the_first(tmp_path, capsys):
    s0 = _answers(tmp_path / "s0", final=[0, 0, 0, 0], majority=[0, 0, 0, 0])
    s1 = _answers(tmp_path / "s1", final=[1, 1, 1, 1], majority=[0, 0, 0, 0])
    c0 = _answers(tmp_path / "c0", final=[1, 1, 0, 0], majority=[0, 0, 0, 0])
    t0 = _answers(tmp_path / "t0", final=[1, 0, 0, 0], majority=[0, 0, 0, 0])
    rc, _, err = _run(capsys, f"sft={s0},{s1}", f"cont={c0}", f"set:sft={t0}", "--json", str(tmp_path / "f.json"))
    assert rc == 0, err
    stages = json.loads((tmp_path / "f.json").read_text())["stages"]
    # cont has seed 0 only: compared with sft's seed 0 (0%), not with both seeds' mean (50%)
    assert stages["cont"]["change"]["seeds"] == 1 and stages["cont"]["change"]["final"]["estimate"] == pytest.approx(0.5)
    assert stages["set"]["base"] == "sft" and stages["set"]["change"]["final"]["estimate"] == pytest.approx(0.25)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("other_problems", "its problems differ from"),
    ("unknown_base", "base 'nope' is not a stage given before it"),
    ("not_records", "not a `spiral infer --eval` answer record"),
    ("bad_spec", "give NAME=FILE"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, message):
    s0 = _answers(tmp_path / "s0", final=[1, 0, 0, 1], majority=[1, 1, 0, 0])
    stages = {
        "missing": [f"sft={s0}", f"cont={tmp_path / 'absent.jsonl'}"],
        "other_problems": [f"sft={s0}", "cont=" + _answers(tmp_path / "o", [1, 1, 1, 1], [0, 0, 0, 0], ids="abcx")],
        "unknown_base": [f"sft={s0}", f"cont:nope={s0}"],
        "not_records": [f"sft={s0}", "cont=" + str(tmp_path / "log")],
        "bad_spec": [f"sft {s0}"],
    }[case]
    (tmp_path / "log").write_text("held-out, 500 problems\n")
    rc, out, err = _run(capsys, *stages, "--json", str(tmp_path / "f.json"))
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "f.json").exists()
