"""Quality/speed of activation sparsity on one model: held-out perplexity, top-1 agreement with dense,
predictor recall, achieved sparsity and decode tokens/s relative to dense, per mode and target.

Everything runs in-process in one run (dense first, then each point); perplexity uses 256-token windows
from held-out Python-stdlib files spread over that split, one from the middle of each file (never the
calibration files, never HumanEval); agreement is the share of positions whose argmax equals the dense
model's greedy token over a 128-token dense continuation (teacher forcing). The oracle rows keep exactly
the neurons with |a_j| > tau_act: what a perfect predictor would give. Writes
``benchmarks/results/sparsity_<model>.md``, a PNG and the rows as JSON (read by ``humaneval_report.py``).

    python benchmarks/sparsity_table.py --model qwen2.5-coder-0.5b --sparsities 0.3 0.5 0.7 0.8 0.9
"""
from __future__ import annotations

import argparse
import json
import math
import re
import os
import statistics
from pathlib import Path

from _common import cpu_model, quiet_logs

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Write a Python function that parses an ISO 8601 date string and returns a datetime."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.8, 0.9])
    ap.add_argument("--modes", nargs="+", default=["oracle", "gate", "predictor"],
                    help="oracle = exact |a_j| > tau_act (the ceiling of any predictor; quality only)")
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--weights", default="q8", help="weight format of every engine (default q8, the engine's)")
    ap.add_argument("--out", default=None, help="markdown path (default: results/sparsity_<model>.md)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of the existing table (its JSON) that this run does not measure again")
    ap.add_argument("--rewrite", action="store_true",
                    help="measure nothing: write the table and plot again from the existing JSON")
    args = ap.parse_args()
    quiet_logs()
    if args.rewrite:
        saved = json.loads(report_path(args).with_suffix(".json").read_text())
        rows = saved["rows"]
        write_report(args, rows, rows[0]["ppl"], saved["threads"], saved["cpu"], token_bytes(args))
        return

    import numpy as np
    import torch
    from tqdm import tqdm

    from runtime import LLM, SamplingParams
    from runtime.core.engine import Engine
    from runtime.core.runners import SparseRunner
    from runtime.model.ffn_shard import FFNShard
    from runtime.model.transformer import ffn_activations
    from runtime.model.weights import load_transformer
    from runtime.sparsity import artifacts
    from runtime.sparsity.corpus import sample_windows
    from runtime.sparsity.predictor import predictor_report
    from runtime.sparsity.profile import calibration_name

    threads = os.cpu_count() or 1
    dense = LLM(args.model, num_threads=threads, weights=args.weights)
    tok = dense.tokenizer
    windows = sample_windows(tok.encode, "heldout", args.ppl_tokens)
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}])
    ref = dense.generate([prompt], SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True))[0]
    ref_ids = ref.prompt_token_ids + ref.token_ids
    decode = SamplingParams(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)

    def quality(llm: LLM) -> tuple[float, float]:
        nll, count = 0.0, 0
        for ids in windows:
            logp = torch.log_softmax(llm.token_logits(ids)[:-1], -1)
            nll -= logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
            count += len(ids) - 1
        pred = llm.token_logits(ref_ids)[len(ref.prompt_token_ids) - 1:-1].argmax(-1)
        agreement = (pred == torch.tensor(ref.token_ids)).float().mean().item()
        return math.exp(nll / count), agreement

    def speed(llm: LLM) -> float:
        return (args.decode_tokens - 1) / llm.generate([prompt], decode)[0].metrics["decode_s"]

    full_ffns = [block.ffn for block in load_transformer(dense.model_dir).layers] if "oracle" in args.modes else []

    class Oracle:
        """The predictor-mode engine with the exact mask |a_j| > tau_act (computed densely from the FFN weights)."""

        def __init__(self, s: float) -> None:
            tau = artifacts.load(dense.model_dir, calibration_name(s), "")[0]["tau_act"]
            model = load_transformer(dense.model_dir, with_ffn=False)
            every = [np.arange(model.cfg.intermediate_size)] * model.cfg.num_hidden_layers
            self.shard = FFNShard.load(dense.model_dir, every, torch.float32, mode="predictor", num_threads=threads)
            mask = lambda i, x: ffn_activations(x, full_ffns[i].w_gate_up_t, full_ffns[i].act).abs() > float(tau[i])  # noqa: E731
            self.engine = Engine(SparseRunner(model, self.shard, mask), dense.tokenizer, dense.config)
            self.model_dir, self.token_logits, self.shutdown = dense.model_dir, self.engine.token_logits, self.engine.shutdown

        def generate(self, prompts: list[str], params: SamplingParams):
            return self.engine.generate(prompts, [params] * len(prompts))

        def achieved_sparsity(self, reset: bool = False) -> float:
            share = 1 - self.shard.num_computed / self.shard.num_offered
            if reset:
                self.shard.num_computed = self.shard.num_offered = 0
            return share

    points = [("dense", 0.0)] + [(m, s) for m in args.modes for s in args.sparsities]
    rows = []
    for mode, s in tqdm(points, desc="sparsity points", unit="point"):
        try:
            llm = (dense if mode == "dense" else Oracle(s) if mode == "oracle"
                   else LLM(args.model, num_threads=threads, weights=args.weights, sparsity=mode,
                            activation_sparsity=s))
        except artifacts.MissingArtifactError:
            rows.append({"mode": mode, "target": s,
                         "missing": f"no {mode} results at this sparsity (`pinfer prepare --sparsity {s}`)"})
            continue
        ppl, agree = quality(llm)
        llm.achieved_sparsity(reset=True)
        tok_s, dense_tok_s = [], []
        for _ in range(1 if mode == "oracle" else args.runs):   # alternate with dense: ratios from the same moments
            tok_s.append(speed(llm))
            dense_tok_s.append(speed(dense))
        report = predictor_report(llm.model_dir, s) if mode == "predictor" else None
        recall = None if report is None else report["mean"]["recall"]
        mass = None if report is None else report["mean"]["weighted_recall"]
        rows.append({"mode": mode, "target": s, "ppl": ppl, "agreement": agree, "predictor_recall": recall,
                     "predictor_mass_kept": mass,
                     "achieved_sparsity": llm.achieved_sparsity() or 0.0, "tok_s": statistics.median(tok_s),
                     "speed_ratio": statistics.median(tok_s) / statistics.median(dense_tok_s)})
        if mode == "oracle":                            # it computes the FFN twice: its speed means nothing
            rows[-1]["tok_s"] = rows[-1]["speed_ratio"] = None
        if llm is not dense:
            llm.shutdown()
    dense_ppl = rows[0]["ppl"]
    if args.merge:                  # each row's speed is a ratio to dense in its own run: rows of two runs compare
        new = {(r["mode"], r["target"]): r for r in rows}
        old = json.loads(report_path(args).with_suffix(".json").read_text())["rows"]
        rows = [new.pop((r["mode"], r["target"]), r) for r in old] + list(new.values())    # the table's order
    write_report(args, rows, dense_ppl, threads, cpu_model(), token_bytes(args))
    best = [r for r in rows if r.get("mode") == "predictor" and r.get("target") == 0.5 and "ppl" in r]
    line = (f"sparsity {args.model} {args.weights} threads={threads}: dense ppl {dense_ppl:.3f}, {rows[0]['tok_s']:.2f} tok/s; "
            + "; ".join(f"{r['mode']}@{r['target']:.1f} ppl {r['ppl']:.3f} ({r['ppl'] / dense_ppl - 1:+.1%})"
                        + (f" speed {r['speed_ratio']:.2f}x" if r["speed_ratio"] else "")
                        for r in rows[1:] if "ppl" in r))
    if best:
        b = best[0]
        line += (f" | target predictor@0.5: ppl within 2%: {'met' if b['ppl'] <= 1.02 * dense_ppl else 'missed'}, "
                 f">=1.5x: {'met' if b['speed_ratio'] >= 1.5 else 'missed'}")
    print(line)
    print("RESULT " + json.dumps({"bench": "sparsity_table", "model": args.model, "threads": threads, "rows": rows}))


