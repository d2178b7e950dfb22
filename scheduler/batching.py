"""Continuous batching: which requests run in the next decoding step (pure Python, no torch, no Ray).

Requests wait in arrival order; between steps, waiting ones take free cache slots (first come, first
served, at most ``max_batch_size`` running, and only while the caller's ``fits`` says the KV cache has
room) and finished or aborted ones leave, so a step always runs every admitted sequence together. The
lowest free slot is handed out first, which keeps the slots in use (and the cache rows) compact.
"""
from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar


class Schedulable(Protocol):
    request_id: str
    slot: int


R = TypeVar("R", bound=Schedulable)


class BatchScheduler(Generic[R]):
    def __init__(self, max_batch_size: int) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.waiting: deque[R] = deque()
        self.running: list[R] = []
        self._free = list(range(max_batch_size))                  # a heap: the lowest free slot first

    def add(self, request: R) -> None:
        self.waiting.append(request)

    def admit(self, fits: Callable[[R, int], bool] = lambda r, slot: True) -> list[R]:
        """Move waiting requests into free slots, in order, while ``fits(request, slot)`` (the first that does not
        waits, and so does everyone after it: nobody is overtaken); returns the newly admitted ones (to prefill)."""
        admitted = []
        while self.waiting and self._free and fits(self.waiting[0], self._free[0]):
            r = self.waiting.popleft()
            r.slot = heapq.heappop(self._free)
            self.running.append(r)
            admitted.append(r)
        return admitted

    def finish(self, request: R) -> None:
        """Take a running request out and free its slot."""
        self.running.remove(request)
        heapq.heappush(self._free, request.slot)

    def remove(self, request_id: str) -> R | None:
        """Drop a request wherever it is (abort); returns it, or None if it is unknown or already gone."""
        for r in self.waiting:
            if r.request_id == request_id:
                self.waiting.remove(r)
                return r
        for r in self.running:
            if r.request_id == request_id:
                self.finish(r)
                return r
        return None

    def drain(self) -> Iterator[R]:
        """Remove and yield every request (engine failure or shutdown)."""
        while self.running:
            r = self.running[-1]
            self.finish(r)
            yield r
        while self.waiting:
            yield self.waiting.popleft()

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)
