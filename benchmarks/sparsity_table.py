"""Quality/speed of activation sparsity on one model: held-out perplexity, top-1 agreement with dense,
predictor recall, achieved sparsity and decode tokens/s relative to dense, per mode and target.

Everything runs in-process in one run (dense first, then each point); perplexity and agreement use
held-out Python-stdlib windows (never the calibration files, never HumanEval); agreement is the
share of positions whose argmax equals the dense model's greedy token over a 128-token dense
continuation (teacher forcing). Writes ``benchmarks/results/sparsity_<model>.md`` and a PNG.

    python benchmarks/sparsity_table.py --model qwen2.5-coder-0.5b --sparsities 0.3 0.5 0.7 0.8 0.9
"""
from __future__ import annotations

import argparse
import json
import math
import re
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet_logs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Write a Python function that parses an ISO 8601 date string and returns a datetime."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.8, 0.9])
    ap.add_argument("--modes", nargs="+", default=["gate", "predictor"])
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=None, help="markdown path (default: results/sparsity_<model>.md)")
    args = ap.parse_args()
    quiet_logs()

    import torch
    from tqdm import tqdm

    from runtime import LLM, SamplingParams
    from runtime.sparsity import artifacts, corpus
    from runtime.sparsity.predictor import predictor_report

    threads = os.cpu_count() or 1
    dense = LLM(args.model, num_threads=threads)
    tok = dense.tokenizer
    windows = corpus.token_windows(tok.encode, "heldout", args.ppl_tokens, 128)
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}])
    ref = dense.generate([prompt], SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True))[0]
    ref_ids = ref.prompt_token_ids + ref.token_ids
    decode = SamplingParams(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)

    def quality(llm: LLM) -> tuple[float, float]:
        nll, count = 0.0, 0
        for ids in windows:
            logp = torch.log_softmax(llm._engine.token_logits(ids)[:-1], -1)
            nll -= logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
            count += len(ids) - 1
        pred = llm._engine.token_logits(ref_ids)[len(ref.prompt_token_ids) - 1:-1].argmax(-1)
        return math.exp(nll / count), (pred == torch.tensor(ref.token_ids)).float().mean().item()

    def speed(llm: LLM) -> float:
        return (args.decode_tokens - 1) / llm.generate([prompt], decode)[0].metrics["decode_s"]

    points = [("dense", 0.0)] + [(m, s) for m in args.modes for s in args.sparsities]
    rows = []
    for mode, s in tqdm(points, desc="sparsity points", unit="point"):
        try:
            llm = dense if mode == "dense" else LLM(args.model, num_threads=threads, sparsity=mode, activation_sparsity=s)
        except artifacts.MissingArtifactError:
            rows.append({"mode": mode, "target": s,
                         "missing": f"no {mode} results at this sparsity (`pinfer prepare --sparsity {s}`)"})
            continue
        ppl, agree = quality(llm)
        shard = getattr(llm._engine.runner, "shard", None)
        if shard is not None:
            shard.num_computed = shard.num_offered = 0
        tok_s, dense_tok_s = [], []
        for _ in range(args.runs):                      # alternate with dense: ratios from the same moments
            tok_s.append(speed(llm))
            dense_tok_s.append(speed(dense))
        report = predictor_report(llm.model_dir, s) if mode == "predictor" else None
        recall = None if report is None else report["mean"]["recall"]
        mass = None if report is None else report["mean"]["weighted_recall"]
        rows.append({"mode": mode, "target": s, "ppl": ppl, "agreement": agree, "predictor_recall": recall,
                     "predictor_mass_kept": mass,
                     "achieved_sparsity": llm.achieved_sparsity() or 0.0, "tok_s": statistics.median(tok_s),
                     "speed_ratio": statistics.median(tok_s) / statistics.median(dense_tok_s)})
        if llm is not dense:
            llm.shutdown()
    dense_ppl = rows[0]["ppl"]
    write_report(args, rows, dense_ppl, threads)
    best = [r for r in rows if r.get("mode") == "predictor" and r.get("target") == 0.5 and "ppl" in r]
    line = (f"sparsity {args.model} fp32 threads={threads}: dense ppl {dense_ppl:.3f}, {rows[0]['tok_s']:.2f} tok/s; "
            + "; ".join(f"{r['mode']}@{r['target']:.1f} ppl {r['ppl']:.3f} ({r['ppl'] / dense_ppl - 1:+.1%}) "
                        f"speed {r['speed_ratio']:.2f}x" for r in rows[1:] if "ppl" in r))
    if best:
        b = best[0]
        line += (f" | target predictor@0.5: ppl within 2%: {'met' if b['ppl'] <= 1.02 * dense_ppl else 'missed'}, "
                 f">=1.5x: {'met' if b['speed_ratio'] >= 1.5 else 'missed'}")
    print(line)
    print("RESULT " + json.dumps({"bench": "sparsity_table", "model": args.model, "threads": threads, "rows": rows}))


