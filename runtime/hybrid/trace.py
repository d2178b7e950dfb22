"""Chrome-trace (Perfetto, chrome://tracing) export of per-layer executor timings."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from scheduler.layer_scheduler import LayerEvent

_TID = {"hot": 1, "cold": 2}
_THREAD_NAMES = {"hot": "GPU executor (hot neurons)", "cold": "CPU executor (cold neurons)"}


def overlapping_layers(events: Iterable[LayerEvent]) -> tuple[int, int]:
    """(layer runs whose hot and cold intervals overlap, layer runs with both sides), pairing in order."""
    hot, cold = [], []
    for e in events:
        (hot if e.side == "hot" else cold).append(e)
    pairs = [(h, c) for h, c in zip(hot, cold) if h.layer == c.layer]
    return sum(max(h.start_ns, c.start_ns) < min(h.end_ns, c.end_ns) for h, c in pairs), len(pairs)


def write_chrome_trace(events: list[LayerEvent], path: str | Path) -> None:
    t0 = min((e.start_ns for e in events), default=0)
    out = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": _TID[side], "args": {"name": name}}
           for side, name in _THREAD_NAMES.items()]
    out += [{"name": f"layer {e.layer} {e.side}", "cat": "ffn", "ph": "X", "pid": 1, "tid": _TID[e.side],
             "ts": (e.start_ns - t0) / 1e3, "dur": (e.end_ns - e.start_ns) / 1e3, "args": {"layer": e.layer}}
            for e in events]
    Path(path).write_text(json.dumps({"traceEvents": out, "displayTimeUnit": "ms"}))
