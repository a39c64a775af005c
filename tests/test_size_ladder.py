"""scripts/size_ladder.py: the model-size ladder runs the recipe's pipeline per preset, tabulates
held-out figures and verdict rates, and a rerun redoes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "size_ladder.py"

# countdown, shrunk to seconds: a few SFT steps, one RL step, 4 held-out problems, 2 diagnosed
SMALL = ["sft.num_search_examples=64", "sft.num_aggregate_examples=32", "sft.steps=3", "sft.eval_problems=0",
         "sft.compile=false", "sft.save_every=100", "generation.max_new_tokens=12", "generation.agg_max_new_tokens=12",
         "train_set.steps=1", "train_set.max_generated_tokens=null", "train_set.prompts_per_step=2",
         "train_set.eval_problems=0", "train_set.dynamic_sampling=false", "model.autocast=off"]


def _ladder(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    sets = [x for s in SMALL for x in ("--set", s)]
    env = {**os.environ, "SPIRAL_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--eval", "4", *sets, *args],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_ladder_trains_evaluates_diagnoses_and_a_rerun_redoes_nothing(tmp_path):
    p = _ladder(tmp_path, "--presets", "nano", "--diagnosis", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "ladder.json").read_text())
    (row,) = summary["rows"]
    assert row["preset"] == "nano" and set(row["models"]) == {"ladder-nano-sft", "ladder-nano-set"}
    assert {"sft", "train-set"} <= set(row["seconds"])
    for figures in row["models"].values():
        held = figures["held_out"]
        assert held["problems"] == 4
        assert 0 <= held["pass@1"]["accuracy"] <= held["pass@8"]["accuracy"] <= 1
        assert held["majority@8"]["accuracy"] <= held["pass@8"]["accuracy"]
        v = figures["verdicts"]
        assert v["sets"] == 2 * 8 and 0 <= v["accepts_right"] <= 1 and 0 <= v["accepts_wrong"] <= 1
    table = (tmp_path / "out" / "ladder.md").read_text()
    assert "| final answer - majority@8 |" in table and "ladder-nano-set" in table and "Machine:" in table
    # the rerun: the SFT is registered at its planned step, the RL run resumes at its last step,
    # infer and diagnosis results are read back; only train-set is started (and stops at once)
    again = _ladder(tmp_path, "--presets", "nano", "--diagnosis", "2")
    assert again.returncode == 0, again.stderr[-2000:]
    (row2,) = json.loads((tmp_path / "out" / "ladder.json").read_text())["rows"]
    assert set(row2["seconds"]) == {"train-set"}
    assert row2["models"] == row["models"]


def test_ladder_refuses_an_unknown_preset_before_any_work(tmp_path):
    p = _ladder(tmp_path, "--presets", "tiny,huge")
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith("error: --presets: unknown ['huge']")
    assert not (tmp_path / "home").exists()
