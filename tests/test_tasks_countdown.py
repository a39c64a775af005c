"""Countdown: verifier, generator, splits, solver traces, SFT data, loading."""
from __future__ import annotations

import random
import re
import time
from collections import Counter

import pytest

from spiral_cli.tasks import TaskError, list_tasks, load_task
from spiral_cli.tasks.base import Task
from spiral_cli.tasks.countdown import CountdownConfig, CountdownTask, check_answer, solve
from spiral_cli.tasks.countdown.steps import (
    Step,
    check_path,
    parse_step,
    path_expression,
    step_path,
)

P70 = {"id": "p70", "numbers": [3, 7, 12, 25], "target": 70}  # 25*3-12+7 = 70 uses all four
P68 = {"id": "p68", "numbers": [3, 7, 12, 25], "target": 68}  # 25*3-7 = 68 leaves 12 unused
P12 = {"id": "p12", "numbers": [2, 2, 7, 5], "target": 12}


def task(**kw) -> CountdownTask:
    return CountdownTask(CountdownConfig(**kw))


AT_MOST = task(number_rule="at_most_once")
EXACTLY = task(number_rule="exactly_once")


def ans(expr: str) -> str:
    return f"25+12=37 (3 7 37)\nback\nanswer: {expr}\n"


# ------------------------------------------------------------------------------- verifier
@pytest.mark.parametrize(
    "expr",
    ["25*3-12+7", "(25*3) - 12 + 7 = 70", "7+25*3-12", "3*25+7-12", "7*(25-12-3)", "7 * (25 - 12 - 3)=70"],
)
def test_valid_answers(expr):
    for t in (AT_MOST, EXACTLY):
        assert t.is_correct(P70, ans(expr))
        assert t.reward(P70, ans(expr)) == 1.0


def test_valid_answers_other_problem():
    assert AT_MOST.is_correct(P12, "answer: 7+5")
    assert AT_MOST.is_correct(P12, "answer: 7*2-2")
    assert not AT_MOST.is_correct(P12, "answer: 5+5+2")  # 12, but 5 twice
    assert not AT_MOST.is_correct(P12, "answer: 2*2*2+2+2")  # 12, but five 2s (two given)
    assert not AT_MOST.is_correct(P12, "answer: 2*2+7+1")  # 12, but 1 not given
    assert EXACTLY.is_correct(P12, "answer: (7+5)*2/2")
    assert not EXACTLY.is_correct(P12, "answer: 7+5")  # 2 and 2 unused


def test_wrong_answers():
    assert not AT_MOST.is_correct(P70, ans("25*3-12"))  # 63
    assert not AT_MOST.is_correct(P70, ans("25*3-12+7 = 71"))  # claim disagrees with the target
    assert not AT_MOST.is_correct(P70, ans("25*3-12+7 = 70 = 70"))
    assert not AT_MOST.is_correct(P70, ans("25*3-5"))  # 5 not given (value is 70)
    assert not AT_MOST.is_correct(P70, ans("12+12+25+3*7"))  # 12 twice (value is 70)
    assert not EXACTLY.is_correct(P70, ans("12+12+25+3*7"))


def test_unused_numbers_exactly_once():
    assert AT_MOST.is_correct(P68, ans("25*3-7"))
    assert not EXACTLY.is_correct(P68, ans("25*3-7"))
    ok, line = check_answer("25*3-7", [3, 7, 12, 25], 68, "exactly_once")
    assert (ok, line) == (False, "25*3=75 75-7=68 unused 12 no")


def test_division_rules():
    assert not AT_MOST.is_correct(P70, ans("(25-12)/(7-7)"))  # division by zero
    assert not AT_MOST.is_correct(P70, ans("25/0"))
    # 7/2*2+5 = 12 with exact fractions, but 7/2 is not an integer
    assert not AT_MOST.is_correct(P12, "answer: 7/2*2+5")
    assert check_answer("7/2*2+5", [2, 2, 7, 5], 12) == (False, "7/2=? no")
    assert AT_MOST.is_correct({"id": "d", "numbers": [8, 4, 3], "target": 6}, "answer: 8/4*3")


def test_check_lines():
    assert check_answer("25*3-12+7", [3, 7, 12, 25], 70) == (True, "25*3=75 75-12=63 63+7=70 ok")
    assert check_answer("(25+12)*3-7", [3, 7, 12, 25], 70) == (False, "25+12=37 37*3=111 111-7=104 no")
    assert check_answer("25*3-5", [3, 7, 12, 25], 70) == (False, "25*3=75 75-5=70 uses 5 no")
    assert check_answer(None, [1, 2], 3) == (False, "none")
    assert check_answer("hello", [1, 2], 3) == (False, "? no")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "answer:",
        "answer: ",
        "answer: ((((",
        "answer: 25**3",
        "answer: -7+77",
        "answer: 2.5*28",
        "answer: 25*3-12+7 70",
        "<answer></answer>",
        "answer: __import__('os').system('rm -rf /')",
        "answer: ().__class__",
        "<answer>().__class__.__bases__[0].__subclasses__()</answer>",
        "<answer>eval('25*3-12+7')</answer>",
        "answer: 25*3-12+7; import os",
        "answer: \x00\xff" * 10,
    ],
)
def test_garbage_and_injection_score_zero(text):
    for t in (AT_MOST, task(scoring="tinyzero")):
        assert t.reward(P70, text) == 0.0
        assert not t.is_correct(P70, text)


def test_huge_answers_are_fast():
    huge = "answer: " + "1+" * 50_000 + "1\n"  # 100 KB
    nested = "<answer>" + "(" * 50_000 + "1" + ")" * 50_000 + "</answer>"
    many_tags = "<answer>" * 12_500  # 100 KB of unclosed tags
    many_lines = "answer: 1\n" * 10_000 + "answer: " + "9" * 100_000  # the last answer is too long
    t0 = time.perf_counter()
    for text in (huge, nested, many_tags, many_lines, "x" * 100_000):
        assert AT_MOST.reward(P70, text) == 0.0
        assert task(scoring="tinyzero").reward(P70, text) == 0.0
    assert AT_MOST.extract_answer(huge) is None
    assert time.perf_counter() - t0 < 5.0  # linear time: a quadratic scan of 100 KB takes minutes


