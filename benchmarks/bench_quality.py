"""Quality of the quantized weight formats against the fp32 reference: held-out perplexity and greedy agreement.

Each format (``LLM(model, weights=...)``, in-process) is loaded in turn, fp32 first, and shut down before the
next one is loaded. Per format:

* held-out perplexity: exp of the mean next-token NLL over ``--ppl-tokens`` tokens of 256-token windows from
  held-out Python-stdlib files (``runtime.sparsity.corpus.sample_windows``, the same windows as
  ``sparsity_table.py``), and its ratio to fp32 (target: ratio <= 1.01, PASS/MISS);
* greedy agreement with fp32 over the exactness prompts (three raw prompts and one chat-templated prompt),
  ``--gen-tokens`` greedy tokens each (ignore_eos, batch 1): the first position where the format's tokens
  differ from fp32's (= gen_tokens when identical), and teacher-forced top-1 agreement: the share of fp32's
  generated positions whose argmax under this format, fed fp32's prompt + continuation, is fp32's token;
* the weight bytes one decode token reads (``runtime.model.qweights.bytes_per_token``) and the model directory.

Writes a markdown table to ``--out`` (default ``benchmarks/results/quality_<model>.md``); the last line printed
is ``RESULT {json}``.

    python benchmarks/bench_quality.py --model qwen2.5-coder-0.5b --formats fp32 q8 q4 --ppl-tokens 8192 \\
        --gen-tokens 64
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

from _common import cpu_model, quiet_logs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ("fp32", "q8", "q4")
PPL_TARGET = 1.01
PROMPTS = ["def fib(n):", "The capital of France is",
           "import numpy as np\n\ndef moving_average(x, w):\n    \"\"\"Return the moving average.\"\"\"\n"]
CHAT = [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS),
                    help="weight formats (fp32, q8, q4), each optionally with a sparse mode at a calibrated level "
                         "(q8+down70, q8+gate30: `pinfer prepare` first); fp32 (the reference) is required and "
                         "always runs first")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=None, help="markdown path (default: results/quality_<model>.md)")
    args = ap.parse_args()
    from runtime.config import SPARSITY_MODES, WEIGHT_FORMATS

    # a weight format, optionally with a sparse mode at a calibrated level: q8, q8+down70
    variant = re.compile(rf"^({'|'.join(WEIGHT_FORMATS)})(?:\+({'|'.join(SPARSITY_MODES)})(\d\d))?$")
    if "fp32" not in args.formats:
        ap.error("--formats must include fp32 (the reference)")
    for f in args.formats:
        if not variant.match(f):
            ap.error(f"--formats: {f!r} is not a format (fp32, q8, q4) with an optional +<mode><level>")
    formats = ["fp32"] + [f for i, f in enumerate(args.formats) if f != "fp32" and f not in args.formats[:i]]
    quiet_logs()

    import torch
    from tqdm import tqdm

    from runtime import LLM, SamplingParams
    from runtime.model.qweights import bytes_per_token
    from runtime.sparsity.corpus import sample_windows

    greedy = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)
    windows: list[list[int]] = []
    prompts: list[str] = []
    ref: list = []                     # fp32's RequestOutput per prompt
    rows: list[dict] = []
    for fmt in formats:
        t0 = time.perf_counter()
        weights, mode, level = variant.match(fmt).groups()
        sparse = {"sparsity": mode, "activation_sparsity": int(level) / 100} if mode else {}
        llm = LLM(args.model, weights=weights, num_threads=args.threads, **sparse)
        load_s = time.perf_counter() - t0
        if fmt == "fp32":
            tok = llm.tokenizer
            windows = sample_windows(tok.encode, "heldout", args.ppl_tokens)
            prompts = list(PROMPTS)
            try:
                prompts.append(tok.apply_chat_template(CHAT))
            except ValueError as e:    # a model without a chat template: the raw prompts only
                print(f"no chat prompt: {e}")

        nll, count = 0.0, 0
        for ids in tqdm(windows, desc=f"{fmt} perplexity", unit="window"):
            logp = torch.log_softmax(llm.token_logits(ids)[:-1].float(), -1)
            nll -= logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
            count += len(ids) - 1
        ppl = math.exp(nll / count)

        outs = [llm.generate([p], greedy)[0] for p in prompts]   # one at a time: batch-1 decode, as served
        if fmt == "fp32":
            ref = outs
        divergence, agree, positions = [], [], 0
        for out, r in zip(outs, ref):
            divergence.append(first_divergence(out.token_ids, r.token_ids))
            ids = r.prompt_token_ids + r.token_ids
            pred = llm.token_logits(ids)[len(r.prompt_token_ids) - 1:-1].argmax(-1)
            agree.append(int((pred == torch.tensor(r.token_ids)).sum().item()))
            positions += len(r.token_ids)

        row = {"format": fmt, "achieved_sparsity": llm.achieved_sparsity() if mode else None, "ppl": ppl,
               "nll_sum": nll, "ppl_tokens_scored": count,
               "ratio_to_fp32": None, "pass": None, "first_divergence": divergence,
               "teacher_forced_agreement": sum(agree) / positions if positions else None,
               "teacher_forced_agreement_per_prompt": [a / len(r.token_ids) if r.token_ids else None
                                                       for a, r in zip(agree, ref)],
               "token_ids": [o.token_ids for o in outs], "texts": [o.text for o in outs],
               "bytes_per_token": bytes_per_token(llm.model_dir, weights), "model_dir": str(llm.model_dir),
               "load_s": load_s}
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        llm.shutdown()
        del llm
        gc.collect()

    ref_ppl = rows[0]["ppl"]
    for row in rows:
        row["ratio_to_fp32"] = row["ppl"] / ref_ppl
        row["pass"] = None if row["format"] == "fp32" else row["ratio_to_fp32"] <= PPL_TARGET

    header = {"cpu": cpu_model(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "commit": git_commit(), "threads": args.threads}
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(args.model).name)
    md = Path(args.out) if args.out else RESULTS / f"quality_{stem}.md"
    text = report(args, header, prompts, rows, count_windows=len(windows), scored=rows[0]["ppl_tokens_scored"])
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    print(text)
    print(f"wrote {md}")
    for row in rows[1:]:
        print(f"{row['format']}: ppl {row['ppl']:.4f} vs fp32 {ref_ppl:.4f} (ratio {row['ratio_to_fp32']:.4f}, "
              f"target <= {PPL_TARGET}): {'PASS' if row['pass'] else 'MISS'}")
    result = {"bench": "quality", "model": args.model, **header, "formats": formats,
              "ppl_tokens": args.ppl_tokens, "ppl_windows": len(windows), "window": 256,
              "gen_tokens": args.gen_tokens, "ppl_target_ratio": PPL_TARGET, "prompts": prompts,
              "out": str(md), "rows": rows}
    print("RESULT " + json.dumps(result))


def first_divergence(tokens: list[int], reference: list[int]) -> int:
    """The first position where ``tokens`` differ from ``reference`` (their common length when none does)."""
    n = min(len(tokens), len(reference))
    return next((i for i in range(n) if tokens[i] != reference[i]), n)


def git_commit() -> str | None:
    def run(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = run("rev-parse", "--short", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


def report(args, header: dict, prompts: list[str], rows: list[dict], count_windows: int, scored: int) -> str:
    def short(p: str) -> str:
        p = p.replace("\n", "\\n").replace("|", "\\|")
        return p if len(p) <= 60 else p[:57] + "..."

    lines = [f"# Quantized weights and sparse modes vs fp32 on {args.model}", "",
             f"- CPU: {header['cpu']} ({header['threads']} threads, in-process engine)",
             f"- date: {header['date']}",
             f"- commit: {header['commit'] or 'unknown'}",
             (f"- held-out perplexity: {args.ppl_tokens} tokens requested, {count_windows} windows of 256 tokens, "
              f"{scored} next tokens scored"),
             f"- greedy: {args.gen_tokens} generated tokens per prompt (temperature 0, ignore_eos, batch 1)", "",
             (f"Target: held-out perplexity within 1% of fp32 (ratio <= {PPL_TARGET}). First divergence = the "
              f"first generated position whose greedy token differs from fp32's ({args.gen_tokens} = identical). "
              "Teacher-forced agreement = share of fp32's generated positions (all prompts) whose argmax under "
              "the format, fed fp32's prompt and continuation, is fp32's token. Produced by "
              "`benchmarks/bench_quality.py`."), "",
             "Prompts:"]
    lines += [f"- p{i + 1}: `{short(p)}`" + (" (chat template)" if i >= len(PROMPTS) else "")
              for i, p in enumerate(prompts)]
    div_cols = [f"div p{i + 1}" for i in range(len(prompts))]
    lines += ["", "| format | achieved sparsity | held-out ppl | ratio to fp32 | target | " + " | ".join(div_cols)
              + " | teacher-forced agreement | weight MB/token |",
              "|---|---|---|---|---|" + "---|" * len(div_cols) + "---|---|"]
    for r in rows:
        verdict = "reference" if r["pass"] is None else "PASS" if r["pass"] else "MISS"
        agree = "" if r["teacher_forced_agreement"] is None else f"{r['teacher_forced_agreement']:.3f}"
        mb = "n/a" if r["bytes_per_token"] is None else f"{r['bytes_per_token'] / 2**20:.1f}"
        sparsity = "dense" if r["achieved_sparsity"] is None else f"{r['achieved_sparsity']:.1%}"
        lines.append(f"| {r['format']} | {sparsity} | {r['ppl']:.4f} | {r['ratio_to_fp32']:.4f} | {verdict} | "
                     + " | ".join(str(d) for d in r["first_divergence"]) + f" | {agree} | {mb} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
