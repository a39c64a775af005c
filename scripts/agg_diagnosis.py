"""How well does a countdown aggregator verify its candidates? (a diagnostic, not a test)

For held-out problems: N=8 search traces per problem, then P=8 aggregation prompts per problem,
each over a random subset of k=4 of those traces (as `spiral infer` builds them). Each
aggregation writes one verdict line per candidate ("<i>: <check> ok|no"); this script compares
every verdict with the candidate's true correctness (and its line with the verifier's own check)
and prints the confusion counts, how often the aggregation's final answer is right (overall and
when at least one candidate was right), how often it rejected every candidate, and in the steps
view the kinds of candidate the search wrote (right, none, off target, a step wrong, a number not left, ...).

    .venv/bin/python scripts/agg_diagnosis.py <checkpoint dir or registry path> [temperature] [problems] [recipe overrides...]

e.g. `... 1.0 100 task.agg_view=grouped task.agg_answer=select` for a model trained with those (in
the steps view a candidate is right when its kept steps check out, the answer it gives then);
`aggregator=<checkpoint dir>` among them aggregates with that model (the two-model form) instead.
"""
from __future__ import annotations

import collections
import random
import re
import sys

_OPERATION = re.compile(r"(\d+)([-+*/])(\d+)=")
_STEP_VALUE = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")


def candidate_kind(task, problem: dict, trace: str) -> str:
    """What kind of candidate a countdown search trace is, in the steps view: "right", "none" (no
    answer line), "no steps" (an answer but no step lines), "off target" (every step's operands,
    operator and value right, the path ending away from the target), "uses a number not left",
    "numbers left unused" (exactly_once), or "a step wrong" (a wrong value or an inexact division)."""
    ok, line = task.candidate_checks(problem, [trace])[0]
    if ok:
        return "right"
    if task.extract_answer(trace) is None:
        return "none"
    if line == "none":
        return "no steps"
    if " uses " in f" {line}":
        return "uses a number not left"
    if " unused " in f" {line}":
        return "numbers left unused"
    # compare what each step claims with its re-done value (an inexact division "a/b=?" has none, so
    # it differs); the numbers-left lists are not checked
    redone = [(int(a), op, int(b), int(v)) for a, op, b, v in _STEP_VALUE.findall(line)]
    claimed = [(s.a, s.op, s.b, s.result) for s in task._steps(trace)]
    if redone == claimed:
        return "off target"
    return "a step wrong"


