"""Rich tables that fit the terminal: the borderless style a table falls back to when its boxed
form is wider than the console (rich would otherwise squeeze its narrowest columns to nothing),
and the width a table takes unconstrained."""
from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

COMPACT = {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False}


def natural_width(console: Console, table: Table) -> int:
    """The width `table` takes when nothing limits it."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update(width=10_000), table).maximum
