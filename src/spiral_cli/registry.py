"""The checkpoint registry: one SQLite file shared by every spiral command.

The registry stores metadata and paths, never weights. An entry is a checkpoint directory plus
what produced it: ``name`` and ``step`` (unique together), the training ``stage``, its
``parent`` (lineage, a reference string such as ``countdown-sft@200``), a snapshot of the
recipe with its hash, metrics, and global ``tags`` (aliases such as ``best``).

References, resolved in this order by :meth:`Registry.resolve`:

====================  ======================================================================
``name@step``         that exact step (an error lists the steps that exist)
``name:latest``       the highest step of ``name``
``name:<tag>``        the entry of ``name`` that carries ``<tag>``
``name``              the entry carrying tag ``name`` if there is one, else the highest step
an existing path      a local model directory, ``ResolvedRef(kind="path")``
``scratch:<preset>``  a small model built locally from a preset, ``kind="scratch"``
``org/model``         a Hugging Face hub id (when no such path exists), ``kind="hub"``
====================  ======================================================================

Concurrency: every operation opens its own short-lived connection (safe across ``fork``), the
database runs in WAL mode with a 30 s busy timeout, and every write is one ``BEGIN IMMEDIATE``
transaction, so several training or evaluation processes can register at once and lose
nothing. The schema version lives in ``PRAGMA user_version`` for future migrations.

Standard library only: no torch.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from .jsonl import canonical_json
from .paths import atomic_dir, checkpoint_path, checkpoints_dir, cleanup_stale_tmp
from .recipe import recipe_hash

__all__ = [
    "STAGES",
    "SCHEMA_VERSION",
    "RegistryError",
    "Entry",
    "ResolvedRef",
    "Registry",
    "recipe_hash",
    "validate_name",
    "atomic_dir",
    "cleanup_stale_tmp",
    "checkpoint_path",
]

STAGES: tuple[str, ...] = ("base", "sft", "set", "agg", "grpo")
SCHEMA_VERSION = 1
DB_FILENAME = "registry.sqlite"
BUSY_TIMEOUT_S = 30.0
RESERVED_NAMES = frozenset({"scratch"})  # "scratch:<preset>" is a model source, not a name
RESERVED_TAGS = frozenset({"latest"})  # "name:latest" means the highest step

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_HUB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

RefKind = Literal["registry", "path", "hub", "scratch"]


class RegistryError(ValueError):
    """A user-facing registry problem; ``str(err)`` is one line, fit to print as is."""


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    id: int
    name: str
    step: int
    stage: str
    path: Path
    parent: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    recipe_hash: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    tags: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        """The exact reference of this entry: ``name@step``."""
        return f"{self.name}@{self.step}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings), for ``--json``/JSONL output."""
        return {
            "id": self.id,
            "ref": self.ref,
            "name": self.name,
            "step": self.step,
            "stage": self.stage,
            "parent": self.parent,
            "path": str(self.path),
            "recipe_hash": self.recipe_hash,
            "recipe": self.recipe,
            "metrics": self.metrics,
            "created": self.created,
            "tags": list(self.tags),
        }


@dataclass(frozen=True)
class ResolvedRef:
    """What a model reference points to.

    ``path_or_id`` is the directory (kinds ``registry`` and ``path``, absolute), the hub id
    (``hub``) or the preset name (``scratch``). ``entry`` is set only for ``registry``.
    """

    kind: RefKind
    path_or_id: str
    entry: Entry | None = None
    ref: str = ""  # the reference as the user wrote it

    @property
    def path(self) -> Path | None:
        return Path(self.path_or_id) if self.kind in ("registry", "path") else None

    @property
    def hub_id(self) -> str | None:
        return self.path_or_id if self.kind == "hub" else None

    @property
    def preset(self) -> str | None:
        return self.path_or_id if self.kind == "scratch" else None

    @property
    def lineage(self) -> str:
        """A string to store as the ``parent`` of a checkpoint trained from this model."""
        if self.entry is not None:
            return self.entry.ref
        if self.kind == "scratch":
            return f"scratch:{self.path_or_id}"
        return self.path_or_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path_or_id": self.path_or_id,
            "ref": self.ref,
            "entry": self.entry.to_dict() if self.entry is not None else None,
        }


