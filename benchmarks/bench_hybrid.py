"""Decode tokens/s of the hybrid Ray runtime (every neuron computed, hot/cold split across the two
executor actors) vs the in-process dense engine, measured in one run.

Both decode greedily for exactly ``--tokens`` tokens from the same chat-formatted prompt; runs
alternate; medians over ``--runs`` after one warm-up. Decode tok/s = (tokens - 1) / decode time as
the engine loop measures it; end-to-end adds the per-request Ray call and prefill.

    python benchmarks/bench_hybrid.py --model qwen2.5-coder-0.5b --hot-fractions 0.5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from _common import quiet_logs

PROMPT = "Write a Python function that checks whether a number is prime."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hot-fractions", default="0.5", help="comma-separated GPU-executor shares to measure")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    quiet_logs()

    from runtime import LLM, SamplingParams
    from runtime.hybrid.cluster import ensure_ray

    ensure_ray()
    threads = os.cpu_count() or 1
    dense = LLM(args.model, dtype=args.dtype, num_threads=threads)
    fractions = [float(f) for f in args.hot_fractions.split(",")]
    hybrids = {f: LLM(args.model, dtype=args.dtype, hot_fraction=f) for f in fractions}
    prompt = dense.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)

    def run(llm: LLM) -> tuple[float, float, list[int]]:
        t0 = time.perf_counter()
        out = llm.generate([prompt], params)[0]
        wall = time.perf_counter() - t0
        return (args.tokens - 1) / out.metrics["decode_s"], args.tokens / wall, out.token_ids

    engines = {"dense": dense, **{f"hybrid@{f}": h for f, h in hybrids.items()}}
    decode: dict[str, list[float]] = {k: [] for k in engines}
    e2e: dict[str, list[float]] = {k: [] for k in engines}
    tokens = {k: run(llm)[2] for k, llm in engines.items()}                # warm-up, and the outputs
    for i in range(args.runs):
        order = list(engines)[i % len(engines):] + list(engines)[:i % len(engines)]   # rotate who goes first
        for k in order:
            d, e, _ = run(engines[k])
            decode[k].append(d)
            e2e[k].append(e)
    med = {k: statistics.median(v) for k, v in decode.items()}
    result = {
        "bench": "hybrid_decode", "model": args.model, "dtype": args.dtype, "new_tokens": args.tokens,
        "runs": args.runs, "dense_threads": threads,
        "hybrid_threads": {"gpu_executor": hybrids[fractions[0]].config.gpu_threads,
                           "cpu_executor": hybrids[fractions[0]].config.cpu_threads},
        "dense_tok_s": round(med["dense"], 2),
        "hybrid_tok_s": {k: round(v, 2) for k, v in med.items() if k != "dense"},
        "ratio": {k: round(v / med["dense"], 3) for k, v in med.items() if k != "dense"},
        "end_to_end_tok_s": {k: round(statistics.median(v), 2) for k, v in e2e.items()},
        "same_tokens_as_dense": {k: tokens[k] == tokens["dense"] for k in engines if k != "dense"},
        "all": {k: [round(x, 2) for x in v] for k, v in decode.items()},
    }
    best = max(result["ratio"], key=result["ratio"].get)
    print(f"hybrid dense-equivalent decode {args.model} {args.dtype}: dense {med['dense']:.2f} tok/s "
          f"({threads} threads) vs " + ", ".join(f"{k} {med[k]:.2f} tok/s ({result['ratio'][k]:.2f}x)"
                                                 for k in result["ratio"])
          + f" (median of {args.runs}); best {best}; target >= 0.9x: "
          + ("met" if result["ratio"][best] >= 0.9 else "missed"))
    print("RESULT " + json.dumps(result))
    for h in hybrids.values():
        h.shutdown()


if __name__ == "__main__":
    main()
