"""JSONL in and out: one JSON object per line, errors that name the line."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


class InputError(ValueError):
    """A malformed input line or file; the message names where."""


def check_input_file(path: str | Path, what: str = "input file") -> Path:
    """`path` as a Path if it is a readable file; else InputError saying which of missing,
    a directory or unreadable it is. Cheap: callers run it before any expensive work."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"{what} {p} is a directory, not a file")
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    if not p.is_file():
        raise InputError(f"{what} {p} is not a regular file")
    try:
        with p.open("rb"):
            pass
    except OSError as e:
        raise InputError(f"{what} {p} cannot be read ({e.strerror or e})") from None
    return p


def _json_error(e: json.JSONDecodeError) -> str:
    """The whole of json's message: its `msg` alone can end mid-sentence ("Invalid control character at")."""
    msg = e.msg.removesuffix(" at")
    return f"{msg} at column {e.colno}"


def _lines(stream: IO[str]) -> Iterator[tuple[int, str]]:
    """(line number, line). A text stream over bytes (stdin, an open file) is read as bytes and
    decoded line by line as UTF-8 (JSON's encoding), so a line that is not UTF-8 is reported by
    its own number, after every good line before it."""
    raw = getattr(stream, "buffer", None)
    if raw is None:  # already text (io.StringIO)
        yield from enumerate(stream, start=1)
        return
    for lineno, data in enumerate(raw, start=1):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"line {lineno}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {e.start + 1})") from None
        yield lineno, line


def iter_jsonl(stream: IO[str], source: str = "<stdin>") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; InputError on the first bad one
    (after yielding every good line before it)."""
    try:
        for lineno, line in _lines(stream):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{source} line {lineno}: not valid JSON ({_json_error(e)})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{source} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
    except InputError as e:
        msg = str(e)
        raise InputError(msg if msg.startswith(source) else f"{source} {msg}") from None


def read_jsonl_file(path: str | Path, what: str = "input file") -> list[tuple[int, dict[str, Any]]]:
    p = check_input_file(path, what)
    with p.open(encoding="utf-8") as f:
        return list(iter_jsonl(f, str(p)))


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive batches of `size` (the last may be shorter). Reading rows from a JSONL stream,
    a bad line yields the batch read so far first, then raises its InputError, so every good
    line before it is answered."""
    chunk: list[Any] = []
    try:
        for item in items:
            chunk.append(item)
            if len(chunk) == size:
                yield chunk
                chunk = []
    except InputError:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


def write_jsonl_line(obj: dict[str, Any], stream: IO[str] | None = None) -> None:
    stream = stream or sys.stdout
    stream.write(json.dumps(obj, ensure_ascii=False) + "\n")
    stream.flush()  # downstream in a pipeline sees each result as soon as it exists


def _json_default(obj: Any) -> Any:
    """Encode the few non-JSON values that commonly appear in recipes and metrics."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    item = getattr(obj, "item", None)  # numpy / torch scalars, without importing either
    if callable(item):
        try:
            value = item()
        except Exception:  # noqa: BLE001 - e.g. a tensor with more than one element
            value = None
        if isinstance(value, (bool, int, float, str)):
            return value
    raise TypeError(f"{type(obj).__name__} value {obj!r:.60} is not JSON-serialisable")


def canonical_json(obj: Any) -> str:
    """One text per value whatever its key order: what the registry stores and recipe hashes hash."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default
    )
