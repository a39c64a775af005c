"""Where spiral keeps its files, and how a checkpoint directory is written safely.

The spiral home holds the checkpoint registry and, by default, the checkpoints and run logs::

    <home>/registry.sqlite
    <home>/checkpoints/<name>/step-<step>/
    <home>/runs/

It is chosen by, in order: the ``--home`` CLI flag, the ``SPIRAL_HOME`` environment variable,
``~/.spiral``.

``atomic_dir`` writes a directory under a temporary sibling name and renames it into place only
once everything inside is written and fsynced, so a crash never leaves a half-written
checkpoint under its final name; ``cleanup_stale_tmp`` removes what crashed writers left behind.

Standard library only: no torch, nothing that is slow to import.
"""
from __future__ import annotations

import errno
import locale
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_HOME",
    "SpiralHomeError",
    "spiral_home",
    "checkpoints_dir",
    "runs_dir",
    "checkpoint_path",
    "atomic_dir",
    "cleanup_stale_tmp",
]

ENV_HOME = "SPIRAL_HOME"
DEFAULT_HOME = "~/.spiral"


class SpiralHomeError(ValueError):
    """The spiral home directory cannot be used (one-line, user-facing message)."""


def spiral_home(override: str | os.PathLike[str] | None = None) -> Path:
    """The spiral home directory, created if missing.

    Precedence: ``override`` (the ``--home`` flag) > ``$SPIRAL_HOME`` > ``~/.spiral``.
    An empty string counts as unset. The result is absolute, with ``~`` expanded.
    """
    if override is not None and str(override).strip():
        raw, source = str(override), "--home"
    elif os.environ.get(ENV_HOME, "").strip():
        raw, source = os.environ[ENV_HOME], f"${ENV_HOME}"
    else:
        raw, source = DEFAULT_HOME, "default home"
    home = Path(raw.strip()).expanduser().absolute()
    if home.exists() and not home.is_dir():
        raise SpiralHomeError(f"spiral home {home} (from {source}) exists but is not a directory")
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpiralHomeError(
            f"cannot create spiral home {home} (from {source}): {exc.strerror or exc}"
        ) from None
    return home


def checkpoints_dir(home: str | os.PathLike[str]) -> Path:
    """``<home>/checkpoints`` (not created)."""
    return Path(home) / "checkpoints"


def runs_dir(home: str | os.PathLike[str]) -> Path:
    """``<home>/runs`` (not created)."""
    return Path(home) / "runs"


def checkpoint_path(home: str | os.PathLike[str], name: str, step: int = 0) -> Path:
    """The conventional directory of checkpoint ``name@step``: ``<home>/checkpoints/<name>/step-<step>``."""
    return checkpoints_dir(home) / name / f"step-{int(step)}"


# --------------------------------------------------------------------------------------------
# Atomic directories
# --------------------------------------------------------------------------------------------

# .<final name>.tmp-<pid>-<hex>  : being written (or abandoned by a crash)
# .<final name>.old-<pid>-<hex>  : the previous version, moved aside during a replace
_LEFTOVER = re.compile(r"^\.(?P<final>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<rand>[0-9a-f]+)$")


def _fsync_path(path: Path, *, directory: bool) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms (Windows) cannot open directories; best effort
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (directory and exc.errno in (errno.EINVAL, errno.EBADF, errno.EACCES)):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file under ``root``, then every directory (deepest first)."""
    dirs: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirs.append(d)
        for fn in filenames:
            p = d / fn
            if p.is_file() and not p.is_symlink():
                _fsync_path(p, directory=False)
    for d in reversed(dirs):
        _fsync_path(d, directory=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def current_umask() -> int:
    """The process umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of `text` in the locale's encoding (what open(path, "w") writes)."""
    atomic_write_bytes(path, text.encode(locale.getpreferredencoding(False)))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically: a hidden temporary sibling, fsynced, then renamed over `path`;
    a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; results are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_via(path: Path, write: Callable[[Path], Any]) -> Any:
    """Atomically write a file that a library writes to a path of its own (a plot's `savefig`):
    `write(tmp)` into a hidden sibling with `path`'s suffix (writers pick the format from it),
    fsynced, then renamed over `path`; returns what `write` returned. A writer that returns None
    wrote nothing (a plot without data): the sibling is removed and `path` left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        result = write(tmp)
        if result is None:
            tmp.unlink(missing_ok=True)
            return None
        os.chmod(tmp, 0o666 & ~current_umask())
        _fsync_path(tmp, directory=False)
        os.replace(tmp, path)
        return result
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a directory atomically.

    Yields a fresh temporary sibling directory ``.<name>.tmp-<pid>-<random>``; write everything
    into it. On normal exit its files are fsynced and it is renamed to ``final_path``. If
    ``final_path`` already exists, the old one is renamed aside first, the new one renamed in,
    then the old one deleted: an observer sees the old complete directory, briefly nothing, or
    the new complete directory -- never a half-written one. On an exception (including
    KeyboardInterrupt) the temporary directory is removed, ``final_path`` is left untouched and
    the exception propagates. A hard crash leaves only a hidden sibling that
    :func:`cleanup_stale_tmp` removes (or restores, if it is the old version of a directory
    whose replacement was interrupted).
    """
    final = Path(final_path).expanduser().absolute()
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    tmp = parent / f".{final.name}.tmp-{pid}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    try:
        _fsync_tree(tmp)
        if final.exists() or final.is_symlink():
            old = parent / f".{final.name}.old-{pid}-{secrets.token_hex(4)}"
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)  # put the previous version back
                raise
            _fsync_path(parent, directory=True)
            _remove(old)
        else:
            os.rename(tmp, final)
        _fsync_path(parent, directory=True)
    except BaseException:
        _remove(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # unknown: err on the side of keeping it
    return True


def cleanup_stale_tmp(parent_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove leftovers of crashed :func:`atomic_dir` writers in ``parent_dir``.

    A leftover ``.<name>.tmp-<pid>-*`` (or ``.old-``) entry is touched only when process
    ``<pid>`` is no longer alive on this machine. A ``.old-`` directory whose final ``<name>``
    is missing (the writer died between moving the old version aside and moving the new one in)
    is renamed back to ``<name>`` instead of deleted. Returns the paths removed or restored
    (their leftover names). A missing ``parent_dir`` is not an error.
    """
    parent = Path(parent_dir).expanduser()
    try:
        children = sorted(parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    done: list[Path] = []
    # restore moved-aside old versions before deleting anything
    for kind in ("old", "tmp"):
        for child in children:
            m = _LEFTOVER.match(child.name)
            if not m or m["kind"] != kind or _pid_alive(int(m["pid"])):
                continue
            if not (child.exists() or child.is_symlink()):
                continue
            final = parent / m["final"]
            if kind == "old" and not (final.exists() or final.is_symlink()):
                try:
                    os.rename(child, final)
                    done.append(child)
                    continue
                except OSError:
                    pass
            _remove(child)
            done.append(child)
    return done
