"""Time or profile the two halves of bench/grpo_step.py's GRPO step in one process.

    PYTHONPATH=src .venv/bin/python bench/rl_halves.py {gen,gen-ab,upd,upd-ab,prof-gen,prof-upd} [reps]
    PYTHONPATH=src .venv/bin/python bench/rl_halves.py record-spiral /tmp/h/spiral.pkl

gen: 8 prompts x 8 samples x 128 tokens from /tmp/bench_f (grpo_step.py prepare), timed;
COMPILE_GEN=1: with generation.compile (the decoding step compiled, on the first call).
gen-ab: the eager and the compiled decoding step, alternating call by call on the same prompts.
upd: rl/update._update on 6 recorded batches (/tmp/h/samples.pkl, made on first use
random
advantages), timed
COMPILE=regional|shared|whole compiles the training forward first. SAMPLES=file.pkl: other recorded
batches (record-spiral writes a SPIRAL step's, `grpo_step.py run --objective spiral` for 4 steps);
SHARED=0: the one-row layout (train_set.shared_prefix false; `upd` times the shared one by default, the
recipe's default, unlike `upd` figures before session 31); upd-ab: both layouts, interleaved.
prof-*: torch.profiler table of one call on one thread.
"""
import json
import os
import pickle
import random
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from spiral_cli.generation.hf import HFGenerator
from spiral_cli.models import load_model
from spiral_cli.optim import adamw
from spiral_cli.recipe import ModelSection, Recipe
from spiral_cli.rl import update as U  # noqa: N812
from spiral_cli.rl.rollout import Sample

B = Path("/tmp/bench_f")
mode = sys.argv[1]
if mode == "record-spiral":  # the samples of each update of a 4-step SPIRAL bench run
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import grpo_step

    from spiral_cli.rl import trainer
    recorded, real = [], trainer._update
    def recording(model, ref, opt, sch, samples, *a, **k):
        recorded.append(list(samples))
        return real(model, ref, opt, sch, samples, *a, **k)
    trainer._update = recording
    grpo_step.run(Path("/tmp/bench_f"), 4, objective="spiral")
    Path(sys.argv[2]).write_bytes(pickle.dumps(recorded))
    sys.exit(0)
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
torch.manual_seed(0)
loaded = load_model(ModelSection(name=str(B / "model"), autocast="on"), for_training=True, seed=0)
prompts = [json.loads(l)["prompt"] for l in (B / "prompts.jsonl").read_text().splitlines()]
gen = HFGenerator(loaded, batch_size=64, compile=os.environ.get("COMPILE_GEN") == "1")
def generate(i, g=None):
    ps = prompts[8 * i: 8 * i + 8]
    return ps, (g or gen).generate(ps, n=8, max_new_tokens=128, temperature=1.0, seed=i)
sec = Recipe.model_validate({"name": "b", "task": {"name": "countdown"}, "train_set": {"objective": "grpo", "micro_batch_size": 64, "lr": 1e-5, "loss_type": "ppo_clip", "beta": 0.0}}).train_set
def samples_of(ps, comps):
    rng = random.Random(0)
    out = []
    for p, cs in zip(ps, comps):
        for c in cs:
            out.append(Sample(p, c.token_ids, c.logprobs, rng.choice([-1.0, 1.0]) * rng.random(), 0.0, "search", 128))
    return out
if mode == "gen-ab":
    both = {"eager": HFGenerator(loaded, batch_size=64), "compiled": HFGenerator(loaded, batch_size=64, compile=True)}
    for g in both.values():
        generate(0, g)  # warm-up (and the compile)
    ts = {k: [] for k in both}
    for i in range(1, reps + 1):
        for k, g in both.items():
            t = time.perf_counter()
            _, c = generate(i, g)
            ts[k].append(time.perf_counter() - t)
    for k, v in ts.items():
        print(k, [round(x, 3) for x in v], "median", round(statistics.median(v), 3))
    print("compiled / eager", round(statistics.median(ts["compiled"]) / statistics.median(ts["eager"]), 3))
elif mode in ("gen", "prof-gen"):
    generate(0)
    if mode == "prof-gen":
        torch.set_num_threads(1)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35))
    else:
        ts = []
        for i in range(1, reps + 1):
            t = time.perf_counter()
            _, c = generate(i)
            ts.append(time.perf_counter() - t)
        print("gen", [round(x, 3) for x in ts], "median", round(statistics.median(ts), 3), "tokens", sum(len(x.token_ids) for cs in c for x in cs))
else:
    cache = Path(os.environ.get("SAMPLES", "/tmp/h/samples.pkl"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    if cache.exists():
        batches = pickle.loads(cache.read_bytes())
    else:
        batches = [samples_of(*generate(i)) for i in range(6)]
        cache.write_bytes(pickle.dumps(batches))
    def timed_batch(i):  # cycle over the batches after the first (the warm-up's), or the only one
        return batches[(1 + i % max(1, len(batches) - 1)) % len(batches)]
    model = loaded.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr=1e-5, betas=(0.9, 0.99), weight_decay=0.0)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    pc = {}
    comp = None

    def run(s, shared=os.environ.get("SHARED", "1") == "1"):
        return U._update(model, None, opt, sch, s, sec, loaded, pc, None, compiled=comp, shared_prefix=shared)
    cm = os.environ.get("COMPILE", "")
    fwd = model
    if cm == "regional":
        for layer in model.model.layers:
            layer.compile(dynamic=True)
    elif cm == "shared":
        f = torch.compile(type(model.model.layers[0]).forward, dynamic=True)
        for layer in model.model.layers:
            layer.forward = types.MethodType(f, layer)
    elif cm == "whole":
        fwd = torch.compile(model, dynamic=True)
    if cm:
        class C:  # compiled callable for _update (already compiled: no warm-up)
            forward = fwd

            def __call__(self, batch):
                return fwd
        comp = C()
    t0 = time.time()
    run(batches[0])
    print("first update", round(time.time()-t0,1), "s")
    if mode == "prof-upd":
        torch.set_num_threads(1)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(batches[1])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    elif mode == "upd-ab":  # one-row and shared-prefix layouts, interleaved batch by batch
        run(batches[0], False)
        run(batches[0], True)
        ts = {False: [], True: []}
        for i in range(reps):
            for shared in (False, True):
                t = time.perf_counter()
                run(timed_batch(i), shared)
                ts[shared].append(time.perf_counter() - t)
        for shared in (False, True):
            print("shared" if shared else "one-row", [round(x, 3) for x in ts[shared]], "median",
                  round(statistics.median(ts[shared]), 3))
    else:
        ts = []
        for i in range(reps):
            s = timed_batch(i)
            t = time.perf_counter()
            st = run(s)
            ts.append(time.perf_counter() - t)
        print("upd", [round(x, 3) for x in ts], "median", round(statistics.median(ts), 3), "loss", st["loss"])
