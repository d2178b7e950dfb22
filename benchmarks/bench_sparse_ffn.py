"""FFN time vs density for one real layer: the neuron-aware sparse kernel vs the dense FFN, same run.

Density = share of the layer's neurons computed (a random active set of that size: no locality to
exploit). The layer's weights are replicated to ~512 MiB and cycled, so reads come from DRAM as they
do for a whole model, not from the last-level cache. Batch 1 (decode), fp32, medians of ``--runs``.

    python benchmarks/bench_sparse_ffn.py --model qwen2.5-coder-0.5b
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

from _common import quiet_logs

DENSITIES = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1)
TARGETS = {0.2: 0.30, 0.5: 0.60}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--layer", type=int, default=None, help="layer index (default: the middle one)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    quiet_logs()

    import numpy as np
    import torch

    from runtime.model.ffn_shard import FFNShard
    from runtime.model.config import ModelConfig
    from runtime.model.registry import resolve_model
    from runtime.model.kernels.sparse_ffn import kernel_available

    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    cfg = ModelConfig.load(model_dir)
    layer = cfg.num_hidden_layers // 2 if args.layer is None else args.layer
    n, d = cfg.intermediate_size, cfg.hidden_size
    neurons = [np.arange(n) if i == layer else np.arange(0) for i in range(cfg.num_hidden_layers)]
    dense = FFNShard.load(model_dir, neurons, torch.float32, mode="dense", num_threads=args.threads)
    sparse = FFNShard.load(model_dir, neurons, torch.float32, mode="predictor", num_threads=args.threads)
    copies = max(2, math.ceil(512 * 2**20 / (3 * n * d * 4)))
    for shard in (dense, sparse):                      # cycle through copies so each call reads DRAM
        for key, ts in shard.w.items():
            if len(ts) > layer:
                shard.w[key] = [ts[layer].clone() for _ in range(copies)]
    x = torch.randn(1, d) / math.sqrt(d) * 8
    gen = torch.Generator().manual_seed(0)

    def timed(fn) -> float:
        fn(0)
        samples = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            for c in range(copies):
                fn(c)
            samples.append((time.perf_counter() - t0) / copies)
        return statistics.median(samples)

    t_dense = timed(lambda c: dense.partial(c, x))
    rows: dict[str, dict[str, float]] = {}
    for density in DENSITIES:
        mask = torch.zeros(1, n, dtype=torch.bool)
        mask[0, torch.randperm(n, generator=gen)[:round(density * n)]] = True
        sparse.neurons = dense.neurons = [torch.arange(n)] * copies
        t = timed(lambda c: sparse.partial(c, x, mask=mask))
        rows[f"{density:.1f}"] = {"ms": round(t * 1e3, 3), "ratio_to_dense": round(t / t_dense, 3)}
    met = {f"{k:.1f}": rows[f"{k:.1f}"]["ratio_to_dense"] <= v for k, v in TARGETS.items()}
    result = {"bench": "sparse_ffn", "model": args.model, "layer": layer, "d": d, "n_ff": n, "dtype": "float32",
              "threads": args.threads, "batch": 1, "runs": args.runs, "kernel": kernel_available(),
              "dense_ms": round(t_dense * 1e3, 3), "by_density": rows, "targets": TARGETS, "targets_met": met}
    print(f"sparse FFN {args.model} layer {layer} (d={d}, n_ff={n}) fp32 threads={args.threads}: dense "
          f"{t_dense * 1e3:.2f} ms; " + ", ".join(f"{k} density {v['ratio_to_dense']:.2f}x" for k, v in rows.items())
          + f" (median of {args.runs}); targets 0.2 -> <=0.30x: {'met' if met['0.2'] else 'missed'}, "
          f"0.5 -> <=0.60x: {'met' if met['0.5'] else 'missed'}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
