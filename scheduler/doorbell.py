"""Per-layer doorbell: tiny msgpack messages over a blocking ``AF_UNIX SOCK_SEQPACKET`` socket.

Tensors never travel here (they sit in the shared-memory arena); a message is a few integers. One
kernel hop per direction and no framing (SEQPACKET keeps message boundaries): measured ~36 us for a
fan-out + gather on the 2-core dev machine, against ~120 us for pyzmq and ~1.2 ms for Ray calls.
The socket file lives in a fresh 0700 directory, so only this user can connect.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

import msgpack

MAX_MESSAGE = 4096


class DoorbellClosed(ConnectionError):
    """The peer closed the socket or died."""


class Doorbell:
    """One connected end of a doorbell socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def connect(cls, path: str, timeout_s: float | None = None) -> "Doorbell":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        sock.settimeout(timeout_s)
        return cls(sock)

    def send(self, *fields: Any) -> None:
        try:
            self._sock.send(msgpack.packb(fields))
        except OSError as e:
            raise DoorbellClosed(f"doorbell send failed: {e}") from e

    def recv(self) -> list[Any]:
        """Block until one message arrives; raises DoorbellClosed on EOF, TimeoutError on timeout."""
        try:
            data = self._sock.recv(MAX_MESSAGE)
        except TimeoutError:
            raise
        except OSError as e:
            raise DoorbellClosed(f"doorbell receive failed: {e}") from e
        if not data:
            raise DoorbellClosed("peer closed the doorbell")
        return msgpack.unpackb(data)

    def settimeout(self, timeout_s: float | None) -> None:
        self._sock.settimeout(timeout_s)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


DIR_PREFIX = "pinfer-bell-"      # + the owner's pid: directories of owners killed with -9 are swept


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                      # someone else's: alive
        pass
    return True


def sweep_stale_dirs(root: str | None = None) -> int:
    """Remove this user's doorbell directories whose owning process is gone (it died without closing them);
    returns how many. A reused pid keeps its directory: nothing is removed that might be in use."""
    removed = 0
    for entry in os.scandir(root or tempfile.gettempdir()):
        if not entry.name.startswith(DIR_PREFIX):
            continue
        try:
            pid = int(entry.name[len(DIR_PREFIX):].split("-", 1)[0])
            if entry.stat(follow_symlinks=False).st_uid != os.getuid() or _is_alive(pid):
                continue
        except (ValueError, OSError):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed += 1
    return removed


class DoorbellListener:
    """Listening end: a socket file in a private temporary directory; accepts one peer at a time."""

    def __init__(self) -> None:
        sweep_stale_dirs()
        self._dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")          # mode 0700
        self.path = os.path.join(self._dir, "doorbell.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self._sock.listen(1)

    def accept(self, timeout_s: float | None = None) -> Doorbell:
        self._sock.settimeout(timeout_s)
        conn, _ = self._sock.accept()
        conn.settimeout(None)
        return Doorbell(conn)

    def close(self) -> None:
        try:
            self._sock.close()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
