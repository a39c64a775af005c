"""Where and in which precision a model runs: the device, the dtype, and bf16 autocast (measured
on this CPU when the flags cannot tell)."""
from __future__ import annotations

import contextlib
import time

import torch

from spiral_cli.models.loaded import ModelError


def resolve_device(spec: str) -> torch.device:
    """"auto" -> cuda if available else cpu; "cpu", "cuda", "cuda:N" as given (checked)."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ModelError(f"model.device: unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"model.device: {spec!r} requested but this machine has no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"model.device: {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ModelError(f"model.device: unsupported device {spec!r} (use auto, cpu, cuda or cuda:N)")
    return dev


def _bf16_ok(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on a CUDA device with bf16 support, else float32."""
    if spec == "auto":
        return torch.bfloat16 if _bf16_ok(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


MEASURE = "measure"  # resolve_autocast's answer when only a timing on this CPU can tell


def resolve_autocast(spec: str, device: torch.device, dtype: torch.dtype) -> bool | str:
    """Whether forward/backward run under bf16 autocast (fp32 master weights).

    "auto": on for CUDA with bf16 support; on a CPU, MEASURE: the CPU's flags do not tell.
    A 2-core Xeon with AMX ran a scratch:tiny step 5x faster under bf16; a Xeon with
    AVX512-BF16 and no AMX 1.4x slower (336 vs 235 ms); an AMD EPYC with AVX512-BF16 and no AMX
    1.8x faster (bench/README.md, "bf16 autocast on the CPU"). Never on for a float16 model.
    """
    if dtype == torch.float16:
        return False
    if spec == "on":
        return device.type in ("cuda", "cpu")
    if spec == "off":
        return False
    if device.type == "cuda":
        return _bf16_ok(device)
    if device.type == "cpu" and dtype == torch.float32:
        return MEASURE
    return False


def cpu_bf16_matmul_is_native() -> bool:
    """Whether torch runs bf16 matrix products through oneDNN on this CPU (AVX512 or AMX). Where
    it does not (an AVX2-only CPU), bf16 matmuls take a scalar fallback: a scratch:tiny training
    step ran 9.5x slower under bf16 autocast than in fp32 on a 2-core AVX2 AMD EPYC
    (bench/README.md, "bf16 autocast on the CPU")."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True  # cannot tell: say nothing


def forced_autocast_warning(spec: str, device: torch.device, autocast: bool | str) -> str:
    """The one-line warning for `model.autocast: on` where bf16 is slow on this CPU, else ""."""
    if spec != "on" or autocast is not True or device.type != "cpu" or cpu_bf16_matmul_is_native():
        return ""
    return ("warning: model.autocast: on, but this CPU has no bf16 matrix instructions (AVX512 or AMX): bf16 "
            "matmuls run torch's slow fallback, several times slower than fp32; use auto (measures both) or off")


# decisions already measured in this process, by model shape (a run loads its model more than once)
_AUTOCAST_MEASURED: dict[tuple, tuple[bool, str]] = {}
AUTOCAST_MARGIN = 0.9  # bf16 must be >10% faster: a near tie keeps fp32, so noise rarely flips it


def measure_cpu_autocast(model, for_training: bool, timer=time.perf_counter) -> tuple[bool, str]:
    """Time the model itself on a small batch (8 x 64 tokens) in fp32 and under bf16 autocast,
    forward+backward when it will train, forward only when it will sample; alternate the two,
    keep each one's fastest of 3 after a warm-up. Leaves weights, gradients and the torch RNG as
    they were. Returns (use bf16, a one-line note with both timings)."""
    cfg = model.config
    key = (type(model).__name__, getattr(cfg, "hidden_size", None), getattr(cfg, "num_hidden_layers", None),
           getattr(cfg, "vocab_size", None), for_training, torch.get_num_threads())
    if key in _AUTOCAST_MEASURED:
        return _AUTOCAST_MEASURED[key]
    rng_state = torch.get_rng_state()
    ids = torch.randint(0, min(int(getattr(cfg, "vocab_size", 256) or 256), 256), (8, 64),
                        generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device)

    def step(bf16: bool) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        t = timer()
        if for_training:
            with ctx:
                loss = model(input_ids=ids).logits.float().mean()
            loss.backward()
        else:
            with torch.inference_mode(), ctx:
                model(input_ids=ids)
        return timer() - t

    try:
        best = {True: float("inf"), False: float("inf")}
        for rep in range(4):
            for bf16 in (False, True):
                seconds = step(bf16)
                if rep:  # the first of each is a warm-up
                    best[bf16] = min(best[bf16], seconds)
    finally:
        for p in model.parameters():
            p.grad = None
        torch.set_rng_state(rng_state)
    use = best[True] < AUTOCAST_MARGIN * best[False]
    note = (f"autocast auto: bf16 {best[True] * 1e3:.0f} ms vs fp32 {best[False] * 1e3:.0f} ms per "
            f"{'training' if for_training else 'forward'} step on this CPU -> {'bf16' if use else 'fp32'}")
    _AUTOCAST_MEASURED[key] = (use, note)
    return use, note