def test_tinyzero_scoring():
    t = task(scoring="tinyzero")
    assert t.reward(P70, ans("25*3-12+7")) == 1.0
    assert t.reward(P70, ans("25*3-12")) == 0.1  # well-formed, wrong value
    assert t.reward(P70, ans("25*3-5")) == 0.1  # well-formed, number not given
    assert t.reward(P70, "<answer> (25 + 12) / 3 </answer>") == 0.1  # well-formed, inexact division
    assert t.reward(P70, "answer: 70") == 0.1  # well-formed, 70 is not a given number
    assert t.reward(P70, "25+12=37 (3 7 37)\nfail\n") == 0.0  # no answer
    assert t.reward(P70, "answer: twenty") == 0.0  # not an expression
    assert AT_MOST.reward(P70, ans("25*3-12")) == 0.0  # binary


def test_extract_answer_picks_last():
    t = AT_MOST
    assert t.extract_answer("answer: 1+2\nfoo\nanswer: 25*3-12+7\n") == "25*3-12+7"
    assert t.extract_answer("<answer>1+2</answer>\nanswer: 3+4") == "3+4"
    assert t.extract_answer("answer: 3+4\n<answer> 5 + 6 </answer>") == "5 + 6"
    assert t.extract_answer("<answer>1</answer> then <answer>2*3</answer>") == "2*3"
    assert t.extract_answer("<think>x</think>\n<answer>7*8") == "7*8"  # stop string trimmed
    assert t.extract_answer("The answer: 5") is None  # not at the start of a line
    assert t.extract_answer("  answer:  9 - 2  \n") == "9 - 2"
    assert t.extract_answer("25+12=37 (3 7 37)\nfail\n") is None
    # the last answer decides, even when an earlier one was right
    assert not t.is_correct(P70, "answer: 25*3-12+7\nanswer: 25*3-12\n")


# ------------------------------------------------------------------------------- generator
@pytest.mark.parametrize(
    "cfg",
    [{}, {"number_rule": "exactly_once"}, {"min_numbers": 5, "max_numbers": 6, "max_value": 100, "max_target": 1000}],
)
def test_reference_solutions_verify(cfg):
    t = task(**cfg)
    c = t.config
    probs = t.problems("train", 500, seed=3) + t.problems("eval", 100, seed=3)
    for p in probs:
        assert t.validate_problem(p) == p
        assert c.min_numbers <= len(p["numbers"]) <= c.max_numbers
        assert all(c.min_value <= x <= c.max_value for x in p["numbers"])
        assert 1 <= p["target"] <= c.max_target and isinstance(p["target"], int)
        assert t.is_correct(p, f"answer: {p['solution']}\n"), p
        assert t.is_correct(p, f"<answer>{p['solution']} = {p['target']}</answer>"), p


def test_splits_disjoint_and_distinct():
    t = AT_MOST
    train = t.problems("train", 3000, seed=0)
    ev = t.problems("eval", 1000, seed=0)

    def key(p):
        return (tuple(sorted(p["numbers"])), p["target"])

    tk, ek = {key(p) for p in train}, {key(p) for p in ev}
    assert len(tk) == 3000 and len(ek) == 1000  # distinct
    assert not tk & ek
    assert len({p["id"] for p in train + ev}) == 4000
    # a different seed draws other problems, but the split of each problem is fixed
    other = t.problems("eval", 300, seed=99)
    assert not {key(p) for p in other} & tk
    assert all(t.split_of(p["numbers"], p["target"]) == "eval" for p in ev)


def test_reproducible():
    t = AT_MOST
    a = t.problems("train", 1000, seed=7)
    assert a == t.problems("train", 1000, seed=7)
    assert a != t.problems("train", 1000, seed=8)
    assert t.problems("eval", 50, seed=1) == t.problems("eval", 50, seed=1)
    with pytest.raises(TaskError):
        t.problems("test", 1)


def test_impossible_request_errors_instead_of_looping():
    t = task(min_numbers=2, max_numbers=2, max_value=2, max_target=4)
    with pytest.raises(TaskError, match="distinct"):
        t.problems("train", 50)


def test_validate_problem():
    t = AT_MOST
    ok = t.validate_problem({"numbers": [3, 7, 12, 25], "target": 70})
    assert ok["id"].startswith("cd-") and ok["numbers"] == [3, 7, 12, 25]
    assert t.validate_problem({"id": 5, "numbers": [1, 2], "target": 3})["id"] == 5  # ids come back as given
    bad = [
        ({"target": 3}, "numbers"),
        ({"numbers": [1], "target": 3}, "numbers"),
        ({"numbers": list(range(1, 10)), "target": 3}, "numbers"),
        ({"numbers": [1, "2"], "target": 3}, "numbers"),
        ({"numbers": [1, 0], "target": 3}, "numbers"),
        ({"numbers": [1, 2_000_000], "target": 3}, "numbers"),
        ({"numbers": [1, True], "target": 3}, "numbers"),
        ({"numbers": [1, 2]}, "target"),
        ({"numbers": [1, 2], "target": 3.5}, "target"),
        ({"numbers": [1, 2], "target": -7}, "target"),
        ({"numbers": [1, 2], "target": 0}, "target"),
        ({"numbers": [1, 2], "target": 10**30}, "target"),
        ({"id": 1.5, "numbers": [1, 2], "target": 3}, "id"),
        ({"numbers": [1, 2], "target": 3, "solution": 5}, "solution"),
    ]
    for d, field in bad:
        with pytest.raises(TaskError) as e:
            t.validate_problem(d)
        assert str(e.value).startswith(field + ":") and "\n" not in str(e.value)