def validate_name(name: Any, what: str = "checkpoint name") -> str:
    """Return ``name`` if it is a valid checkpoint name or tag, else raise RegistryError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RegistryError(
            f"invalid {what} {name!r}: use letters, digits, '-', '_' and '.', starting with a "
            "letter or digit, at most 128 characters (no '@', ':', '/' or spaces)"
        )
    return name


def _validate_stage(stage: Any) -> str:
    if stage not in STAGES:
        raise RegistryError(f"invalid stage {stage!r}: expected one of {', '.join(STAGES)}")
    return stage


def _validate_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise RegistryError(f"invalid step {step!r}: expected a non-negative integer")
    return step


def _json_dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RegistryError(f"{what} must be a dict, got {type(value).__name__}")
    return value


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fmt_list(items: list[str], limit: int = 12) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items) - limit} more)"


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS entries (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        name        TEXT    NOT NULL,
        step        INTEGER NOT NULL DEFAULT 0,
        stage       TEXT    NOT NULL,
        parent      TEXT,
        recipe      TEXT    NOT NULL DEFAULT '{}',
        recipe_hash TEXT,
        path        TEXT    NOT NULL,
        metrics     TEXT    NOT NULL DEFAULT '{}',
        created     TEXT    NOT NULL,
        UNIQUE (name, step)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS tags (
        tag      TEXT    PRIMARY KEY,
        entry_id INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE
    )
    """,
    "CREATE INDEX IF NOT EXISTS tags_entry ON tags(entry_id)",
)

_SELECT = (
    "SELECT e.id, e.name, e.step, e.stage, e.parent, e.recipe, e.recipe_hash, e.path, "
    "e.metrics, e.created, (SELECT group_concat(t.tag, ',') FROM tags t WHERE t.entry_id = e.id) "
    "FROM entries e"
)


def _row_to_entry(row: tuple) -> Entry:
    (id_, name, step, stage, parent, recipe, rhash, path, metrics, created, tags) = row
    return Entry(
        id=id_,
        name=name,
        step=step,
        stage=stage,
        parent=parent,
        recipe=json.loads(recipe) if recipe else {},
        recipe_hash=rhash,
        path=Path(path),
        metrics=json.loads(metrics) if metrics else {},
        created=created,
        tags=sorted(tags.split(",")) if tags else [],
    )


