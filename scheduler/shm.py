"""Shared-memory arena: named POSIX segment holding the per-layer buffers both executors map once.

The owner (the layer scheduler's side) creates and unlinks it; a peer attaches by name and must not
unlink it at exit (Python 3.11's resource tracker would, so attaching unregisters it). Segments are
created mode 0600 (private to the user).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import numpy as np

_ALIGN = 64
PREFIX = "pinfer-"
_CREATED_HERE: set[str] = set()      # segments this process owns (an in-process peer must not untrack them)


@dataclass(frozen=True, slots=True)
class BufferSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str                   # numpy dtype name, e.g. "float32", "uint8"


def _layout(specs: list[BufferSpec]) -> tuple[dict[str, int], int]:
    offsets, off = {}, 0
    for s in specs:
        offsets[s.name] = off
        off += -(-int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize // _ALIGN) * _ALIGN
    return offsets, max(off, _ALIGN)


class SharedArena:
    """A set of named numpy arrays laid out in one shared-memory segment."""

    def __init__(self, specs: list[BufferSpec], name: str | None = None) -> None:
        self.specs = list(specs)
        offsets, size = _layout(self.specs)
        self.is_owner = name is None
        if self.is_owner:
            self._shm = shared_memory.SharedMemory(name=PREFIX + secrets.token_hex(6), create=True, size=size)
            _CREATED_HERE.add(self._shm.name)
        else:
            self._shm = shared_memory.SharedMemory(name=name, create=False)
            if name not in _CREATED_HERE:
                # Only the owner may unlink; stop this process's resource tracker from doing it at exit.
                resource_tracker.unregister(self._shm._name, "shared_memory")  # type: ignore[attr-defined]
        self.name = self._shm.name
        self.arrays: dict[str, np.ndarray] = {
            s.name: np.ndarray(s.shape, dtype=s.dtype, buffer=self._shm.buf, offset=offsets[s.name])
            for s in self.specs}

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def close(self) -> None:
        """Drop this process's mapping; the owner also removes the segment."""
        if self._shm is None:
            return
        self.arrays.clear()
        try:
            self._shm.close()
        except BufferError:          # a view is still alive somewhere; the mapping goes with the process
            pass
        if self.is_owner:
            _CREATED_HERE.discard(self.name)
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
        self._shm = None