# ------------------------------------------------------------------------------- prompts
def test_prompts_compact_and_verbose():
    assert AT_MOST.search_prompt(P70) == "3 7 12 25 -> 70\n"
    traces = [ans("25*3-12+7"), "fail\n", ans("(25+12)*3-7")]
    assert AT_MOST.aggregate_prompt(P70, traces) == "agg 3 7 12 25 -> 70\n1: 25*3-12+7\n2: none\n3: (25+12)*3-7\n--\n"
    full = task(agg_view="full", agg_max_chars=20).aggregate_prompt(P70, ["x" * 50 + "\nanswer: 1+2\n", "fail\n"])
    assert full == "agg 3 7 12 25 -> 70\n[1]\n..." + ("x" * 50 + "\nanswer: 1+2")[-17:] + "\n[2]\nfail\n--\n"
    v = task(prompt_format="verbose", number_rule="at_most_once")
    sp = v.search_prompt(P70)
    assert "[3, 7, 12, 25]" in sp and "equals 70" in sp and "<answer>" in sp and "at most once" in sp
    assert "exactly once" in task(prompt_format="verbose", number_rule="exactly_once").search_prompt(P70)
    ap = v.aggregate_prompt(P70, traces)
    assert "Candidate 2:\nnone" in ap and "Candidate 3:\n(25+12)*3-7" in ap
    assert v.stop_strings() == ["</answer>"] and AT_MOST.stop_strings() == []
    assert not AT_MOST.search_prompt(P70).startswith("agg")


# ------------------------------------------------------------------------------- solver
_STEP = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+) \(([\d ]*)\)$")


def replay(problem, trace: str, rule="at_most_once"):
    """Check every step line of a compact trace against the state it claims; return the answer."""
    stack = [sorted(problem["numbers"])]
    lines = trace.split("\n")
    assert lines[-1] == "" and trace.endswith("\n")
    lines = lines[:-1]
    for line in lines[:-1]:
        if line == "back":
            stack.pop()
            assert stack
            continue
        m = _STEP.match(line)
        assert m, line
        a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
        state = list(stack[-1])
        state.remove(a)
        state.remove(b)
        assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b if a % b == 0 else None}[op] == r
        assert r > 0
        new = sorted(state + [r])
        assert sorted(int(x) for x in m[5].split()) == new
        stack.append(new)
    last = lines[-1]
    assert last == "fail" or last.startswith("answer: ")
    if last.startswith("answer: "):
        if rule == "at_most_once":
            assert problem["target"] in stack[-1]
        else:
            assert stack[-1] == [problem["target"]]
    return last


@pytest.mark.parametrize("rule", ["at_most_once", "exactly_once"])
@pytest.mark.parametrize("order", ["closest", "random"])
def test_solver_traces_are_valid(rule, order):
    t = task(number_rule=rule)
    rng = random.Random(0)
    n_ok = 0
    for p in t.problems("train", 300, seed=11):
        trace, ok = solve(p, rng, max_nodes=12, order=order, moves_per_node=3, number_rule=rule)
        last = replay(p, trace, rule)
        assert ok == last.startswith("answer: ")
        if ok:
            n_ok += 1
            assert t.is_correct(p, trace) and t.reward(p, trace) == 1.0
        else:
            assert t.extract_answer(trace) is None and t.reward(p, trace) == 0.0
    assert 0 < n_ok < 300


def test_solver_success_grows_with_budget():
    t = EXACTLY  # the default rule
    probs = t.problems("train", 200, seed=5)
    rates = []
    for budget in (2, 8, 64):
        rng = random.Random(1)
        rates.append(sum(t.solve(p, rng, max_nodes=budget)[1] for p in probs) / len(probs))
    assert rates[0] < rates[1] < rates[2]
    # the default budget lands in the intended band on the default difficulty
    rng = random.Random(2)
    default = sum(t.solve(p, rng)[1] for p in probs) / len(probs)
    assert 0.4 <= default <= 0.75


def test_solver_samples_differ():
    probs = EXACTLY.problems("train", 50, seed=6)
    rng = random.Random(3)
    differ = sum(EXACTLY.solve(p, rng)[0] != EXACTLY.solve(p, rng)[0] for p in probs)
    assert differ >= 15  # closest-first with jitter: near-ties reorder between samples
    # and a trace is reproducible from its rng
    assert solve(probs[0], random.Random(9)) == solve(probs[0], random.Random(9))


def test_solver_trivial_and_verbose():
    p = {"id": "t", "numbers": [4, 6], "target": 10}
    trace, ok = solve(p, random.Random(0), max_nodes=50)
    assert ok and AT_MOST.is_correct(p, trace)
    v = task(prompt_format="verbose", number_rule="at_most_once")
    rng = random.Random(0)
    for p in v.problems("train", 100, seed=1):
        trace, ok = v.solve(p, rng)
        assert trace.startswith("<think>\n")
        assert ok == v.is_correct(p, trace)
        assert ok == ("<answer>" in trace)


