"""math (math-verify) and reasoning_gym (sandboxed scorer) tasks."""
from __future__ import annotations

import json
import time

import pytest

from spiral_cli.tasks import TaskError, load_task
from spiral_cli.tasks.math_task import SAMPLE_DATA, MathTask, last_boxed

HALF = {"id": "h", "problem": "What is 1/2?", "answer": "\\frac{1}{2}"}


# ------------------------------------------------------------------------------- math
@pytest.fixture(scope="module")
def math_task() -> MathTask:
    return load_task("math", {})


def test_math_sample_data(math_task):
    rows = [json.loads(line) for line in open(SAMPLE_DATA, encoding="utf-8")]
    assert len(rows) >= 40 and all({"problem", "answer"} <= set(r) for r in rows)
    train = math_task.problems("train", 10, seed=0)
    ev = math_task.problems("eval", 1000, seed=0)
    assert len(train) == 10 and train == math_task.problems("train", 10, seed=0)
    assert 1 <= len(ev) < len(rows)  # eval never repeats; it holds the whole eval split
    all_train = math_task.problems("train", len(rows), seed=0)
    assert not {p["id"] for p in all_train} & {p["id"] for p in ev}
    assert len(math_task.problems("train", 100, seed=0)) == 100  # train cycles through epochs
    p = train[0]
    assert set(p) == {"id", "problem", "answer"}
    assert p["problem"] in math_task.search_prompt(p) and "<answer>" in math_task.search_prompt(p)


def test_math_sample_answers_verify_against_themselves(math_task):
    for p in math_task.problems("train", 20, seed=1):
        assert math_task.is_correct(p, f"<answer>{p['answer']}</answer>"), p


@pytest.mark.parametrize(
    "text",
    [
        "<think>1 divided by 2</think>\n<answer>\\frac{1}{2}</answer>",
        "<answer>0.5</answer>",
        "<answer>1/2</answer>",
        "<answer>2/4</answer>",
        "answer: 0.5",
        "so the result is \\boxed{\\frac12}.",
        "<answer>\\boxed{\\dfrac{1}{2}}</answer>",
        "<answer>$\\frac{1}{2}$</answer>",
    ],
)
def test_math_correct_and_equivalent_forms(math_task, text):
    assert math_task.reward(HALF, text) == 1.0
    assert math_task.is_correct(HALF, text)


@pytest.mark.parametrize(
    "text",
    [
        "<answer>0.6</answer>",
        "<answer>2</answer>",
        "answer: 1/3",
        "\\boxed{-\\frac{1}{2}}",
        "I think it is one half",  # no final answer
        "",
        "<answer></answer>",
        "answer: __import__('os').system('rm -rf /')",
        "<answer>().__class__</answer>",
    ],
)
def test_math_wrong(math_task, text):
    assert math_task.reward(HALF, text) == 0.0


def test_math_last_answer_wins_and_extraction(math_task):
    assert math_task.extract_answer("<answer>3</answer> hmm <answer>1/2</answer>") == "1/2"
    assert math_task.extract_answer("\\boxed{1} and then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{unclosed") is None
    assert math_task.reward(HALF, "<answer>0.5</answer>\nanswer: 7") == 0.0


def test_math_hostile_input_is_fast(math_task):
    hostile = [
        "<answer>" + "9^" * 50_000 + "9</answer>",
        "\\boxed{" + "{" * 50_000,
        "answer: " + "(" * 100_000,
        "x" * 100_000,
        "<answer>" + "1+" * 149 + "1</answer>",  # under the cap: parsed, and wrong
    ]
    t0 = time.perf_counter()
    for text in hostile:
        assert math_task.reward(HALF, text) == 0.0
    assert time.perf_counter() - t0 < 3.0


