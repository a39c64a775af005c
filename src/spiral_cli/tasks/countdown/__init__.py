"""Countdown: combine some of the given numbers with + - * / to hit a target.

Everything here is plain Python: a seeded generator whose problems are solvable by construction,
a verifier that parses answers with a small hand-written parser (never ``eval``), a depth-first
solver that writes its search (steps and backtracks) as text for supervised warm-start data, and
the aggregation format (a problem plus candidate answers; the target completion checks each
candidate step by step).

Compact format (byte-level friendly, every line ends with "\\n"; real solver output)::

    search prompt       "1 20 6 -> 15\\n"
    search trace        "20+6=26 (1 26)\\n26+1=27 (27)\\nback\\n26-1=25 (25)\\nback\\nback\\n"
                        "20-6=14 (1 14)\\n14-1=13 (13)\\nback\\n14+1=15 (15)\\nanswer: 20-6+1\\n"
                        (a step shows the numbers left after it; "back" undoes the last step;
                        a trace that runs out of budget ends with "fail\\n" and has no answer line)
    aggregation prompt  "agg 1 23 14 -> 8\\n1: 24-14-1\\n2: 23-14\\n3: 23-(14+1)\\n4: 23-14-1\\n--\\n"
    aggregation target  "1: 24-14=10 10-1=9 no\\n2: 23-14=9 no\\n3: 14+1=15 23-15=8 ok\\n"
                        "4: 23-14=9 9-1=8 ok\\nanswer: 23-(14+1)\\n"
                        (no candidate ok -> the check lines are followed by a search of its own)

Verbose format (for instruct models, TinyZero style): a natural-language instruction; the
completion reasons inside <think>...</think> and answers with <answer>expr</answer>.

The package, one module per responsibility (each imports only those above it):

    expressions.py  tokenizer, parser, exact evaluation, check_answer (the verifier)
    solver.py       expression building and the depth-first search that writes its trace; solve
    config.py       CountdownConfig (the recipe's `task:` options)
    steps.py        a candidate's kept search steps, their re-done check, the expression they build
    problems.py     the seeded generator, the train/eval split, problem validation
    formats.py      search and aggregation prompts, completion endings, `select` answers
    sft_data.py     supervised warm-start examples (search traces, aggregation targets)
    task.py         CountdownTask, the task protocol over the parts above, and its scoring
"""
from __future__ import annotations

from .config import MAX_TARGET, CountdownConfig
from .expressions import MAX_ANSWER_CHARS, Node, check_answer, parse_expression
from .problems import stable_hash
from .solver import solve
from .steps import check_path, path_expression, step_path
from .task import CountdownTask

__all__ = [
    "MAX_ANSWER_CHARS",
    "MAX_TARGET",
    "CountdownConfig",
    "CountdownTask",
    "Node",
    "check_answer",
    "check_path",
    "parse_expression",
    "path_expression",
    "solve",
    "stable_hash",
    "step_path",
]