# ------------------------------------------------------------------------------- SFT data
@pytest.mark.parametrize("cfg", [{}, {"number_rule": "exactly_once"}, {"prompt_format": "verbose"}, {"agg_view": "full"}])
def test_sft_examples(cfg):
    t = task(**cfg)
    ex = t.sft_examples(40, 120, seed=0, set_size=4)
    assert Counter(e["kind"] for e in ex) == {"search": 40, "aggregate": 120}
    assert ex == t.sft_examples(40, 120, seed=0, set_size=4)
    for e in ex:
        assert set(e) == {"prompt", "completion", "kind"}
        assert isinstance(e["prompt"], str) and isinstance(e["completion"], str)
    search = [e for e in ex if e["kind"] == "search"]
    agg = [e for e in ex if e["kind"] == "aggregate"]
    compact = t.config.prompt_format == "compact"
    if compact:
        assert all(not e["prompt"].startswith("agg ") for e in search)
        assert all(e["prompt"].startswith("agg ") for e in agg)
    # search examples: both successes and failures, each consistent with the verifier
    n_ok = 0
    for e in search:
        p = _problem_from_prompt(t, e["prompt"])
        assert t.split_of(p["numbers"], p["target"]) == "train"
        ok = t.is_correct(p, e["completion"])
        n_ok += ok
        assert ok or t.extract_answer(e["completion"]) is None
    assert 0 < n_ok < len(search)
    # aggregation: a correct final answer whenever any candidate was correct
    any_right = none_right = wrong_claims = 0
    for e in agg:
        p = _problem_from_prompt(t, e["prompt"])
        cands = _candidates_from_prompt(t, e["prompt"])
        assert len(cands) == 4
        right = [c for c in cands if t.check(p, c)[0]]
        wrong_claims += sum(1 for c in cands if c is not None and not t.check(p, c)[0])
        if right:
            any_right += 1
            assert t.is_correct(p, e["completion"]), e
        else:
            none_right += 1
        # the completion checks every candidate in order
        checks = [ln for ln in e["completion"].split("\n") if re.match(r"^\d+: ", ln)]
        assert [int(c.split(":")[0]) for c in checks] == [1, 2, 3, 4]
        for line, c in zip(checks, cands):
            assert line.split(": ", 1)[1] == t.check(p, c)[1]
        if not right:  # it searched on its own: the answer, if any, still verifies
            assert t.extract_answer(e["completion"]) is None or t.is_correct(p, e["completion"])
    assert any_right >= 20 and none_right >= 10 and wrong_claims >= 100


def test_aggregation_until_ok_answers_right_after_the_check_it_copies():
    """agg_checks=until_ok: the target checks candidates in order, stops at the first that
    verifies and copies it as the answer on the next line; the verifier scores that answer right."""
    t = task(number_rule="at_most_once", agg_checks="until_ok")
    traces = [ans("25*3-12+7"), "fail\n", ans("(25+12)*3-7-34"), ans("25*3-12+7-25+25")]
    prompt = t.aggregate_prompt(P70, traces)
    assert prompt == "agg 3 7 12 25 -> 70\n1: 25*3-12+7\n2: none\n3: (25+12)*3-7-34\n4: 25*3-12+7-25+25\n--\n"
    target = t.aggregate_completion(P70, traces, random.Random(0))
    assert target == "1: 25*3=75 75-12=63 63+7=70 ok\nanswer: 25*3-12+7\n"
    assert t.extract_answer(target) == "25*3-12+7" and t.is_correct(P70, target)
    # the right candidate third: the wrong ones are checked first, the answer follows its own check
    target = t.aggregate_completion(P70, [traces[1], ans("3+7"), traces[0], ans("12*7")], random.Random(0))
    assert target == "1: none\n2: 3+7=10 no\n3: 25*3=75 75-12=63 63+7=70 ok\nanswer: 25*3-12+7\n"
    # the default checks them all before answering with the first that verified
    full = task(number_rule="at_most_once").aggregate_completion(P70, traces, random.Random(0))
    assert full.startswith("1: 25*3=75 75-12=63 63+7=70 ok\n2: none\n3: ") and full.endswith("answer: 25*3-12+7\n")
    # none verifies: both forms search on their own after the checks
    wrong = [ans("3+7"), "fail\n"]
    a = t.aggregate_completion(P70, wrong, random.Random(1))
    assert a == task(number_rule="at_most_once").aggregate_completion(P70, wrong, random.Random(1))
    assert a.startswith("1: 3+7=10 no\n2: none\n") and a.count("\n") > 3


def test_sft_examples_until_ok():
    t = task(number_rule="at_most_once", agg_checks="until_ok")
    agg = [e for e in t.sft_examples(0, 200, seed=3, set_size=4) if e["kind"] == "aggregate"]
    stopped_early = 0
    for e in agg:
        p = _problem_from_prompt(t, e["prompt"])
        cands = _candidates_from_prompt(t, e["prompt"])
        first_ok = next((i for i, c in enumerate(cands) if t.check(p, c)[0]), None)
        lines = e["completion"].split("\n")
        if first_ok is not None:
            assert lines[first_ok].endswith(" ok") and lines[first_ok + 1] == f"answer: {cands[first_ok]}"
            assert len(lines) == first_ok + 3 and t.is_correct(p, e["completion"])
            stopped_early += first_ok < 3
    assert stopped_early >= 50


def test_grouped_view_counts_distinct_answers_most_votes_first():
    """agg_view=grouped: one line per distinct answer (white space ignored) with its vote count,
    most votes first, ties in order of first appearance, then how many candidates gave none."""
    t = task(number_rule="at_most_once", agg_view="grouped")
    traces = [ans("3+7"), "fail\n", ans("25*3-12+7"), ans("25 * 3-12+7"), ans("12*7"), "fail\n", ans("25*3 - 12 + 7")]
    prompt = t.aggregate_prompt(P70, traces)
    assert prompt == "agg 3 7 12 25 -> 70\n1: 3x 25*3-12+7\n2: 1x 3+7\n3: 1x 12*7\nnone: 2x\n--\n"
    assert t.candidate_answers(traces) == ["25*3-12+7", "3+7", "12*7"]
    # the target checks the distinct answers in that order (each once), then writes the first that verified
    target = t.aggregate_completion(P70, traces, random.Random(0))
    assert target == "1: 25*3=75 75-12=63 63+7=70 ok\n2: 3+7=10 no\n3: 12*7=84 no\nanswer: 25*3-12+7\n"
    # no candidate with an answer: no numbered line, the target searches
    empty = t.aggregate_prompt(P70, ["fail\n", "fail\n"])
    assert empty == "agg 3 7 12 25 -> 70\nnone: 2x\n--\n"
    assert t.aggregate_completion(P70, ["fail\n"], random.Random(1)).split("\n")[0] != "1: none"
    verbose = task(agg_view="grouped", prompt_format="verbose").aggregate_prompt(P70, traces)
    assert "Answer 1 (given by 3 of 7): 25*3-12+7" in verbose and "2 of 7 candidates gave no answer." in verbose


