"""Run untrusted Python programs in limited child processes, one private temp dir each, in parallel.

Where the machine allows it (root and a working ``unshare``), each program gets its own network, PID, IPC and
mount namespaces, a read-only file system with the homes and scratch directories hidden, and an unprivileged
user of its own (``sandbox_boot``); ``sandbox_features`` says which of these hold here, ``isolation_report``
says it in words, and ``require_isolation`` refuses to go on without them unless told to."""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import BinaryIO, Literal

from runtime.errors import PinferError

logger = logging.getLogger(__name__)

BOOT = Path(__file__).with_name("sandbox_boot.py")
Status = Literal["passed", "failed", "timeout", "error"]


@dataclass(slots=True, frozen=True)
class SandboxLimits:
    """Per-program limits: wall clock, address space, CPU, file size, open files, captured output; its user."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 1
    num_files: int = 128
    output_chars: int = 2000
    uid: int = 65534            # the program's uid and gid ("nobody") where the "user" feature holds

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64 (the interpreter needs it), got {self.memory_mb!r}")
        if not 0 < self.uid < 2**31:
            raise ValueError(f"uid must be a numeric id other than root's, got {self.uid!r}")


@dataclass(slots=True, frozen=True)
class ExecResult:
    status: Status          # passed: its last line ran; failed: an AssertionError; timeout; error: anything else
    detail: str             # "" when passed, else the last line of the error output or what killed it
    elapsed_s: float
    output: str = ""        # stdout + stderr, truncated

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Own network, PID, IPC and mount namespaces (a private /proc): no network, no view of (or signal to) the harness
# or any process but its own, and every process it starts dies with it. Needs root.
NAMESPACES = ["unshare", "--net", "--pid", "--ipc", "--mount", "--fork", "--kill-child", "--mount-proc"]

Feature = Literal["network", "pid", "filesystem", "user"]
FEATURES: dict[Feature, str] = {
    "network": "own network namespace: no network, not even loopback",
    "pid": "own PID and IPC namespaces: no other process visible or signalable, all of its own killed at the timeout",
    "filesystem": "read-only file system but for its own directory: /root, /home, /tmp, /var/tmp, /dev/shm and /run "
                  "hidden, the Python installation re-exposed",
    "user": "own unprivileged user: no root, no capabilities, no_new_privs, no new processes",
}
WEAK_SANDBOX_FLAG = "--allow-weak-sandbox"


class WeakSandboxError(PinferError, RuntimeError):
    """The sandbox lacks isolation features here and running anyway was not allowed."""


@cache
def namespaces_available() -> bool:
    """Whether ``unshare`` can give a program its own namespaces here (checked once)."""
    try:
        return subprocess.run([*NAMESPACES, "true"], capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# Run with the feature on, each assertion checks it really holds (the boot script also fails closed).
_PROBE = ("import os\n"
          "assert os.statvfs('/').f_flag & os.ST_RDONLY and not os.statvfs('.').f_flag & os.ST_RDONLY\n")


@cache
def sandbox_features() -> frozenset[Feature]:
    """The isolation features this machine gives a program (checked once, by running probes).

    All need root: ``unshare`` makes the namespaces, the boot script mounts and then drops to its own user.
    A harness that is already an unprivileged user gets none of them: its program would run as that same user,
    with the harness's files and processes within reach."""
    if not namespaces_available():
        return frozenset()
    base: frozenset[Feature] = frozenset({"network", "pid"})
    limits = SandboxLimits(timeout_s=60.0)
    for extra, probe in (({"filesystem", "user"}, _PROBE + "assert os.getuid() != 0\n"), ({"filesystem"}, _PROBE)):
        r = run_program(probe, limits, base | extra)
        if r.passed:
            return base | extra
        logger.warning("sandbox: %s unavailable here: %s %s", "+".join(sorted(extra)), r.detail, r.output[-500:])
    return base


def missing_features(features: frozenset[Feature] | None = None) -> list[Feature]:
    """The isolation features ``features`` (default: this machine's) lack."""
    have = sandbox_features() if features is None else features
    return [f for f in FEATURES if f not in have]


def isolation_report(features: frozenset[Feature] | None = None) -> str:
    """What the sandbox enforces on this machine, and what it does not (said once at the start of an eval)."""
    have = sandbox_features() if features is None else features
    on = [text for f, text in FEATURES.items() if f in have]
    off = [FEATURES[f] for f in missing_features(have)]
    missing = f"MISSING here (needs root and a working unshare): {'; '.join(off)}. " if off else ""
    return (f"sandbox: enforced: {'; '.join(on) or 'no kernel isolation'}; resource limits (memory, CPU, file size, "
            f"open files, wall clock); a pass needs a completion token written after the program's last line. "
            f"{missing}Not enforced: a cap on the disk used inside its own directory; a program that sets out to "
            f"fake its own pass can (it shares its process with its tests and the token)")


def require_isolation(allow_weak: bool) -> None:
    """Say what the sandbox enforces here; raise ``WeakSandboxError`` when a feature is missing, unless
    ``allow_weak``."""
    missing = missing_features()
    logger.warning("%s", isolation_report())                 # what holds against hostile completions, said once
    if missing and not allow_weak:
        raise WeakSandboxError(
            f"the sandbox cannot isolate model-written programs here: no {', '.join(missing)} isolation (it needs "
            f"root and a working `unshare`); run as root, or pass {WEAK_SANDBOX_FLAG} "
            f"(EvalConfig.allow_weak_sandbox) to run them anyway with what this machine gives")


