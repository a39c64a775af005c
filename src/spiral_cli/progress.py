"""Progress lines on stderr: how long is left, in one short form for every command."""
from __future__ import annotations

import math


def fmt_duration(seconds: float | None) -> str:
    """42s, 3m07s, 1h05m; "?" when the time is not known (None, inf, nan)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
