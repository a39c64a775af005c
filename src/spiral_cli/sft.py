"""`spiral sft`: supervised warm start on the search format and the aggregation format.

Data: the task's own examples (countdown: solver search traces and aggregation examples built
from sets of solver traces) or a JSONL of {"prompt", "completion"} pairs. Loss on completion
tokens only (the EOS that ends a completion included). Resumable: every `save_every` steps the
run writes its full state (model, optimizer, scheduler, RNG, step) atomically under
<home>/runs/<name>/state; a restarted run continues from there with the same batch order.
At the end the model is evaluated on the task's held-out split and registered.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from spiral_cli.checkpoints import (
    clean_leftovers,
    load_trainer_state,
    prepare_run,
    resolve_model,
    save_registered,
    save_run_state,
)
from spiral_cli.jsonl import InputError, read_jsonl_file
from spiral_cli.optim import adamw, compile_for_training
from spiral_cli.generation import close_generator, make_generator
from spiral_cli.paths import atomic_write_text, runs_dir
from spiral_cli.progress import fmt_duration
from spiral_cli.recipe import Recipe
from spiral_cli.registry import Registry
from spiral_cli.tasks import load_task
from spiral_cli.tasks.base import Task

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    kind: str


def load_examples(recipe: Recipe, task: Task) -> list[dict[str, str]]:
    """Prompt/completion pairs from the recipe's JSONL or the task's generator."""
    cfg = recipe.sft
    if cfg.data:
        pairs = []
        for lineno, obj in read_jsonl_file(cfg.data):
            if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("completion"), str):
                raise InputError(f"{cfg.data} line {lineno}: expected string fields 'prompt' and 'completion'")
            pairs.append({"prompt": obj["prompt"], "completion": obj["completion"], "kind": obj.get("kind", "data")})
        if not pairs:
            raise InputError(f"{cfg.data}: no examples")
        return pairs
    make = getattr(task, "sft_examples", None)
    if make is None:
        raise InputError(f"task {task.name!r} provides no SFT examples: give sft.data (a JSONL of prompt/completion)")
    return make(cfg.num_search_examples, cfg.num_aggregate_examples, seed=recipe.seed, set_size=cfg.set_size)


def tokenize_examples(pairs: list[dict[str, str]], tokenizer, max_len: int) -> tuple[list[Example], int]:
    """Token ids with labels masked on the prompt; examples longer than max_len are dropped."""
    from spiral_cli.models import encode_prompts

    eos = tokenizer.eos_token_id
    out, dropped = [], 0
    prompt_ids = encode_prompts(tokenizer, [pair["prompt"] for pair in pairs])  # as the generators see them
    for pair, p in zip(pairs, prompt_ids):
        c = tokenizer(pair["completion"], add_special_tokens=False)["input_ids"] + [eos]
        if len(p) + len(c) > max_len:
            dropped += 1
            continue
        out.append(Example(input_ids=p + c, labels=[IGNORE] * len(p) + c, kind=pair.get("kind", "data")))
    return out, dropped


def batch_schedule(n_examples: int, batch_size: int, epoch: int, seed: int, lengths: list[int]) -> list[list[int]]:
    """One epoch of batches: shuffled, then grouped by similar length (less padding), batches shuffled.
    A pure function of (seed, epoch), so a resumed run sees the same batches."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n_examples))
    rng.shuffle(order)
    chunk = batch_size * 64
    batches = []
    for start in range(0, n_examples, chunk):
        block = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [block[j : j + batch_size] for j in range(0, len(block), batch_size)]
    rng.shuffle(batches)
    return [b for b in batches if len(b) == batch_size] or batches


def collate(examples: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def self_aggregate_pairs(task: Task, generator, n: int, set_size: int, recipe: Recipe) -> list[dict[str, str]]:
    """Aggregation examples whose candidates are the model's own samples (its real kinds of
    wrong answers, which a solver's corrupted expressions do not cover) and whose targets come
    from the task's verifier (`aggregate_completion`): check every candidate, keep a verified one."""
    make = getattr(task, "aggregate_completion", None)
    if make is None:
        raise InputError(f"sft.self_aggregate_examples: task {task.name!r} has no aggregate_completion to build targets")
    problems = task.problems("train", n, seed=recipe.seed + 104_729)
    gen = recipe.generation
    outs = generator.generate(
        [task.search_prompt(p) for p in problems], n=set_size, max_new_tokens=gen.max_new_tokens,
        temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k, stop=task.stop_strings(), seed=recipe.seed,
    )
    rng = random.Random(f"self-aggregate/{recipe.seed}")
    pairs = []
    for p, samples in zip(problems, outs):
        texts = [c.text for c in samples]
        pairs.append({"prompt": task.aggregate_prompt(p, texts), "completion": make(p, texts, rng), "kind": "self_aggregate"})
    return pairs


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _self_aggregate_examples(task: Task, loaded, recipe: Recipe, path: Path, console: Console) -> list[Example]:
    """Phase-2 examples: read back on resume (the same ones), else sampled now and saved."""

    cfg = recipe.sft
    if path.is_file():
        pairs = [row for _, row in read_jsonl_file(path)]
    else:
        t0 = time.time()
        generator = make_generator(loaded, recipe.generation)
        try:
            pairs = self_aggregate_pairs(task, generator, cfg.self_aggregate_examples, cfg.set_size, recipe)
        finally:
            close_generator(generator)
        atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in pairs))
        console.print(f"  built {len(pairs)} aggregation examples over the model's own candidates ({time.time() - t0:.0f}s)")
    out, _ = tokenize_examples(pairs, loaded.tokenizer, cfg.max_len)
    return out


