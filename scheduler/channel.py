"""The per-layer channel between the hot side (GPU executor) and the cold side (CPU executor): the shared
arena's layout, the doorbell messages, and both ends of the protocol. Pure Python and numpy.

Per FFN layer the hot side writes the normed hidden rows (and the predictor's mask) into the arena once,
sends ``LayerRequest(FFN, seq, layer, num_rows)``, and reads the cold partial sum from the arena after the
``LayerReply`` with the same ``seq``. Nothing but these few integers crosses the socket: a message is a
msgpack array in its NamedTuple's field order, sent field by field (no tuple is built on the send path)
and read back into the NamedTuple.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from scheduler.doorbell import Doorbell, DoorbellClosed
from scheduler.shm import BufferSpec, SharedArena

logger = logging.getLogger(__name__)


class ColdExecutorError(RuntimeError):
    """The cold executor died, timed out, or failed on a layer."""


# ---- the arena ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ArenaLayout:
    """Sizes of the buffers both executors map once."""

    max_rows: int           # token rows per layer message; a longer prefill goes through in chunks
    hidden_size: int        # d
    num_neurons: int        # n_ff

    def specs(self) -> list[BufferSpec]:
        rows, d, n = self.max_rows, self.hidden_size, self.num_neurons
        return [BufferSpec("x", (rows, d), "float32"), BufferSpec("y_cold", (rows, d), "float32"),
                BufferSpec("mask", (rows, n), "bool")]


class LayerArena:
    """The arena's buffers as fields: ``x`` [rows, d] normed hidden rows (hot side writes), ``y_cold``
    [rows, d] the cold partial FFN sum (cold side writes), ``mask`` [rows, n_ff] the predictor's output
    (hot side writes, predictor mode only). ``name=None`` creates the segment (and owns it)."""

    def __init__(self, layout: ArenaLayout, name: str | None = None) -> None:
        self.layout = layout
        self._shm = SharedArena(layout.specs(), name)
        self.name = self._shm.name
        self.x: np.ndarray = self._shm["x"]
        self.y_cold: np.ndarray = self._shm["y_cold"]
        self.mask: np.ndarray = self._shm["mask"]

    def ref(self) -> "ArenaRef":
        return ArenaRef(self.name, self.layout)

    def close(self) -> None:
        """Drop this side's mapping; the owner also removes the segment."""
        self.x = self.y_cold = self.mask = None
        self._shm.close()


class ArenaRef(NamedTuple):
    """What the cold side needs to map the hot side's arena (a control-plane message)."""

    name: str
    layout: ArenaLayout


# ---- the messages ------------------------------------------------------------------------------------

class Op:
    """``LayerRequest.op`` values (plain ints: the per-layer path packs and compares them)."""

    STOP = 0
    FFN = 1
    PING = 2


class LayerRequest(NamedTuple):
    op: int
    seq: int
    layer: int              # -1 for PING / STOP
    num_rows: int           # arena rows holding this layer's input


class LayerReply(NamedTuple):
    seq: int
    ok: bool
    start_ns: int           # the cold side's work, on the system-wide monotonic clock
    end_ns: int
    error: str              # what failed ("" when ok)


# ---- the hot side's end ------------------------------------------------------------------------------

class ColdChannel:
    """Rings the cold executor and waits for its answers; a death, a timeout, an answer out of order or a
    failure on its side becomes ``ColdExecutorError`` (the hot side never hangs).

    A hung (not dead) cold side is caught by a per-layer deadline sized to what layers took so far:
    ``slack`` times the slowest answer per row seen, for the rows asked, but at least ``floor_s``;
    ``timeout_s`` as a ceiling and for the first ``warmup`` layers (first touches of every layer's weights)."""

    def __init__(self, bell: Doorbell, timeout_s: float = 60.0, floor_s: float = 5.0, slack: float = 50.0,
                 warmup: int = 64) -> None:
        self._bell = bell
        self._seq = 0
        self.timeout_s, self.floor_s, self.slack, self.warmup = timeout_s, floor_s, slack, warmup
        self._answered = 0
        self._per_row_s: float | None = None          # the slowest answered layer's seconds per row
        self._asked: tuple[int, int, float] = (0, 0, 0.0)     # (seq, rows, when) of the request in flight

    def deadline_s(self, num_rows: int) -> float:
        if self._per_row_s is None:
            return self.timeout_s
        return min(self.timeout_s, max(self.floor_s, self.slack * self._per_row_s * max(1, num_rows)))

    def request(self, layer: int, num_rows: int, op: int = Op.FFN) -> int:
        self._seq += 1
        try:
            self._bell.send(op, self._seq, layer, num_rows)         # a LayerRequest
        except DoorbellClosed as e:
            raise ColdExecutorError(f"cold executor unreachable at layer {layer}: {e}") from e
        self._asked = (self._seq, num_rows, time.perf_counter())
        return self._seq

    def wait(self, seq: int, layer: int) -> LayerReply:
        _, rows, asked_at = self._asked
        deadline = self.deadline_s(rows)
        self._bell.settimeout(deadline)
        try:
            reply = LayerReply(*self._bell.recv())
        except TimeoutError as e:
            raise ColdExecutorError(f"cold executor did not answer layer {layer} within {deadline:.1f}s (hung?)") from e
        except DoorbellClosed as e:
            raise ColdExecutorError(f"cold executor died during layer {layer}: {e}") from e
        except TypeError as e:
            raise ColdExecutorError(f"cold executor sent a malformed reply at layer {layer}: {e}") from e
        if reply.seq != seq:
            raise ColdExecutorError(f"cold executor answered seq {reply.seq} for seq {seq} (layer {layer})")
        if not reply.ok:
            raise ColdExecutorError(f"cold executor failed on layer {layer}: {reply.error}")
        if layer >= 0:                                  # an FFN layer (not a ping): what a layer may take
            self._answered += 1
            if self._answered > self.warmup:
                per_row = (time.perf_counter() - asked_at) / max(1, rows)
                self._per_row_s = max(per_row, self._per_row_s or 0.0)
        return reply

    def ping(self) -> None:
        self.wait(self.request(-1, 0, Op.PING), -1)

    def close(self) -> None:
        try:
            self._bell.send(*LayerRequest(Op.STOP, 0, -1, 0))
        except DoorbellClosed:
            pass
        self._bell.close()


# ---- the cold side's end -----------------------------------------------------------------------------

def serve_cold(bell: Doorbell, work: Callable[[int, int], None]) -> None:
    """Run ``work(layer, num_rows)`` per FFN request and answer each request with its timing; a failure is
    answered too (the hot side must never hang). STOP or a closed socket ends the loop."""
    while True:
        try:
            req = LayerRequest(*bell.recv())
        except DoorbellClosed:
            break
        except TypeError as e:                  # not a request: answer so the hot side fails fast
            bell.send(*LayerReply(-1, False, 0, 0, f"malformed request: {e}"))
            continue
        if req.op == Op.STOP:
            break
        t0 = time.perf_counter_ns()
        ok, error = True, ""
        if req.op == Op.FFN:
            try:
                work(req.layer, req.num_rows)
            except Exception as e:
                logger.exception("cold FFN failed on layer %d", req.layer)
                ok, error = False, f"{type(e).__name__}: {e}"
        elif req.op != Op.PING:
            ok, error = False, f"unknown op {req.op}"
        bell.send(req.seq, ok, t0, time.perf_counter_ns(), error)    # a LayerReply
    bell.close()
