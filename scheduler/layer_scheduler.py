"""Layer scheduler: per layer, ring the cold executor, run the hot work meanwhile, gather, and time both.

Pure Python (no torch, no Ray): the work itself is a callable, the data sits in the shared arena.
It runs in the GPU executor's process so a layer costs one cross-process round trip.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from scheduler.doorbell import Doorbell, DoorbellClosed

logger = logging.getLogger(__name__)

# Messages: request [op, seq, layer, n_rows]; reply [seq, status, start_ns, end_ns, error].
OP_STOP, OP_FFN, OP_PING = 0, 1, 2
STATUS_OK, STATUS_ERROR = 0, 1


class ColdExecutorError(RuntimeError):
    """The cold executor died, timed out, or failed on a layer."""


@dataclass(slots=True, frozen=True)
class LayerEvent:
    """One executor's work on one layer: for traces and the overlap check (monotonic ns, system-wide)."""

    layer: int
    side: str            # "hot" | "cold"
    start_ns: int
    end_ns: int


class LayerScheduler:
    def __init__(self, cold: Doorbell, timeout_s: float = 60.0) -> None:
        self.cold = cold
        self.cold.settimeout(timeout_s)
        self._seq = 0
        self.is_tracing = False
        self.events: list[LayerEvent] = []

    def run_layer(self, layer: int, n_rows: int, hot: Callable[[], None], has_cold: bool = True) -> None:
        """Dispatch the cold half of ``layer`` over ``n_rows`` arena rows, run ``hot()`` meanwhile, wait."""
        self._seq += 1
        seq = self._seq
        if has_cold:
            try:
                self.cold.send(OP_FFN, seq, layer, n_rows)
            except DoorbellClosed as e:
                raise ColdExecutorError(f"cold executor unreachable at layer {layer}: {e}") from e
        t0 = time.perf_counter_ns()
        hot()
        t1 = time.perf_counter_ns()
        if self.is_tracing:
            self.events.append(LayerEvent(layer, "hot", t0, t1))
        if not has_cold:
            return
        reply = self._wait(layer)
        if reply[0] != seq:
            raise ColdExecutorError(f"cold executor answered seq {reply[0]} for seq {seq} (layer {layer})")
        if reply[1] != STATUS_OK:
            raise ColdExecutorError(f"cold executor failed on layer {layer}: {reply[4]}")
        if self.is_tracing:
            self.events.append(LayerEvent(layer, "cold", reply[2], reply[3]))

    def ping(self) -> None:
        self._seq += 1
        self.cold.send(OP_PING, self._seq, -1, 0)
        if self._wait(-1)[0] != self._seq:
            raise ColdExecutorError("cold executor answered a ping out of order")

    def _wait(self, layer: int) -> list:
        try:
            return self.cold.recv()
        except TimeoutError as e:
            raise ColdExecutorError(f"cold executor did not answer layer {layer} in time") from e
        except DoorbellClosed as e:
            raise ColdExecutorError(f"cold executor died during layer {layer}: {e}") from e

    def close(self) -> None:
        try:
            self.cold.send(OP_STOP, 0, -1, 0)
        except DoorbellClosed:
            pass
        self.cold.close()


def serve_cold(bell: Doorbell, work: Callable[[int, int], None]) -> None:
    """The cold executor's side of the protocol: run ``work(layer, n_rows)`` per FFN message and answer
    each message with its timing; a failure is answered (the scheduler must never hang), STOP or a
    closed socket ends the loop."""
    while True:
        try:
            op, seq, layer, n = bell.recv()
        except DoorbellClosed:
            break
        if op == OP_STOP:
            break
        t0 = time.perf_counter_ns()
        status, error = STATUS_OK, ""
        if op == OP_FFN:
            try:
                work(layer, n)
            except Exception as e:
                logger.exception("cold FFN failed on layer %d", layer)
                status, error = STATUS_ERROR, f"{type(e).__name__}: {e}"
        elif op != OP_PING:
            status, error = STATUS_ERROR, f"unknown op {op}"
        bell.send(seq, status, t0, time.perf_counter_ns(), error)
    bell.close()
