"""Layer scheduler: the whole per-layer hop of the hybrid runtime, on one page.

It runs in the GPU executor's process. Per FFN layer it broadcasts the input rows and the predictor's
mask (written once into the shared arena), rings the cold executor, computes the hot partial meanwhile,
waits for the cold answer and gathers the cold partial from the arena without a copy. It imports neither
torch nor Ray: tensors arrive from the executor and are only sliced, copied into and added here.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scheduler.channel import ColdChannel

if TYPE_CHECKING:
    from torch import Tensor

# (layer, h [N, d], mask [N, n_ff] | None) -> this side's partial FFN sum [N, d]
HotWork = Callable[[int, "Tensor", "Tensor | None"], "Tensor"]
MaskFn = Callable[[int, "Tensor"], "Tensor"]


@dataclass(slots=True, frozen=True)
class LayerEvent:
    """One executor's work on one layer: for traces and the overlap check (monotonic ns, system-wide)."""

    layer: int
    side: str            # "hot" | "cold"
    start_ns: int
    end_ns: int


@dataclass(slots=True)
class ArenaViews:
    """The hot side's tensors over the arena (``LayerArena`` fields), and where its own work happens."""

    x: "Tensor"             # [rows, d] fp32 input rows, read by the cold side
    y_cold: "Tensor"        # [rows, d] fp32 cold partial, written by the cold side
    mask: "Tensor"          # [rows, n_ff] bool predictor output, read by the cold side
    device: Any             # the hot side's torch device
    dtype: Any              # the hot side's torch dtype


class LayerScheduler:
    """Joins the two executors per layer. ``has_hot[l]`` / ``has_cold[l]``: whether each side holds any of
    layer l's neurons (a side with none is skipped: no message, no work)."""

    def __init__(self, channel: ColdChannel, arena: ArenaViews, hot: HotWork, predictor: MaskFn | None,
                 has_hot: list[bool], has_cold: list[bool]) -> None:
        self.channel, self.arena, self.hot, self.predictor = channel, arena, hot, predictor
        self.has_hot, self.has_cold = has_hot, has_cold
        self.max_rows = arena.x.shape[0]
        # The cold partial moves (to the device, to the dtype) only where it must: on the CPU in fp32 it is
        # used in place.
        self._moves = arena.y_cold.device != arena.device or arena.y_cold.dtype != arena.dtype
        self.is_tracing = False
        self.events: list[LayerEvent] = []

    def ffn(self, layer: int, h: "Tensor") -> "Tensor":
        """h [N, d] (normed hidden) -> FFN output [N, d] = hot partial + cold partial."""
        if h.shape[0] > self.max_rows:                       # a long prefill goes through in arena-sized chunks
            out = h.new_empty(h.shape)
            for start in range(0, h.shape[0], self.max_rows):
                out[start:start + self.max_rows] = self.ffn(layer, h[start:start + self.max_rows])
            return out
        n, a = h.shape[0], self.arena
        mask = None if self.predictor is None else self.predictor(layer, h)        # [N, n_ff] bool
        seq = None
        if self.has_cold[layer]:
            a.x[:n].copy_(h)                                 # broadcast: written once (D2H on CUDA)
            if mask is not None:
                a.mask[:n].copy_(mask)
            seq = self.channel.request(layer, n)             # ring the cold executor
        t0 = time.perf_counter_ns()
        y_hot = self.hot(layer, h, mask) if self.has_hot[layer] else None          # the hot partial, meanwhile
        t1 = time.perf_counter_ns()
        if seq is None:
            self._trace(layer, "hot", t0, t1)
            return y_hot
        reply = self.channel.wait(seq, layer)                # the cold partial is in the arena now
        self._trace(layer, "hot", t0, t1)
        self._trace(layer, "cold", reply.start_ns, reply.end_ns)
        y_cold = a.y_cold[:n]                                # gather: no copy on the CPU
        if self._moves:
            y_cold = y_cold.to(a.device, non_blocking=True).to(a.dtype)
        return y_cold.clone() if y_hot is None else y_hot + y_cold

    def _trace(self, layer: int, side: str, start_ns: int, end_ns: int) -> None:
        if self.is_tracing:
            self.events.append(LayerEvent(layer, side, start_ns, end_ns))

    def close(self) -> None:
        self.channel.close()
