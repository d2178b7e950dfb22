"""Child-side start of a sandboxed program: confine it, set resource limits, install guards, run the program.

Run as ``python -I -B sandbox_boot.py AS_BYTES CPU_S FSIZE_BYTES NOFILE PROGRAM TOKEN_FD DONE_FD FREEZE UID``
with the sandbox directory as cwd: the harness's completion token is read from TOKEN_FD (then closed) and
written to DONE_FD only after the program's last line ran, so an exit status alone (``os._exit(0)``) never
counts as a pass. Standalone on purpose (isolated mode puts no project path on ``sys.path``). Limits are set
here rather than in ``preexec_fn`` because the parent forks from a thread pool, where ``preexec_fn`` is unsafe.

Started by the harness as root inside fresh mount, PID, network and IPC namespaces (``unshare``), this
script does the kernel-enforced part before any program code runs:

* FREEZE = 1: the home and scratch directories (``HIDDEN``) are covered with empty tmpfs mounts, the
  Python installation (when it lies under one of them) is bind-mounted back, the sandbox directory is the
  only writable mount, and every other mount in this namespace is remounted read-only;
* UID >= 0: it drops to that uid (and gid) with no supplementary groups and sets no_new_privs, so the
  program holds no capabilities, cannot regain root through a setuid binary, cannot undo the mounts, and
  RLIMIT_NPROC = 0 stops it from creating processes.

Either fails closed: an error here exits before the program runs. The Python-level guards installed afterwards
turn accidental damage into a clear ``PermissionError``; ctypes or ``posix`` get around them, so without the
two steps above (the harness's ``--allow-weak-sandbox`` fallback) they are no jail against hostile code.
"""
import builtins
import errno
import io
import os
import resource
import sys

# Covered by an empty read-only tmpfs: the harness's home (Ray's auth token, model caches, credentials), other
# users' homes, and the shared scratch directories (Ray's sockets, other programs' sandbox directories).
HIDDEN = ("/root", "/home", "/tmp", "/var/tmp", "/dev/shm", "/run")

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 0x1, 0x2, 0x4, 0x8, 0x20
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 0x400, 0x800, 0x1000, 0x4000, 0x40000, 0x200000
# A bind remount sets exactly the flags it is given: restate these so that none is cleared (and so that the
# kernel, which refuses to clear locked ones, does not refuse the remount).
KEPT_FLAGS = {b"nosuid": MS_NOSUID, b"nodev": MS_NODEV, b"noexec": MS_NOEXEC, b"noatime": MS_NOATIME,
              b"nodiratime": MS_NODIRATIME, b"relatime": MS_RELATIME}
PR_SET_NO_NEW_PRIVS = 38


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, source: bytes | None, target: bytes, fstype: bytes | None, flags: int,
           data: bytes | None = None) -> None:
    import ctypes

    _check(libc.mount(source, target, fstype, ctypes.c_ulong(flags), data), f"mount {os.fsdecode(target)}")


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _mounts() -> list[tuple[bytes, bytes]]:
    """(mount point, per-mount options) of every mount in this namespace, from ``/proc/self/mountinfo``."""
    with open("/proc/self/mountinfo", "rb") as f:
        fields = [line.split(b" ") for line in f.read().splitlines()]
    # Mount points escape space, tab, newline and backslash as \ooo.
    return [(f[4].decode("unicode_escape").encode("latin-1"), f[5]) for f in fields]


def freeze_files(root: str) -> None:
    """Leave ``root`` the only writable directory, with ``HIDDEN`` empty except for the Python installation.

    Needs root in a mount namespace of its own (never run it in the host's: the mounts would land there)."""
    if os.getpid() != 1:
        raise RuntimeError("the file system is only frozen as PID 1 of the namespaces unshare makes")
    libc = _libc()
    _mount(libc, None, b"/", None, MS_REC | MS_PRIVATE)         # nothing done below may propagate to the host
    hidden = sorted({os.path.realpath(d) for d in HIDDEN if os.path.isdir(d)})
    hidden = [d for d in hidden if not any(h != d and _within(d, h) for h in hidden)]
    python = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix,
                                            *sys.path) if p and os.path.isdir(p)}
    python = {p for p in python if any(_within(p, h) for h in hidden)}
    exposed = [p for p in python if not any(q != p and _within(p, q) for q in python)] + [root]
    fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in exposed]     # reachable after their paths are covered
    for d in hidden:
        _mount(libc, b"tmpfs", os.fsencode(d), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=64k")
    umask = os.umask(0o022)
    for path, fd in zip(exposed, fds):
        os.makedirs(path, exist_ok=True)                        # its path inside the tmpfs; root's own stays
        _mount(libc, f"/proc/self/fd/{fd}".encode(), os.fsencode(path), None, MS_BIND)   # root: its own mount
        os.close(fd)
    os.umask(umask)
    for target, options in _mounts():
        if target == os.fsencode(root):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for name in options.split(b","):
            flags |= KEPT_FLAGS.get(name, 0)
        try:
            _mount(libc, None, target, None, flags)
        except OSError as e:            # a mount covered by a tmpfs above is out of reach: nothing to do
            if e.errno not in (errno.ENOENT, errno.EINVAL) or not any(_within(os.fsdecode(target), h)
                                                                       for h in hidden):
                raise
    os.chdir(root)                       # the old cwd is the directory under the bind mount, now read-only
    if not os.statvfs("/").f_flag & os.ST_RDONLY or os.statvfs(".").f_flag & os.ST_RDONLY:
        raise RuntimeError("the file system did not freeze as intended")


def drop_user(uid: int) -> None:
    """Become ``uid`` (gid the same, no groups): no capabilities left, none to regain (no_new_privs)."""
    from ctypes import c_ulong

    _check(_libc().prctl(PR_SET_NO_NEW_PRIVS, c_ulong(1), c_ulong(0), c_ulong(0), c_ulong(0)),
           "prctl(PR_SET_NO_NEW_PRIVS)")
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise RuntimeError("still able to become root after dropping privileges")


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
    freeze, uid = sys.argv[8] == "1", int(sys.argv[9])
    with os.fdopen(token_fd, "rb") as f:
        token = f.read()
    with open(path, encoding="utf-8") as f:
        source = f.read()
    root = os.path.realpath(os.getcwd())
    exit_now, stderr, write = os._exit, sys.stderr, os.write
    if freeze:
        freeze_files(root)
    if uid >= 0:
        drop_user(uid)
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