def report_path(args) -> Path:
    """The markdown table's path (the JSON and PNG beside it)."""
    short = {"qwen2.5-coder-0.5b": "qwen05", "qwen2.5-coder-1.5b": "qwen15"}
    stem = "sparsity_" + short.get(args.model, re.sub(r"[^A-Za-z0-9]+", "_", args.model))
    return Path(args.out) if args.out else RESULTS / f"{stem}.md"


def token_bytes(args) -> dict[str, int] | None:
    """The weight bytes a dense decode step reads, by part (``qweights.bytes_by_part``), plus ``scorer``: the
    predictors' (None for float weights)."""
    if args.weights == "fp32":
        return None
    from runtime.model.qweights import bytes_by_part
    from runtime.model.registry import resolve_model
    from runtime.sparsity import artifacts
    from runtime.sparsity.predictor import load_predictors

    model_dir = resolve_model(args.model)
    parts = bytes_by_part(model_dir, args.weights)
    for s in args.sparsities:                        # one scorer per layer, shared by every level
        try:
            parts["scorer"] = sum(p.nbytes for p in load_predictors(model_dir, s, quantized="q8_0"))
            break
        except artifacts.MissingArtifactError:
            continue
    return parts


SKIPPED = {"gate": ("up", "down"), "down": ("down",), "wina": ("down",), "predictor": ("gate", "up", "down")}


