"""What machine a run ran on, for reports: our 2-core machines differ up to 3x in speed, so every
absolute time is quoted beside the CPU model (and the GPU, where there is one)."""
from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

# (flag in /proc/cpuinfo, name), most capable first: the CPU's matrix instructions set how fast bf16
# and fp32 training run, and one CPU model name ("Intel(R) Xeon(R) Processor" in a VM) covers machines
# with and without them (demo times per instruction set: docs/install.md)
_MATRIX_ISA = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2"))


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


def cpu_isa(cpuinfo: str | None = None) -> str:
    """The CPU's most capable matrix instruction set ("AMX-BF16", "AVX512-BF16", "AVX512", "AVX2"), from
    the flags of /proc/cpuinfo (or the given text); "" where unknown (no such file, another architecture)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    line = re.search(r"^flags\s*:(.*)$", cpuinfo, flags=re.M)
    flags = set(line.group(1).split()) if line else set()
    return next((name for flag, name in _MATRIX_ISA if flag in flags), "")


def describe() -> dict[str, Any]:
    """The machine as a report records it: CPU model, matrix instructions and cores, torch, the GPUs torch sees."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": cpu_model(), "isa": cpu_isa(), "cores": os.cpu_count() or 0, "torch": torch.__version__, "gpus": gpus}


def summary_line(machine: dict[str, Any]) -> str:
    """One line for a report: "2-core AMD EPYC ..., AVX512-BF16" or "1 x NVIDIA H200 (16-core ...)"."""
    cpu = f"{machine.get('cores', 0)}-core {machine.get('cpu', 'unknown CPU')}"
    if machine.get("isa"):  # absent in records written before it was recorded
        cpu += f", {machine['isa']}"
    gpus = machine.get("gpus") or []
    if not gpus:
        return cpu
    return f"{len(gpus)} x {gpus[0]} ({cpu})"
