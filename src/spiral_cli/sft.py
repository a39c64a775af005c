"""`spiral sft`: supervised warm start on the search format and the aggregation format.

Data: the task's own examples (countdown: solver search traces and aggregation examples built
from sets of solver traces) or a JSONL of {"prompt", "completion"} pairs. Loss on completion
tokens only (the EOS that ends a completion included). Resumable: every `save_every` steps the
run writes its full state (model, optimizer, scheduler, RNG, step) atomically under
<home>/runs/<name>/state; a restarted run continues from there with the same batch order.
At the end the model is evaluated on the task's held-out split and registered.

Data parallel under torchrun / accelerate launch (DDP): every rank builds the same batches and
trains on its share of each (contiguous slices, so N ranks train what one process trains with
grad_accum N); rank 0 alone writes the state, the metrics, evaluates and registers.
"""
from __future__ import annotations

import bisect
import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from spiral_cli.checkpoints import (
    ModelRef,
    clean_leftovers,
    load_trainer_state,
    prepare_run,
    resolve_model,
    save_registered,
    save_run_state,
)
from spiral_cli.generation import close_generator, make_generator
from spiral_cli.generation.roles import for_aggregation
from spiral_cli.jsonl import InputError, read_jsonl_file
from spiral_cli.optim import adamw, compile_for_training, full_determinism, resolve_full_determinism
from spiral_cli.paths import atomic_write_text, runs_dir
from spiral_cli.processes import (
    all_sum,
    check_shared_home,
    end_processes,
    is_main,
    make_accelerator,
    rank_world,
    run_on_main,
)
from spiral_cli.progress import fmt_duration
from spiral_cli.prompt_fit import AggregationFit
from spiral_cli.recipe import Recipe, RecipeError
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


def self_aggregate_pairs(task: Task, generator, n: int, set_size: int, recipe: Recipe,
                         round_index: int = 0) -> list[dict[str, str]]:
    """Aggregation examples whose candidates are the model's own samples (its real kinds of
    wrong answers, which a solver's corrupted expressions do not cover) and whose targets come
    from the task's verifier (`aggregate_completion`): check every candidate, keep a verified one.
    Each round (sft.self_aggregate_after as a list) draws other problems and samples."""
    make = getattr(task, "aggregate_completion", None)
    if make is None:
        raise InputError(f"sft.self_aggregate_examples: task {task.name!r} has no aggregate_completion to build targets")
    problems = task.problems("train", n, seed=recipe.seed + 104_729 * (round_index + 1))
    gen = recipe.generation
    fit = AggregationFit(task, for_aggregation(generator), gen.agg_max_new_tokens, gen.agg_fit)
    fit.check(problems, set_size)  # the prompts the model will see at inference, fitted alike
    outs = generator.generate(
        [task.search_prompt(p) for p in problems], n=set_size, max_new_tokens=gen.max_new_tokens,
        temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k, stop=task.stop_strings(),
        seed=recipe.seed + round_index,
    )
    rng = random.Random(f"self-aggregate/{recipe.seed}" + (f"/{round_index}" if round_index else ""))
    candidates = [[c.text for c in samples] for samples in outs]
    prompts, _ = fit.prompts(problems, candidates)
    return [{"prompt": prompt, "completion": make(p, texts, rng), "kind": "self_aggregate"}
            for p, texts, prompt in zip(problems, candidates, prompts)]


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def self_aggregate_file(run_dir: Path, round_index: int) -> Path:
    """Where a round's self-aggregation examples are kept for resume (round 0: the name of one round)."""
    return run_dir / ("self_aggregate.jsonl" if round_index == 0 else f"self_aggregate-{round_index + 1}.jsonl")


def _self_aggregate_examples(task: Task, loaded, recipe: Recipe, run_dir: Path, round_index: int,
                             console: Console) -> list[Example]:
    """A round's self-aggregation examples: read back on resume (the same ones), else sampled now
    from the model being trained and saved."""

    cfg = recipe.sft
    path = self_aggregate_file(run_dir, round_index)
    if path.is_file():
        pairs = [row for _, row in read_jsonl_file(path)]
    else:
        t0 = time.time()
        generator = make_generator(loaded, recipe.generation)
        try:
            pairs = self_aggregate_pairs(task, generator, cfg.self_aggregate_examples, cfg.set_size, recipe, round_index)
        finally:
            close_generator(generator)
        atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in pairs))
        rounds = len(cfg.self_aggregate_rounds())
        console.print(f"  built {len(pairs)} aggregation examples over the model's own candidates"
                      + (f" (round {round_index + 1} of {rounds})" if rounds > 1 else "") + f" ({time.time() - t0:.0f}s)")
    out, dropped = tokenize_examples(pairs, loaded.tokenizer, cfg.max_len)
    if dropped:
        console.print(f"  {dropped} of round {round_index + 1}'s {len(pairs)} aggregation examples are longer than "
                      f"sft.max_len={cfg.max_len}: the round trains on {len(out)}")
    return out


