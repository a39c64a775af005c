"""Tasks: problem domains spiral can train on.

`load_task(name, options)` finds a task class by built-in name (countdown, reasoning_gym, math),
by import path (``my_pkg.tasks:MyTask``) or by an entry point in the ``spiral.tasks`` group,
validates `options` with the class's pydantic ``Config`` and returns an instance. Errors are
`TaskError`s with one line naming the bad field, e.g. ``task.max_value: Input should be greater
than 0``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

from pydantic import ValidationError

from .base import Task, TaskConfig, TaskError

__all__ = ["Task", "TaskConfig", "TaskError", "BUILTIN_TASKS", "load_task", "list_tasks", "resolve_task_class"]

ENTRY_POINT_GROUP = "spiral.tasks"

# name -> (import path, one-line description); imported lazily so that e.g. countdown never
# pays for reasoning_gym or math_verify imports.
BUILTIN_TASKS: dict[str, tuple[str, str]] = {
    "countdown": (
        "spiral_cli.tasks.countdown:CountdownTask",
        "reach a target with + - * / over given numbers (procedural, exact verifier, solver traces)",
    ),
    "reasoning_gym": (
        "spiral_cli.tasks.reasoning_gym:ReasoningGymTask",
        "any reasoning-gym procedural dataset, scored in a sandboxed subprocess",
    ),
    "math": (
        "spiral_cli.tasks.math_task:MathTask",
        "math word problems from JSONL/parquet/HF datasets, answers checked with math-verify",
    ),
}


def _import_path(path: str) -> type:
    mod_name, _, attr = path.partition(":")
    if not mod_name or not attr:
        raise TaskError(f"task: {path!r} is not an import path of the form 'package.module:Class'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise TaskError(f"task: cannot import module {mod_name!r} ({e})") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TaskError(f"task: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    try:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # broken metadata must not break built-in tasks
        return {}
    return {ep.name: ep for ep in eps}


def _check_class(cls: Any, label: str) -> type:
    if not isinstance(cls, type):
        raise TaskError(f"task: {label} is not a class")
    cfg = getattr(cls, "Config", None)
    if not (isinstance(cfg, type) and issubclass(cfg, TaskConfig)):
        raise TaskError(f"task: {label} has no `Config` (a TaskConfig subclass)")
    return cls


def resolve_task_class(name: str) -> type:
    """The task class for a built-in name, an import path or an entry point name."""
    if not isinstance(name, str) or not name:
        raise TaskError("task.name: expected a task name")
    if name in BUILTIN_TASKS:
        return _check_class(_import_path(BUILTIN_TASKS[name][0]), name)
    if ":" in name:
        return _check_class(_import_path(name), name)
    eps = _entry_points()
    if name in eps:
        try:
            cls = eps[name].load()
        except Exception as e:
            raise TaskError(f"task: entry point {name!r} failed to load ({type(e).__name__}: {e})") from None
        return _check_class(cls, name)
    known = ", ".join(list(BUILTIN_TASKS) + sorted(eps))
    raise TaskError(f"task.name: unknown task {name!r}; built-in tasks: {known} (or use 'package.module:Class')")


def format_validation_error(err: ValidationError, prefix: str = "task") -> str:
    """One line for the first error: 'task.<field>: <message>'."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e.get("loc", ()))
    where = f"{prefix}.{loc}" if loc else prefix
    msg = e.get("msg", "invalid value")
    if e.get("type") == "extra_forbidden":
        msg = "unknown option"
    elif e.get("type") == "missing":
        what = "NAME" if loc in ("dataset", "name") else "VALUE"
        msg = f"Field required (give it in the recipe's task: section, or with --set task.{loc}={what})"
    msg = msg.removeprefix("Value error, ")
    more = len(err.errors()) - 1
    return f"{where}: {msg}" + (f" (and {more} more)" if more > 0 else "")


def load_task(name: str, options: dict[str, Any] | None = None) -> Task:
    """Instantiate a task from its name and its options (the recipe's `task:` section minus `name`)."""
    cls = resolve_task_class(name)
    opts = dict(options or {})
    opts.pop("name", None)
    try:
        config = cls.Config(**opts)
    except ValidationError as e:
        raise TaskError(format_validation_error(e)) from None
    return cls(config)


def list_tasks() -> dict[str, str]:
    """Name -> one-line description of every built-in and entry-point task."""
    out = {name: desc for name, (_path, desc) in BUILTIN_TASKS.items()}
    for name, ep in sorted(_entry_points().items()):
        if name in out:
            continue
        desc = f"(entry point {ep.value})"
        try:
            cls = ep.load()
            doc = getattr(cls, "description", None) or (cls.__doc__ or "").strip().splitlines()[0:1]
            if isinstance(doc, list):
                doc = doc[0] if doc else ""
            if doc:
                desc = str(doc)
        except Exception as e:
            desc = f"(entry point {ep.value} fails to load: {type(e).__name__})"
        out[name] = desc
    return out