def dense_bytes(parts: dict[str, int]) -> int:
    """The weight bytes of a dense decode step (the scorers are predictor mode's alone)."""
    return sum(v for k, v in parts.items() if k != "scorer")


def byte_bound(row: dict, parts: dict[str, int] | None) -> float | None:
    """The decode speed over dense if a step's time followed the weight bytes it reads: the mode skips its
    matrices' rows at the achieved sparsity (and predictor mode reads its scorers too)."""
    if parts is None or row["mode"] not in SKIPPED or (row["mode"] == "predictor" and "scorer" not in parts):
        return 1.0 if parts is not None and row["mode"] == "dense" else None
    dense = dense_bytes(parts)
    read = dense - row["achieved_sparsity"] * sum(parts[k] for k in SKIPPED[row["mode"]])
    return dense / (read + (parts["scorer"] if row["mode"] == "predictor" else 0))


def write_report(args, rows: list[dict], dense_ppl: float, threads: int, cpu: str,
                 parts: dict[str, int] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(exist_ok=True)
    md = report_path(args)
    lines = [f"# Activation sparsity on {args.model} ({args.weights} weights, {threads} threads, in-process engine, "
             f"{cpu})", "",
             f"Held-out perplexity over {args.ppl_tokens} tokens, 256-token windows from Python-stdlib files never "
             "used for calibration (one window per file, files spread over the held-out split); agreement = top-1 "
             "agreement with the dense greedy continuation (128 tokens, teacher-forced); achieved sparsity = share "
             "of (token, neuron) FFN pairs skipped while decoding; speed = decode tok/s over dense, alternating in "
             "the same run (batch 1). oracle = exactly the neurons with |a_j| > tau_act (a perfect predictor; quality only, it "
             "computes the FFN twice). predictor recall / \\|a\\| mass kept = held-out means from `pinfer "
             "train-predictors` (share of the truly active neurons predicted; share of the sum of \\|a_j\\| over "
             "all neurons that the predicted ones carry). Produced by `benchmarks/sparsity_table.py`.", ""]
    if parts is not None:
        dense = dense_bytes(parts)
        share = {k: v / dense for k, v in parts.items()}
        lines += [f"Weight bytes a dense decode step reads: {dense / 1e6:.0f} MB: FFN gate {share['gate']:.0%}, up "
                  f"{share['up']:.0%}, down {share['down']:.0%}, attention projections {share['attention']:.0%}, "
                  f"LM head {share['head']:.0%}"
                  + (f"; the predictors' scorers {share['scorer']:.0%} more" if "scorer" in share else "")
                  + ". *Byte bound* = the speed over dense if a step's time were proportional to the weight bytes "
                  "it reads (a mode skips its matrices' rows at the achieved sparsity: gate mode up and down, "
                  "down/wina modes down, predictor mode all three, and reads its scorers): where a measured speed "
                  "falls short of it, the kernel's work per byte, not the bytes, is what costs. Input sparsity on the "
                  f"attention projections (TEAL) could remove at most half of their {share['attention']:.0%} at 50%, "
                  f"a byte bound of {1 / (1 - share['attention'] / 2):.2f}x: not built.", ""]
    lines += ["| mode | target sparsity | achieved sparsity | held-out ppl | ppl vs dense | agreement | "
              "predictor recall | predictor \\|a\\| mass kept | decode tok/s | vs dense | byte bound |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    bounds = [None if "missing" in r else byte_bound(r, parts) for r in rows]
    for r, bound in zip(rows, bounds):
        if "missing" in r:
            lines.append(f"| {r['mode']} | {r['target']:.0%} | not run: {r['missing']} | | | | | | | | |")
            continue
        rec = "" if r["predictor_recall"] is None else f"{r['predictor_recall']:.3f}"
        mass = "" if r.get("predictor_mass_kept") is None else f"{r['predictor_mass_kept']:.3f}"
        speed = "n/a | n/a" if r["tok_s"] is None else f"{r['tok_s']:.2f} | {r['speed_ratio']:.2f}x"
        lines.append(f"| {r['mode']} | {r['target']:.0%} | {r['achieved_sparsity']:.1%} | {r['ppl']:.3f} | "
                     f"{r['ppl'] / dense_ppl - 1:+.1%} | {r['agreement']:.3f} | {rec} | {mass} | {speed} | "
                     f"{'' if bound is None else f'{bound:.2f}x'} |")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (mode, marker) in enumerate(zip(dict.fromkeys(r["mode"] for r in rows[1:]), "^osDvP")):   # a color a mode
        ppl_pts = sorted((r["achieved_sparsity"], r["ppl"]) for r in rows if r.get("mode") == mode and "ppl" in r)
        speed_pts = sorted((r["achieved_sparsity"], r["speed_ratio"]) for r in rows
                           if r.get("mode") == mode and r.get("speed_ratio"))
        if ppl_pts:
            a1.plot(*zip(*ppl_pts), marker=marker, label=mode, color=f"C{i}")
        if speed_pts:
            a2.plot(*zip(*speed_pts), marker=marker, label=mode, color=f"C{i}")
            bound_pts = sorted((r["achieved_sparsity"], b) for r, b in zip(rows, bounds)
                               if r.get("mode") == mode and r.get("speed_ratio") and b)
            if bound_pts:
                a2.plot(*zip(*bound_pts), ls=":", color=f"C{i}")
    a1.axhline(dense_ppl, color="gray", ls="--", label="dense")
    a2.axhline(1.0, color="gray", ls="--", label="dense")
    a1.set(xlabel="achieved activation sparsity", ylabel="held-out perplexity", yscale="log", title=args.model)
    a2.set(xlabel="achieved activation sparsity", ylabel="decode tok/s vs dense",
           title="speed (same run; dotted: byte bound)" if parts else "speed (same run)")
    a1.legend(), a2.legend()
    fig.tight_layout()
    png = md.with_suffix(".png")
    fig.savefig(png, dpi=120)
    lines += ["", f"![perplexity and speed vs sparsity]({png.name})", ""]
    md.write_text("\n".join(lines))
    md.with_suffix(".json").write_text(json.dumps(      # what humaneval_report.py reads the speed of each point from
        {"model": args.model, "weights": args.weights, "threads": threads, "cpu": cpu, "token_bytes": parts,
         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
