"""Imports flow one way: recipe -> task -> model -> generator -> pipeline -> trainer, with the
commands on top. Every `import` of every module (those inside functions too) is checked against
the layer list below; a module may import from an earlier layer, or from its own layer where the
layer says its members may use each other. A new module must be given a layer here."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "spiral_cli"

# (layer, its modules, whether its modules may import each other), lowest first.
# Two places where the order departs from the one-line flow, both deliberate:
# - the tasks sit below the recipe: a recipe validates its `task:` section with the task's own
#   Config, while a task knows nothing of recipes (a plugin task needs only tasks/base.py);
# - the registry is where a run ends, but as a store it imports only paths and the recipe hash,
#   and every stage that writes or reads checkpoints imports it, so it sits low.
LAYERS: list[tuple[str, list[str], bool]] = [
    ("utilities", ["spiral_cli", "spiral_cli.machine", "spiral_cli.paths", "spiral_cli.jsonl", "spiral_cli.progress",
                   "spiral_cli.tables",
                   "spiral_cli.metrics", "spiral_cli.optim", "spiral_cli.plots", "spiral_cli.adapters"], True),
    ("task protocol", ["spiral_cli.tasks.base", "spiral_cli.tasks._answers"], False),
    ("scoring sandbox", ["spiral_cli.tasks._sandbox"], False),
    # the countdown package: the verifier, the solver and the options, the task's parts built on
    # them, the task, and the package that re-exports them (with the other tasks)
    ("countdown core", ["spiral_cli.tasks.countdown.expressions", "spiral_cli.tasks.countdown.solver",
                        "spiral_cli.tasks.countdown.config"], False),
    ("countdown steps", ["spiral_cli.tasks.countdown.steps"], False),  # a candidate's step path, on the solver
    ("countdown parts", ["spiral_cli.tasks.countdown.problems", "spiral_cli.tasks.countdown.formats",
                         "spiral_cli.tasks.countdown.sft_data"], False),
    ("countdown task", ["spiral_cli.tasks.countdown.task"], False),
    ("tasks", ["spiral_cli.tasks.countdown", "spiral_cli.tasks.math_task", "spiral_cli.tasks.reasoning_gym"], False),
    ("task lookup", ["spiral_cli.tasks"], False),
    ("recipe", ["spiral_cli.recipe"], False),
    ("registry", ["spiral_cli.registry"], False),
    # the model package: its core (LoadedModel, ModelError, prompts), the parts built on it, load and
    # save, and the package that re-exports them
    ("model core", ["spiral_cli.models.loaded"], False),
    ("model parts", ["spiral_cli.models.scratch", "spiral_cli.models.device", "spiral_cli.models.cpu_attention"], False),
    ("model load and save", ["spiral_cli.models.load", "spiral_cli.models.save"], False),
    ("model", ["spiral_cli.models"], False),
    ("checkpoints", ["spiral_cli.checkpoints"], False),
    ("generator protocol", ["spiral_cli.generation.base", "spiral_cli.generation.lean_qwen2"], False),
    ("generators", ["spiral_cli.generation.roles", "spiral_cli.generation.hf", "spiral_cli.generation.vllm",
                    "spiral_cli.generation.vllm_server"], False),
    ("generator choice", ["spiral_cli.generation"], False),
    # aggregation prompts fitted to the sampler's context: every site that builds them calls it
    ("prompt fitting", ["spiral_cli.prompt_fit"], False),
    ("pipeline", ["spiral_cli.pipeline"], False),
    ("evaluation", ["spiral_cli.evaluate"], False),
    # one process or several: the accelerator, ranks, sums over ranks (both trainers)
    ("processes", ["spiral_cli.processes"], False),
    ("RL pieces", ["spiral_cli.rl", "spiral_cli.rl.advantages", "spiral_cli.rl.loss"], False),
    ("rollouts", ["spiral_cli.rl.rollout"], False),
    # the trainer's parts: token log-probs, then the optimizer update and what a run writes
    ("token log-probs", ["spiral_cli.rl.logprobs"], False),
    # FSDP2 sharding, unsharded sampling, filler micro-batches, gathered checkpoints
    ("FSDP", ["spiral_cli.rl.fsdp"], False),
    ("update and run records", ["spiral_cli.rl.update", "spiral_cli.rl.run_io"], False),
    ("trainers", ["spiral_cli.sft", "spiral_cli.rl.trainer"], False),
    # the numbers of a sweep (its grid, cells, scaling efficiency), read by sweep and compare
    ("sweep cells", ["spiral_cli.sweep_cells"], False),
    # the commands wire the stages together and call each other (compare runs sweep and trainers)
    ("commands", ["spiral_cli.infer", "spiral_cli.sweep", "spiral_cli.compare", "spiral_cli.compare_report",
                  "spiral_cli.cli", "spiral_cli.__main__"], True),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, importer: str, is_package: bool, known: set[str]) -> set[str]:
    """The spiral_cli modules an AST imports (`from pkg import mod` counts as importing pkg.mod)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "spiral_cli")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importer's package
                base = importer.split(".") if is_package else importer.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "spiral_cli":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known
            out.update(subs or {target})
    return out


