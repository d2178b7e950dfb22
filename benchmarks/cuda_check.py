"""CUDA check of the hybrid runtime on quantized weights, for a machine with a GPU.

The two executors run in this process (``runtime.hybrid.in_process``: the real per-layer data plane, control
calls without Ray, so the GPU machine needs no Ray). The GPU executor dequantizes its share of the quantized
container (attention, head and its hot FFN neurons) to ``dtype`` on the device; the CPU executor computes the
cold neurons with the block kernels. For each hot fraction and dtype it reports:
- logits after each prompt against the same pair with the GPU executor's arithmetic reproduced on the CPU in
  fp32 (dequantized weights; ``max_rel_diff`` = max |diff| / max |logit|: tight in fp32 when the GPU holds every
  neuron; with a cold part, within the format's own rounding noise, as far as the in-process engine is from the
  reproduction), and against the in-process engine (whose dense FFN rounds its activations to 8 bits: an
  informative difference, not an error); argmax agreement; greedy tokens equal before the first difference;
- GPU memory: what the executor allocated for its weights against what the placement's budget counts for
  them (``GpuMemory``: dense part + hot neurons, in dtype);
- decode tok/s of both (batch 1, greedy, ``--tokens`` tokens), and the median time a layer's hot and cold
  partials take (the layer scheduler's trace; prefill and decode layers together).

    python benchmarks/cuda_check.py --model smollm2-135m             # a registry name or a model directory
    python benchmarks/cuda_check.py --device cpu                     # dry run of the plumbing without a GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from _common import cpu_model, quiet_logs

PROMPTS = ["def fib(n):", "The capital of France is", "import numpy as np\n\ndef moving_average(x, w):\n"]
TOLERANCE = {"float32": 2e-3, "bfloat16": 0.05}     # max |diff| / max |logit| vs the arithmetic reproduced on the CPU



def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="registry name or model directory")
    ap.add_argument("--weights", default="q8", choices=["q8", "q4"])
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--hot-fractions", default="0.5,1.0")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="also print torch's profile of one request per dtype "
                    "(the GPU kernels: the engine's own thread runs the request)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the plumbing (the GPU "
                    "executor dequantizes there too; no memory rows)")
    args = ap.parse_args()
    quiet_logs()

    import torch

    from runtime import LLM, EngineConfig, SamplingParams
    from runtime.hybrid.in_process import ExecutorPair
    from runtime.hybrid.placement import GpuMemory
    from runtime.model.registry import open_model

    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        sys.exit("no CUDA device visible to this torch: run this on the GPU machine (or --device cpu)")
    greedy = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)

    def decode_tok_s(generate) -> list[float]:
        return [round((args.tokens - 1) / o.metrics["decode_s"], 1) for o in generate(PROMPTS, greedy)]

    def run(pair_or_llm, generate) -> tuple[list, list]:
        return ([pair_or_llm.prompt_logits(p) for p in PROMPTS], [o.token_ids for o in generate(PROMPTS, greedy)])

    def compare(logits: list, want: list) -> tuple[list[float], list[bool]]:
        return ([round(((a - b).abs().max() / b.abs().max()).item(), 5) for a, b in zip(logits, want)],
                [bool(a.argmax() == b.argmax()) for a, b in zip(logits, want)])

    local = LLM(args.model, weights=args.weights)
    local_logits, local_tokens = run(local, local.generate)
    local_speed = decode_tok_s(local.generate)
    local.shutdown()

    def pair_for(hot: float, dtype: str, device: str, dequantize: bool | None = None):
        config, model_dir, model_cfg = open_model(EngineConfig.resolve(
            model=args.model, weights=args.weights, dtype=dtype, hot_fraction=hot, is_hybrid=True))
        pair = ExecutorPair(config, model_dir, device=device, dequantize=dequantize)
        return pair, (lambda ps, sp: pair.gpu.generate(ps, [sp] * len(ps))), config, model_cfg

    rows, ok = [], True
    for hot in (float(h) for h in args.hot_fractions.split(",")):
        ref, ref_generate, _, _ = pair_for(hot, "float32", "cpu", dequantize=True)
        ref_logits, ref_tokens = run(ref.gpu, ref_generate)
        ref.close()
        # With a cold part, the CPU executor rounds its input rows to 8-bit blocks: a last-bit difference in a
        # row (GPU vs CPU sums) can move a rounding step, a difference of the format's own size. Bound: how far
        # the in-process engine (every activation rounded) is from the reproduction.
        noise = max(compare(local_logits, ref_logits)[0]) if hot < 1 else 0.0
        for dtype in args.dtypes.split(","):
            if on_gpu:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            pair, gen, config, model_cfg = pair_for(hot, dtype, args.device, None if on_gpu else True)
            row: dict = {"dtype": dtype, "hot_fraction": hot, "load_s": round(time.perf_counter() - t0, 1)}
            if on_gpu:
                mem = GpuMemory.of(model_cfg, config)
                num_hot = sum(pair.gpu.hot.num_neurons(layer) for layer in range(model_cfg.num_hidden_layers))
                counted, allocated = mem.dense + num_hot * mem.per_neuron, torch.cuda.memory_allocated() - before
                row.update(gpu_weights_mb=round(allocated / 1e6, 1), budget_counts_mb=round(counted / 1e6, 1),
                           resident_mb=round(pair.gpu.resident_bytes() / 1e6, 1),
                           memory_ok=abs(allocated / counted - 1) < 0.05)
            logits, tokens = run(pair.gpu, gen)
            diffs, argmax = compare(logits, ref_logits)
            local_diffs, local_argmax = compare(logits, local_logits)
            row.update(max_rel_diff=diffs, argmax_equal=argmax,
                       greedy_agree=[first_difference(a, b) for a, b in zip(tokens, ref_tokens)],
                       vs_in_process={"max_rel_diff": local_diffs, "argmax_equal": local_argmax,
                                      "greedy_agree": [first_difference(a, b) for a, b in zip(tokens, local_tokens)]},
                       decode_tok_s=decode_tok_s(gen))
            pair.gpu.set_tracing(True)                       # one more greedy request, traced: the per-layer hop
            gen(PROMPTS[:1], greedy)
            events = pair.gpu.trace_events()
            pair.gpu.set_tracing(False)
            for side in ("hot", "cold"):
                spans = [(e.end_ns - e.start_ns) / 1e6 for e in events if e.side == side]
                row[f"{side}_ms_per_layer"] = round(statistics.median(spans), 3) if spans else None
            pair.close()
            row.update(bound=max(TOLERANCE[dtype], noise))
            row["ok"] = max(diffs) < row["bound"] and (dtype != "float32" or all(argmax)) and row.get("memory_ok", True)
            ok &= row["ok"]
            rows.append(row)
            print(f"hot {hot:.2f} {dtype:9}: vs CPU-reproduced max rel diff {max(diffs):.5f} (< {row['bound']:.4f}), "
                  f"argmax {sum(argmax)}/{len(argmax)}, greedy agree {row['greedy_agree']}/{args.tokens}; vs "
                  f"in-process max rel diff {max(local_diffs):.4f}, greedy agree "
                  f"{row['vs_in_process']['greedy_agree']}; decode tok/s {row['decode_tok_s']} (in-process CPU "
                  f"{local_speed}), per layer: hot {row['hot_ms_per_layer']} ms, cold {row['cold_ms_per_layer']} ms"
                  + (f"; GPU weights {row['gpu_weights_mb']} MB, the budget counts "
                                      f"{row['budget_counts_mb']} MB" if on_gpu else "")
                  + f" -> {'ok' if row['ok'] else 'FAIL'}", flush=True)
    if args.profile:
        for dtype in args.dtypes.split(","):                 # where a decode step's time goes, every neuron hot
            pair, gen, _, _ = pair_for(1.0, dtype, args.device, None if on_gpu else True)
            gen(PROMPTS[:1], greedy)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])) as prof:
                gen(PROMPTS[:1], greedy)
            pair.close()
            print(f"profile of one request ({args.tokens} tokens), {dtype}, every neuron hot:")
            print(prof.key_averages().table(sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total",
                                            row_limit=15, max_name_column_width=50))
    device = torch.cuda.get_device_name(0) if on_gpu else "cpu (dry run)"
    print(f"{'PASS' if ok else 'FAIL'} on {device}")
    print("RESULT " + json.dumps({"bench": "cuda_check", "model": args.model, "weights": args.weights,
                                  "device": device, "cpu": cpu_model(),
                                  "torch": torch.__version__, "in_process_decode_tok_s": local_speed,
                                  "rows": rows, "ok": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
