"""Aggregate decode tokens/s of continuous batching on the hybrid runtime at batch 1, 4, 8, 16, in one run.

B distinct chat-formatted prompts are submitted at once (concurrent callers, as clients would); the
engine prefills each, then decodes all B together every step (the hot/cold FFN split computes every
neuron of the batch). Aggregate decode tok/s = decoded tokens / (wall time - prefill time), the
prefills being serial in the first step; medians over ``--runs`` after a warm-up, batch sizes rotated.

    python benchmarks/bench_batch.py --model qwen2.5-coder-0.5b
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from _common import quiet_logs

TASKS = ["checks whether a number is prime", "reverses a linked list", "merges two sorted lists",
         "computes the n-th Fibonacci number", "parses a CSV line", "flattens a nested list",
         "counts words in a string", "finds the median of a list", "validates an e-mail address",
         "converts Roman numerals to integers", "implements binary search", "removes duplicates from a list",
         "transposes a matrix", "checks balanced parentheses", "computes a factorial iteratively",
         "finds the longest common prefix"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--weights", default="fp32", choices=["fp32", "q8", "q4"])
    ap.add_argument("--hot-fraction", type=float, default=0.5, help="hybrid runtime GPU-executor share")
    ap.add_argument("--local", action="store_true", help="the in-process engine instead of the hybrid runtime")
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    quiet_logs()

    import torch

    from runtime import LLM, SamplingParams

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    engine = "local" if args.local else f"hybrid@{args.hot_fraction}"
    llm = LLM(args.model, dtype=args.dtype, weights=args.weights,
              hot_fraction=None if args.local else args.hot_fraction, max_batch_size=max(sizes))
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": f"Write a Python function that {t}."}])
               for t in TASKS]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    pool = ThreadPoolExecutor(max(sizes))

    def run(b: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        outs = list(pool.map(lambda p: llm.generate(p, params)[0], [prompts[i % len(prompts)] for i in range(b)]))
        wall = time.perf_counter() - t0
        decoded = sum(len(o.token_ids) - 1 for o in outs)
        prefill = sum(o.metrics["prefill_s"] for o in outs)
        return decoded / (wall - prefill), sum(len(o.token_ids) for o in outs) / wall

    run(max(sizes))                                                      # warm-up
    decode: dict[int, list[float]] = {b: [] for b in sizes}
    e2e: dict[int, list[float]] = {b: [] for b in sizes}
    for i in range(args.runs):
        for b in sizes[i % len(sizes):] + sizes[:i % len(sizes)]:
            d, e = run(b)
            decode[b].append(d)
            e2e[b].append(e)
    med = {b: statistics.median(v) for b, v in decode.items()}
    base = med[sizes[0]]
    result = {
        "bench": "continuous_batching", "model": args.model, "weights": args.weights, "dtype": args.dtype,
        "engine": engine,
        "new_tokens": args.tokens, "runs": args.runs,
        "threads": ({"in_process": torch.get_num_threads()} if args.local else
                    {"gpu_executor": llm.config.gpu_threads, "cpu_executor": llm.config.cpu_threads}),
        "decode_tok_s": {str(b): round(v, 2) for b, v in med.items()},
        "ratio_to_batch_1": {str(b): round(v / base, 2) for b, v in med.items()},
        "end_to_end_tok_s": {str(b): round(statistics.median(v), 2) for b, v in e2e.items()},
        "all": {str(b): [round(x, 2) for x in v] for b, v in decode.items()},
    }
    top = max(sizes)
    print(f"continuous batching {args.model} {args.weights} weights {args.dtype} {engine}: aggregate decode "
          + ", ".join(f"B={b} {med[b]:.1f} tok/s ({med[b] / base:.2f}x)" for b in sizes)
          + f" (median of {args.runs}); target B={top} >= 5x B=1: " + ("met" if med[top] / base >= 5 else "missed"))
    print("RESULT " + json.dumps(result))
    pool.shutdown()
    llm.shutdown()


if __name__ == "__main__":
    main()
