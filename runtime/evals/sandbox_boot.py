"""Child-side start of a sandboxed program: set resource limits, install guards, run the program.

Run as ``python -I -B sandbox_boot.py AS_BYTES CPU_S FSIZE_BYTES NOFILE PROGRAM TOKEN_FD DONE_FD`` with the
sandbox directory as cwd: the harness's completion token is read from TOKEN_FD (then closed) and written to
DONE_FD only after the program's last line ran, so an exit status alone (``os._exit(0)``) never counts as a pass. Standalone on purpose (isolated mode puts no project path on ``sys.path``). Limits
are set here rather than in ``preexec_fn`` because the parent forks from a thread pool, where
``preexec_fn`` is unsafe. The guards stop accidental damage (forks, signals, file changes outside
the sandbox directory); they are not a jail against deliberately hostile code.
"""
import builtins
import io
import os
import resource
import sys


def set_limits(as_bytes: int, cpu_s: int, fsize: int, nofile: int) -> None:
    wanted = [(resource.RLIMIT_AS, as_bytes), (resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_FSIZE, fsize),
              (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 0)]
    for res, value in wanted:
        _, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, value))     # soft == hard: the program cannot raise it again


def _denied(name: str):
    def deny(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return deny


def _inside(root: str, path) -> bool:
    if isinstance(path, int):                       # an already open descriptor
        return True
    real = os.path.realpath(os.fsdecode(path))
    return real == root or real.startswith(root + os.sep)


def _confined(name: str, fn, root: str, num_paths: int = 1):
    """``fn`` with its first ``num_paths`` path arguments required to lie under ``root``."""
    def call(*args, **kwargs):
        for path in args[:num_paths]:
            if not _inside(root, path):
                raise PermissionError(f"{name}({path!r}): outside the sandbox directory")
        return fn(*args, **kwargs)
    return call


def install_guards(root: str) -> None:
    """Stop process creation, signals and file changes outside ``root`` at the Python level."""
    import _posixsubprocess

    _posixsubprocess.fork_exec = _denied("subprocess")
    for name in ("_exit", "abort", "system", "popen", "fork", "forkpty", "vfork", "posix_spawn", "posix_spawnp",
                 "kill", "killpg", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "putenv", "unsetenv", "setuid", "setgid", "chroot", "fchmod", "fchown"):
        if hasattr(os, name):
            setattr(os, name, _denied(f"os.{name}"))
    for name in ("remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "truncate", "chmod", "chown",
                 "lchown", "mkfifo", "mknod", "utime"):
        if hasattr(os, name):
            setattr(os, name, _confined(f"os.{name}", getattr(os, name), root))
    for name in ("rename", "renames", "replace", "link", "symlink"):
        setattr(os, name, _confined(f"os.{name}", getattr(os, name), root, num_paths=2))
    resource.setrlimit = _denied("resource.setrlimit")

    real_open, real_os_open = io.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not _inside(root, file):
            raise PermissionError(f"open({file!r}, {mode!r}): writing outside the sandbox directory")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not _inside(root, path):
            raise PermissionError(f"os.open({path!r}): writing outside the sandbox directory")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open


def main() -> None:
    as_bytes, cpu_s, fsize, nofile = (int(a) for a in sys.argv[1:5])
    path, token_fd, done_fd = sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
    with os.fdopen(token_fd, "rb") as f:
        token = f.read()
    with open(path, encoding="utf-8") as f:
        source = f.read()
    root = os.path.realpath(os.getcwd())
    exit_now, stderr, write = os._exit, sys.stderr, os.write
    set_limits(as_bytes, cpu_s, fsize, nofile)
    install_guards(root)
    code = compile(source, path, "exec")
    try:
        exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": builtins})
    except SystemExit as e:                         # an exit before the last line never reached check()
        stderr.write(f"SandboxExit: the program exited ({e.code!r}) before its checks completed\n")
        stderr.flush()
        exit_now(3)
    sys.stdout.flush()
    write(done_fd, token)
    exit_now(0)


if __name__ == "__main__":
    main()
