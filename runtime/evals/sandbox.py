"""Run untrusted Python programs in limited child processes, one private temp dir each, in parallel."""
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

logger = logging.getLogger(__name__)

BOOT = Path(__file__).with_name("sandbox_boot.py")
Status = Literal["passed", "failed", "timeout", "error"]


@dataclass(slots=True, frozen=True)
class SandboxLimits:
    """Per-program limits: wall clock, address space, CPU, file size, open files, captured output."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 1
    num_files: int = 128
    output_chars: int = 2000

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64 (the interpreter needs it), got {self.memory_mb!r}")


@dataclass(slots=True, frozen=True)
class ExecResult:
    status: Status          # passed: its last line ran; failed: an AssertionError; timeout; error: anything else
    detail: str             # "" when passed, else the last line of the error output or what killed it
    elapsed_s: float
    output: str = ""        # stdout + stderr, truncated

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Own network, PID and mount namespaces (a private /proc): no network, no view of (or signal to) the harness or
# any process but its own, and every process it starts dies with it. Needs root (or user namespaces).
NAMESPACES = ["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc"]


@cache
def namespaces_available() -> bool:
    """Whether ``unshare`` can give a program its own namespaces here (checked once)."""
    try:
        return subprocess.run([*NAMESPACES, "true"], capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def isolation_report() -> str:
    """What the sandbox enforces on this machine, and what it does not (said once at the start of an eval)."""
    ns = ("own network, PID and mount namespaces (no network; neither the harness nor its environment visible "
          "or signalable; every process killed at the timeout)" if namespaces_available() else
          "NO namespaces (unshare unavailable: the program shares the network and can see other processes)")
    return (f"sandbox: {ns}; resource limits; a pass needs the completion token written after the last line; "
            f"not enforced: a user of its own and a read-only file system (file changes outside its directory "
            f"are refused at the Python level only)")


def _minimal_env(home: str) -> dict[str, str]:
    """No proxies, tokens or Python variables from the parent; HOME and TMPDIR are the sandbox."""
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}


def _classify(returncode: int, output: str, completed: bool) -> tuple[Status, str]:
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


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecResult:
    """Run ``program`` with ``python -I`` in a fresh 0700 temp dir (removed after); never raises for its faults."""
    t0 = time.perf_counter()
    root = tempfile.mkdtemp(prefix="pinfer-eval-")          # mode 0700
    try:
        (Path(root) / "program.py").write_text(program, encoding="utf-8")
        token = secrets.token_hex(16).encode()
        token_r, token_w = os.pipe()
        done_r, done_w = os.pipe()
        os.write(token_w, token)
        os.close(token_w)
        cmd = [sys.executable, "-I", "-B", str(BOOT), str(limits.memory_mb * 2**20), str(int(limits.timeout_s) + 1),
               str(limits.file_size_mb * 2**20), str(limits.num_files), "program.py", str(token_r), str(done_w)]
        try:
            with tempfile.TemporaryFile() as out:               # unnamed: the program cannot reach it by path
                proc = subprocess.Popen([*NAMESPACES, *cmd] if namespaces_available() else cmd, cwd=root,
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

    def __init__(self, num_workers: int | None = None, limits: SandboxLimits = SandboxLimits()) -> None:
        self.num_workers = max(1, min(8, os.cpu_count() or 1)) if num_workers is None else num_workers
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers!r}")
        self.limits = limits
        self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="sandbox")

    def submit(self, program: str) -> Future[ExecResult]:
        return self._pool.submit(run_program, program, self.limits)

    def map(self, programs: list[str]) -> list[ExecResult]:
        """Run all ``programs``; results in order."""
        return [f.result() for f in [self.submit(p) for p in programs]]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