@pytest.mark.parametrize("view", ["answer", "grouped"])
def test_select_names_a_verified_candidate_and_resolution_scores_it(view):
    """agg_answer=select: the target names the first verified candidate ("answer: #i", i as the
    prompt numbers it); resolve_aggregation substitutes that candidate's answer, which the
    verifier then scores. Unresolvable names stay unscorable."""
    t = task(number_rule="at_most_once", agg_view=view, agg_answer="select")
    traces = [ans("3+7"), "fail\n", ans("25*3-12+7"), ans("3+7")]
    target = t.aggregate_completion(P70, traces, random.Random(0))
    i = 3 if view == "answer" else 2  # grouped: "3+7" (2 votes) is 1, 25*3-12+7 is 2
    assert target.endswith(f"\nanswer: #{i}\n") and not t.is_correct(P70, target)
    assert target.split("\n")[i - 1] == f"{i}: 25*3=75 75-12=63 63+7=70 ok"
    resolved = t.resolve_aggregation(traces, target)
    assert resolved == target + "answer: 25*3-12+7\n" and t.is_correct(P70, resolved)
    assert t.reward(P70, resolved) == 1.0
    # naming a wrong candidate, a candidate without an answer, or a number out of range
    assert not t.is_correct(P70, t.resolve_aggregation(traces, "answer: #1\n"))
    assert t.extract_answer(t.resolve_aggregation(traces, "answer: #1\n")) == "3+7"
    if view == "answer":
        assert t.resolve_aggregation(traces, "answer: #2\n") == "answer: #2\n"  # "none"
    for bad in ("answer: #9\n", "answer: #0\n", "answer: #-1\n", "answer: #1x\n", "answer: # \n"):
        assert t.resolve_aggregation(traces, bad) == bad and t.reward(P70, bad) == 0.0
    # an aggregator that searched and wrote an expression is scored as written
    own = "1: 3+7=10 no\n25*3=75 (7 12 75)\nanswer: 25*3-12+7\n"
    assert t.resolve_aggregation(traces, own) == own
    # the write form never resolves (the paper's aggregator writes its answer)
    w = task(number_rule="at_most_once", agg_view=view)
    assert w.resolve_aggregation(traces, f"answer: #{i}\n") == f"answer: #{i}\n"
    assert w.aggregate_completion(P70, traces, random.Random(0)).endswith("\nanswer: 25*3-12+7\n")


def test_select_in_verbose_format_and_not_with_full_view():
    t = task(number_rule="at_most_once", agg_view="grouped", agg_answer="select", prompt_format="verbose")
    traces = ["<think>x</think>\n<answer>25*3-12+7</answer>", "<think>fail\n</think>\n"]
    target = t.aggregate_completion(P70, traces, random.Random(0))
    assert target.endswith("<answer>#1</answer>") and "name it by its number" in t.aggregate_prompt(P70, traces)
    sampled = target.removesuffix("</answer>")  # the stop string is cut from a sampled completion
    assert t.is_correct(P70, t.resolve_aggregation(traces, sampled))
    with pytest.raises(ValueError, match="agg_answer: select needs agg_view answer, grouped or steps"):
        task(agg_view="full", agg_answer="select")


def test_sft_examples_grouped_select_round_trip():
    """Every SFT aggregation example of the grouped/select form: the prompt numbers the distinct
    answers, the target checks each once in that order and names the first that verifies; resolved,
    the verifier scores it right."""
    t = task(number_rule="at_most_once", agg_view="grouped", agg_answer="select")
    agg = [e for e in t.sft_examples(0, 200, seed=5, set_size=4) if e["kind"] == "aggregate"]
    named = duplicated = 0
    for e in agg:
        p = _problem_from_prompt(t, e["prompt"])
        groups = re.findall(r"^(\d+): (\d+)x (.*)$", e["prompt"], flags=re.M)
        cands = [g[2] for g in groups]
        assert [int(g[0]) for g in groups] == list(range(1, len(groups) + 1))
        counts = [int(g[1]) for g in groups]
        assert counts == sorted(counts, reverse=True) and len(set(map("".join, map(str.split, cands)))) == len(cands)
        duplicated += counts[0] > 1 if counts else 0
        first_ok = next((i for i, c in enumerate(cands) if t.check(p, c)[0]), None)
        lines = e["completion"].split("\n")
        assert [ln.split(": ")[0] for ln in lines[: len(cands)]] == [str(i) for i in range(1, len(cands) + 1)]
        if first_ok is not None:
            named += 1
            assert lines[len(cands)] == f"answer: #{first_ok + 1}"
            assert t.extract_answer(e["completion"]) == f"#{first_ok + 1}"
    assert named >= 100 and duplicated >= 30


# ------------------------------------------------------------------------------- steps view
SOLVED70 = "25*3=75 (7 12 75)\n75+12=87 (7 87)\nback\n75-12=63 (7 63)\n63+7=70 (70)\nanswer: 25*3-12+7\n"


def test_step_path_keeps_the_steps_on_the_way_to_the_answer():
    path = step_path(SOLVED70)
    assert [s.text() for s in path] == ["25*3=75 (7 12 75)", "75-12=63 (7 63)", "63+7=70 (70)"]
    assert step_path("3 + 7 = 10\nsomething else\nback\nback\n12*7=84\nanswer: 12*7\n75-12=63 (7 63)\n") == [
        Step(12, "*", 7, 84, None)]  # no state written; "back" on an empty path; nothing after the answer
    assert step_path("25*3=75 (7 12 75)\n") == []  # no answer: nothing kept
    # a resolved selection: the checks, the name, then the named candidate's steps and answer
    assert step_path("1: 25*3=75 (7 12 75) ok\nanswer: #1\n25*3=75 (7 12 75)\nanswer: 25*3\n") == [
        Step(25, "*", 3, 75, (7, 12, 75))]
    assert step_path("<think>\n25*3=75 (7 12 75)\n</think>\n<answer>25*3</answer>") == [Step(25, "*", 3, 75, (7, 12, 75))]
    assert step_path("9" * 13 + "+1=2\nanswer: 1\n") == []  # no 13-digit operands
    assert len(step_path("1+1=2\n" * 100 + "answer: 2\n")) == 16  # MAX_STEPS


