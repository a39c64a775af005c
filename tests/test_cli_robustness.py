"""The CLI as a careless or hostile user drives it (issue 17): bad input is refused before any
work, with one `error:` line and exit code 2; history (lineage, tags) is never rewritten; infer
keeps the good lines before a bad one; long work streams and shows an ETA; Ctrl-C says how to
resume. Every case runs `python -m spiral_cli` in a subprocess with SPIRAL_HOME in a tmp dir, and
stays cheap: a scratch:nano model, a few steps, no evaluation, most cases refused before any model
loads."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPIRAL = [sys.executable, "-m", "spiral_cli"]

TINY = """
name: tiny
seed: 0
task: {name: countdown}
model: {name: "scratch:nano", max_seq_len: 128}
generation: {temperature: 1.0, max_new_tokens: 8, agg_max_new_tokens: 8, batch_size: 16}
sft: {steps: 2, batch_size: 2, num_search_examples: 8, num_aggregate_examples: 4, eval_problems: 0,
      save_every: 1, log_every: 1, max_len: 128, warmup_steps: 1}
train_set: {steps: 1, prompts_per_step: 1, num_search: 2, num_sets: 1, set_size: 2, num_aggregations: 1,
            num_generations: 2, grpo_max_new_tokens: 8, max_prompt_draws: 1, eval_problems: 0,
            micro_batch_size: 4, save_every: 1}
"""
GOOD = [{"numbers": [3, 7, 25], "target": 46}, {"numbers": [1, 2, 3], "target": 6}, {"numbers": [4, 5, 6], "target": 26}]
FAST_INFER = ["--model", "scratch:nano", "-N", "1", "-T", "4", "-R", "0", "--aggregate", "majority"]


def run(args, *, home: Path, stdin: str | bytes | None = None, env: dict | None = None, timeout: int = 300,
        cwd: Path = REPO) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "SPIRAL_HOME": str(home), **(env or {})}
    if isinstance(stdin, bytes):
        p = subprocess.run(SPIRAL + list(args), input=stdin, capture_output=True, env=full_env, cwd=cwd, timeout=timeout)
        return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(errors="replace"),
                                           p.stderr.decode(errors="replace"))
    return subprocess.run(SPIRAL + list(args), input=stdin, capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=timeout)


def refused(p: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user mistake: exit code 2, no traceback, exactly one `error:` line naming the problem."""
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, p.stderr[-2000:]
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def only_error(p: subprocess.CompletedProcess, *fragments: str) -> str:
    """Refused before any work: the `error:` line is all there is on stderr."""
    line = refused(p, *fragments)
    assert p.stderr.strip().splitlines() == [line], p.stderr[-2000:]
    return line


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    return recipe


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def register(home: Path, name: str, step: int, stage: str = "sft", parent: str | None = "scratch:nano"):
    from spiral_cli.paths import checkpoint_path
    from spiral_cli.registry import Registry

    d = checkpoint_path(home, name, step)
    d.mkdir(parents=True, exist_ok=True)
    return Registry(home).register(name, stage, d, step=step, parent=parent, metrics={"acc": 0.25})


# ---------------------------------------------------------------- 1. names


@pytest.mark.parametrize("command", [["sft"], ["train-set"], ["train-agg"]])
@pytest.mark.parametrize("name", ["../../escape", "bad@name", "x y"])
def test_bad_name_is_refused_before_any_work(tmp_path, home, tiny, command, name):
    p = run(command + [str(tiny), "--name", name], home=home, timeout=600)
    only_error(p, "invalid run name (--name)", repr(name))
    assert not (home / "runs").exists() and not (home / "checkpoints").exists()
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path / "escape").exists()


