"""Decode tokens/s of pinfer's dense engine vs Hugging Face transformers ``generate``, same run.

Both engines load the same GGUF (pinfer through its converted directory, transformers through its
own GGUF loader), use the same dtype and thread count, decode greedily for exactly ``--tokens`` new
tokens from the same chat-formatted prompt, and alternate runs. Decode tok/s = (tokens - 1) /
(generation time - prefill time); medians over ``--runs`` runs after one warm-up.

    python benchmarks/bench_dense.py --model smollm2-135m --dtype float32 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from _common import hf_model_for, quiet_logs

PROMPT = "Write a Python function that checks whether a number is prime."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    quiet_logs()

    import torch
    from runtime import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, num_threads=args.threads)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    ids = llm.tokenizer.encode(prompt)
    hf = hf_model_for(llm, args.dtype)
    n = args.tokens
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    def run_pinfer() -> float:
        out = llm.generate([prompt], params)[0]
        assert len(out.token_ids) == n
        return (n - 1) / out.metrics["decode_s"]

    input_ids = torch.tensor([ids])

    def hf_generate(num: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(input_ids, max_new_tokens=num, min_new_tokens=num, do_sample=False,
                              pad_token_id=llm.tokenizer.eos_id)
        assert out.shape[1] == len(ids) + num
        return time.perf_counter() - t0

    def run_hf() -> float:
        prefill = hf_generate(1)
        return (n - 1) / (hf_generate(n) - prefill)

    run_pinfer(), run_hf()                                     # warm-up
    ours, theirs = [], []
    for i in range(args.runs):                                 # alternate, rotating who goes first
        pair = (run_pinfer, run_hf) if i % 2 == 0 else (run_hf, run_pinfer)
        for fn in pair:
            (ours if fn is run_pinfer else theirs).append(fn())
    med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)
    result = {
        "bench": "dense_decode", "model": args.model, "dtype": args.dtype, "threads": args.threads,
        "new_tokens": n, "prompt_tokens": len(ids), "runs": args.runs,
        "pinfer_tok_s": round(med_ours, 2), "transformers_tok_s": round(med_theirs, 2),
        "ratio": round(med_ours / med_theirs, 3),
        "pinfer_all": [round(x, 2) for x in ours], "transformers_all": [round(x, 2) for x in theirs],
    }
    print(f"dense decode {args.model} {args.dtype} threads={args.threads}: pinfer {med_ours:.1f} tok/s vs "
          f"transformers {med_theirs:.1f} tok/s (median of {args.runs}) -> ratio {med_ours / med_theirs:.2f}x")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