class Registry:
    """The checkpoint registry at ``<home>/registry.sqlite`` (created on first use)."""

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.home = Path(home).expanduser().absolute()
        self.db_path = self.home / DB_FILENAME
        self._schema_ok = False

    def __repr__(self) -> str:
        return f"Registry({str(self.home)!r})"

    @property
    def checkpoints_dir(self) -> Path:
        return checkpoints_dir(self.home)

    def checkpoint_path(self, name: str, step: int = 0) -> Path:
        """Where a new checkpoint ``name@step`` conventionally goes: ``<home>/checkpoints/<name>/step-<step>``."""
        return checkpoint_path(self.home, validate_name(name), _validate_step(step))

    # -- connections ------------------------------------------------------------------------

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(
                self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(f"cannot open registry {self.db_path}: {exc}") from None
        try:
            con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            con.execute("PRAGMA foreign_keys = ON")
            self._ensure_schema(con)
            yield con
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"registry {self.db_path}: {exc}") from None
        finally:
            con.close()

    def _ensure_schema(self, con: sqlite3.Connection) -> None:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RegistryError(
                f"registry {self.db_path} has schema version {version}, newer than this spiral "
                f"understands ({SCHEMA_VERSION}); upgrade spiral"
            )
        if version == SCHEMA_VERSION and self._schema_ok:
            return
        # WAL is a persistent property of the file; switching can briefly fail while another
        # process holds a lock, and the busy handler does not always cover it: retry.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                mode = con.execute("PRAGMA journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    con.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if version < SCHEMA_VERSION:
            con.execute("BEGIN IMMEDIATE")
            try:
                version = con.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    for stmt in _SCHEMA:
                        con.execute(stmt)
                    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                # future migrations: `if version == 1: ...; version = 2`
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        self._schema_ok = True

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE takes the write lock up front)."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise

    # -- queries -------------------------------------------------------------------------------

    @staticmethod
    def _fetch(con: sqlite3.Connection, where: str = "", args: tuple = ()) -> list[Entry]:
        sql = f"{_SELECT} {where}"
        return [_row_to_entry(r) for r in con.execute(sql, args).fetchall()]

    def _by_name(self, con: sqlite3.Connection, name: str) -> list[Entry]:
        return self._fetch(con, "WHERE e.name = ? ORDER BY e.step", (name,))

    def _by_tag(self, con: sqlite3.Connection, tag: str) -> Entry | None:
        rows = self._fetch(con, "JOIN tags t ON t.entry_id = e.id WHERE t.tag = ?", (tag,))
        return rows[0] if rows else None

    def _known(self, con: sqlite3.Connection) -> tuple[list[str], list[str]]:
        names = [r[0] for r in con.execute("SELECT DISTINCT name FROM entries ORDER BY name")]
        tags = [r[0] for r in con.execute("SELECT tag FROM tags ORDER BY tag")]
        return names, tags

    def _unknown_name_msg(self, con: sqlite3.Connection, name: str) -> str:
        names, tags = self._known(con)
        msg = f"no checkpoint named {name!r} in registry {self.db_path}"
        close = difflib.get_close_matches(name, names + tags, n=3, cutoff=0.6)
        hints = []
        if close:
            hints.append("did you mean " + " or ".join(repr(c) for c in close) + "?")
        hints.append(f"known: {_fmt_list(names)}" if names else "the registry is empty")
        return f"{msg} ({' '.join(hints)})"

    @staticmethod
    def _split_ref(ref: str) -> tuple[str, str, str] | None:
        """``(name, sep, rest)`` when ``ref`` has a registry shape (valid name + '@'/':'/nothing)."""
        for sep in ("@", ":"):
            if sep in ref:
                name, _, rest = ref.partition(sep)
                return (name, sep, rest) if _NAME_RE.match(name) else None
        return (ref, "", "") if _NAME_RE.match(ref) else None

    def _lookup(self, con: sqlite3.Connection, ref: str, *, tags_first: bool = True) -> Entry:
        """Resolve a registry-shaped ``ref`` to an entry (no filesystem checks), or raise."""
        parts = self._split_ref(ref)
        if parts is None:
            raise RegistryError(
                f"{ref!r} is not a registry reference (expected name, name@step, name:latest "
                "or name:<tag>)"
            )
        name, sep, rest = parts
        if sep == "@":
            if not re.fullmatch(r"[0-9]+", rest):
                hint = f" (use {name}:latest for the highest step)" if rest == "latest" else ""
                raise RegistryError(
                    f"invalid step {rest!r} in {ref!r}: expected a non-negative integer{hint}"
                )
            step = int(rest)
            entries = self._by_name(con, name)
            if not entries:
                raise RegistryError(self._unknown_name_msg(con, name))
            for e in entries:
                if e.step == step:
                    return e
            raise RegistryError(
                f"checkpoint {name!r} has no step {step} (available steps: "
                f"{_fmt_list([str(e.step) for e in entries])})"
            )
        if sep == ":":
            entries = self._by_name(con, name)
            if not entries:
                raise RegistryError(self._unknown_name_msg(con, name))
            if rest == "latest":
                return entries[-1]
            for e in entries:
                if rest in e.tags:
                    return e
            on_name = sorted({t for e in entries for t in e.tags})
            other = self._by_tag(con, rest)
            where = f"; tag {rest!r} is on {other.ref}" if other is not None else ""
            have = f"tags on {name}: {', '.join(on_name)}" if on_name else f"{name} has no tags"
            raise RegistryError(f"checkpoint {name!r} has no tag {rest!r} ({have}{where})")
        if tags_first:
            tagged = self._by_tag(con, name)
            if tagged is not None:
                return tagged
        entries = self._by_name(con, name)
        if entries:
            return entries[-1]
        raise RegistryError(self._unknown_name_msg(con, name))

    # -- public API ----------------------------------------------------------------------------

    def register(
        self,
        name: str,
        stage: str,
        path: str | os.PathLike[str],
        *,
        step: int = 0,
        parent: str | Entry | ResolvedRef | None = None,
        recipe: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> Entry:
        """Add checkpoint ``name@step``. The directory need not exist yet, but usually does.

        If ``name@step`` exists already (a rerun that saves the same step again), only its
        ``path`` and ``metrics`` are updated: its lineage -- ``stage``, ``parent``, the recipe
        snapshot and hash, ``created`` -- never changes, and a write whose stage or parent
        differs is refused (RegistryError) before anything is written. Tags stay."""
        validate_name(name)
        if name in RESERVED_NAMES:
            raise RegistryError(f"invalid checkpoint name {name!r}: reserved (scratch:<preset>)")
        _validate_stage(stage)
        _validate_step(step)
        if isinstance(parent, Entry):
            parent = parent.ref
        elif isinstance(parent, ResolvedRef):
            parent = parent.lineage
        if parent is not None and (not isinstance(parent, str) or not parent.strip()):
            raise RegistryError(f"invalid parent {parent!r}: expected a reference string")
        recipe_d = _json_dict(recipe, "recipe") if recipe is not None else None
        metrics_d = _json_dict(metrics, "metrics")
        try:
            recipe_json = canonical_json(recipe_d if recipe_d is not None else {})
            metrics_json = canonical_json(metrics_d)
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"recipe/metrics of {name}@{step} are not JSON-serialisable: {exc}") from None
        abspath = str(Path(path).expanduser().absolute())
        parent = parent.strip() if parent else None
        with self._write() as con:
            old = self._fetch(con, "WHERE e.name = ? AND e.step = ?", (name, step))
            if old:
                (o,) = old
                changed = [f"{what} {a!r} -> {b!r}" for what, a, b in
                           (("stage", o.stage, stage), ("parent", o.parent, parent)) if a != b]
                if changed:
                    raise RegistryError(
                        f"{o.ref} is registered already with another lineage ({'; '.join(changed)}): "
                        f"refusing to rewrite it; register under another name, or remove it first "
                        f"(spiral registry rm {o.ref})"
                    )
                con.execute("UPDATE entries SET path = ?, metrics = ? WHERE id = ?",
                            (abspath, metrics_json, o.id))
            else:
                con.execute(
                    "INSERT INTO entries (name, step, stage, parent, recipe, recipe_hash, path, metrics, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, step, stage, parent, recipe_json, recipe_hash(recipe_d), abspath, metrics_json,
                     _now_iso()),
                )
            (entry,) = self._fetch(con, "WHERE e.name = ? AND e.step = ?", (name, step))
        return entry

    def resolve(self, ref: str | os.PathLike[str]) -> ResolvedRef:
        """Resolve a model reference (see the module docstring for the rules and their order).

        A registry entry whose directory is gone raises RegistryError rather than returning a
        path that will fail later.
        """
        if isinstance(ref, os.PathLike):
            ref = os.fspath(ref)
        if not isinstance(ref, str) or not ref.strip():
            raise RegistryError(f"empty model reference {ref!r}")
        ref = ref.strip()
        if ref.startswith("scratch:"):
            preset = ref.split(":", 1)[1]
            if not _NAME_RE.match(preset):
                raise RegistryError(f"invalid scratch preset in {ref!r}: expected scratch:<preset>")
            return ResolvedRef("scratch", preset, None, ref)
        if self._split_ref(ref) is not None:
            with self._connect() as con:
                try:
                    entry: Entry | None = self._lookup(con, ref)
                except RegistryError as exc:
                    # not in the registry, but it may still be a local directory
                    if not Path(ref).expanduser().exists():
                        if "@" in ref or ":" in ref:
                            raise
                        raise RegistryError(
                            f"{exc}; {ref!r} is also not an existing path, a hub id (org/name) "
                            "or scratch:<preset>"
                        ) from None
                    entry = None
            if entry is not None:
                if not entry.path.exists():
                    raise RegistryError(
                        f"checkpoint {entry.ref} is registered but its directory {entry.path} is "
                        f"missing (remove the entry with: spiral registry rm {entry.ref})"
                    )
                return ResolvedRef("registry", str(entry.path), entry, ref)
        p = Path(ref).expanduser()
        if p.exists():
            return ResolvedRef("path", str(p.absolute()), None, ref)
        if _HUB_RE.match(ref) and not ref.startswith("."):
            return ResolvedRef("hub", ref, None, ref)
        raise RegistryError(
            f"model reference {ref!r} is not a registered checkpoint, an existing path, "
            "a hub id (org/name) or scratch:<preset>"
        )

    def show(self, ref: str) -> Entry:
        """The registry entry ``ref`` names (its directory need not exist)."""
        with self._connect() as con:
            return self._lookup(con, ref.strip())

    def latest(self, name: str) -> Entry | None:
        """The highest step registered under ``name``, or None."""
        with self._connect() as con:
            entries = self._fetch(con, "WHERE e.name = ? ORDER BY e.step DESC LIMIT 1", (name,))
        return entries[0] if entries else None

    def ls(self, name: str | None = None, stage: str | None = None) -> list[Entry]:
        """Entries, ordered by name then step; optionally only one name and/or one stage."""
        if stage is not None:
            _validate_stage(stage)
        clauses, args = [], []
        if name is not None:
            clauses.append("e.name = ?")
            args.append(name)
        if stage is not None:
            clauses.append("e.stage = ?")
            args.append(stage)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._connect() as con:
            return self._fetch(con, f"{where} ORDER BY e.name, e.step", tuple(args))

    def tagged(self, tag: str) -> Entry | None:
        """The entry that carries ``tag``, or None."""
        with self._connect() as con:
            return self._by_tag(con, tag)

    def require_name(self, name: str) -> None:
        """RegistryError (with did-you-mean and the known names) unless ``name`` has an entry."""
        with self._connect() as con:
            if not self._by_name(con, name):
                raise RegistryError(self._unknown_name_msg(con, name))

    def children(self, entries: list[Entry]) -> list[Entry]:
        """Entries (other than ``entries``) whose parent names one of ``entries`` (``name@step``)."""
        refs = {e.ref for e in entries}
        ids = {e.id for e in entries}
        if not refs:
            return []
        marks = ",".join("?" * len(refs))
        with self._connect() as con:
            rows = self._fetch(con, f"WHERE e.parent IN ({marks}) ORDER BY e.name, e.step", tuple(sorted(refs)))
        return [e for e in rows if e.id not in ids]

    def tag(self, ref: str, tag: str) -> Entry:
        """Put ``tag`` on the entry ``ref`` names, moving it off any other entry. Returns the
        tagged entry. A tag may not shadow another checkpoint's name (plain names resolve tags
        first), but may equal the entry's own name, which pins that name to this step."""
        validate_name(tag, "tag")
        if tag in RESERVED_TAGS:
            raise RegistryError(f"invalid tag {tag!r}: reserved (name:latest is the highest step)")
        with self._write() as con:
            entry = self._lookup(con, ref.strip())
            if tag != entry.name and con.execute(
                "SELECT 1 FROM entries WHERE name = ? LIMIT 1", (tag,)
            ).fetchone():
                raise RegistryError(
                    f"tag {tag!r} would shadow the checkpoint named {tag!r}; choose another tag"
                )
            con.execute(
                "INSERT INTO tags (tag, entry_id) VALUES (?, ?) "
                "ON CONFLICT (tag) DO UPDATE SET entry_id = excluded.entry_id",
                (tag, entry.id),
            )
            (entry,) = self._fetch(con, "WHERE e.id = ?", (entry.id,))
        return entry

    def untag(self, tag: str) -> Entry:
        """Remove ``tag``; returns the entry that carried it."""
        with self._write() as con:
            entry = self._by_tag(con, tag)
            if entry is None:
                _, tags = self._known(con)
                known = f"known tags: {_fmt_list(tags)}" if tags else "no tags exist"
                raise RegistryError(f"no tag {tag!r} in registry {self.db_path} ({known})")
            con.execute("DELETE FROM tags WHERE tag = ?", (tag,))
            (entry,) = self._fetch(con, "WHERE e.id = ?", (entry.id,))
        return entry

    def update_metrics(self, ref: str, metrics: dict[str, Any]) -> Entry:
        """Merge ``metrics`` into the metrics of the entry ``ref`` names (e.g. after a sweep)."""
        _json_dict(metrics, "metrics")
        try:
            canonical_json(metrics)
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"metrics for {ref} are not JSON-serialisable: {exc}") from None
        with self._write() as con:
            entry = self._lookup(con, ref.strip())
            merged = {**entry.metrics, **metrics}
            con.execute(
                "UPDATE entries SET metrics = ? WHERE id = ?",
                (canonical_json(merged), entry.id),
            )
            (entry,) = self._fetch(con, "WHERE e.id = ?", (entry.id,))
        return entry

    def _deletable(self, path: Path) -> bool:
        root = self.checkpoints_dir.resolve()
        try:
            real = path.resolve()
        except OSError:
            return False
        return real != root and real.is_relative_to(root)

    def rm(self, ref: str, delete_files: bool = False) -> list[Entry]:
        """Remove entries: ``name@step`` (or ``name:latest``/``name:<tag>``) removes one, a
        plain ``name`` removes every step of it (tags are not followed here, for safety).
        With ``delete_files`` their directories are deleted too -- only directories inside
        ``<home>/checkpoints``; anything else is refused before anything is removed."""
        ref = ref.strip()
        with self._write() as con:
            parts = self._split_ref(ref)
            if parts is not None and parts[1] == "":
                entries = self._by_name(con, ref)
                if not entries:
                    tagged = self._by_tag(con, ref)
                    if tagged is not None:
                        raise RegistryError(
                            f"{ref!r} is a tag on {tagged.ref}, not a checkpoint name; "
                            f"remove {tagged.ref} explicitly or untag {ref!r}"
                        )
                    raise RegistryError(self._unknown_name_msg(con, ref))
            else:
                entries = [self._lookup(con, ref)]
            if delete_files:
                refused = [e for e in entries if e.path.exists() and not self._deletable(e.path)]
                if refused:
                    e = refused[0]
                    raise RegistryError(
                        f"refusing to delete {e.path} ({e.ref}): it is outside {self.checkpoints_dir}; "
                        "delete it yourself, or remove the entry without deleting files"
                    )
            con.executemany("DELETE FROM entries WHERE id = ?", [(e.id,) for e in entries])
        if delete_files:
            failed = []
            for e in entries:
                if e.path.exists() or e.path.is_symlink():
                    try:
                        if e.path.is_dir() and not e.path.is_symlink():
                            shutil.rmtree(e.path)
                        else:
                            e.path.unlink()
                    except OSError as exc:
                        failed.append(f"{e.path}: {exc.strerror or exc}")
                        continue
                # drop an emptied <home>/checkpoints/<name>/ too (never the checkpoints root)
                if self._deletable(e.path.parent):
                    try:
                        e.path.parent.rmdir()
                    except OSError:
                        pass
            if failed:
                raise RegistryError(
                    f"removed {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} but could "
                    f"not delete {_fmt_list(failed, 3)}"
                )
        return entries