def test_a_sampled_line_with_garbled_numbers_left_is_not_a_step():
    # "(3-3)" crashed `spiral infer` in the steps view (int("3-3")): model output is hostile input
    assert parse_step("3+3=6 (3-3)") is None and parse_step("3+3=6 (3 -3 x)") is None
    assert parse_step("3+3=6 (--3)") is None and parse_step("3+3=6 (" + "1 " * 41 + ")") is None
    assert parse_step("3-5=-2 (7 -2)") == Step(3, "-", 5, -2, (7, -2))
    assert parse_step("3+3=6 ()") == Step(3, "+", 3, 6, ())
    assert parse_step("3+3=6 ( 7  6 )") == Step(3, "+", 3, 6, (7, 6))
    assert step_path("3+3=6 (3-3)\n6*2=12 (12)\nanswer: 6*2\n") == [Step(6, "*", 2, 12, (12,))]
    t = CountdownTask(CountdownConfig(agg_view="steps", agg_answer="select"))
    p = {"numbers": [3, 3, 2], "target": 12}
    prompt = t.aggregate_prompt(p, ["3+3=6 (3-3)\n6*2=12 (12)\nanswer: 3+3*2\n", "answer: 3*2*2\n"])
    assert "1: 6*2=12 (12)\n2: none\n" in prompt
    # a long run of digits in the parentheses fails fast (no exponential backtracking)
    assert parse_step("3+3=6 (" + "1" * 5000 + "x)") is None


def test_check_path_redoes_each_step_as_the_search_writes_it():
    def check(trace, numbers=(3, 7, 12, 25), target=70, rule="at_most_once"):
        return check_path(step_path(trace + "answer: x\n"), list(numbers), target, rule)

    assert check(SOLVED70) == (True, "25*3=75 (7 12 75) 75-12=63 (7 63) 63+7=70 (70) ok")
    # the value is re-done and the claimed one compared: the first wrong claim ends the check
    assert check("25*3=76 (7 12 76)\n76-6=70 (7 70)\n") == (False, "25*3=75 (7 12 75) no")
    assert check("25*3=75 (7 12 75)\n75-12=63 (7 63)\n63+7=71 (71)\n") == (
        False, "25*3=75 (7 12 75) 75-12=63 (7 63) 63+7=70 (70) no")
    # the numbers left are tracked from the problem, not from what the trace wrote
    assert check("25*3=75 (3 7 12 75)\n75-5=70 (70)\n") == (False, "25*3=75 (7 12 75) uses 5 no")
    assert check("25*3=75 (7 12 75)\n75-3=72 (7 12 72)\n") == (False, "25*3=75 (7 12 75) uses 3 no")
    assert check("25/3=8 (7 12 8)\n") == (False, "25/3=? no")
    assert check("25*3=75 (7 12 75)\n75-7=68 (12 68)\n") == (False, "25*3=75 (7 12 75) 75-7=68 (12 68) no")
    assert check("25*3=75 (7 12 75)\n75-7=68 (12 68)\n", target=68) == (
        True, "25*3=75 (7 12 75) 75-7=68 (12 68) ok")
    assert check("25*3=75 (7 12 75)\n75-7=68 (12 68)\n", target=68, rule="exactly_once") == (
        False, "25*3=75 (7 12 75) 75-7=68 (12 68) unused 12 no")
    assert check("2+2=4 (7 5 4)\n", numbers=(2, 2, 7, 5), target=4) == (True, "2+2=4 (7 5 4) ok")
    assert check("2+2=4 (7 5 4)\n4*2=8 (7 5 8)\n", numbers=(2, 2, 7, 5), target=8)[1].endswith("uses 2 no")
    assert check("answer: 25*3-12+7\n") == (False, "none")


def test_path_expression_is_what_the_steps_build():
    assert path_expression(step_path(SOLVED70)) == "25*3-12+7"
    assert path_expression(step_path("20-11=9 (9)\n14-3=11 (20 11)\nanswer: x\n")) == "14-3"  # the last step's
    assert path_expression(step_path("14-3=11 (20 11)\n20-11=9 (9)\nanswer: x\n")) == "20-(14-3)"
    # steps link by real value: 76 is not what 25*3 made, so it stays a number the verifier rejects
    wrong = path_expression(step_path("25*3=76 (7 12 76)\n76-6=70 (7 70)\nanswer: x\n"))
    assert wrong == "76-6" and AT_MOST.check(P70, wrong) == (False, "76-6=70 uses 6 76 no")
    # a wrong claim that the next step does not use: 75 is what 25*3 made
    assert path_expression(step_path("25*3=76 (7 12 76)\n75-5=70 (7 70)\nanswer: x\n")) == "25*3-5"
    assert path_expression([]) is None


def test_paths_that_check_out_build_answers_that_verify():
    """Over the steps view's SFT candidates (honest, slipped, cut short) and both number rules:
    a path the check accepts builds an expression the verifier accepts; one it rejects builds one
    that verifies only where the check is stricter (a wrong claim no later step uses)."""
    for rule in ("at_most_once", "exactly_once"):
        t = task(number_rule=rule, agg_view="steps", agg_answer="select")
        rng = random.Random(3)
        accepted = rejected = stricter = 0
        for p in t.problems("train", 300, seed=1):
            cand = t._steps_candidate(p, rng)
            ok, _line = t.candidate_checks(p, [cand])[0]
            expr = t.candidate_answers([cand])[0]
            if ok:
                accepted += 1
                assert t.check(p, expr)[0], (p, cand)
            elif expr is not None:
                rejected += 1
                if t.check(p, expr)[0]:
                    stricter += 1
                    redone = check_path(step_path(cand), p["numbers"], p["target"], rule)[1]
                    assert redone.endswith(") no")  # stopped at a wrong claim, not at a number or the target
        assert accepted >= 50 and rejected >= 80 and stricter < rejected / 2, (rule, accepted, rejected, stricter)