def _save_state(loaded, optimizer, step: int, state_dir: Path, extra: dict[str, Any]) -> None:
    save_run_state(loaded, state_dir, {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        **extra,
    })


def _ignore(message: str) -> None:
    """SftPhases' default `warn`: tests and callers that do not print."""


@dataclass
class SftPhases:
    """Which examples step `s` trains on: the phases along the steps (docs/method.md).

    Search examples alone until `aggregate_from` (the arithmetic the aggregator checks with is
    learned there first), then every example; from each of `self_agg_starts` on
    (sft.self_aggregate_examples) also aggregation examples over the model's own candidates, built
    by `build_self_agg(round)` the first time a step needs them and replacing the previous round's.
    The boundaries count steps, never seconds: the same recipe trains the same model on a fast and
    on a slow machine. Within a phase, each epoch's batches are `batch_schedule(phase pool, epoch)`,
    a pure function of (seed, phase, epoch), so a resumed run sees the same batches."""

    examples: list[Example]
    aggregate_from: int  # 0: mixed from the start
    self_agg_starts: list[int]  # the step each self-aggregation round begins; empty: none
    batch_size: int
    seed: int
    build_self_agg: Callable[[int], list[Example]] | None = None
    self_agg_share: float | None = None  # the own examples' share of a round's pool; None: all others too
    self_agg_others: str = "all"  # what the others are drawn from: "all" examples or "search" ones alone
    total_steps: int = 0  # the run's length: the last learning-rate cycle ends there
    restart_lr_each_round: bool = False
    warn: Callable[[str], None] = _ignore  # a round whose pool is not what the recipe asked
    build_seconds: float = field(default=0.0, init=False)  # spent building rounds: not training time
    rounds_built: int = field(default=0, init=False)
    search_only: list[Example] = field(init=False)
    _self_agg_pool: tuple[int, list[Example]] | None = field(default=None, init=False)  # (round, pool)
    _schedule: tuple[tuple[int, int], list[list[int]]] = field(default=((-1, -1), []), init=False)

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError(f"SftPhases.total_steps must be the run's steps (> 0), got {self.total_steps}")
        self.search_only = [e for e in self.examples if e.kind != "aggregate"]

    @classmethod
    def for_recipe(cls, cfg, examples: list[Example], seed: int,
                   build_self_agg: Callable[[int], list[Example]] | None = None,
                   warn: Callable[[str], None] = _ignore) -> SftPhases:
        """The phases of an SftSection: `aggregate_after` and `self_aggregate_after` are fractions
        of `steps`; a pool with no aggregation examples (or only those) has one phase."""
        has_both = any(e.kind == "aggregate" for e in examples) and any(e.kind != "aggregate" for e in examples)
        rounds = cfg.self_aggregate_rounds() if cfg.self_aggregate_examples else []  # never with sft.data (refused)
        phases = cls(
            examples=examples,
            aggregate_from=int(cfg.steps * cfg.aggregate_after) if has_both else 0,
            self_agg_starts=sorted({int(cfg.steps * f) for f in rounds}),
            batch_size=cfg.batch_size, seed=seed, build_self_agg=build_self_agg,
            self_agg_share=cfg.self_aggregate_share, self_agg_others=cfg.self_aggregate_others, total_steps=cfg.steps,
            restart_lr_each_round=cfg.restart_lr_each_round, warn=warn,
        )
        if cfg.restart_lr_each_round:
            for start, length in sorted({phases.lr_cycle(s) for s in [0, *phases.self_agg_starts]}):
                if length < cfg.warmup_steps:
                    warn(f"the learning-rate cycle from step {start} is {length} steps, shorter than "
                         f"sft.warmup_steps={cfg.warmup_steps}: it never reaches sft.lr")
        return phases

    def at(self, step: int) -> tuple[int, list[Example]]:
        """(the step the phase began, its example pool) for `step`."""
        r = bisect.bisect_right(self.self_agg_starts, step) - 1  # the last round begun by `step`
        if r >= 0:
            if self._self_agg_pool is None or self._self_agg_pool[0] != r:
                t0 = time.time()
                extra = self.build_self_agg(r) if self.build_self_agg else []
                self.build_seconds += time.time() - t0
                self.rounds_built += 1
                self._self_agg_pool = (r, self._others_for_round(r, len(extra)) + extra)
            return self.self_agg_starts[r], self._self_agg_pool[1]
        if step < self.aggregate_from:
            return 0, self.search_only
        return self.aggregate_from, self.examples

    def _others_for_round(self, round_index: int, n_own: int) -> list[Example]:
        """The other examples beside round `round_index`'s `n_own` own ones, from every example or
        (`self_agg_others` "search") the search ones alone: all of them, or with `self_agg_share` a
        draw of the size that gives the own ones that share, fixed by (seed, round) so a resumed
        run draws the same, in their original order."""
        source = self.search_only if self.self_agg_others == "search" else self.examples
        if not source:  # every search example longer than sft.max_len
            self.warn(f"sft.self_aggregate_others=search: no search example fits sft.max_len; round {round_index + 1} "
                      f"draws from all {len(self.examples)} examples")
            source = self.examples
        if not n_own:
            self.warn(f"self-aggregation round {round_index + 1} has no examples of the model's own "
                      f"(none fit sft.max_len): it trains on the {len(source)} others alone")
            return source
        if self.self_agg_share is None:
            return source
        wanted = round(n_own * (1 - self.self_agg_share) / self.self_agg_share)
        if wanted > len(source):
            self.warn(f"sft.self_aggregate_share={self.self_agg_share} asks for {wanted} other examples beside "
                      f"round {round_index + 1}'s {n_own} own ones, and there are {len(source)}: their share "
                      f"is {n_own / (n_own + len(source)):.2f}")
        k = min(len(source), wanted)
        keep = sorted(random.Random(f"self-aggregate-share/{self.seed}/{round_index}").sample(range(len(source)), k))
        return [source[i] for i in keep]

    def lr_cycle(self, step: int) -> tuple[int, int]:
        """(first step, length) of the learning-rate cycle `step` is in: the whole run, or with
        restarts the stretch from the last round begun (or step 0) to the next one (or the end)."""
        if not self.restart_lr_each_round:
            return 0, self.total_steps
        bounds = [0, *self.self_agg_starts, self.total_steps]
        i = bisect.bisect_right(bounds, step) - 1
        return bounds[i], bounds[i + 1] - bounds[i]

    def eta_seconds(self, step: int, first_step: int, elapsed: float) -> float:
        """Time left after `step` steps done (`first_step` of them before this process): the steps
        left at this process's training pace, plus the rounds not built yet at the mean time of
        those built (none built yet: not counted)."""
        per_step = (elapsed - self.build_seconds) / max(1, step - first_step)
        rounds_left = sum(1 for s in self.self_agg_starts if s >= step)
        per_round = self.build_seconds / self.rounds_built if self.rounds_built else 0.0
        return (self.total_steps - step) * per_step + rounds_left * per_round

    def batch(self, step: int) -> list[Example]:
        """The examples of `step`'s batch."""
        pool_start, pool = self.at(step)
        batches_per_epoch = max(1, len(pool) // self.batch_size)
        epoch, pos = divmod(step - pool_start, batches_per_epoch)
        if self._schedule[0] != (pool_start, epoch):
            lengths = [len(e.input_ids) for e in pool]
            self._schedule = ((pool_start, epoch), batch_schedule(len(pool), self.batch_size, epoch, self.seed, lengths))
        return [pool[i] for i in self._schedule[1][pos % batches_per_epoch]]


@dataclass
class SftRun:
    """What the SFT loop needs, built by `_setup_sft`."""

    name: str
    cfg: Any  # SftSection
    loaded: Any  # LoadedModel, training mode
    base: ModelRef  # the starting model
    task: Task
    registry: Registry
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    phases: SftPhases
    state_dir: Path
    log_path: Path
    resuming: bool
    step: int  # where the loop starts (a resumed run's saved step)
    tokens_seen: int
    model: Any = None  # what the loop calls: the policy, DDP-wrapped in a multi-process run
    accelerator: Any = None  # None: one process
    rank: int = 0
    world: int = 1


@dataclass
class SftOutcome:
    step: int
    tokens_seen: int
    last_loss: float
    stopped_early: bool
    train_seconds: float


def run_sft(recipe: Recipe, *, home: Path, name: str | None = None, resume: bool = True, console: Console | None = None) -> dict[str, Any]:
    console = console or Console(stderr=True)
    if int(os.environ.get("RANK", "0")) > 0:  # one voice for a multi-process run: rank 0's
        console = Console(stderr=True, quiet=True)
    run = _setup_sft(recipe, home=home, name=name or f"{recipe.name}-sft", resume=resume, console=console)
    result = _train_and_register(run, recipe, home, console)
    end_processes(run.accelerator)  # on success only: a failed rank may have left the others in a collective
    return result


def _train_and_register(run: SftRun, recipe: Recipe, home: Path, console: Console) -> dict[str, Any]:
    deterministic = resolve_full_determinism(run.cfg.full_determinism, run.loaded.device.type)
    if deterministic:
        console.print("  deterministic algorithms on (sft.full_determinism): a rerun on this machine repeats bit for bit")
    with full_determinism(deterministic):  # the compile and every step it serves
        done = _train(run, recipe, console)
    run.loaded.model.eval()
    # rank 0 evaluates and registers while the others wait; if it fails, they stop with its reason
    result = run_on_main(run.accelerator, lambda: _evaluate_and_register(run, recipe, home, done, console))
    if result is None:
        entry = run.registry.resolve(f"{run.name}@{done.step}").entry
        return {"name": run.name, "step": done.step, "path": str(entry.path), "rank": run.rank}
    return result


def _evaluate_and_register(run: SftRun, recipe: Recipe, home: Path, done: SftOutcome, console: Console) -> dict[str, Any]:
    from spiral_cli.evaluate import evaluate_recipe

    cfg = run.cfg
    metrics: dict[str, Any] = {"train_loss": None if math.isnan(done.last_loss) else done.last_loss,
                               "steps": done.step, "planned_steps": cfg.steps, "train_tokens": done.tokens_seen}
    if done.step < cfg.steps:  # the registry says so too: this is not the recipe's model
        metrics["stopped_by_time_budget"] = 1
    if cfg.eval_problems > 0 and not cfg.data:
        problems = run.task.problems("eval", cfg.eval_problems, seed=recipe.seed)
        gen = recipe.generation
        generator = make_generator(run.loaded, gen)
        console.print(f"  evaluating on {len(problems)} held-out problems (N={recipe.infer.parallel}, T={gen.max_new_tokens})")
        t_eval = time.time()
        try:
            metrics.update(evaluate_recipe(run.task, generator, problems, recipe, short_budget=True))
        finally:
            close_generator(generator)
        metrics["eval_seconds"] = time.time() - t_eval
    entry = save_registered(
        run.loaded, run.registry, home, name=run.name, stage="sft", step=done.step, parent=run.base.lineage,
        recipe=recipe.snapshot(), metrics=metrics,
    )
    result = {"name": run.name, "step": done.step, "path": str(entry.path), "train_seconds": round(done.train_seconds, 1),
              "stopped_early": done.stopped_early, "metrics": metrics}
    _print_metrics(console, metrics)
    return result


def _setup_sft(recipe: Recipe, *, home: Path, name: str, resume: bool, console: Console) -> SftRun:
    """Checks, the model (from the run's state when resuming), the examples, the optimizer and the
    phases. The order of the seeded steps is the order they consume randomness in: keep it."""
    from spiral_cli.models import count_parameters, load_model

    cfg = recipe.sft
    if cfg.self_aggregate_examples and cfg.data:  # here, not in the schema: old snapshots still load
        raise RecipeError("sft.self_aggregate_examples samples the task's problems beside its own examples; "
                          "with sft.data the examples are the file's: drop one of the two")
    prepare_run(recipe, home=home, name=name, stage="sft", model_ref=recipe.model.name, resume=resume)
    registry = Registry(home)
    task = load_task(recipe.task.name, recipe.task.options())
    base = resolve_model(recipe.model.name, registry)
    run_dir = runs_dir(home) / name
    state_dir = run_dir / "state"
    clean_leftovers(home, name, run_dir)
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

    params = [p for p in loaded.model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    accelerator = make_accelerator(loaded.device)
    rank, world = rank_world(accelerator)
    model = loaded.model
    if accelerator is not None:
        _check_data_parallel(cfg, world)
        check_shared_home(accelerator, resuming, state_dir)
        model, optimizer = accelerator.prepare(model, optimizer)
        if is_main(accelerator):
            console.print(f"  data parallel over {world} processes: each trains {cfg.batch_size // world} of "
                          f"every {cfg.batch_size} examples" + ("; sft.compile is off (one process only)" if cfg.compile else ""))
    step, tokens_seen = 0, 0
    if resuming:
        state = load_trainer_state(state_dir)
        optimizer.load_state_dict(state["optimizer"])
        step, tokens_seen = state["step"], state.get("tokens_seen", 0)
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        console.print(f"  resumed from {state_dir} at step {step}" + (" (already finished; --no-resume starts over)" if step >= cfg.steps else ""))

    if not resuming:  # a fresh run samples its own candidates anew
        for old in run_dir.glob("self_aggregate*.jsonl"):
            old.unlink()
    phases = SftPhases.for_recipe(
        cfg, examples, recipe.seed,
        build_self_agg=lambda r: _self_aggregate_examples(task, loaded, recipe, run_dir, r, console),
        warn=lambda message: console.print(f"[bold yellow]WARNING:[/] {message}"))
    return SftRun(name=name, cfg=cfg, loaded=loaded, base=base, task=task, registry=registry, optimizer=optimizer,
                  params=params, phases=phases, state_dir=state_dir, log_path=run_dir / "metrics.jsonl",
                  resuming=resuming, step=step, tokens_seen=tokens_seen, model=model, accelerator=accelerator,
                  rank=rank, world=world)


def _check_data_parallel(cfg, world: int) -> None:
    """What SFT over several processes needs, checked before any training."""
    if cfg.batch_size % (world * cfg.grad_accum):
        raise RecipeError(f"sft.batch_size={cfg.batch_size} must be a multiple of processes x sft.grad_accum "
                          f"({world} x {cfg.grad_accum}): each rank trains an equal share of every batch")
    if cfg.self_aggregate_examples:
        raise RecipeError("sft.self_aggregate_examples is not supported over several processes yet "
                          "(the model's own candidates are sampled in one process): run this SFT in one process")


def _last_logged_loss(log_path: Path) -> float:
    """The loss of the run's last log line (NaN if none): what a resumed run reports before it steps."""
    try:
        lines = log_path.read_text().splitlines()
    except FileNotFoundError:
        return float("nan")
    for line in reversed(lines):
        try:
            return float(json.loads(line)["loss"])
        except (ValueError, KeyError, TypeError):
            continue
    return float("nan")


def _train(run: SftRun, recipe: Recipe, console: Console) -> SftOutcome:
    """The loop: one optimizer step per batch of the phase schedule, a log line every `log_every`
    steps, the run's state every `save_every` (and at the end)."""
    cfg, loaded, optimizer, phases = run.cfg, run.loaded, run.optimizer, run.phases
    step, tokens_seen = run.step, run.tokens_seen
    pad_id = loaded.tokenizer.pad_token_id
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    loaded.model.train()
    start_time, last_loss = time.time(), _last_logged_loss(run.log_path)  # a finished run resumed trains no step
    first_step = step  # of this process (a resumed run): the ETA counts the steps it has timed
    window = (start_time, tokens_seen, 0.0)  # (time, tokens, build seconds) at the last log line
    deadline = start_time + cfg.time_budget_minutes * 60 if cfg.time_budget_minutes else None
    stopped_early = False
    main, device = is_main(run.accelerator), (run.accelerator.device if run.accelerator else loaded.device)
    forward = run.model
    if cfg.compile and step < cfg.steps and run.world == 1:
        # a full batch: compiled with dynamic shapes, a batch of 1 would be specialised and recompiled
        first = collate(phases.at(step)[1][: cfg.batch_size // cfg.grad_accum], pad_id, loaded.device)
        forward = compile_for_training(loaded, console,
                                       lambda f: f(input_ids=first["input_ids"], labels=first["labels"]).loss)
    while step < cfg.steps:
        batch_examples = phases.batch(step)
        mine = _split(batch_examples, run.world)[run.rank] if run.world > 1 else batch_examples
        cycle_start, cycle_steps = phases.lr_cycle(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - cycle_start, cycle_steps, cfg.warmup_steps, cfg.lr)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        micros = _split(mine, cfg.grad_accum)
        for i, micro in enumerate(micros):
            batch = collate(micro, pad_id, device)
            # DDP averages the ranks' gradients once, at the last micro-batch's backward
            sync = forward.no_sync() if run.world > 1 and i < len(micros) - 1 else nullcontext()
            with sync:
                with loaded.autocast_ctx():
                    # right padding + causal attention: real tokens never see the pads, so no mask is
                    # needed (same logits), and the maskless attention kernel is much faster on the CPU
                    loss = forward(input_ids=batch["input_ids"], labels=batch["labels"]).loss / cfg.grad_accum
                loss.backward()
            loss_sum += loss.item()
        tokens_seen += sum(len(e.input_ids) for e in batch_examples)  # every rank's, counted alike on each
        torch.nn.utils.clip_grad_norm_(run.params, 1.0)
        optimizer.step()
        step += 1
        last_loss = loss_sum
        if step % cfg.log_every == 0 or step == cfg.steps:
            if run.world > 1:  # the batch's loss: the mean of the ranks' shares
                last_loss = all_sum([loss_sum], run.accelerator)[0] / run.world
            now = time.time()
            # training time only: a round's examples are sampled between two log lines
            tps = (tokens_seen - window[1]) / max(now - window[0] - (phases.build_seconds - window[2]), 1e-9)
            window = (now, tokens_seen, phases.build_seconds)
            eta = phases.eta_seconds(step, first_step, now - start_time)
            if main:
                console.print(f"  step {step}/{cfg.steps} loss {last_loss:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                              f"{tps:,.0f} tok/s, ETA {fmt_duration(eta)}")
                with run.log_path.open("a") as f:
                    f.write(json.dumps({"step": step, "loss": last_loss, "tokens": tokens_seen, "tok_per_s": tps,
                                        "time": now - start_time}) + "\n")
        if step % cfg.save_every == 0 and step < cfg.steps and main:
            _save_state(loaded, optimizer, step, run.state_dir, {"tokens_seen": tokens_seen})
        if deadline and _past(deadline, run) and step < cfg.steps:
            if main:
                _warn_time_budget(console, cfg, step, phases.aggregate_from, phases.self_agg_starts)
            stopped_early = True
            break
    train_seconds = time.time() - start_time
    if (step > first_step or not run.resuming) and main:  # the final state too, so a rerun does not retrain
        _save_state(loaded, optimizer, step, run.state_dir, {"tokens_seen": tokens_seen})
    return SftOutcome(step=step, tokens_seen=tokens_seen, last_loss=last_loss, stopped_early=stopped_early,
                      train_seconds=train_seconds)


def _warn_time_budget(console: Console, cfg, step: int, aggregate_from: int, self_agg_starts: list[int]) -> None:
    """The safety net fired: say loudly that this run's model is not the one its recipe defines."""
    console.print(
        f"[bold red]WARNING: sft.time_budget_minutes={cfg.time_budget_minutes} stopped the run at step "
        f"{step} of {cfg.steps}.[/] The model is weaker than the recipe's, and on another machine this "
        f"recipe trains a different one. Rerun the same command to train on from step {step} (the run "
        f"resumes), or raise or drop sft.time_budget_minutes."
    )
    rounds = [(at, "sft.self_aggregate_examples" + (f" (round {i + 1})" if len(self_agg_starts) > 1 else ""))
              for i, at in enumerate(self_agg_starts)]
    for at, what in [(aggregate_from, "the aggregation examples"), *rounds]:
        if step < at:
            console.print(f"[bold red]WARNING:[/] {what} (from step {at}) were never trained on.")


def _past(deadline: float, run: SftRun) -> bool:
    """Whether the time budget is spent; over several processes, on any of them (all stop together)."""
    late = time.time() > deadline
    return late if run.world == 1 else all_sum([float(late)], run.accelerator)[0] > 0


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    size = math.ceil(len(items) / parts)
    return [items[i : i + size] for i in range(0, len(items), size)]


def _print_metrics(console: Console, metrics: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table("metric", "value", title="sft result")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(table)