def write_report(args, rows: list[dict], dense_ppl: float, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(exist_ok=True)
    short = {"qwen2.5-coder-0.5b": "qwen05", "qwen2.5-coder-1.5b": "qwen15"}
    stem = "sparsity_" + short.get(args.model, re.sub(r"[^A-Za-z0-9]+", "_", args.model))
    md = Path(args.out) if args.out else RESULTS / f"{stem}.md"
    lines = [f"# Activation sparsity on {args.model} (fp32, {threads} threads, in-process engine)", "",
             "Held-out perplexity over Python-stdlib files never used for calibration; agreement = top-1 "
             "agreement with the dense greedy continuation (128 tokens, teacher-forced); achieved sparsity = "
             "share of (token, neuron) FFN pairs skipped while decoding; speed = decode tok/s over dense, "
             "alternating in the same run. Produced by `benchmarks/sparsity_table.py`.", "",
             "| mode | target sparsity | achieved sparsity | held-out ppl | ppl vs dense | agreement | "
             "predictor recall | predictor \\|a\\| mass kept | decode tok/s | vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "missing" in r:
            lines.append(f"| {r['mode']} | {r['target']:.0%} | not run: {r['missing']} | | | | | | | |")
            continue
        rec = "" if r["predictor_recall"] is None else f"{r['predictor_recall']:.3f}"
        mass = "" if r.get("predictor_mass_kept") is None else f"{r['predictor_mass_kept']:.3f}"
        lines.append(f"| {r['mode']} | {r['target']:.0%} | {r['achieved_sparsity']:.1%} | {r['ppl']:.3f} | "
                     f"{r['ppl'] / dense_ppl - 1:+.1%} | {r['agreement']:.3f} | {rec} | {mass} | {r['tok_s']:.2f} | "
                     f"{r['speed_ratio']:.2f}x |")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, marker in (("gate", "o"), ("predictor", "s")):
        pts = sorted((r["achieved_sparsity"], r["ppl"], r["speed_ratio"]) for r in rows if r.get("mode") == mode and "ppl" in r)
        if pts:
            a1.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=mode)
            a2.plot([p[0] for p in pts], [p[2] for p in pts], marker=marker, label=mode)
    a1.axhline(dense_ppl, color="gray", ls="--", label="dense")
    a2.axhline(1.0, color="gray", ls="--", label="dense")
    a1.set(xlabel="achieved activation sparsity", ylabel="held-out perplexity", yscale="log", title=args.model)
    a2.set(xlabel="achieved activation sparsity", ylabel="decode tok/s vs dense", title="speed (same run)")
    a1.legend(), a2.legend()
    fig.tight_layout()
    png = md.with_suffix(".png")
    fig.savefig(png, dpi=120)
    lines += ["", f"![perplexity and speed vs sparsity]({png.name})", ""]
    md.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