def _steps_candidate_kinds(t, n=1000):
    """Counts of the steps view's SFT candidates by kind, and one cut-short example."""
    rng = random.Random(0)
    kinds, example = Counter(), None
    for p in t.problems("train", n, seed=5):
        cand = t._steps_candidate(p, rng)
        ok, line = t.candidate_checks(p, [cand])[0]
        steps = " ".join(s.text() for s in step_path(cand))
        if not ok and line == steps + " no":  # re-done step for step, and still no: off the target
            kinds["off target"] += 1
            example = example or (p, cand, line)
        else:
            kinds["right" if ok else "other"] += 1
    return kinds, example


def test_sft_cut_short_adds_right_steps_that_end_off_the_target():
    """A trained model's commonest wrong candidate has every step right and stops short of the
    target (18% of stp-agg-agg's own candidates, docs/results.md session 17). By default the SFT
    data has none of them (a failed search has backtracked its whole path by its end: `none`);
    `task.sft_cut_short` adds them, with a target that re-does the steps and rejects them."""
    default, _ = _steps_candidate_kinds(task(number_rule="at_most_once", agg_view="steps", agg_answer="select"))
    assert default["off target"] == 0 and default["right"] >= 400, default
    t = task(number_rule="at_most_once", agg_view="steps", agg_answer="select", sft_cut_short=0.35)
    kinds, (p, cand, line) = _steps_candidate_kinds(t)
    assert 0.10 <= kinds["off target"] / 1000 <= 0.25 and kinds["right"] >= 400, kinds
    claim = t.candidate_answers([cand])[0]
    assert claim == path_expression(step_path(cand)) and not t.check(p, claim)[0]
    assert t.aggregate_completion(p, [cand], random.Random(0)).startswith(f"1: {line}\n")  # the check rejects it
    with pytest.raises(ValueError, match="sft_cut_short"):
        task(agg_view="steps", agg_answer="select", sft_cut_short=0.7)  # more than honest traces leave
    with pytest.raises(ValueError, match="sft_cut_short"):
        task(sft_cut_short=0.35)  # the answer view's candidates have no steps to cut


def test_steps_view_prompt_target_and_selection():
    """agg_view=steps: each candidate shown as the steps it kept; the target re-does them and names
    the first that checks out; the selected candidate's answer is the expression its steps build,
    which the verifier then scores, whatever its answer line said."""
    t = task(number_rule="at_most_once", agg_view="steps", agg_answer="select")
    slipped = "25*3=75 (7 12 75)\n75-12=62 (7 62)\n62+8=70 (70)\nanswer: 25*3-12+7\n"
    miscopied = SOLVED70.replace("answer: 25*3-12+7", "answer: 25*3-(12+7)")  # right steps, wrong answer line
    traces = [slipped, "fail\n", miscopied]
    prompt = t.aggregate_prompt(P70, traces)
    assert prompt == ("agg 3 7 12 25 -> 70\n1: 25*3=75 (7 12 75) 75-12=62 (7 62) 62+8=70 (70)\n2: none\n"
                      "3: 25*3=75 (7 12 75) 75-12=63 (7 63) 63+7=70 (70)\n--\n")
    target = t.aggregate_completion(P70, traces, random.Random(0))
    assert target == ("1: 25*3=75 (7 12 75) 75-12=63 (7 63) no\n2: none\n"
                      "3: 25*3=75 (7 12 75) 75-12=63 (7 63) 63+7=70 (70) ok\nanswer: #3\n")
    resolved = t.resolve_aggregation(traces, target)
    assert resolved.endswith("answer: 25*3-12+7\n") and t.is_correct(P70, resolved)
    assert not t.is_correct(P70, miscopied)  # the vote scores its answer line
    named_slip = t.resolve_aggregation(traces, "answer: #1\n")
    assert t.extract_answer(named_slip) == "62+8" and not t.is_correct(P70, named_slip)
    assert t.resolve_aggregation(traces, "answer: #2\n") == "answer: #2\n"  # "none" resolves to nothing
    # the resolved selection carries the named candidate's steps, which a second RSA round then checks
    assert resolved == target + "25*3=75 (7 12 75)\n75-12=63 (7 63)\n63+7=70 (70)\nanswer: 25*3-12+7\n"
    assert t.aggregate_prompt(P70, [resolved, named_slip]) == (
        "agg 3 7 12 25 -> 70\n1: 25*3=75 (7 12 75) 75-12=63 (7 63) 63+7=70 (70)\n"
        "2: 25*3=75 (7 12 75) 75-12=62 (7 62) 62+8=70 (70)\n--\n")
    assert t.candidate_answers([resolved]) == ["25*3-12+7"]
    with pytest.raises(ValueError, match="agg_view: steps needs agg_answer: select"):
        task(agg_view="steps")  # a written answer has no steps for the next round
    # verbose: steps inside <think>, the candidate shown as its steps
    v = task(number_rule="at_most_once", agg_view="steps", agg_answer="select", prompt_format="verbose")
    vt = "<think>\n25*3=75 (7 12 75)\n75-12=63 (7 63)\n63+7=70 (70)\n</think>\n<answer>25*3-12+7</answer>"
    assert "Candidate 1:\n25*3=75 (7 12 75) 75-12=63 (7 63) 63+7=70 (70)" in v.aggregate_prompt(P70, [vt])
    vtarget = v.aggregate_completion(P70, [vt], random.Random(0))
    assert vtarget.endswith("<answer>#1</answer>")
    vresolved = v.resolve_aggregation([vt], vtarget.removesuffix("</answer>"))
    assert v.is_correct(P70, vresolved) and v.candidate_answers([vresolved]) == ["25*3-12+7"]