def layer_of(module: str) -> tuple[int, bool]:
    for rank, (_, modules, peers) in enumerate(LAYERS):
        if module in modules:
            return rank, peers
    raise KeyError(module)


def backward_edges(edges: dict[str, set[str]]) -> list[str]:
    """Each import against the flow, as 'importer (layer) -> imported (layer)'."""
    bad = []
    for importer, targets in sorted(edges.items()):
        rank, peers = layer_of(importer)
        for target in sorted(targets - {importer}):
            t_rank, _ = layer_of(target)
            if t_rank > rank or (t_rank == rank and not peers):
                bad.append(f"{importer} ({LAYERS[rank][0]}) -> {target} ({LAYERS[t_rank][0]})")
    return bad


def package_edges() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges[name] = imported_modules(tree, name, path.name == "__init__.py", set(files))
    return edges


def test_every_module_has_a_layer():
    missing = [m for m in package_edges() if not any(m in mods for _, mods, _ in LAYERS)]
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


def test_imports_flow_one_way():
    assert backward_edges(package_edges()) == []


def test_other_modules_use_the_countdown_package_not_its_parts():
    """The countdown parts sit below the other tasks in LAYERS only to order them among
    themselves: the rest of spiral imports `spiral_cli.tasks.countdown`, never a part."""
    inside = "spiral_cli.tasks.countdown"
    bad = sorted(f"{importer} -> {target}" for importer, targets in package_edges().items()
                 for target in targets
                 if target.startswith(inside + ".")
                 and not (importer == inside or importer.startswith(inside + ".")))
    assert bad == []


@pytest.mark.parametrize("source,importer,expected", [
    ("from spiral_cli.generation.roles import AGGREGATOR_ADAPTER", "spiral_cli.models",
     ["spiral_cli.models (model) -> spiral_cli.generation.roles (generators)"]),
    ("def f():\n    from spiral_cli.infer import run_infer", "spiral_cli.sft",
     ["spiral_cli.sft (trainers) -> spiral_cli.infer (commands)"]),
    ("from .math_task import verify_math", "spiral_cli.tasks._sandbox",
     ["spiral_cli.tasks._sandbox (scoring sandbox) -> spiral_cli.tasks.math_task (tasks)"]),
    ("from .countdown import extract_answer_text", "spiral_cli.tasks.math_task",
     ["spiral_cli.tasks.math_task (tasks) -> spiral_cli.tasks.countdown (tasks)"]),
    ("from spiral_cli import sweep", "spiral_cli.compare", []),
    ("from spiral_cli.sweep import run_sweep", "spiral_cli.sweep_cells",
     ["spiral_cli.sweep_cells (sweep cells) -> spiral_cli.sweep (commands)"]),
    ("from spiral_cli.recipe import Recipe\nimport json", "spiral_cli.models", []),
])
def test_the_checker_catches_a_backward_edge(source, importer, expected):
    known = set(package_edges())
    edges = {importer: imported_modules(ast.parse(source), importer, False, known)}
    assert backward_edges(edges) == expected
