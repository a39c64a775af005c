"""Reading and comparing final answers: shared by the tasks and the scoring sandbox's worker.

Kept apart from any one task so the tasks and `_sandbox` import it without importing each other
(imports flow one way, docs/method.md). Nothing here evaluates text as code; `verify_math` parses
with sympy through math-verify, which is why the sandbox may run it in a worker process.
"""
from __future__ import annotations

import threading


def extract_answer_text(text: str) -> str | None:
    """The last answer in `text`: an `answer: ...` line or an `<answer>...</answer>` block,
    whichever comes last. Linear time on any input. Returns the stripped answer (may be long)."""
    if not text:
        return None
    best_pos, best = -1, None
    # <answer>...</answer>; a final unclosed <answer> (stop string trimmed) counts too
    open_pos = text.rfind("<answer>")
    if open_pos >= 0:
        close_pos = text.find("</answer>", open_pos)
        body = text[open_pos + 8 : close_pos] if close_pos >= 0 else text[open_pos + 8 :]
        best_pos, best = open_pos, body
    # the last line starting with "answer:"
    pos = len(text)
    while True:
        k = text.rfind("answer:", 0, pos)
        if k < 0:
            break
        line_start = text.rfind("\n", 0, k) + 1
        if text[line_start:k].strip() == "":
            if k > best_pos:
                end = text.find("\n", k)
                best_pos, best = k, text[k + 7 : end if end >= 0 else len(text)]
            break
        pos = k
    if best is None:
        return None
    return " ".join(best.split())


def vote_key(answer: str | None) -> str | None:
    """Answers that differ only in white space vote together (the majority vote, and countdown's
    grouped aggregation view, which shows the vote's counts)."""
    return None if answer is None else "".join(answer.split())


def _as_latex(s: str) -> str:
    s = s.strip()
    if "$" in s or "\\boxed" in s or "\\(" in s or "\\[" in s:
        return s
    return f"${s}$"


def verify_math(gold: str, pred: str, timeout: bool | None = None) -> bool:
    """math_verify equivalence of a gold answer and a predicted answer (both short strings)."""
    from math_verify import parse, verify

    if timeout is None:
        timeout = threading.current_thread() is threading.main_thread()
    t = 5 if timeout else None
    gold_p = parse(_as_latex(gold), parsing_timeout=t)
    if not gold_p:
        gold_p = parse(gold, parsing_timeout=t)
    pred_p = parse(_as_latex(pred), parsing_timeout=t)
    if not pred_p:
        pred_p = parse(pred, parsing_timeout=t)
    if not gold_p or not pred_p:
        return False
    return bool(verify(gold_p, pred_p, timeout_seconds=t))
