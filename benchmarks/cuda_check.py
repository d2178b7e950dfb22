"""CUDA check of the hybrid runtime on quantized weights, for a machine with a GPU (prepared, not yet run: no
device was lent when it was written). The GPU executor dequantizes its share of the quantized container to
``--dtype`` on the device; the CPU executor computes the cold neurons with the block kernels. Its logits must
track the in-process engine on the same quantized weights, and its decode speed is printed beside it.

    python benchmarks/cuda_check.py --model smollm2-135m --weights q8 --dtype bfloat16 --hot-fraction 0.5
"""
from __future__ import annotations

import argparse
import json
import sys

from _common import quiet_logs

PROMPTS = ["def fib(n):", "The capital of France is", "import numpy as np\n\ndef moving_average(x, w):\n"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--weights", default="q8", choices=["q8", "q4"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--hot-fraction", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    quiet_logs()

    import torch

    from runtime import LLM, SamplingParams

    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to this torch: run this on the GPU machine")
    local = LLM(args.model, weights=args.weights)
    hybrid = LLM(args.model, weights=args.weights, dtype=args.dtype, hot_fraction=args.hot_fraction)
    tolerance = 0.05 if args.dtype == "bfloat16" else 0.01          # the hot partial in dtype on the GPU
    rows = []
    for p in PROMPTS:
        ours, ref = hybrid.prompt_logits(p), local.prompt_logits(p)
        rel = ((ours - ref).abs().max() / ref.abs().max()).item()
        rows.append({"prompt": p, "max_rel_diff": round(rel, 5), "same_argmax": bool(ours.argmax() == ref.argmax()),
                     "ok": rel < tolerance})
    greedy = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    outs = {name: llm.generate(PROMPTS, greedy) for name, llm in (("local", local), ("hybrid", hybrid))}
    speed = {name: [round((args.tokens - 1) / o.metrics["decode_s"], 2) for o in out] for name, out in outs.items()}
    agree = [next((i for i, (a, b) in enumerate(zip(x.token_ids, y.token_ids)) if a != b), args.tokens)
             for x, y in zip(outs["local"], outs["hybrid"])]
    local.shutdown(), hybrid.shutdown()
    ok = all(r["ok"] for r in rows)
    for r in rows:
        print(f"{r['prompt'][:30]!r:34} max rel diff {r['max_rel_diff']:.4f} (< {tolerance}) argmax equal "
              f"{r['same_argmax']}")
    print(f"greedy tokens equal to the in-process engine's before the first difference: {agree}; decode tok/s "
          f"{speed}; {'PASS' if ok else 'FAIL'}")
    print("RESULT " + json.dumps({"bench": "cuda_check", "model": args.model, "weights": args.weights,
                                  "dtype": args.dtype, "hot_fraction": args.hot_fraction,
                                  "device": torch.cuda.get_device_name(0), "rows": rows, "agree": agree,
                                  "decode_tok_s": speed, "ok": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