def test_sft_examples_steps_select_round_trip():
    """Every SFT aggregation example of the steps/select form: the target's lines are the re-done
    steps of the candidates the prompt shows, it names the first that checks out, and resolved,
    the verifier scores it right; slips of all three kinds and honest paths are all there."""
    t = task(number_rule="at_most_once", agg_view="steps", agg_answer="select")
    ex = t.sft_examples(0, 300, seed=4, set_size=4)
    kinds = Counter()
    named = 0
    for e in ex:
        p = _problem_from_prompt(t, e["prompt"])
        views = re.findall(r"^(\d+): (.*)$", e["prompt"], flags=re.M)
        assert [int(i) for i, _ in views] == [1, 2, 3, 4]
        lines = e["completion"].split("\n")
        first_ok = None
        for k, (_i, view) in enumerate(views):
            steps = [] if view == "none" else step_path(view.replace(") ", ")\n") + "\nanswer: x\n")
            ok, line = check_path(steps, p["numbers"], p["target"])
            assert lines[k] == f"{k + 1}: {line}"
            kinds["ok" if ok else "none" if line == "none" else "uses" if "uses " in line else "wrong"] += 1
            if ok and first_ok is None:
                first_ok = k + 1
        if first_ok is not None:
            named += 1
            assert lines[4] == f"answer: #{first_ok}"
            assert t.is_correct(p, t.resolve_aggregation(_traces_for(views), e["completion"]))
    assert named >= 150
    assert kinds["ok"] >= 300 and kinds["none"] >= 50 and kinds["uses"] >= 50, kinds
    assert kinds["wrong"] >= 100, kinds  # a wrong value, an inexact division, or a last value that is not the target


def _traces_for(views):
    """Search traces with the steps a steps-view prompt shows (a round trip through the view)."""
    return ["fail\n" if v == "none" else v.replace(") ", ")\n") + "\nanswer: x\n" for _i, v in views]


def _problem_from_prompt(t, prompt):
    if t.config.prompt_format == "compact":
        head = prompt.split("\n", 1)[0].removeprefix("agg ")
        nums, target = head.split(" -> ")
        return {"id": "x", "numbers": [int(x) for x in nums.split()], "target": int(target)}
    m = re.search(r"numbers \[([\d, ]+)\], create an equation that equals (\d+)", prompt)
    return {"id": "x", "numbers": [int(x) for x in m[1].split(", ")], "target": int(m[2])}


def _candidates_from_prompt(t, prompt):
    if t.config.prompt_format == "verbose":
        views = re.findall(r"Candidate \d+:\n(.*)", prompt)
    elif t.config.agg_view == "full":
        blocks = re.split(r"^\[\d+\]\n", prompt.removesuffix("--\n"), flags=re.M)[1:]
        return [t.extract_answer(b) for b in blocks]
    else:
        views = re.findall(r"^\d+: (.*)$", prompt, flags=re.M)
    return [None if v == "none" else v for v in views]


# ------------------------------------------------------------------------------- loading
def test_load_by_name_and_import_path():
    t = load_task("countdown", {"max_value": 10, "number_rule": "exactly_once"})
    assert isinstance(t, CountdownTask) and t.config.max_value == 10
    assert isinstance(t, Task)
    t2 = load_task("spiral_cli.tasks.countdown:CountdownTask", {"max_target": 50, "name": "ignored"})
    assert isinstance(t2, CountdownTask) and t2.config.max_target == 50
    assert "countdown" in list_tasks() and set(list_tasks()) >= {"countdown", "reasoning_gym", "math"}


def test_load_errors_are_one_line():
    cases = [
        ("countdown", {"max_value": 0}, "task.max_value: Input should be greater than or equal to 1"),
        ("countdown", {"number_rule": "twice"}, "task.number_rule: Input should be 'at_most_once' or 'exactly_once'"),
        ("countdown", {"colour": "red"}, "task.colour: unknown option"),
        ("countdown", {"min_numbers": 5, "max_numbers": 4}, "task: min_numbers must be <= max_numbers"),
        ("nope", {}, "task.name: unknown task 'nope'; built-in tasks: countdown, reasoning_gym, math"),
        ("spiral_cli.tasks.countdown:Nope", {}, "task: module 'spiral_cli.tasks.countdown' has no attribute 'Nope'"),
        ("no_such_pkg.mod:Task", {}, "task: cannot import module 'no_such_pkg.mod'"),
    ]
    for name, opts, msg in cases:
        with pytest.raises(TaskError) as e:
            load_task(name, opts)
        assert str(e.value).startswith(msg), str(e.value)
        assert "\n" not in str(e.value)


def test_load_by_entry_point(monkeypatch):
    import importlib.metadata

    import spiral_cli.tasks as tasks

    ep = importlib.metadata.EntryPoint(
        name="my_countdown", value="spiral_cli.tasks.countdown:CountdownTask", group="spiral.tasks"
    )
    monkeypatch.setattr(tasks, "_entry_points", lambda: {"my_countdown": ep})
    t = load_task("my_countdown", {"max_value": 9})
    assert isinstance(t, CountdownTask) and t.config.max_value == 9
    assert list_tasks()["my_countdown"].startswith("reach a target")
    with pytest.raises(TaskError, match="built-in tasks: countdown, reasoning_gym, math, my_countdown"):
        load_task("other", {})


def test_parse_problem_text():
    from spiral_cli.tasks.base import TaskError
    from spiral_cli.tasks.countdown import CountdownTask

    t = CountdownTask()
    p = t.parse_problem_text(" 3 7 25 -> 46 ")
    assert p["numbers"] == [3, 7, 25] and p["target"] == 46 and p["id"].startswith("cd-")
    assert t.search_prompt(p) == "3 7 25 -> 46\n"
    for bad in ["3 7 25", "a b -> 3", "3 -> 4", "1 2 -> x"]:
        with pytest.raises(TaskError):
            t.parse_problem_text(bad)