def _save_state(loaded, optimizer, step: int, state_dir: Path, extra: dict[str, Any]) -> None:
    save_run_state(loaded, state_dir, {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        **extra,
    })


def run_sft(recipe: Recipe, *, home: Path, name: str | None = None, resume: bool = True, console: Console | None = None) -> dict[str, Any]:
    from spiral_cli.evaluate import evaluate
    from spiral_cli.models import count_parameters, load_model

    console = console or Console(stderr=True)
    cfg = recipe.sft
    name = name or f"{recipe.name}-sft"
    prepare_run(recipe, home=home, name=name, stage="sft", model_ref=recipe.model.name, resume=resume)
    registry = Registry(home)
    task = load_task(recipe.task.name, recipe.task.options())
    base = resolve_model(recipe.model.name, registry)
    state_dir = runs_dir(home) / name / "state"
    clean_leftovers(home, name, runs_dir(home) / name)
    resuming = resume and (state_dir / "trainer_state.pt").is_file()
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)

    source = str(state_dir / "model") if resuming else base.source
    loaded = load_model(recipe.model, source=source, for_training=True, seed=recipe.seed)
    total, trainable = count_parameters(loaded.model)
    console.print(f"[bold]sft[/] {name}: model {base.ref} ({total / 1e6:.2f}M params, {trainable / 1e6:.2f}M trainable) on {loaded.device}")
    if loaded.autocast_note:
        console.print(f"  {loaded.autocast_note}")

    t0 = time.time()
    pairs = load_examples(recipe, task)
    examples, dropped = tokenize_examples(pairs, loaded.tokenizer, cfg.max_len)
    if not examples:
        raise InputError(f"all {len(pairs)} SFT examples are longer than sft.max_len={cfg.max_len}")
    lengths = [len(e.input_ids) for e in examples]
    kinds = {k: sum(e.kind == k for e in examples) for k in sorted({e.kind for e in examples})}
    console.print(
        f"  {len(examples)} examples {kinds}, {sum(lengths) / len(lengths):.0f} tokens on average, "
        f"{dropped} dropped as longer than {cfg.max_len} ({time.time() - t0:.1f}s)"
    )

    model = loaded.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    step, tokens_seen, state = 0, 0, {}
    if resuming:
        state = load_trainer_state(state_dir)
        optimizer.load_state_dict(state["optimizer"])
        step, tokens_seen = state["step"], state.get("tokens_seen", 0)
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        console.print(f"  resumed from {state_dir} at step {step}" + (" (already finished; --no-resume starts over)" if step >= cfg.steps else ""))

    pad_id = loaded.tokenizer.pad_token_id
    # Phases along the steps: search examples alone until `aggregate_after` (the arithmetic the
    # aggregator checks with is learned there first), then every example; from
    # `self_aggregate_after` on (sft.self_aggregate_examples), also aggregation examples over the
    # model's own candidates, kept in the run dir for resume.
    # The boundaries count steps, never seconds: the same recipe trains the same model on a
    # fast and on a slow machine.
    search_only = [e for e in examples if e.kind != "aggregate"]
    aggregate_from = int(cfg.steps * cfg.aggregate_after) if search_only and len(search_only) < len(examples) else 0
    self_agg_from = int(cfg.steps * cfg.self_aggregate_after) if cfg.self_aggregate_examples and not cfg.data else None
    self_agg_file = runs_dir(home) / name / "self_aggregate.jsonl"
    if not resuming:
        self_agg_file.unlink(missing_ok=True)
    self_agg_pool: list[Example] | None = None

    def phase_at(at: int) -> tuple[int, list[Example]]:
        """(the step the phase began, its example pool) for step `at`."""
        nonlocal self_agg_pool
        if self_agg_from is not None and at >= self_agg_from:
            if self_agg_pool is None:
                self_agg_pool = examples + _self_aggregate_examples(task, loaded, recipe, self_agg_file, console)
            return self_agg_from, self_agg_pool
        if at < aggregate_from:
            return 0, search_only
        return aggregate_from, examples

    log_path = runs_dir(home) / name / "metrics.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    model.train()
    start_time, last_loss = time.time(), float("nan")
    first_step = step  # of this process (a resumed run): the ETA counts the steps it has timed
    window = (start_time, tokens_seen)  # (time, tokens) at the last log line
    deadline = start_time + cfg.time_budget_minutes * 60 if cfg.time_budget_minutes else None
    stopped_early = False
    forward = model
    if cfg.compile and step < cfg.steps:
        # a full batch: compiled with dynamic shapes, a batch of 1 would be specialised and recompiled
        first = collate(phase_at(step)[1][: cfg.batch_size // cfg.grad_accum], pad_id, loaded.device)
        forward = compile_for_training(loaded, {"input_ids": first["input_ids"], "labels": first["labels"]}, console)
    schedule: tuple[tuple[int, int], list[list[int]]] = ((-1, -1), [])  # ((phase start, epoch), its batches)
    while step < cfg.steps:
        pool_start, pool = phase_at(step)
        batches_per_epoch = max(1, len(pool) // cfg.batch_size)
        epoch, pos = divmod(step - pool_start, batches_per_epoch)
        if schedule[0] != (pool_start, epoch):
            lengths = [len(e.input_ids) for e in pool]
            schedule = ((pool_start, epoch), batch_schedule(len(pool), cfg.batch_size, epoch, recipe.seed, lengths))
        batch_ids = schedule[1][pos % batches_per_epoch]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in _split(batch_ids, cfg.grad_accum):
            batch = collate([pool[i] for i in micro], pad_id, loaded.device)
            with loaded.autocast_ctx():
                # right padding + causal attention: real tokens never see the pads, so no mask is
                # needed (same logits), and the maskless attention kernel is much faster on the CPU
                loss = forward(input_ids=batch["input_ids"], labels=batch["labels"]).loss / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
            tokens_seen += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        last_loss = loss_sum
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.time()
            elapsed = now - start_time
            tps = (tokens_seen - window[1]) / max(now - window[0], 1e-9)  # since the last log line
            window = (now, tokens_seen)
            eta = (cfg.steps - step) * elapsed / max(1, step - first_step)
            console.print(f"  step {step}/{cfg.steps} loss {last_loss:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                          f"{tps:,.0f} tok/s, ETA {fmt_duration(eta)}")
            with log_path.open("a") as f:
                f.write(json.dumps({"step": step, "loss": last_loss, "tokens": tokens_seen, "tok_per_s": tps, "time": elapsed}) + "\n")
        if step % cfg.save_every == 0 and step < cfg.steps:
            _save_state(loaded, optimizer, step, state_dir, {"tokens_seen": tokens_seen})
        if deadline and time.time() > deadline and step < cfg.steps:
            _warn_time_budget(console, cfg, step, aggregate_from, self_agg_from)
            stopped_early = True
            break
    train_seconds = time.time() - start_time
    if train_seconds > 1 or not resuming:  # the final state too, so a rerun does not retrain
        _save_state(loaded, optimizer, step, state_dir, {"tokens_seen": tokens_seen})
    model.eval()

    metrics: dict[str, Any] = {"train_loss": last_loss, "steps": step, "planned_steps": cfg.steps, "train_tokens": tokens_seen}
    if step < cfg.steps:  # the registry says so too: this is not the recipe's model
        metrics["stopped_by_time_budget"] = 1
    if cfg.eval_problems > 0 and not cfg.data:
        problems = task.problems("eval", cfg.eval_problems, seed=recipe.seed)
        gen = recipe.generation
        generator = make_generator(loaded, recipe.generation)
        console.print(f"  evaluating on {len(problems)} held-out problems (N={recipe.infer.parallel}, T={gen.max_new_tokens})")
        t_eval = time.time()
        metrics.update(
            evaluate(
                task, generator, problems, parallel=recipe.infer.parallel, seq_budget=gen.max_new_tokens,
                population=recipe.infer.population, agg_set_size=recipe.infer.agg_set_size,
                agg_max_new_tokens=gen.agg_max_new_tokens, temperature=gen.temperature, seed=recipe.seed,
                short_budget=max(1, gen.max_new_tokens // 4),
            )
        )
        close_generator(generator)
        metrics["eval_seconds"] = time.time() - t_eval
    entry = save_registered(
        loaded, registry, home, name=name, stage="sft", step=step, parent=base.lineage,
        recipe=recipe.snapshot(), metrics=metrics,
    )
    result = {"name": name, "step": step, "path": str(entry.path), "train_seconds": round(train_seconds, 1),
              "stopped_early": stopped_early, "metrics": metrics}
    _print_metrics(console, metrics)
    return result


def _warn_time_budget(console: Console, cfg, step: int, aggregate_from: int, self_agg_from: int | None) -> None:
    """The safety net fired: say loudly that this run's model is not the one its recipe defines."""
    console.print(
        f"[bold red]WARNING: sft.time_budget_minutes={cfg.time_budget_minutes} stopped the run at step "
        f"{step} of {cfg.steps}.[/] The model is weaker than the recipe's, and on another machine this "
        f"recipe trains a different one. Rerun the same command to train on from step {step} (the run "
        f"resumes), or raise or drop sft.time_budget_minutes."
    )
    for at, what in ((aggregate_from, "the aggregation examples"), (self_agg_from, "sft.self_aggregate_examples")):
        if at is not None and step < at:
            console.print(f"[bold red]WARNING:[/] {what} (from step {at}) were never trained on.")


def _split(ids: list[int], parts: int) -> list[list[int]]:
    size = math.ceil(len(ids) / parts)
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def _print_metrics(console: Console, metrics: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table("metric", "value", title="sft result")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(table)
