"""JSONL in and out: one JSON object per line, errors that name the line."""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class InputError(ValueError):
    """A malformed input line or file; the message names where."""


def iter_jsonl(stream: IO[str], source: str = "<stdin>") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; InputError on the first bad one."""
    for lineno, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{source} line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{source} line {lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def read_jsonl_file(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"input file not found: {p}")
    with p.open() as f:
        return list(iter_jsonl(f, str(p)))


def write_jsonl_line(obj: dict[str, Any], stream: IO[str] | None = None) -> None:
    stream = stream or sys.stdout
    stream.write(json.dumps(obj, ensure_ascii=False) + "\n")
    stream.flush()  # downstream in a pipeline sees each result as soon as it exists
