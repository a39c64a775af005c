"""What machine a run ran on, for reports: our 2-core machines differ up to 3x in speed, so every
absolute time is quoted beside the CPU model (and the GPU, where there is one)."""
from __future__ import annotations

import os
import platform
import re
import subprocess
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (`lscpu`, else /proc/cpuinfo, else what Python knows)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        names = re.findall(r"^Model name:\s*(.+)$", out, flags=re.M)
        if names:
            return names[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe() -> dict[str, Any]:
    """The machine as a report records it: CPU model and cores, torch, the GPUs torch sees."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 0, "torch": torch.__version__, "gpus": gpus}


def summary_line(machine: dict[str, Any]) -> str:
    """One line for a report: "2-core AMD EPYC ..." or "1 x NVIDIA H200 (16-core ...)"."""
    cpu = f"{machine.get('cores', 0)}-core {machine.get('cpu', 'unknown CPU')}"
    gpus = machine.get("gpus") or []
    if not gpus:
        return cpu
    return f"{len(gpus)} x {gpus[0]} ({cpu})"