def main(ckpt: str, temperature: float = 1.0, n_problems: int = 100, overrides: list[str] = (),
         recipe_path: str = "recipes/countdown.yaml") -> dict[str, float]:
    """Prints the counts and returns the summary rates (scripts/size_ladder.py tabulates them)."""
    from spiral_cli.generation.hf import HFGenerator
    from spiral_cli.models import load_model
    from spiral_cli.pipeline import PipelineConfig, draw_subsets, run_pipeline
    from spiral_cli.recipe import load_recipe
    from spiral_cli.tasks import load_task
    from spiral_cli.tasks._answers import vote_key
    from spiral_cli.tasks.base import resolve_aggregation
    from spiral_cli.tasks.countdown import step_path

    aggregator = [o.split("=", 1)[1] for o in overrides if o.startswith("aggregator=")]
    recipe = load_recipe(recipe_path, [o for o in overrides if not o.startswith("aggregator=")])
    task = load_task(recipe.task.name, recipe.task.options())
    gen = HFGenerator(load_model(recipe.model, source=ckpt, for_training=False), batch_size=256)
    agg_gen = HFGenerator(load_model(recipe.model, source=aggregator[0], for_training=False), batch_size=256) if aggregator else gen
    problems = task.problems("eval", n_problems, seed=0)
    cfg = PipelineConfig(parallel=8, seq_budget=256, agg_rounds=0, aggregate="majority", seed=0)
    results = run_pipeline(task, gen, problems, cfg)
    rng = random.Random(0)
    prompts, sets = [], []
    for i, r in enumerate(results):
        for subset in draw_subsets(8, 4, 8, rng):
            texts = [r.search[j].text for j in subset]
            prompts.append(task.aggregate_prompt(problems[i], texts))
            # the truth about each numbered candidate: its answer's check, or its re-done steps (steps view)
            sets.append((i, texts, task.candidate_checks(problems[i], texts)))
    outs = agg_gen.generate(prompts, n=1, max_new_tokens=256, temperature=temperature, stop=task.stop_strings(), seed=1)
    c = collections.Counter()
    steps_view = task.config.agg_view == "steps"
    for (i, texts, checks), out in zip(sets, outs):
        own = [[(str(s.a), s.op, str(s.b)) for s in step_path(t)] if task.extract_answer(t) else [] for t in texts]
        text = resolve_aggregation(task, texts, out[0].text)
        right = task.is_correct(problems[i], text)
        any_right = any(ok for ok, _ in checks)
        c["sets"] += 1
        c["sets with a right candidate"] += any_right
        c["aggregation right"] += right
        c["aggregation right | a right candidate"] += right and any_right
        verdicts = {int(m.group(1)): m.group(2).rstrip() for m in re.finditer(r"^(\d+): (.*)$", text, re.M)}
        if not any(v.endswith(" ok") for v in verdicts.values()):
            c["rejected every candidate"] += 1
        answers = task.candidate_answers(texts)  # numbered as the prompt numbers them
        accepted = [k for k in range(1, len(checks) + 1) if verdicts.get(k, "").endswith(" ok") and answers[k - 1]]
        if any(checks[k - 1][0] for k in accepted):
            c["accepted a right candidate"] += 1
            answer = task.extract_answer(text)
            c["accepted a right candidate, answered with an accepted one"] += any(
                answer is not None and vote_key(answer) == vote_key(answers[k - 1]) for k in accepted)
            c["accepted a right candidate, answer right"] += right
        for k, (truth, line) in enumerate(checks, 1):
            if line == "none" or k not in verdicts:
                continue
            ok = verdicts[k].endswith(" ok")
            c["verdict lines"] += 1
            c["verdict lines equal to the verifier's check"] += verdicts[k] == line
            if steps_view:  # did it re-do the candidate's own steps (operands and operators), whatever the values?
                done = _OPERATION.findall(verdicts[k])
                c["verdict lines re-doing the candidate's steps"] += bool(done) and done == own[k - 1][: len(done)]
            c[("accepted" if ok else "rejected") + (" right" if truth else " wrong") + " candidate"] += 1
    pass1 = sum(t.correct for r in results for t in r.search) / (8 * len(results))
    if steps_view:  # the kinds of candidate the search wrote, which the aggregator has to tell apart
        kinds = collections.Counter(candidate_kind(task, p, t.text) for p, r in zip(problems, results) for t in r.search)
        kind_shares = {k: v / sum(kinds.values()) for k, v in kinds.most_common()}
        print("search candidates: " + ", ".join(f"{k} {share:.0%}" for k, share in kind_shares.items()))
    for k, v in c.items():
        print(f"{k:40s} {v}")
    acc_wrong = c["accepted wrong candidate"] / max(1, c["accepted wrong candidate"] + c["rejected wrong candidate"])
    acc_right = c["accepted right candidate"] / max(1, c["accepted right candidate"] + c["rejected right candidate"])
    print(f"pass@1 of the search traces {pass1:.3f}; aggregation accuracy {c['aggregation right'] / c['sets']:.3f}")
    faithful = c["verdict lines equal to the verifier's check"] / max(1, c["verdict lines"])
    print(f"accepts {acc_right:.0%} of right candidates and {acc_wrong:.0%} of wrong ones; "
          f"{faithful:.0%} of the verdict lines are the verifier's own check, step for step")
    redo = c["verdict lines re-doing the candidate's steps"] / max(1, c["verdict lines"])
    if steps_view:
        print(f"{redo:.0%} of the verdict lines re-do the candidate's own steps (its operands and operators)")
    return {**({f"candidates {k}": share for k, share in kind_shares.items()} if steps_view else {}), "sets": c["sets"], "accepts_right": acc_right, "accepts_wrong": acc_wrong, "faithful_verdict_lines": faithful,
            "rejected_every_candidate": c["rejected every candidate"], "search_pass@1": pass1,
            **({"verdict_lines_redoing_own_steps": redo} if steps_view else {}),
            "aggregation_accuracy": c["aggregation right"] / max(1, c["sets"])}


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 1.0, int(sys.argv[3]) if len(sys.argv) > 3 else 100,
         sys.argv[4:])
