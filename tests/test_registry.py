"""Tests of the checkpoint registry, the spiral home and atomic checkpoint directories."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sqlite3
import sys
from pathlib import Path

import pytest

from spiral_cli.paths import (
    ENV_HOME,
    atomic_dir,
    checkpoint_path,
    checkpoints_dir,
    cleanup_stale_tmp,
    runs_dir,
    spiral_home,
)
from spiral_cli.registry import (
    SCHEMA_VERSION,
    Entry,
    Registry,
    RegistryError,
    ResolvedRef,
    recipe_hash,
)

SPAWN = mp.get_context("spawn")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def reg(home: Path) -> Registry:
    return Registry(home)


def ckpt(home: Path, name: str, step: int = 0) -> Path:
    d = checkpoint_path(home, name, step)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text("{}")
    return d


def add(reg: Registry, name: str, step: int = 0, stage: str = "sft", **kw) -> Entry:
    return reg.register(name, stage, ckpt(reg.home, name, step), step=step, **kw)


# ----------------------------------------------------------------------------------------------
# spiral home
# ----------------------------------------------------------------------------------------------


def test_home_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "userhome"))
    monkeypatch.delenv(ENV_HOME, raising=False)
    default = spiral_home()
    assert default == tmp_path / "userhome" / ".spiral"
    assert default.is_dir()

    monkeypatch.setenv(ENV_HOME, str(tmp_path / "fromenv"))
    assert spiral_home() == tmp_path / "fromenv"
    assert (tmp_path / "fromenv").is_dir()

    assert spiral_home(tmp_path / "flag") == tmp_path / "flag"  # flag beats env
    assert spiral_home(str(tmp_path / "flag2")) == tmp_path / "flag2"
    assert spiral_home("") == tmp_path / "fromenv"  # empty flag counts as unset

    monkeypatch.setenv(ENV_HOME, "")
    assert spiral_home() == default


def test_home_relative_and_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "u"))
    monkeypatch.chdir(tmp_path)
    assert spiral_home("rel") == tmp_path / "rel"
    assert spiral_home("~/x") == tmp_path / "u" / "x"
    assert spiral_home("rel").is_absolute()


def test_home_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        spiral_home(f)


def test_helper_dirs(tmp_path):
    assert checkpoints_dir(tmp_path) == tmp_path / "checkpoints"
    assert runs_dir(tmp_path) == tmp_path / "runs"
    assert checkpoint_path(tmp_path, "a", 200) == tmp_path / "checkpoints" / "a" / "step-200"


# ----------------------------------------------------------------------------------------------
# register / show / ls
# ----------------------------------------------------------------------------------------------


def test_register_and_show(reg, home):
    e = add(reg, "countdown-sft", 200, parent="scratch:tiny", recipe={"lr": 1e-4}, metrics={"acc": 0.5})
    assert e.name == "countdown-sft" and e.step == 200 and e.stage == "sft"
    assert e.path == checkpoint_path(home, "countdown-sft", 200) and e.path.is_absolute()
    assert e.parent == "scratch:tiny"
    assert e.recipe == {"lr": 1e-4} and e.metrics == {"acc": 0.5}
    assert e.recipe_hash == recipe_hash({"lr": 1e-4}) and len(e.recipe_hash) == 16
    assert e.created.endswith("+00:00")
    assert reg.show("countdown-sft@200") == e
    d = e.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["ref"] == "countdown-sft@200" and d["path"] == str(e.path)
    assert (home / "registry.sqlite").is_file()


def test_register_relative_path_is_made_absolute(reg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    e = reg.register("r", "base", "rel")
    assert e.path == tmp_path / "rel"


def test_lineage(reg):
    base = add(reg, "countdown-sft", 200, stage="sft", parent="Qwen/Qwen2.5-0.5B")
    child = add(reg, "countdown-set", 50, stage="set", parent=base)  # an Entry is accepted
    grandchild = add(reg, "countdown-agg", 10, stage="agg",
                     parent=reg.resolve("countdown-set"))  # so is a ResolvedRef
    assert base.parent == "Qwen/Qwen2.5-0.5B"
    assert child.parent == "countdown-sft@200"
    assert grandchild.parent == "countdown-set@50"
    assert reg.show("countdown-agg").parent == "countdown-set@50"
    # walk the lineage back
    chain, e = [], reg.show("countdown-agg")
    while e is not None:
        chain.append(e.ref)
        e = reg.show(e.parent) if e.parent and "@" in e.parent else None
    assert chain == ["countdown-agg@10", "countdown-set@50", "countdown-sft@200"]
    assert reg.resolve("scratch:tiny").lineage == "scratch:tiny"


@pytest.mark.parametrize("bad", ["", "a@b", "a:b", "a/b", "a b", "-x", ".x", "x" * 200, "scratch", 3])
def test_register_rejects_bad_names(reg, tmp_path, bad):
    with pytest.raises(RegistryError):
        reg.register(bad, "sft", tmp_path)


def test_register_rejects_bad_stage_and_step(reg, tmp_path):
    with pytest.raises(RegistryError, match="stage 'rl'.*base, sft, set, agg, grpo"):
        reg.register("a", "rl", tmp_path)
    for step in (-1, 1.5, "3", True):
        with pytest.raises(RegistryError, match="step"):
            reg.register("a", "sft", tmp_path, step=step)
    with pytest.raises(RegistryError, match="JSON"):
        reg.register("a", "sft", tmp_path, metrics={"x": object()})
    assert reg.ls() == []


def test_reregister_updates_in_place_but_never_its_lineage(reg, home):
    e1 = add(reg, "a", 5, parent="scratch:tiny", metrics={"acc": 0.1}, recipe={"x": 1})
    reg.tag("a@5", "best")
    other = home / "elsewhere"
    other.mkdir()
    # the same step saved again (a rerun): path and metrics update, the lineage stays as it was
    e2 = reg.register("a", "sft", other, step=5, parent="scratch:tiny", metrics={"acc": 0.9}, recipe={"x": 2})
    assert len(reg.ls()) == 1
    assert e2.id == e1.id
    assert e2.path == other and e2.metrics == {"acc": 0.9}
    assert (e2.stage, e2.parent, e2.recipe, e2.recipe_hash, e2.created) == (
        e1.stage, e1.parent, e1.recipe, e1.recipe_hash, e1.created)
    assert e2.tags == ["best"]  # tags survive a re-register
    # another stage or another parent would rewrite history: refused, nothing changes
    for kw in ({"stage": "grpo", "parent": "scratch:tiny"}, {"stage": "sft", "parent": "scratch:huge"}):
        with pytest.raises(RegistryError, match="refusing to rewrite"):
            reg.register("a", kw["stage"], other, step=5, parent=kw["parent"], metrics={"acc": 0.0})
    assert reg.show("a@5") == e2


def test_recipe_hash_stable_across_key_order():
    a = {"model": {"name": "x", "dtype": "bf16"}, "lr": 1e-5, "steps": [1, 2]}
    b = {"steps": [1, 2], "lr": 1e-5, "model": {"dtype": "bf16", "name": "x"}}
    assert recipe_hash(a) == recipe_hash(b)
    assert recipe_hash(a) != recipe_hash({**a, "lr": 2e-5})
    assert recipe_hash(None) is None


def test_recipe_hash_stored_equals_function(reg):
    r = {"b": [1, {"z": 1, "a": 2}], "a": "é"}
    e = add(reg, "h", recipe=r)
    assert e.recipe_hash == recipe_hash({"a": "é", "b": [1, {"a": 2, "z": 1}]})
    assert reg.show("h").recipe == r


def test_a_recipes_hash_is_the_registrys(reg):
    """One recipe_hash: what sweep and compare report for a recipe is what its entries store."""
    from spiral_cli.recipe import Recipe

    recipe = Recipe.model_validate({"name": "r", "train_set": {"lr": 3e-5}, "task": {"name": "countdown"}})
    assert add(reg, "hashed", recipe=recipe.snapshot()).recipe_hash == recipe.hash()


def test_ls_order_and_filters(reg):
    add(reg, "b", 10, stage="set")
    add(reg, "a", 200, stage="sft")
    add(reg, "a", 3, stage="sft")
    add(reg, "b", 2, stage="grpo")
    assert [e.ref for e in reg.ls()] == ["a@3", "a@200", "b@2", "b@10"]
    assert [e.ref for e in reg.ls("b")] == ["b@2", "b@10"]
    assert [e.ref for e in reg.ls(stage="sft")] == ["a@3", "a@200"]
    assert [e.ref for e in reg.ls("b", stage="set")] == ["b@10"]
    assert reg.ls("nope") == []
    with pytest.raises(RegistryError, match="stage"):
        reg.ls(stage="bogus")


def test_latest(reg):
    assert reg.latest("a") is None
    add(reg, "a", 2)
    add(reg, "a", 100)
    add(reg, "a", 30)
    assert reg.latest("a").step == 100


# ----------------------------------------------------------------------------------------------
# resolve
# ----------------------------------------------------------------------------------------------


def test_resolve_registry_forms(reg):
    add(reg, "countdown-sft", 100)
    add(reg, "countdown-sft", 200)
    add(reg, "countdown-sft", 50)
    add(reg, "other", 7)
    reg.tag("countdown-sft@100", "best")
    reg.tag("countdown-sft@50", "warm")

    r = reg.resolve("countdown-sft")
    assert isinstance(r, ResolvedRef) and r.kind == "registry"
    assert r.entry.step == 200  # plain name -> highest step
    assert r.path == r.entry.path and r.path_or_id == str(r.entry.path)
    assert r.ref == "countdown-sft"

    assert reg.resolve("countdown-sft@100").entry.step == 100
    assert reg.resolve("countdown-sft:latest").entry.step == 200
    assert reg.resolve("countdown-sft:best").entry.step == 100
    assert reg.resolve("countdown-sft:warm").entry.step == 50
    assert reg.resolve("best").entry.ref == "countdown-sft@100"  # a tag alone is a global alias
    assert reg.resolve("  other  ").entry.ref == "other@7"


def test_resolve_tag_equal_to_own_name_pins_it(reg):
    add(reg, "a", 1)
    add(reg, "a", 2)
    reg.tag("a@1", "a")
    assert reg.resolve("a").entry.step == 1
    assert reg.resolve("a:latest").entry.step == 2


def test_resolve_path(reg, tmp_path, monkeypatch):
    d = tmp_path / "some" / "model"
    d.mkdir(parents=True)
    r = reg.resolve(str(d))
    assert r.kind == "path" and r.path == d and r.entry is None
    assert reg.resolve(d).kind == "path"  # a Path object works too
    monkeypatch.chdir(tmp_path / "some")
    r = reg.resolve("model")  # a plain word not in the registry but an existing dir
    assert r.kind == "path" and r.path == d
    r = reg.resolve("./model")
    assert r.kind == "path" and r.path.resolve() == d


def test_resolve_registry_beats_path(reg, tmp_path, monkeypatch):
    add(reg, "model", 3)
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert reg.resolve("model").kind == "registry"


def test_resolve_scratch_and_hub(reg):
    r = reg.resolve("scratch:tiny")
    assert r.kind == "scratch" and r.preset == "tiny" and r.path_or_id == "tiny" and r.path is None
    r = reg.resolve("Qwen/Qwen2.5-0.5B-Instruct")
    assert r.kind == "hub" and r.hub_id == "Qwen/Qwen2.5-0.5B-Instruct" and r.entry is None
    assert json.loads(json.dumps(r.to_dict()))["kind"] == "hub"
    with pytest.raises(RegistryError, match="scratch"):
        reg.resolve("scratch:")


@pytest.mark.parametrize("ref", ["/definitely/not/here", "a/b/c", "org /model", "./nope", "org/"])
def test_resolve_not_hub_shaped_missing_path(reg, ref):
    with pytest.raises(RegistryError, match="not a registered checkpoint, an existing path"):
        reg.resolve(ref)


def test_resolve_missing_name_suggests(reg):
    add(reg, "countdown-sft", 200)
    add(reg, "countdown-set", 10)
    with pytest.raises(RegistryError) as ei:
        reg.resolve("countdwn-sft")
    msg = str(ei.value)
    assert "'countdwn-sft'" in msg and "did you mean 'countdown-sft'" in msg
    assert str(reg.db_path) in msg and "\n" not in msg
    with pytest.raises(RegistryError, match="no checkpoint named 'zzz'.*known: countdown-set, countdown-sft"):
        reg.resolve("zzz")
    with pytest.raises(RegistryError, match="no checkpoint named 'countdwn-sft'.*did you mean"):
        reg.resolve("countdwn-sft@200")


def test_resolve_empty_registry(reg):
    with pytest.raises(RegistryError, match="no checkpoint named 'x'.*registry is empty"):
        reg.resolve("x")
    with pytest.raises(RegistryError, match="empty model reference"):
        reg.resolve("  ")


def test_resolve_missing_step_lists_steps(reg):
    for s in (0, 100, 200):
        add(reg, "a", s)
    with pytest.raises(RegistryError, match=r"'a' has no step 150 \(available steps: 0, 100, 200\)"):
        reg.resolve("a@150")
    with pytest.raises(RegistryError, match="invalid step 'latest'.*a:latest"):
        reg.resolve("a@latest")
    with pytest.raises(RegistryError, match="invalid step"):
        reg.resolve("a@-1")


def test_resolve_missing_tag(reg):
    add(reg, "a", 1)
    add(reg, "b", 1)
    reg.tag("b@1", "best")
    with pytest.raises(RegistryError, match="'a' has no tag 'best'.*tag 'best' is on b@1"):
        reg.resolve("a:best")


def test_resolve_missing_directory(reg):
    e = add(reg, "countdown-sft", 200)
    for f in e.path.iterdir():
        f.unlink()
    e.path.rmdir()
    with pytest.raises(RegistryError) as ei:
        reg.resolve("countdown-sft@200")
    assert str(ei.value).startswith(
        f"checkpoint countdown-sft@200 is registered but its directory {e.path} is missing"
    )
    assert reg.show("countdown-sft@200") == e  # metadata is still readable


def test_show_rejects_non_registry_refs(reg):
    with pytest.raises(RegistryError, match="not a registry reference"):
        reg.show("org/model")
    with pytest.raises(RegistryError, match="no checkpoint named 'nope'"):
        reg.show("nope")


# ----------------------------------------------------------------------------------------------
# tags
# ----------------------------------------------------------------------------------------------


def test_tag_moves_between_entries(reg):
    add(reg, "a", 1)
    add(reg, "a", 2)
    add(reg, "b", 1)
    assert reg.tag("a@1", "best").tags == ["best"]
    assert reg.resolve("best").entry.ref == "a@1"
    reg.tag("b", "best")  # moves
    assert reg.resolve("best").entry.ref == "b@1"
    assert reg.show("a@1").tags == []
    tagged = [e.ref for e in reg.ls() if "best" in e.tags]
    assert tagged == ["b@1"]
    reg.tag("b@1", "prod")
    assert reg.show("b@1").tags == ["best", "prod"]


def test_tag_validation(reg):
    add(reg, "a", 1)
    add(reg, "b", 1)
    with pytest.raises(RegistryError, match="reserved"):
        reg.tag("a@1", "latest")
    with pytest.raises(RegistryError, match="invalid tag"):
        reg.tag("a@1", "x:y")
    with pytest.raises(RegistryError, match="shadow"):
        reg.tag("a@1", "b")
    with pytest.raises(RegistryError, match="no checkpoint named 'zz'"):
        reg.tag("zz", "best")


def test_untag(reg):
    add(reg, "a", 1)
    reg.tag("a@1", "best")
    assert reg.untag("best").ref == "a@1"
    assert reg.show("a@1").tags == []
    with pytest.raises(RegistryError, match="no tag 'best'"):
        reg.untag("best")
    with pytest.raises(RegistryError, match="no checkpoint named 'best'"):
        reg.resolve("best")


def test_update_metrics(reg):
    add(reg, "a", 1, metrics={"loss": 1.0})
    e = reg.update_metrics("a", {"pass@1": 0.4})
    assert e.metrics == {"loss": 1.0, "pass@1": 0.4}


# ----------------------------------------------------------------------------------------------
# rm
# ----------------------------------------------------------------------------------------------


def test_rm_one_step_and_all_steps(reg):
    for s in (1, 2, 3):
        add(reg, "a", s)
    add(reg, "b", 1)
    reg.tag("a@2", "best")
    removed = reg.rm("a@2")
    assert [e.ref for e in removed] == ["a@2"]
    assert [e.ref for e in reg.ls()] == ["a@1", "a@3", "b@1"]
    with pytest.raises(RegistryError):  # its tag went with it
        reg.resolve("best")
    assert removed[0].path.is_dir()  # files are kept by default
    removed = reg.rm("a")
    assert [e.ref for e in removed] == ["a@1", "a@3"]
    assert [e.ref for e in reg.ls()] == ["b@1"]
    with pytest.raises(RegistryError, match="no checkpoint named 'a'"):
        reg.rm("a")


def test_rm_does_not_follow_tags_for_plain_names(reg):
    add(reg, "a", 1)
    add(reg, "a", 2)
    reg.tag("a@1", "best")
    with pytest.raises(RegistryError, match="'best' is a tag on a@1"):
        reg.rm("best")
    assert [e.ref for e in reg.rm("a:best")] == ["a@1"]
    assert [e.ref for e in reg.ls()] == ["a@2"]


def test_rm_delete_files_only_inside_home(reg, home, tmp_path):
    inside = add(reg, "a", 1)
    outside_dir = tmp_path / "outside" / "ckpt"
    outside_dir.mkdir(parents=True)
    (outside_dir / "w.bin").write_bytes(b"x")
    reg.register("ext", "base", outside_dir)
    # symlink inside checkpoints/ pointing outside must also be refused
    link = checkpoints_dir(home) / "sneaky"
    link.symlink_to(outside_dir, target_is_directory=True)
    reg.register("sneaky", "base", link)

    with pytest.raises(RegistryError, match=f"refusing to delete {outside_dir}.*outside"):
        reg.rm("ext", delete_files=True)
    with pytest.raises(RegistryError, match="refusing to delete"):
        reg.rm("sneaky", delete_files=True)
    assert outside_dir.is_dir() and (outside_dir / "w.bin").exists()
    assert {e.name for e in reg.ls()} == {"a", "ext", "sneaky"}  # refused => nothing removed

    removed = reg.rm("a@1", delete_files=True)
    assert [e.ref for e in removed] == ["a@1"]
    assert not inside.path.exists()
    assert not inside.path.parent.exists()  # the emptied <name>/ folder goes too
    assert checkpoints_dir(home).is_dir()

    # without delete_files, outside entries can be removed (files kept)
    reg.rm("ext")
    assert outside_dir.is_dir()


def test_rm_delete_files_with_missing_dir(reg):
    e = add(reg, "a", 1)
    (e.path / "config.json").unlink()
    e.path.rmdir()
    assert [x.ref for x in reg.rm("a", delete_files=True)] == ["a@1"]


# ----------------------------------------------------------------------------------------------
# storage and concurrency
# ----------------------------------------------------------------------------------------------


def test_schema_wal_and_version(reg, home):
    add(reg, "a")
    con = sqlite3.connect(home / "registry.sqlite")
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        con.close()
    # a fresh Registry object on the same home sees the same data
    assert Registry(home).show("a").ref == "a@0"


def test_newer_schema_refused(home):
    con = sqlite3.connect(home / "registry.sqlite")
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(RegistryError, match="newer"):
        Registry(home).ls()


def test_failed_write_is_rolled_back(reg, monkeypatch):
    add(reg, "a", 1)
    # make the post-insert read fail: the insert must be rolled back with it
    import spiral_cli.registry as mod

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(mod, "_row_to_entry", boom)
    with pytest.raises(RuntimeError):
        add(reg, "b", 1)
    monkeypatch.undo()
    assert [e.ref for e in reg.ls()] == ["a@1"]


def _register_many(home: str, worker: int, n: int) -> None:
    reg = Registry(Path(home))
    base = Path(home) / "checkpoints"
    for i in range(n):
        d = base / f"w{worker}" / f"step-{i}"
        d.mkdir(parents=True, exist_ok=True)
        reg.register(f"w{worker}", "set", d, step=i, metrics={"i": i}, parent=f"w{worker}@{i - 1}" if i else None)
        if i % 10 == 0:
            reg.tag(f"w{worker}@{i}", "hot")  # everyone fights over one tag
        reg.register("shared", "grpo", d, step=worker * 1000 + i)


def test_concurrent_registration(home):
    """Four processes register 50 entries each (plus a shared name and a contested tag) into a
    registry that none of them created: nothing is lost, nothing raises."""
    workers, n = 4, 50
    procs = [SPAWN.Process(target=_register_many, args=(str(home), w, n)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * workers
    reg = Registry(home)
    for w in range(workers):
        entries = reg.ls(f"w{w}")
        assert [e.step for e in entries] == list(range(n))
        assert all(e.metrics == {"i": e.step} for e in entries)
    assert len(reg.ls("shared")) == workers * n
    assert len(reg.ls()) == 2 * workers * n
    assert sum("hot" in e.tags for e in reg.ls()) == 1


def _register_after_fork(home: str, name: str) -> None:
    Registry(Path(home)).register(name, "sft", Path(home), step=1)


@pytest.mark.skipif(sys.platform == "win32" or "fork" not in mp.get_all_start_methods(), reason="no fork")
def test_registry_object_survives_fork(reg, home):
    add(reg, "parent")
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_register_after_fork, args=(str(home), "child"))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert {e.name for e in reg.ls()} == {"parent", "child"}


# ----------------------------------------------------------------------------------------------
# atomic directories
# ----------------------------------------------------------------------------------------------


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_atomic_dir_success(tmp_path):
    final = tmp_path / "ckpts" / "step-1"
    with atomic_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp.is_dir()
        assert tmp.name.startswith(".step-1.tmp-") and str(os.getpid()) in tmp.name
        assert not final.exists()
        (tmp / "model.safetensors").write_bytes(b"w" * 100)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.json").write_text("{}")
    assert (final / "model.safetensors").read_bytes() == b"w" * 100
    assert (final / "sub" / "x.json").read_text() == "{}"
    assert leftovers(final.parent) == []


def test_atomic_dir_exception_cleans_up(tmp_path):
    final = tmp_path / "step-1"
    with pytest.raises(RuntimeError, match="oops"):
        with atomic_dir(final) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("oops")
    assert not final.exists()
    assert leftovers(tmp_path) == []


def test_atomic_write_via_a_library_writer(tmp_path):
    from spiral_cli.paths import atomic_write_via

    plot = tmp_path / "out" / "plot.png"
    seen = []

    def draw(p: Path) -> Path:
        seen.append(p)
        assert p.parent == plot.parent and p.suffix == ".png" and p.name.startswith(".plot.png.")
        p.write_bytes(b"png-1")
        return p

    assert atomic_write_via(plot, draw) == seen[0] and plot.read_bytes() == b"png-1"
    assert oct(plot.stat().st_mode & 0o777) != oct(0o600)  # the umask's mode, not mkstemp's
    # a writer with nothing to draw leaves the old file; one that fails leaves it too, and no sibling
    assert atomic_write_via(plot, lambda p: None) is None and plot.read_bytes() == b"png-1"

    def fail(p: Path) -> Path:
        p.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_via(plot, fail)
    assert plot.read_bytes() == b"png-1" and leftovers(plot.parent) == []


def test_atomic_dir_replaces_existing(tmp_path):
    final = tmp_path / "step-1"
    final.mkdir()
    (final / "old.bin").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "new.bin").write_text("new")
        assert (final / "old.bin").exists()  # old stays in place while writing
    assert sorted(p.name for p in final.iterdir()) == ["new.bin"]
    assert leftovers(tmp_path) == []
    # a failed replacement keeps the old version intact
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "partial").write_text("p")
            raise KeyboardInterrupt
    assert sorted(p.name for p in final.iterdir()) == ["new.bin"]
    assert leftovers(tmp_path) == []


def _crash_while_writing(final: str) -> None:
    with atomic_dir(Path(final)) as tmp:
        (tmp / "config.json").write_text('{"complete": false}')
        with open(tmp / "model.bin", "wb") as f:
            f.write(b"\0" * 1000)
            f.flush()
            os._exit(3)  # hard crash: no cleanup, no exception handling


def _crash_between_renames(final: str) -> None:
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        real_rename(src, dst)
        if len(calls) == 1:  # the old version has just been moved aside
            os._exit(4)

    os.rename = rename
    with atomic_dir(Path(final)) as tmp:
        (tmp / "new.bin").write_text("new")


def _run_child(target, *args) -> int:
    p = SPAWN.Process(target=target, args=args)
    p.start()
    p.join(30)
    return p.exitcode


def test_atomic_dir_crash_leaves_nothing_half_written(tmp_path):
    final = tmp_path / "step-7"
    assert _run_child(_crash_while_writing, str(final)) == 3
    assert not final.exists()  # absent, not half-written
    (left,) = leftovers(tmp_path)
    assert left.startswith(".step-7.tmp-")

    # a live writer's temp dir is never touched
    with atomic_dir(tmp_path / "live") as live_tmp:
        removed = cleanup_stale_tmp(tmp_path)
        assert [p.name for p in removed] == [left]
        assert live_tmp.is_dir()
    assert leftovers(tmp_path) == []
    assert cleanup_stale_tmp(tmp_path) == []
    assert cleanup_stale_tmp(tmp_path / "missing") == []


def test_atomic_dir_crash_during_replace_keeps_old(tmp_path):
    final = tmp_path / "step-7"
    final.mkdir()
    (final / "old.bin").write_text("old")
    assert _run_child(_crash_while_writing, str(final)) == 3
    assert (final / "old.bin").read_text() == "old"  # the complete old version is untouched
    cleanup_stale_tmp(tmp_path)
    assert leftovers(tmp_path) == []

    # crash after moving the old version aside, before moving the new one in:
    # cleanup puts the old complete version back
    assert _run_child(_crash_between_renames, str(final)) == 4
    assert not final.exists()
    assert len(leftovers(tmp_path)) == 2  # .old-* and .tmp-*
    cleanup_stale_tmp(tmp_path)
    assert sorted(p.name for p in final.iterdir()) == ["old.bin"]
    assert leftovers(tmp_path) == []


def test_atomic_dir_then_register(reg, home):
    """The intended flow: write under a temporary name, rename, then register."""
    final = reg.checkpoint_path("countdown-sft", 200)
    with atomic_dir(final) as tmp:
        (tmp / "config.json").write_text("{}")
    e = reg.register("countdown-sft", "sft", final, step=200)
    assert reg.resolve("countdown-sft").path == final == e.path
