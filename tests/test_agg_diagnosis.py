"""scripts/agg_diagnosis.py: the kinds of candidate a search trace is, in the steps view."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from spiral_cli.tasks import load_task

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("agg_diagnosis", REPO / "scripts" / "agg_diagnosis.py")
agg_diagnosis = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(agg_diagnosis)

P = {"numbers": [19, 22, 11, 14], "target": 44}


def test_candidate_kinds_in_the_steps_view():
    t = load_task("countdown", {"agg_view": "steps", "agg_answer": "select", "number_rule": "at_most_once"})
    kind = lambda trace: agg_diagnosis.candidate_kind(t, P, trace)  # noqa: E731
    assert kind("22+19=41 (11 14 41)\n41-11=30 (14 30)\n30+14=44 (44)\nanswer: 22+19-11+14\n") == "right"
    assert kind("fail\n") == "none"
    # every step right, stopped at 41: the kind a trained model writes most (docs/results.md)
    assert kind("22+19=41 (11 14 41)\nanswer: 22+19\n") == "off target"
    # the numbers-left list is rewritten by the check, not checked: still right steps off the target
    assert kind("22+19=41 (14 11 41)\nanswer: 22+19\n") == "off target"
    assert kind("22+19=42 (11 14 42)\n42+2=44 (11 14 44)\nanswer: 22+19+2\n") == "a step wrong"
    assert kind("22/11=3 (19 14 3)\nanswer: 22/11\n") == "a step wrong"  # inexact division
    assert kind("22+19=41 (11 14 41)\n41+3=44 (11 14 44)\nanswer: 22+19+3\n") == "uses a number not left"
    assert kind("answer: 22+19+3\n") == "no steps"
    exact = load_task("countdown", {"agg_view": "steps", "agg_answer": "select", "number_rule": "exactly_once"})
    reached = "22+19=41 (11 14 41)\n41+14=55 (11 55)\n55-11=44 (44)\nanswer: 22+19+14-11\n"
    assert agg_diagnosis.candidate_kind(exact, P, reached) == "right"
    early = "22+19=41 (11 14 41)\n41-11=30 (14 30)\n30+14=44 (44)\nanswer: 22+19-11+14\n"
    assert agg_diagnosis.candidate_kind(exact, {"numbers": [19, 22, 11, 14, 2], "target": 44}, early) == "numbers left unused"
