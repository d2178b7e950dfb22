"""FFN time vs density over every layer of a model: the neuron-sparse kernel vs the dense FFN, same run.

Density = share of each layer's neurons computed, in two layouts of the active set: ``scattered`` (a random
set: what a threshold or a predictor picks in the checkpoint's neuron order) and ``runs`` (runs of
``--run-length`` consecutive neurons: what a neuron order that kept co-active neurons together would give). One
pass reads every layer's FFN, from DRAM as decoding does (the model's FFNs outsize the last-level cache). Batch 1
(decode), block-quantized weights (default q8, the engine's), the passes alternating within each run, medians.

    python benchmarks/bench_sparse_ffn.py --model qwen2.5-coder-0.5b
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from _common import cpu_model, quiet_logs

DENSITIES = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1)
TARGETS = {0.2: 0.30, 0.5: 0.60}        # time ratio to dense the kernel should reach at these densities


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--weights", default="q8", choices=["q8", "q4"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--run-length", type=int, default=32, help="consecutive neurons per run in the runs layout")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    quiet_logs()

    import torch

    from runtime.model.config import ModelConfig
    from runtime.model.kernels.quantized import qffn
    from runtime.model.qweights import open_quantized
    from runtime.model.registry import resolve_model

    model_dir = resolve_model(args.model)
    cfg = ModelConfig.load(model_dir)
    q = open_quantized(model_dir, args.weights)
    layers = [q.neurons(i, cfg) for i in range(cfg.num_hidden_layers)]
    n, d = cfg.intermediate_size, cfg.hidden_size
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)

    def active(density: float, layout: str) -> torch.Tensor:
        """round(density * n) neuron ids, ascending: scattered at random, or whole runs placed at random."""
        if layout == "scattered":
            return torch.randperm(n, generator=gen)[:round(density * n)].sort().values
        runs = torch.randperm(n // args.run_length, generator=gen)[:round(density * n / args.run_length)]
        return (runs.sort().values[:, None] * args.run_length + torch.arange(args.run_length)).reshape(-1)

    passes = {("dense", 1.0): None} | {(layout, s): [active(s, layout) for _ in layers]
                                       for s in DENSITIES for layout in ("scattered", "runs")}
    times: dict[tuple[str, float], list[float]] = {k: [] for k in passes}
    for _ in range(args.runs + 1):                       # the first run warms up, not counted
        for key, ids in passes.items():
            t0 = time.perf_counter()
            for i, layer in enumerate(layers):
                qffn(x, layer, None if ids is None else ids[i], cfg.hidden_act, args.threads)
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    dense = med[("dense", 1.0)]
    ffn_mb = sum(layer.nbytes() for layer in layers) / 1e6
    rows = {f"{s:.1f}": {layout: round(med[(layout, s)] / dense, 3) for layout in ("scattered", "runs")}
            for s in DENSITIES}
    met = {f"{k:.1f}": {layout: rows[f"{k:.1f}"][layout] <= v for layout in ("scattered", "runs")}
           for k, v in TARGETS.items()}
    result = {"bench": "sparse_ffn", "model": args.model, "weights": args.weights, "threads": args.threads,
              "cpu": cpu_model(), "batch": 1, "runs": args.runs, "run_length": args.run_length,
              "dense_ms": round(dense * 1e3, 3), "ffn_mb": round(ffn_mb, 1),
              "dense_gb_s": round(ffn_mb / 1e3 / dense, 1), "ratio_to_dense": rows, "targets": TARGETS,
              "targets_met": met}
    print(f"sparse FFN {args.model} {args.weights}, {cfg.num_hidden_layers} layers (d={d}, n_ff={n}), "
          f"threads={args.threads}, {cpu_model()}: dense {dense * 1e3:.2f} ms a token "
          f"({ffn_mb / 1e3 / dense:.1f} GB/s); time vs dense (scattered / runs of {args.run_length}): "
          + ", ".join(f"{k} {v['scattered']:.2f}x / {v['runs']:.2f}x" for k, v in rows.items())
          + f" (medians of {args.runs}); targets 0.2 -> <=0.30x, 0.5 -> <=0.60x: scattered "
          + ("met" if all(m["scattered"] for m in met.values()) else "missed") + ", runs "
          + ("met" if all(m["runs"] for m in met.values()) else "missed"))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
