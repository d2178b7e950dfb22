"""Each quantized kernel path this CPU runs (scalar, AVX2, AVX-512 VNNI), timed on Qwen2.5-0.5B's FFN shapes.

Per path, format, activation rows (1 = decode, 16 = a batch) and thread count: one FFN layer's dense pass
(gate and up as matrix-vector products, then W_down) over 8 layers' worth of synthetic random weights, so
that every read comes from DRAM as in a real step. Prints ms per layer and the weight bytes read per second;
medians of ``--repeats`` rounds, the paths alternating within each round. Last line ``RESULT {json}``.

    python benchmarks/bench_kernel_paths.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from _common import cpu_model, quiet_logs

D, N_FF, LAYERS = 896, 4864, 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}")
    args = ap.parse_args()
    quiet_logs()

    import numpy as np
    import torch

    from runtime.model.kernels import quantized as qk
    from runtime.model.qformat import quantize

    rng = np.random.default_rng(0)

    def matrix(rows: int, k: int, fmt: str) -> qk.QMatrix:
        return qk.QMatrix(quantize(rng.standard_normal((rows, k), dtype=np.float32), fmt), fmt, k)

    paths, results = qk.available_isas(), []
    for fmt in ("q8_0", "q4_1"):
        layers = [qk.QNeurons(matrix(N_FF, D, fmt), matrix(N_FF, D, "q8_0"), matrix(N_FF, D, fmt),
                              matrix(D, N_FF, "q8_0")) for _ in range(LAYERS)]
        layer_bytes = sum(m.data.nbytes for m in (layers[0].gate, layers[0].up, layers[0].down_t))
        for rows in (1, 16):
            x = torch.randn(rows, D)
            for threads in (int(t) for t in args.threads.split(",")):
                times: dict[str, list[float]] = {p: [] for p in paths}
                for _ in range(args.repeats):
                    for path in paths:
                        qk.set_isa(path)
                        t0 = time.perf_counter()
                        for q in layers:
                            qk.qffn(x, q, None, "silu", threads)
                        times[path].append((time.perf_counter() - t0) / LAYERS)
                for path in paths:
                    ms = statistics.median(times[path]) * 1e3
                    results.append({"path": path, "format": fmt, "rows": rows, "threads": threads,
                                    "ms_per_layer": round(ms, 3), "weight_gb_s": round(layer_bytes / ms / 1e6, 1)})
                    print(f"{fmt} rows {rows:2} threads {threads:2} {path:7} {ms:7.3f} ms/layer "
                          f"{layer_bytes / ms / 1e6:6.1f} GB/s of weights", flush=True)
    qk.set_isa(paths[-1])
    print("RESULT " + json.dumps({"bench": "kernel_paths", "cpu": cpu_model(), "paths": paths, "d": D,
                                  "n_ff": N_FF, "repeats": args.repeats, "results": results}))


if __name__ == "__main__":
    main()
