"""Rollout throughput: the in-process vLLM engine (generation.backend=vllm) vs a vLLM server on
this machine (generation.backend=vllm_server), same model, same batch, and the cost of a LoRA
adapter sync through the server.

The model is saved to a temporary directory (a scratch preset lives in memory only, a server needs
a directory), a server is started on 127.0.0.1 with the flags docs/scaling.md gives, measured,
stopped; then the in-process engine is measured. Each backend generates twice with the same
seed; the second call is timed. Figures, not a test: on a shared CPU they move with its load.

    VLLM_CPU_KVCACHE_SPACE=1 python bench/vllm_server_gen.py      # scratch:tiny, 64 x 8 x 128
    python bench/vllm_server_gen.py --model scratch:tiny --prompts 64 --n 8 --max-new-tokens 128 --lora-r 8

Prints one line per measurement and a JSON summary at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _tokens(outs) -> int:
    return sum(len(c.token_ids) for s in outs for c in s)


def _timed_gen(gen, prompts, args, seed=0):
    kw = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=seed)
    gen.generate(prompts, **kw)  # warm-up
    t = time.perf_counter()
    outs = gen.generate(prompts, **kw)
    return _tokens(outs), time.perf_counter() - t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="scratch:tiny")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    import torch

    from spiral_cli.generation.vllm_server import VLLMServerGenerator
    from spiral_cli.machine import cpu_model
    from spiral_cli.models import load_model, save_checkpoint
    from spiral_cli.recipe import (
        GenerationSection,
        LoraSection,
        ModelSection,
        VllmSection,
        VllmServerSection,
    )
    from spiral_cli.tasks.countdown import CountdownTask

    task = CountdownTask()
    prompts = [task.search_prompt(p) for p in task.problems("train", args.prompts, seed=0)]
    autocast = "on" if args.dtype == "bfloat16" else "off"
    tmp = Path(tempfile.mkdtemp(prefix="spiral-bench-server-"))
    src = load_model(ModelSection(name=args.model, autocast=autocast), for_training=False, seed=0)
    model_dir = tmp / "model"
    save_checkpoint(src, model_dir)
    import vllm

    summary: dict = {
        "model": args.model, "batch": f"{args.prompts} prompts x n={args.n} x {args.max_new_tokens} new tokens",
        "machine": f"{cpu_model()}, {os.cpu_count()} cpus, torch {torch.__version__}, vllm {vllm.__version__}",
        "dtype": args.dtype, "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(summary), flush=True)

    # -- the server
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", args.dtype, "--max-model-len", "1024", "--enable-lora",
           "--max-lora-rank", str(args.lora_r), "--max-loras", "2", "--logprobs-mode", "processed_logprobs"]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = (tmp / "server.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited; see {tmp / 'server.log'}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except OSError:
                time.sleep(1)
        summary["server_start_s"] = round(time.perf_counter() - t0, 1)
        section = GenerationSection(backend="vllm_server", vllm=VllmSection(server=VllmServerSection(url=url)))
        loaded = load_model(ModelSection(name=str(model_dir), autocast=autocast), for_training=False, seed=0)
        gen = VLLMServerGenerator(loaded, section)
        toks, dt = _timed_gen(gen, prompts, args)
        gen.close()
        summary["server"] = {"tokens": toks, "seconds": round(dt, 3), "tok_per_s": round(toks / dt)}
        print(f"server    : {toks} tokens in {dt:.2f} s = {toks / dt:,.0f} tok/s (start {summary['server_start_s']} s)",
              flush=True)
        lm = load_model(ModelSection(name=str(model_dir), autocast=autocast,
                                     lora=LoraSection(r=args.lora_r, alpha=2 * args.lora_r)), for_training=True, seed=0)
        gen = VLLMServerGenerator(lm, section)
        try:
            times = []
            for _ in range(args.syncs):
                gen.update_weights(lm.model)
                times.append(gen.last_sync_seconds)
            gen.verify = False
            plain = []
            for _ in range(args.syncs):
                gen.update_weights(lm.model)
                plain.append(gen.last_sync_seconds)
            toks, dt = _timed_gen(gen, prompts, args)
        finally:
            gen.close()
        summary["server_lora"] = {"tokens": toks, "seconds": round(dt, 3), "tok_per_s": round(toks / dt),
                                  "sync_s": round(statistics.median(plain), 4),
                                  "sync_with_verify_s": round(statistics.median(times), 4)}
        print(f"server+LoRA: {toks} tokens in {dt:.2f} s = {toks / dt:,.0f} tok/s; adapter sync "
              f"{statistics.median(plain) * 1e3:.0f} ms ({statistics.median(times) * 1e3:.0f} ms with the probe)", flush=True)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()

    # -- the in-process engine, same model directory
    from spiral_cli.generation.vllm import VLLMGenerator

    loaded = load_model(ModelSection(name=str(model_dir), autocast=autocast), for_training=False, seed=0)
    t0 = time.perf_counter()
    gen = VLLMGenerator(loaded, GenerationSection(backend="vllm", vllm=VllmSection(gpu_memory_utilization=0.2)))
    start = time.perf_counter() - t0
    try:
        toks, dt = _timed_gen(gen, prompts, args)
    finally:
        gen.close()
    summary["in_process"] = {"tokens": toks, "seconds": round(dt, 3), "tok_per_s": round(toks / dt),
                             "engine_start_s": round(start, 1)}
    print(f"in-process: {toks} tokens in {dt:.2f} s = {toks / dt:,.0f} tok/s (engine start {start:.1f} s)", flush=True)
    print(json.dumps(summary))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