# ---------------------------------------------------------------- 2. reruns never rewrite lineage


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished 2-step sft run of the tiny recipe."""
    tmp = tmp_path_factory.mktemp("trained")
    recipe = tmp / "tiny.yaml"
    recipe.write_text(TINY)
    home = tmp / "home"
    p = run(["sft", str(recipe)], home=home, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return home, recipe


def show(home: Path, ref: str) -> dict:
    p = run(["registry", "show", ref], home=home)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_rerun_with_another_model_is_refused_and_the_entry_kept(trained):
    home, recipe = trained
    before = show(home, "tiny-sft")
    # an unknown preset: refused as such, before anything
    only_error(run(["sft", str(recipe), "--set", "model.name=scratch:huge"], home=home), "unknown scratch preset 'huge'")
    # a real but different model, and a different learning rate: the fields are named
    line = only_error(run(["sft", str(recipe), "--set", "model.name=scratch:tiny", "--set", "sft.lr=0.5"], home=home),
                      "model.name", "sft.lr", "--name")
    assert "scratch:nano" in line and "scratch:tiny" in line
    assert show(home, "tiny-sft") == before  # parent, recipe, creation time: all unchanged


def test_rerun_that_only_changes_what_may_change_continues(trained):
    home, recipe = trained
    before = show(home, "tiny-sft@2")
    p = run(["sft", str(recipe), "--set", "sft.log_every=5", "--set", "model.autocast=off"], home=home, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "already finished" in p.stderr
    after = show(home, "tiny-sft@2")
    assert {k: after[k] for k in ("parent", "recipe", "recipe_hash", "created", "stage")} == \
        {k: before[k] for k in ("parent", "recipe", "recipe_hash", "created", "stage")}


def test_a_name_of_another_stage_is_refused(trained):
    home, recipe = trained
    only_error(run(["train-set", str(recipe), "--model", "tiny-sft", "--name", "tiny-sft"], home=home),
               "registered already as a sft checkpoint")


# ---------------------------------------------------------------- 3. infer keeps the good lines


@pytest.mark.parametrize("extra", [[], ["--set", "generation.batch_size=2"]])
def test_infer_answers_every_good_line_before_a_bad_one(home, extra):
    stdin = "".join(json.dumps(g) + "\n" for g in GOOD) + "{not json\n"
    p = run(["infer", *FAST_INFER, *extra], home=home, stdin=stdin)
    refused(p, "<stdin> line 4", "not valid JSON", "the 3 problems before it answered")
    rows = lines(p.stdout)
    assert [r["problem"]["target"] for r in rows] == [g["target"] for g in GOOD]


# ---------------------------------------------------------------- 4. one line, never a traceback


def test_non_utf8_recipe(tmp_path, home):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: bad\nseed: 0\n# caf\xe9\n")
    only_error(run(["sft", str(bad)], home=home), "line 3", "not UTF-8")


def test_spiral_home_that_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("")
    only_error(run(["registry", "ls"], home=f), "from $SPIRAL_HOME", "not a directory")
    only_error(run(["--home", str(f), "registry", "ls"], home=tmp_path / "unused"), "from --home")


def _readonly_home(tmp_path: Path) -> Path:
    home = tmp_path / "ro"
    home.mkdir()
    home.chmod(0o555)
    if os.access(home, os.W_OK):  # root: permissions stop nothing; sysfs still refuses to create files
        home.chmod(0o755)
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no read-only directory available to root")
        return Path("/sys/kernel")
    return home


def test_read_only_home_during_sft(tmp_path, tiny):
    only_error(run(["sft", str(tiny)], home=_readonly_home(tmp_path), timeout=600))


def test_curves_output_is_checked_first(tmp_path, home):
    (home / "runs" / "r").mkdir(parents=True)
    (home / "runs" / "r" / "eval.jsonl").write_text(json.dumps({"step": 0, "generated_tokens": 0, "T8/pass@1": 0.1}) + "\n")
    only_error(run(["curves", "r", "-o", "/nonexistent/dir/c.png"], home=home), "/nonexistent/dir", "does not exist")
    only_error(run(["curves", "r", "-o", str(tmp_path / "c.txt")], home=home), "c.txt", ".png")
    only_error(run(["curves", "../r", "-o", str(tmp_path / "c.png")], home=home), "invalid run name")
    p = run(["curves", "r", "-o", str(tmp_path / "c.png")], home=home)
    assert p.returncode == 0 and (tmp_path / "c.png").is_file(), p.stderr
    # without -o the image goes inside the spiral home, never into the working directory
    p = run(["curves", "r"], home=home)
    assert p.returncode == 0 and (home / "curves" / "r.png").is_file(), p.stderr


def test_sweep_out_pointing_at_a_file(tmp_path, home):
    f = tmp_path / "afile"
    f.write_text("")
    only_error(run(["sweep", "recipes/countdown.yaml", "--models", "scratch:nano", "--out", str(f)], home=home),
               "--out", "a file is there")


def test_non_utf8_and_control_characters_on_stdin(home):
    good = json.dumps({"problem": {"numbers": [1, 2], "target": 3}, "completion": "answer: 1+2"}).encode()
    p = run(["tasks", "score", "countdown"], home=home, stdin=good + b"\n\xff\xfe\n")
    only_error(p, "<stdin> line 2", "not UTF-8")
    assert lines(p.stdout)[0]["reward"] == 1.0  # the good line before it is scored
    # json's message is given whole ("Invalid control character at" used to end there)
    only_error(run(["tasks", "score", "countdown"], home=home, stdin='{"completion": "a\tb"}\n'),
               "<stdin> line 1", "Invalid control character at column")


# ---------------------------------------------------------------- 5. tags never move silently


def test_tag_does_not_move_between_names_without_move(home):
    register(home, "tiny-set", 1, stage="set")
    register(home, "intr3-sft", 5)
    assert run(["registry", "tag", "tiny-set@1", "best"], home=home).returncode == 0
    only_error(run(["registry", "tag", "intr3-sft", "best"], home=home), "tag 'best' is on tiny-set@1", "--move")
    assert show(home, "tiny-set:best")["ref"] == "tiny-set@1"
    p = run(["registry", "tag", "intr3-sft", "best", "--move"], home=home)
    assert p.returncode == 0 and "moved tag best from tiny-set@1 to intr3-sft@5" in p.stderr, p.stderr
    assert show(home, "intr3-sft:best")["ref"] == "intr3-sft@5"


def test_tag_moving_along_one_name_says_so(home):
    register(home, "m", 1)
    register(home, "m", 2)
    run(["registry", "tag", "m@1", "best"], home=home)
    p = run(["registry", "tag", "m@2", "best"], home=home)
    assert p.returncode == 0 and "moved tag best from m@1 to m@2" in p.stderr, p.stderr


# ---------------------------------------------------------------- 6. inputs checked before the model loads


def test_infer_input_checked_before_the_model(tmp_path, home):
    # a hub id that is never loaded: the input is refused first
    model = ["--model", "no-such-org/never-loaded"]
    only_error(run(["infer", *model, "--input", str(tmp_path / "nonexistent.jsonl")], home=home), "--input not found")
    only_error(run(["infer", *model, "--input", str(tmp_path)], home=home), "is a directory, not a file")


def test_sft_data_checked_before_the_model(tmp_path, home, tiny):
    model = ["--model", "no-such-org/never-loaded"]
    only_error(run(["sft", str(tiny), *model, "--data", str(tmp_path / "nope.jsonl")], home=home), "--data not found")
    only_error(run(["sft", str(tiny), *model, "--data", str(tmp_path)], home=home), "is a directory, not a file")
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "1 2 -> 3", "completion": "1+2"}\n')
    only_error(run(["sft", str(tiny), *model, "--data", str(data), "--set", "sft.self_aggregate_examples=4"], home=home),
               "with sft.data the examples are the file's: drop one of the two")


# ---------------------------------------------------------------- 7. bounded work, progress, streaming


@pytest.mark.parametrize("args, fragment", [
    (["--agg-rounds", "100", "--prompt", "3 7 25 -> 46"], "at most 32 rounds"),
    (["--eval", "1000000"], "--eval 1000000: give a number of problems in 1..100,000"),
    (["-N", "5000", "--prompt", "3 7 25 -> 46"], "at most 1024"),
])
def test_absurd_work_is_refused_at_once(home, args, fragment):
    only_error(run(["infer", "--model", "scratch:nano", *args], home=home), fragment)


def test_tasks_sample_streams(home):
    env = {**os.environ, "SPIRAL_HOME": str(home)}
    t0 = time.monotonic()
    p = subprocess.Popen(SPIRAL + ["tasks", "sample", "countdown", "-n", "100000"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        first = p.stdout.readline()
        waited = time.monotonic() - t0
    finally:
        p.kill()
        p.wait()
    assert json.loads(first)["id"].startswith("cd-")
    assert waited < 30, f"first line after {waited:.0f}s: not streamed"  # all 100000 take minutes


def test_tasks_sample_pipe_to_head_ends_quietly(home):
    p = subprocess.run(" ".join(SPIRAL) + " tasks sample countdown -n 1000000 | head -1", shell=True,
                       capture_output=True, text=True, env={**os.environ, "SPIRAL_HOME": str(home)}, cwd=REPO,
                       timeout=120)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 1 and "Traceback" not in p.stderr


def test_infer_shows_progress_with_an_eta(home):
    p = run(["infer", *FAST_INFER, "--eval", "3", "--set", "generation.batch_size=1"], home=home)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(lines(p.stdout)) == 3
    assert "1/3 problems" in p.stderr and "ETA" in p.stderr, p.stderr


# ---------------------------------------------------------------- 8. sample what the default recipe trains on


def test_task_defaults_agree_with_the_default_recipe(home):
    plain = run(["tasks", "sample", "countdown", "-n", "20"], home=home)
    with_recipe = run(["tasks", "sample", "countdown", "-n", "20", "--recipe", "recipes/countdown.yaml"], home=home)
    assert plain.returncode == with_recipe.returncode == 0
    assert plain.stdout == with_recipe.stdout
    problems = lines(plain.stdout)
    assert all(max(p["numbers"]) <= 25 and p["target"] <= 100 for p in problems)


# ---------------------------------------------------------------- 9. --set takes documented values as written


@pytest.mark.parametrize("override", ["model.autocast=off", "model.autocast=on", "name=2024", "name=1e3"])
def test_set_takes_enum_words_and_names_as_written(home, override):
    # the recipe validates, so the run gets as far as the (unknown) model: nothing trains
    only_error(run(["sft", "recipes/countdown.yaml", "--set", override, "--model", "scratch:nosuch"], home=home),
               "unknown scratch preset 'nosuch'")


@pytest.mark.parametrize("override", [
    "generation.fast_decode=off", "train_set.scale_rewards=none", "train_set.scale_rewards=false",
    "model.gradient_checkpointing=no", "sft.lr=1e-4",
])
def test_set_keeps_the_values_that_already_worked(home, override):
    only_error(run(["sft", "recipes/countdown.yaml", "--set", override, "--model", "scratch:nosuch"], home=home),
               "unknown scratch preset 'nosuch'")


# ---------------------------------------------------------------- 10. the small items


def test_math_sample_says_how_small_its_splits_are(home):
    p = run(["tasks", "sample", "math", "-n", "100"], home=home)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 1
    assert "eval split of 'math' has only 1 problem" in p.stderr, p.stderr
    p = run(["tasks", "sample", "math", "-n", "100", "--split", "train"], home=home)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 100
    assert "train split of 'math' has 41 problems" in p.stderr and "repeat" in p.stderr, p.stderr


def test_registry_ls_fits_80_columns(home):
    for name in ("countdown-qwen-sft", "countdown-qwen-grpo-long-run"):
        register(home, name, 5300, parent="Qwen/Qwen3-4B-Instruct-2507")
    p = run(["registry", "ls"], home=home, env={"COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    assert all(len(line) <= 80 for line in p.stdout.splitlines())
    for name in ("countdown-qwen-sft", "countdown-qwen-grpo-long-run", "Qwen/Qwen3-4B-Instruct-2507", "5300"):
        assert name in p.stdout, p.stdout
    assert "left out at 80 columns" in p.stderr and "--json" in p.stderr


def test_registry_ls_unknown_name(home):
    register(home, "tiny-sft", 2)
    only_error(run(["registry", "ls", "tiny-stf"], home=home), "no checkpoint named 'tiny-stf'", "tiny-sft")


def test_registry_ls_takes_home_after_the_subcommand(tmp_path, home):
    register(home, "elsewhere", 1)
    p = run(["registry", "ls", "--home", str(home), "--json"], home=tmp_path / "other")
    assert p.returncode == 0, p.stderr
    assert [r["name"] for r in lines(p.stdout)] == ["elsewhere"]


def test_registry_rm_of_a_parent_warns_about_its_children(home):
    register(home, "base-sft", 2)
    register(home, "base-set", 4, stage="set", parent="base-sft@2")
    p = run(["registry", "rm", "base-sft"], home=home)
    assert p.returncode == 0, p.stderr
    assert "warning:" in p.stderr and "base-set@4" in p.stderr, p.stderr
    assert show(home, "base-set")["parent"] == "base-sft@2"  # lineage is history: kept as it was


def test_train_set_that_kept_no_prompt_says_so(home, tiny):
    p = run(["train-set", str(tiny), "--model", "scratch:nano", "--objective", "grpo", "--name", "nosignal"],
            home=home, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "warning:" in p.stderr and "kept 0 prompts" in p.stderr, p.stderr[-2000:]
    assert show(home, "nosignal")["metrics"]["steps_without_signal"] == 1


def test_ctrl_c_says_where_the_state_is_and_how_to_resume(tmp_path, home):
    recipe = tmp_path / "long.yaml"
    recipe.write_text(TINY.replace("steps: 2,", "steps: 100000,"))
    # SIGINT back to its default in the child: a test run started in the background (`cmd &` in a
    # script) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    p = subprocess.Popen(SPIRAL + ["sft", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "SPIRAL_HOME": str(home)}, cwd=REPO,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = p.stderr.readline()
            seen.append(line)
            if not line or "step 3/" in line:
                break
        p.send_signal(signal.SIGINT)
        _, rest = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    stderr = "".join(seen) + rest
    assert p.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "interrupted: tiny-sft saved its state at step" in stderr, stderr[-2000:]
    assert str(home / "runs" / "tiny-sft" / "state") in stderr and "run the same command again" in stderr


@pytest.mark.parametrize("args", [["--eval", "0"], ["--eval", "-3"], ["--eval", "3", "--prompt", "3 7 25 -> 46"],
                                  ["--agg-set-size", "50", "-N", "2", "--prompt", "3 7 25 -> 46"]])
def test_infer_arguments_that_cannot_mean_anything(home, args):
    only_error(run(["infer", "--model", "scratch:nano", *args], home=home))


def test_infer_names_the_conflicting_sources_and_the_set_size(home):
    only_error(run(["infer", "--model", "scratch:nano", "--eval", "3", "--prompt", "1 2 -> 3"], home=home),
               "one source of problems", "--prompt and --eval")
    only_error(run(["infer", "--model", "scratch:nano", "-N", "2", "--agg-set-size", "50", "--prompt", "1 2 -> 3"],
                   home=home), "agg_set_size", "N=2")


def test_tasks_sample_negative_n(home):
    only_error(run(["tasks", "sample", "countdown", "-n", "-1"], home=home), "-n")


@pytest.mark.parametrize("target", [-7, 0, 10**30])
def test_countdown_targets_out_of_range(home, target):
    line = json.dumps({"problem": {"numbers": [1, 2], "target": target}, "completion": "answer: 1+2"})
    only_error(run(["tasks", "score", "countdown"], home=home, stdin=line + "\n"), "line 1", "target")


def test_integer_ids_come_back_as_integers(home):
    stdin = json.dumps({"id": 7, "numbers": [1, 2], "target": 3}) + "\n" + json.dumps({"id": "b", **GOOD[0]}) + "\n"
    p = run(["infer", *FAST_INFER], home=home, stdin=stdin)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = lines(p.stdout)
    assert [r["id"] for r in rows] == [7, "b"] and [r["problem"]["id"] for r in rows] == [7, "b"]


def test_reasoning_gym_without_a_dataset_says_how_to_give_one(home):
    only_error(run(["tasks", "score", "reasoning_gym"], home=home, stdin=""), "task.dataset", "--set task.dataset=NAME")


def test_flags_take_no_value_and_help_says_so(home):
    help_text = run(["tasks", "sample", "--help"], home=home, env={"COLUMNS": "200"}).stdout
    row = next(line for line in help_text.splitlines() if "--with-prompt" in line)
    assert "<bool>" not in row, row
    only_error(run(["tasks", "sample", "countdown", "--with-prompt", "true"], home=home), "flag", "--help")


def test_usage_errors_are_one_line(home):
    only_error(run(["sft"], home=home), "Missing argument")
    only_error(run(["no-such-command"], home=home), "No such command")


@pytest.mark.parametrize("args", [
    ["infer", "recipes/countdown.yaml", *FAST_INFER, "--eval", "2"],
    ["sweep", "recipes/countdown.yaml", "--models", "scratch:nano"],
    ["compare", "recipes/countdown.yaml", "--quick"],
], ids=["infer", "sweep", "compare"])
def test_single_process_commands_refuse_a_launcher(args, home):
    """Under torchrun every rank would run the whole command and write the same run: refused in one
    line before any work, nothing written to SPIRAL_HOME."""
    p = run(args, home=home, env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    only_error(p, f"spiral {args[0]} runs in one process", "1 of 2", "sft, train-set and train-agg")
    assert not home.exists() or not any(home.iterdir())
