"""scripts/results_from_compare.py: docs/results.md and the README headline come from a compare report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "results_from_compare.py"

CONCLUSION = [
    "Overall, at 1,200,000 generated training tokens per arm and 3 seeds per method, SPIRAL is ahead on learned "
    "aggregation; the difference is within noise on pass@N, majority@N.",
    "On pass@N (N=8, T=256) there is no clear difference: 64.0% vs 67.0%.",
    "On learned aggregation (N=8, T=256, R=1) SPIRAL is ahead of GRPO: 34.2% vs 22.5%, difference +11.8 points.",
    "Scaling efficiency on pass@N: 0.90x at best.",
    "Scaling efficiency on learned aggregation: GRPO needs up to 1.29x the inference tokens.",
]


def _report(tmp: Path) -> Path:
    rep = tmp / "report"
    rep.mkdir()
    (rep / "summary.json").write_text(json.dumps({"conclusion": CONCLUSION, "seeds": 3, "problems_scored": 500,
                                                  "sft_model": "countdown-sft@5300", "quick": False}))
    (rep / "report.md").write_text("# SPIRAL vs GRPO at an equal training budget: countdown\n\n"
                                   "## Setup\n\n- budget\n\n## Conclusion\n\n- " + CONCLUSION[0] + "\n")
    (rep / "commands.txt").write_text("# spiral compare: commands\n\n# as run\n"
                                      "spiral --home /tmp/x compare recipes/countdown.yaml --seeds 3\n")
    (rep / "accuracy_vs_inference_tokens.png").write_bytes(b"png-inference")
    (rep / "accuracy_vs_training_tokens.png").write_bytes(b"png-training")
    return rep


def _docs(tmp: Path) -> tuple[Path, Path]:
    docs = tmp / "results.md"
    docs.write_text("# Results of the default recipe\n\nIntro.\n\n## 2026-12-01: older\n\nold text\n")
    readme = tmp / "README.md"
    readme.write_text("# spiral\n\n## Results\n\n<!-- headline:begin -->\nstale\n<!-- headline:end -->\n\n"
                      "More.\n\n## Code map\n")
    return docs, readme


def _run(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    docs, readme = tmp / "results.md", tmp / "README.md"
    return subprocess.run([sys.executable, str(SCRIPT), *extra, "--docs", str(docs), "--readme", str(readme),
                           "--img", str(tmp / "img"), "--machine", "2-core AMD EPYC", "--date", "2026-12-02",
                           "--wall", "1 h 50 min"], capture_output=True, text=True, timeout=60)


def test_report_becomes_the_results_section_and_the_headline(tmp_path):
    rep = _report(tmp_path)
    docs, readme = _docs(tmp_path)
    p = _run(tmp_path, str(rep))
    assert p.returncode == 0, p.stderr
    text = docs.read_text()
    # the generated block sits before the older sections, headings one level down, plots linked and copied
    assert text.index("compare-report:begin") < text.index("## 2026-12-01: older")
    assert "## 2026-12-02: SPIRAL vs GRPO at an equal training budget (`spiral compare`)" in text
    assert "### Setup" in text and "### Conclusion" in text and "# SPIRAL vs GRPO at an equal" not in text
    assert "Machine: 2-core AMD EPYC. Wall time of the whole compare: 1 h 50 min." in text
    assert "Command: `spiral compare recipes/countdown.yaml --seeds 3`." in text  # the local --home dropped
    assert "](img/compare-accuracy-vs-inference-tokens.png)" in text
    assert (tmp_path / "img" / "compare-accuracy-vs-training-tokens.png").read_bytes() == b"png-training"
    assert text.endswith("## 2026-12-01: older\n\nold text\n")
    head = readme.read_text()
    assert "stale" not in head and head.startswith("# spiral\n\n## Results\n\n<!-- headline:begin")
    assert f"- {CONCLUSION[0]}" in head and f"- {CONCLUSION[2]}" in head and f"- {CONCLUSION[4]}" in head
    assert CONCLUSION[1] not in head and CONCLUSION[3] not in head  # pass@N lines stay in the report
    assert ("From `spiral compare recipes/countdown.yaml --seeds 3` (2026-12-02; 3 seed(s) per method, 500 held-out "
            "problems, SFT checkpoint `countdown-sft@5300`") in head
    assert head.endswith("<!-- headline:end -->\n\nMore.\n\n## Code map\n")
    # a rerun replaces the blocks and changes nothing else
    before = (docs.read_text(), readme.read_text())
    assert _run(tmp_path, str(rep)).returncode == 0
    assert (docs.read_text(), readme.read_text()) == before


@pytest.mark.parametrize("breakage", ["no_dir", "no_plot", "bad_json", "no_markers"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, breakage):
    rep = _report(tmp_path)
    docs, readme = _docs(tmp_path)
    if breakage == "no_dir":
        rep = tmp_path / "missing"
    elif breakage == "no_plot":
        (rep / "accuracy_vs_training_tokens.png").unlink()
    elif breakage == "bad_json":
        (rep / "summary.json").write_text("{not json")
    else:
        readme.write_text("# spiral\n\n## Results\n\nno markers\n")
    before = (docs.read_text(), readme.read_text())
    p = _run(tmp_path, str(rep))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p.stderr
    assert (docs.read_text(), readme.read_text()) == before and not (tmp_path / "img").exists()


def test_the_real_readme_carries_the_headline_markers():
    assert "<!-- headline:begin" in (REPO / "README.md").read_text()
    assert "<!-- headline:end -->" in (REPO / "README.md").read_text()


def test_the_machine_defaults_to_the_one_the_report_records(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import results_from_compare as rfc
    finally:
        sys.path.remove(str(SCRIPT.parent))
    epyc, xeon = "2-core AMD EPYC 9R14", "2-core Intel Xeon"
    both = {"machines": {"arms": {"a-s0": [epyc], "b-s0": [epyc, xeon]}, "sweep": [epyc], "report": xeon}}
    assert rfc.recorded_machine(both) == f"{epyc} and {xeon}"
    unrecorded = {"machines": {"arms": {"a-s0": [epyc], "b-s0": []}, "sweep": [epyc], "report": epyc}}
    assert rfc.recorded_machine(unrecorded) is None and rfc.recorded_machine({}) is None
    assert "where this page was generated" in rfc.default_machine(unrecorded)
    # without --machine, the recorded one is what the page says
    rep = _report(tmp_path)
    summary = json.loads((rep / "summary.json").read_text())
    (rep / "summary.json").write_text(json.dumps({**summary, **both}))
    _docs(tmp_path)
    p = subprocess.run([sys.executable, str(SCRIPT), str(rep), "--docs", str(tmp_path / "results.md"),
                        "--readme", str(tmp_path / "README.md"), "--img", str(tmp_path / "img"), "--date", "2026-12-02"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"Machine: {epyc} and {xeon}.\n" in (tmp_path / "results.md").read_text()