def _minimal_env(home: str) -> dict[str, str]:
    """No proxies, tokens or Python variables from the parent; HOME and TMPDIR are the sandbox."""
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}


def _machine_paths() -> list[tuple[str, str]]:
    """This machine's directories an error line can name (a module's file), longest first, and what a recorded
    detail says instead: results are shared, machine paths are not."""
    places = {sys.prefix: "<venv>", sys.base_prefix: "<python>", os.path.expanduser("~"): "~"}
    return sorted(((path, name) for path, name in places.items() if len(path) > 1), key=lambda p: -len(p[0]))


def _classify(returncode: int, output: str, completed: bool) -> tuple[Status, str]:
    for path, name in _machine_paths():              # before the detail is cut to length
        output = output.replace(path, name)
    if returncode == 0 and completed:
        return "passed", ""
    if returncode == 0:
        return "error", "exited with status 0 before its last line ran (no completion token)"
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else ""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        reason = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit", "SIGKILL": "killed"}.get(name, name)
        return "error", f"{reason} ({name})" + (f"; {last[:200]}" if last else "")
    if last.startswith("AssertionError"):
        return "failed", last[:200]
    return "error", last[:200] or f"exit code {returncode}"


def _read_ends(f: BinaryIO, limit: int) -> str:
    """The whole output when short, else its first and last ``limit // 2`` bytes (the error is at the end)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if size <= limit:
        return f.read().decode("utf-8", errors="replace")
    head = f.read(limit // 2)
    f.seek(size - limit // 2)
    return (head + b"\n...\n" + f.read()).decode("utf-8", errors="replace")


def run_program(program: str, limits: SandboxLimits = SandboxLimits(),
                features: frozenset[Feature] | None = None) -> ExecResult:
    """Run ``program`` with ``python -I`` in a fresh 0700 temp dir (removed after), isolated by ``features``
    (default: all this machine has); never raises for its faults."""
    t0 = time.perf_counter()
    features = sandbox_features() if features is None else features
    root = tempfile.mkdtemp(prefix="pinfer-eval-")          # mode 0700
    try:
        source = Path(root) / "program.py"
        source.write_text(program, encoding="utf-8")
        uid = limits.uid if "user" in features else -1
        if uid >= 0:
            os.chown(source, uid, uid)
            os.chown(root, uid, uid)
        token = secrets.token_hex(16).encode()
        token_r, token_w = os.pipe()
        done_r, done_w = os.pipe()
        os.write(token_w, token)
        os.close(token_w)
        cmd = [sys.executable, "-I", "-B", str(BOOT), str(limits.memory_mb * 2**20), str(int(limits.timeout_s) + 1),
               str(limits.file_size_mb * 2**20), str(limits.num_files), "program.py", str(token_r), str(done_w),
               "1" if "filesystem" in features else "0", str(uid)]
        try:
            with tempfile.TemporaryFile() as out:               # unnamed: the program cannot reach it by path
                proc = subprocess.Popen([*NAMESPACES, *cmd] if "pid" in features else cmd, cwd=root,
                                        env=_minimal_env(root), stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                        pass_fds=(token_r, done_w))
                os.close(done_w)
                done_w = -1
                try:
                    is_done = _wait_unreaped(proc.pid, limits.timeout_s)
                finally:
                    _kill_group(proc)
                completed = os.read(done_r, len(token) + 1) == token        # every writer is dead: no blocking
                is_flooded = out.seek(0, os.SEEK_END) >= limits.file_size_mb * 2**20
                output = _read_ends(out, limits.output_chars)
        finally:
            for fd in (token_r, done_r, done_w):
                if fd >= 0:
                    os.close(fd)
        elapsed = time.perf_counter() - t0
        if not is_done:
            return ExecResult("timeout", f"timed out after {limits.timeout_s:g}s", elapsed, output)
        status, detail = _classify(proc.returncode, output, completed)
        if is_flooded and status != "passed":
            detail = f"output reached the {limits.file_size_mb} MiB file size limit"
        return ExecResult(status, detail, elapsed, output)
    except OSError as e:                                        # could not start: the harness's fault, say so
        logger.warning("sandbox could not run a program: %s", e)
        return ExecResult("error", f"sandbox: {e}", time.perf_counter() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``pid`` to exit, leaving it a zombie so that its group id stays its own."""
    deadline, pause = time.monotonic() + timeout_s, 0.002
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    return True


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the program's whole session (it may have left children) before reaping its leader."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class Sandbox:
    """A pool of ``num_workers`` threads, each waiting on one sandboxed child process at a time."""

    def __init__(self, num_workers: int | None = None, limits: SandboxLimits = SandboxLimits(),
                 features: frozenset[Feature] | None = None) -> None:
        self.num_workers = max(1, min(8, os.cpu_count() or 1)) if num_workers is None else num_workers
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers!r}")
        self.limits = limits
        self.features = sandbox_features() if features is None else features
        self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="sandbox")

    def submit(self, program: str) -> Future[ExecResult]:
        return self._pool.submit(run_program, program, self.limits, self.features)

    def map(self, programs: list[str]) -> list[ExecResult]:
        """Run all ``programs``; results in order."""
        return [f.result() for f in [self.submit(p) for p in programs]]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
