"""A persistent, resource-limited scoring subprocess for third-party scorers that may evaluate strings.

Model output is hostile input. Some reasoning_gym scorers call ``sympy.parse_expr`` (which uses
``eval``) on the answer; math-verify parses with sympy too. So spiral scores such answers in a
separate worker process (``python -m spiral_cli.tasks._sandbox``) that

* talks JSON lines over its stdin/stdout (its real stdout is moved away from fd 1 so stray prints
  cannot corrupt the protocol),
* sets resource limits after its imports: address space (RLIMIT_AS), file size 0 (RLIMIT_FSIZE),
  no new processes (RLIMIT_NPROC, where not root), a per-request CPU limit (RLIMIT_CPU),
* installs an audit hook that refuses process creation, file writes/deletes, sockets and ctypes,
* runs from an empty temporary directory.

The parent (`SandboxScorer`) starts the worker lazily, enforces a wall-clock limit per request,
and on timeout or crash kills the worker (restarted on the next request) and scores 0. None of
this is a security boundary like a container; it is defence in depth on top of answer length caps.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import Any

DEFAULT_MEMORY_MB = 4096


# ----------------------------------------------------------------------------- worker side
def _limit_resources(memory_mb: int) -> None:
    try:
        import resource
    except ImportError:  # not POSIX
        return
    for name, value in (("RLIMIT_AS", memory_mb * 1024 * 1024), ("RLIMIT_FSIZE", 0), ("RLIMIT_CORE", 0)):
        lim = getattr(resource, name, None)
        if lim is None:
            continue
        try:
            resource.setrlimit(lim, (value, value))
        except (ValueError, OSError):
            pass
    if hasattr(resource, "RLIMIT_NPROC") and os.geteuid() != 0:
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        except (ValueError, OSError):
            pass


_BLOCKED_EVENTS = (
    "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "os.kill",
    "os.killpg", "subprocess.Popen", "pty.spawn", "os.remove", "os.unlink", "os.rmdir",
    "os.rename", "os.replace", "os.truncate", "os.chmod", "os.chown", "os.mkdir", "os.symlink",
    "os.link", "os.putenv", "os.unsetenv", "shutil.", "socket.", "ctypes.", "urllib.", "http.",
    "ftplib.", "smtplib.", "webbrowser.", "os.startfile",
)


def _audit_hook(event: str, args: tuple) -> None:
    if event.startswith(_BLOCKED_EVENTS):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        mode = args[1] if len(args) > 1 else "r"
        flags = args[2] if len(args) > 2 else 0
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        ):
            raise PermissionError("sandbox: opening files for writing is not allowed")


class _Handlers:
    def __init__(self) -> None:
        self.datasets: dict[str, Any] = {}

    def rg(self, req: dict[str, Any]) -> float:
        import reasoning_gym

        key = json.dumps([req["dataset"], req["seed"], req["size"], req.get("config") or {}], sort_keys=True)
        ds = self.datasets.get(key)
        if ds is None:
            if len(self.datasets) > 64:
                self.datasets.clear()
            ds = reasoning_gym.create_dataset(
                req["dataset"], seed=req["seed"], size=req["size"], **(req.get("config") or {})
            )
            self.datasets[key] = ds
        entry = ds[req["index"]]
        score = ds.score_answer(req.get("answer"), entry)
        return float(score)

    def math(self, req: dict[str, Any]) -> float:
        from ._answers import verify_math

        return 1.0 if verify_math(req["gold"], req["pred"], timeout=True) else 0.0


def _serve() -> None:
    # The protocol runs over a private dup of stdout; fd 1 now points at stderr.
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    memory_mb = int(os.environ.get("SPIRAL_SANDBOX_MEMORY_MB", DEFAULT_MEMORY_MB))
    preload = [m for m in os.environ.get("SPIRAL_SANDBOX_PRELOAD", "").split(",") if m]
    handlers = _Handlers()
    for mod in preload:  # import what the scorers need *before* the limits and the hook
        try:
            __import__(mod)
        except Exception as e:  # reported per request instead
            print(f"sandbox: preload {mod} failed: {e}", file=sys.stderr)
    if "spiral_cli.tasks.math_task" in preload:
        try:  # warm up sympy/latex2sympy lazy imports
            handlers.math({"gold": "$1$", "pred": "1"})
        except Exception:
            pass
    try:
        import tempfile

        os.chdir(tempfile.mkdtemp(prefix="spiral-sandbox-"))
    except OSError:
        pass
    _limit_resources(memory_mb)
    try:
        import resource
    except ImportError:
        resource = None  # type: ignore[assignment]
    sys.addaudithook(_audit_hook)
    proto_out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        try:
            req = json.loads(line)
            cpu_s = float(req.get("cpu_limit", 0) or 0)
            if resource is not None and cpu_s > 0:
                used = resource.getrusage(resource.RUSAGE_SELF)
                soft = int(used.ru_utime + used.ru_stime + cpu_s) + 1
                try:
                    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
                    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
                except (ValueError, OSError):
                    pass
            kind = req.get("kind")
            if kind == "ping":
                resp: dict[str, Any] = {"score": 0.0}
            elif kind == "rg":
                resp = {"score": handlers.rg(req)}
            elif kind == "math":
                resp = {"score": handlers.math(req)}
            else:
                resp = {"error": f"unknown request kind {kind!r}", "score": 0.0}
        except MemoryError:
            resp = {"error": "MemoryError", "score": 0.0}
        except (Exception, SystemExit) as e:  # a scorer crash on hostile input scores 0
            resp = {"error": f"{type(e).__name__}: {str(e)[:200]}", "score": 0.0}
        s = resp.get("score", 0.0)
        if not isinstance(s, (int, float)) or s != s:
            resp["score"] = 0.0
        proto_out.write(json.dumps(resp) + "\n")


# ----------------------------------------------------------------------------- parent side
class SandboxScorer:
    """Client of one worker process. Thread-safe (one request at a time)."""

    def __init__(
        self,
        preload: list[str],
        timeout_s: float = 10.0,
        startup_timeout_s: float = 120.0,
        memory_mb: int = DEFAULT_MEMORY_MB,
    ) -> None:
        self.preload = list(preload)
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.memory_mb = memory_mb
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._lock = threading.Lock()
        self.restarts = 0
        self.last_error: str | None = None
        atexit.register(self.close)

    # -- process management
    def _start(self) -> None:
        env = dict(os.environ)
        env["SPIRAL_SANDBOX_PRELOAD"] = ",".join(self.preload)
        env["SPIRAL_SANDBOX_MEMORY_MB"] = str(self.memory_mb)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
        # the worker must import this very spiral_cli, wherever it came from
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "spiral_cli.tasks._sandbox"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        self._buf = b""
        ready = self._read_line(self.startup_timeout_s)
        if ready is None:
            self._kill()
            raise RuntimeError(f"scoring worker did not start ({self.last_error})")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.kill()
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                if f:
                    f.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _read_line(self, timeout: float) -> dict[str, Any] | None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.last_error = "timeout"
                return None
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self.last_error = "worker exited"
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            self.last_error = "bad reply"
            return None

    # -- requests
    def request(self, req: dict[str, Any]) -> float:
        """Send one request; its score, or 0.0 on timeout / crash / error."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
            req = dict(req)
            req.setdefault("cpu_limit", max(1.0, self.timeout_s))
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write((json.dumps(req) + "\n").encode())
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self.last_error = "worker pipe closed"
                self._kill()
                self.restarts += 1
                return 0.0
            resp = self._read_line(self.timeout_s)
            if resp is None:
                self._kill()  # restarted lazily on the next request
                self.restarts += 1
                return 0.0
            self.last_error = resp.get("error")
            try:
                score = float(resp.get("score", 0.0))
            except (TypeError, ValueError):
                return 0.0
            return min(1.0, max(0.0, score)) if score == score else 0.0


if __name__ == "__main__":
    _serve()