def test_math_custom_file_and_errors(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(
        "\n".join(json.dumps({"qid": f"q{i}", "question": f"What is {i} + {i}?", "sol": str(2 * i)}) for i in range(30))
        + "\n"
    )
    t = load_task("math", {"data": str(f), "problem_column": "question", "answer_column": "sol", "id_column": "qid"})
    ps = t.problems("train", 5, seed=0)
    assert all(p["id"].startswith("q") for p in ps)
    p = next(p for p in ps if p["id"] == "q7") if any(p["id"] == "q7" for p in ps) else ps[0]
    assert t.is_correct(p, f"<answer>{p['answer']}</answer>")
    assert not t.is_correct(p, f"<answer>{int(p['answer']) + 1}</answer>")

    with pytest.raises(TaskError) as e:
        load_task("math", {"data": str(f), "answer_column": "answer"}).problems("train", 1)
    assert str(e.value).startswith("task.problem_column: column 'problem' not in")
    with pytest.raises(TaskError) as e:
        load_task("math", {"data": str(f), "problem_column": "question", "answer_column": "nope"}).problems("train", 1)
    msg = str(e.value)
    assert msg.startswith("task.answer_column: column 'nope' not in") and "qid, question, sol" in msg
    with pytest.raises(TaskError, match=r"^task.data: file not found: .*missing.jsonl$"):
        load_task("math", {"data": str(tmp_path / "missing.jsonl")}).problems("train", 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x", "answer": "1"}\nnot json\n')
    with pytest.raises(TaskError, match=r"task.data: .*bad.jsonl line 2: not valid JSON"):
        load_task("math", {"data": str(bad)}).problems("train", 1)
    with pytest.raises(TaskError, match=r"^task.eval_fraction: "):
        load_task("math", {"eval_fraction": 1.5})


def test_math_validate_problem(math_task):
    p = math_task.validate_problem({"problem": "1+1?", "answer": 2})
    assert p["answer"] == "2" and p["id"].startswith("math-")
    with pytest.raises(TaskError, match="^problem:"):
        math_task.validate_problem({"answer": "2"})
    with pytest.raises(TaskError, match="^answer:"):
        math_task.validate_problem({"problem": "1+1?"})


def test_math_sandboxed_scoring():
    t = load_task("math", {"sandbox": True})
    try:
        assert t.reward(HALF, "<answer>0.5</answer>") == 1.0
        assert t.reward(HALF, "<answer>0.6</answer>") == 0.0
    finally:
        t.close()


# ------------------------------------------------------------------------------- reasoning_gym
@pytest.fixture(scope="module")
def rg_task():
    t = load_task("reasoning_gym", {"dataset": "basic_arithmetic", "size": 200})
    yield t
    t.close()


def test_rg_problems(rg_task):
    train = rg_task.problems("train", 50, seed=0)
    ev = rg_task.problems("eval", 20, seed=0)
    keys = {"id", "question", "answer", "rg_dataset", "rg_config", "rg_seed", "rg_size", "rg_index"}
    assert all(set(p) == keys for p in train + ev)
    assert train == rg_task.problems("train", 50, seed=0)
    assert len({p["id"] for p in train}) == 50
    assert {p["rg_seed"] for p in train} != {p["rg_seed"] for p in ev}
    all_train_q = {p["question"] for p in rg_task.problems("train", 200, seed=0)}
    assert not all_train_q & {p["question"] for p in ev}
    # the entry can be regenerated from the problem alone
    import reasoning_gym

    p = ev[3]
    entry = reasoning_gym.create_dataset(p["rg_dataset"], seed=p["rg_seed"], size=p["rg_size"], **p["rg_config"])[
        p["rg_index"]
    ]
    assert entry["question"] == p["question"] and str(entry["answer"]) == p["answer"]
    assert rg_task.validate_problem(p) == p
    with pytest.raises(TaskError, match="^rg_index:"):
        rg_task.validate_problem({**p, "rg_index": p["rg_size"]})


def test_rg_scoring(rg_task):
    p = rg_task.problems("eval", 1, seed=1)[0]
    assert rg_task.reward(p, f"<think>easy</think>\n<answer>{p['answer']}</answer>") == 1.0
    assert rg_task.is_correct(p, f"answer: {p['answer']}")
    wrong = str(int(p["answer"]) + 1)
    assert rg_task.reward(p, f"<answer>{wrong}</answer>") == 0.0
    assert rg_task.reward(p, "no answer here") == 0.0
    for hostile in (
        "answer: __import__('os').system('rm -rf /')",
        "<answer>().__class__.__bases__[0].__subclasses__()</answer>",
        "<answer>" + "9" * 100_000 + "</answer>",  # over the cap: never sent
    ):
        assert rg_task.reward(p, hostile) == 0.0
    assert rg_task.reward(p, f"answer: {p['answer']}") == 1.0  # the worker still works


def test_rg_eval_string_scorer_cannot_run_commands(tmp_path):
    # reasoning_gym's countdown scorer calls sympy.parse_expr (eval) on the answer
    t = load_task("reasoning_gym", {"dataset": "countdown", "size": 20})
    try:
        p = t.problems("train", 1)[0]
        assert t.reward(p, f"answer: {p['answer']}") == 1.0
        marker = tmp_path / "pwned"
        for code in (
            f"__import__('os').system('touch {marker}')",
            f"open('{marker}', 'w').write('x')",
            f"__import__('subprocess').run(['touch', '{marker}'])",
        ):
            assert t.reward(p, f"answer: {code}") < 0.1
        assert not marker.exists()
        assert t.reward(p, f"answer: {p['answer']}") == 1.0
    finally:
        t.close()


def test_rg_timeout_kills_and_restarts_worker():
    t = load_task("reasoning_gym", {"dataset": "countdown", "size": 20, "score_timeout_s": 1.0})
    try:
        p = t.problems("train", 1)[0]
        assert t.reward(p, f"answer: {p['answer']}") == 1.0  # starts the worker
        t0 = time.perf_counter()
        assert t.reward(p, "answer: 9**9**9**9") == 0.0  # parse_expr would compute forever
        assert time.perf_counter() - t0 < 5.0
        assert t._scorer.restarts == 1 and t._scorer.last_error == "timeout"
        assert t.reward(p, f"answer: {p['answer']}") == 1.0  # a fresh worker
    finally:
        t.close()


def test_rg_bad_config():
    with pytest.raises(TaskError) as e:
        load_task("reasoning_gym", {"dataset": "no_such_dataset"})
    assert str(e.value).startswith("task.dataset: unknown reasoning_gym dataset 'no_such_dataset'; e.g. ")
    with pytest.raises(TaskError, match=r"^task.dataset: Field required"):
        load_task("reasoning_gym", {})
    with pytest.raises(TaskError, match=r"^task.dataset_config: basic_arithmetic: "):
        load_task("reasoning_gym", {"dataset": "basic_arithmetic", "dataset_config": {"bogus": 1}}).problems("train", 1)


def test_rg_prompts(rg_task):
    p = rg_task.problems("train", 1)[0]
    sp = rg_task.search_prompt(p)
    assert sp.startswith(p["question"]) and "<answer>" in sp
    ap = rg_task.aggregate_prompt(p, ["<think>a</think><answer>1</answer>", "x" * 5000])
    assert "Candidate 1:\n<think>a</think><answer>1</answer>" in ap
    assert "Candidate 2:\n..." in ap and len(ap) < 4000 + 1000
    assert rg_task.stop_strings() == ["</answer>"]
