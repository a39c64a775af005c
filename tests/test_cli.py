"""The command line as a user drives it: subprocesses, pipes, exit codes, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPIRAL = [sys.executable, "-m", "spiral_cli"]


def run(args, *, home: Path, stdin: str | None = None, check: bool = False):
    env = {**os.environ, "SPIRAL_HOME": str(home)}
    p = subprocess.run(SPIRAL + args, input=stdin, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}): {p.stderr}")
    return p


def test_help_lists_subcommands(tmp_path):
    out = run(["--help"], home=tmp_path, check=True).stdout
    for cmd in ["sft", "train-set", "train-agg", "infer", "sweep", "compare", "registry", "tasks"]:
        assert cmd in out
    assert "ls" in run(["registry", "--help"], home=tmp_path, check=True).stdout


def test_sample_then_score_pipeline(tmp_path):
    sample = run(["tasks", "sample", "countdown", "-n", "3"], home=tmp_path, check=True).stdout
    problems = [json.loads(line) for line in sample.splitlines()]
    assert len(problems) == 3 and all({"numbers", "target", "solution", "id"} <= set(p) for p in problems)
    lines = [json.dumps({"problem": p, "completion": f"answer: {p['solution']}"}) for p in problems]
    lines.append(json.dumps({"problem": problems[0], "completion": "answer: __import__('os').system('true')"}))
    scored = run(["tasks", "score", "countdown"], home=tmp_path, stdin="\n".join(lines) + "\n", check=True).stdout
    rows = [json.loads(line) for line in scored.splitlines()]
    assert [r["reward"] for r in rows] == [1.0, 1.0, 1.0, 0.0]
    assert [r["correct"] for r in rows] == [True, True, True, False]


def test_sample_is_reproducible_and_split_aware(tmp_path):
    a = run(["tasks", "sample", "countdown", "-n", "5", "--seed", "3"], home=tmp_path, check=True).stdout
    b = run(["tasks", "sample", "countdown", "-n", "5", "--seed", "3"], home=tmp_path, check=True).stdout
    c = run(["tasks", "sample", "countdown", "-n", "5", "--seed", "3", "--split", "train"], home=tmp_path, check=True).stdout
    assert a == b and a != c
    d = run(["tasks", "sample", "countdown", "-n", "2", "--set", "max_value=5", "--with-prompt"], home=tmp_path, check=True).stdout
    for p in map(json.loads, d.splitlines()):
        assert max(p["numbers"]) <= 5 and p["prompt"].endswith("\n")


@pytest.mark.parametrize(
    "args, stdin, message",
    [
        (["tasks", "score", "countdown"], "{bad json\n", "<stdin> line 1: not valid JSON"),
        (["tasks", "score", "countdown"], '{"problem": {"numbers": [1, 2], "target": 3}, "completion": "answer: 1+2"}\n[1]\n',
         "<stdin> line 2: expected a JSON object"),
        (["tasks", "score", "countdown"], '{"problem": {"numbers": "x", "target": 3}, "completion": ""}\n', "line 1: "),
        (["tasks", "sample", "nope"], None, "unknown task 'nope'"),
        (["tasks", "sample", "countdown", "--set", "max_value=-3"], None, "task.max_value"),
        (["sft", "missing.yaml"], None, "recipe file not found: missing.yaml"),
        (["sft", "recipes/countdown.yaml", "--set", "sft.lr=fast"], None, "sft.lr: Input should be a valid number"),
        (["infer", "--model", "no-such-model", "--eval", "1"], None, "no-such-model"),
        (["registry", "show", "ghost@3"], None, "ghost"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, args, stdin, message):
    p = run(args, home=tmp_path, stdin=stdin)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_score_keeps_lines_before_a_bad_one(tmp_path):
    good = json.dumps({"problem": {"numbers": [1, 2], "target": 3}, "completion": "answer: 1+2"})
    p = run(["tasks", "score", "countdown"], home=tmp_path, stdin=good + "\nnot json\n")
    assert p.returncode == 2
    assert json.loads(p.stdout.splitlines()[0])["reward"] == 1.0


def test_registry_commands(tmp_path):
    from spiral_cli.registry import Registry

    home = tmp_path / "home"
    ckpt = home / "checkpoints" / "m" / "step-5"
    ckpt.mkdir(parents=True)
    Registry(home).register("m", "sft", str(ckpt), step=5, parent="scratch:tiny", metrics={"acc": 0.5})
    rows = [json.loads(line) for line in run(["registry", "ls", "--json"], home=home, check=True).stdout.splitlines()]
    assert [(r["name"], r["step"], r["stage"]) for r in rows] == [("m", 5, "sft")]
    assert "m" in run(["registry", "ls"], home=home, check=True).stdout
    run(["registry", "tag", "m@5", "best"], home=home, check=True)
    shown = json.loads(run(["registry", "show", "best"], home=home, check=True).stdout)
    assert shown["step"] == 5 and shown["tags"] == ["best"] and shown["metrics"] == {"acc": 0.5}
    run(["registry", "rm", "m@5", "--delete-files"], home=home, check=True)
    assert not ckpt.exists()
    assert run(["registry", "ls", "--json"], home=home, check=True).stdout == ""


def test_vllm_backend_missing_is_a_one_line_error(tmp_path):
    """Without vLLM installed (simulated: the import is blocked), --backend vllm says what to install."""
    code = (
        "import sys; sys.modules['vllm'] = None; sys.argv = ['spiral'] + sys.argv[1:]\n"
        "from spiral_cli.cli import main; main()"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, "infer", "--model", "scratch:nano", "--prompt", "3 7 25 -> 46",
         "--backend", "vllm", "-N", "1", "-R", "0"],
        capture_output=True, text=True, env={**os.environ, "SPIRAL_HOME": str(tmp_path)}, cwd=REPO, timeout=300,
    )
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "pip install vllm" in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_main_lets_an_unexpected_exception_through_and_maps_abort_to_130(monkeypatch, capsys):
    """A bug in a command surfaces as itself (the except clauses must not fail while matching it),
    and an Abort (Ctrl-D at a prompt) is one 'interrupted' line with exit 130."""
    import typer.exceptions

    from spiral_cli import cli

    def boom(**_):
        raise ValueError("a bug inside a command")

    monkeypatch.setattr(cli, "app", boom)
    with pytest.raises(ValueError, match="a bug inside a command") as caught:
        cli.main(["infer"])
    assert caught.value.__context__ is None  # no AttributeError raised while matching the except clauses

    def abort(**_):
        raise typer.exceptions.Abort()

    monkeypatch.setattr(cli, "app", abort)
    with pytest.raises(SystemExit) as ended:
        cli.main(["infer"])
    assert ended.value.code == 130 and "interrupted" in capsys.readouterr().err
