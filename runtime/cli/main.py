"""The ``pinfer`` command line: generate, serve/stop, and the subcommands of the other modules."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from runtime.cli import batch, evaluate, models, offline
from runtime.cli.args import add_engine_args, add_sampling_args, engine_config, llm_from_args
from runtime.errors import PinferError


def cmd_generate(args: argparse.Namespace) -> int:
    from runtime import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop)
    t0 = time.perf_counter()
    if args.trace and args.is_hybrid is False:
        raise ValueError("--trace needs the hybrid runtime (drop --local)")
    llm = llm_from_args(args)
    load_s = time.perf_counter() - t0
    try:
        prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
        if args.trace:
            llm.start_trace()
        out = llm.generate([prompt], params)[0]
        if args.trace:
            from runtime.hybrid.trace import write_chrome_trace

            write_chrome_trace(llm.trace_events(), args.trace)
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
        print(f"[{llm.model_name} ({llm.config.weights} weights): {len(out.prompt_token_ids)} prompt + {n} new tokens, finish={out.finish_reason}, "
              f"load {load_s:.1f}s, prefill {out.metrics.get('prefill_s', 0):.2f}s, {rate}]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    if args.detach and args.http:
        raise ValueError("--detach returns at once, so nothing would answer HTTP: use --http without --detach "
                         "(the engine stops with the server), or --detach alone")
    api_key = _http_api_key(args)                 # before an engine loads: a refused --host fails at once
    config = engine_config(args, engine_name=args.name)
    if not config.is_hybrid:
        if args.replicas is not None:
            raise ValueError("--replicas runs hybrid engines on the Ray cluster: drop --local")
        if not args.http:
            raise ValueError("--local serves an in-process engine, reachable only over HTTP: add --http")
        llm = llm_from_args(args)
        try:
            _serve_http(llm, args, api_key)
        finally:
            llm.shutdown()
        return 0
    from runtime.hybrid.cluster import ensure_ray
    from runtime.serving.client import connect
    from runtime.serving.replicas import start_replicas, stop_replicas
    from runtime.serving.service import start_service, stop_service

    name = config.engine_name
    owns_cluster = ensure_ray(config.address)
    if args.detach and owns_cluster:
        raise ValueError("--detach needs a running cluster (start one with `ray start --head`); "
                         "without one the engine would die with this command")
    if args.max_replicas is not None and args.replicas is None:
        raise ValueError("--max-replicas sets how far --replicas may grow: give --replicas too")
    if args.replicas is not None:
        client, stop_engine = start_replicas(config, args.replicas, args.max_replicas), stop_replicas
        what = f"{args.replicas} replica(s) of {client.model_name}"
    else:
        client, stop_engine = None, stop_service
        what = start_service(config)[1]["model"]
    print(f"engine {name!r} serves {what}; connect with runtime.serving.client.connect(name={name!r})", flush=True)
    if args.detach:
        return 0
    try:
        if args.http:
            _serve_http(client or connect(name=name), args, api_key)
        else:
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            stop.wait()
    finally:
        stop_engine(name)
    print(f"engine {name!r} stopped")
    return 0


def _http_api_key(args: argparse.Namespace) -> str | None:
    """--http's API key (--api-key, else $PINFER_API_KEY), checked against --host and --no-auth."""
    if not args.http:
        if args.api_key is not None or args.no_auth:
            raise ValueError("--api-key and --no-auth are about the HTTP API: add --http")
        return None
    api_key = args.api_key if args.api_key is not None else os.environ.get("PINFER_API_KEY") or None
    if args.no_auth and api_key is not None:
        raise ValueError("--no-auth serves without an API key, but one is set (--api-key or PINFER_API_KEY): "
                         "drop one or the other")
    from runtime.serving.http_api import check_access

    check_access(args.host, api_key, allow_unauthenticated=args.no_auth)
    return api_key


def _serve_http(client, args: argparse.Namespace, api_key: str | None) -> None:
    """The OpenAI-compatible API over ``client`` until SIGINT/SIGTERM."""
    from runtime.serving.http_api import serve_http

    try:
        serve_http(client, args.host, args.port, api_key=api_key, allow_unauthenticated=args.no_auth,
                   ready=lambda url: print(f"OpenAI-compatible API on {url}/v1 (Ctrl-C stops)", flush=True))
    except OSError as e:                          # the address is taken or not ours: the flags were wrong
        raise ValueError(f"cannot serve HTTP on {args.host}:{args.port}: {e.strerror or e}") from None


def cmd_stop(args: argparse.Namespace) -> int:
    from runtime.config import EngineConfig
    from runtime.hybrid.cluster import ensure_ray
    from runtime.serving.replicas import stop_replicas
    from runtime.serving.service import stop_service

    name = args.name or EngineConfig.load().engine_name
    ensure_ray(args.address or os.environ.get("RAY_ADDRESS") or "auto")
    if not (stop_service(name) or stop_replicas(name)):
        raise ValueError(f"no engine named {name!r} runs on this cluster")
    print(f"engine {name!r} stopped")
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
    add_engine_args(p, is_hybrid=True)
    add_sampling_args(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("serve", help="run a named engine on the Ray cluster for clients",
                       description="Start the hybrid engine as a named, detached Ray actor; clients reach it "
                                   "with runtime.serving.client.connect(), and with --http over an OpenAI-compatible "
                                   "HTTP API. Blocks until Ctrl-C unless --detach. Every engine flag applies.")
    p.add_argument("--name", default=None, help="engine actor name (default: configs/engine.yaml)")
    p.add_argument("--detach", action="store_true", help="return at once, leave the engine on the cluster")
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="N engines behind the one name (Ray Serve replicas, each reserving --gpu-threads + "
                        "--cpu-threads CPUs (default 1 + 1) on one node, its executors on that node); requests go to "
                        "the less loaded live replica")
    p.add_argument("--max-replicas", type=int, default=None, metavar="M",
                   help="with --replicas N: grow up to M replicas while more than max_batch_size requests per replica "
                        "are in flight (Ray Serve autoscaling, where the cluster has room), back to N when idle")
    p.add_argument("--http", action="store_true",
                   help="also serve /v1/completions, /v1/chat/completions, /v1/models from this process")
    p.add_argument("--host", default="127.0.0.1",
                   help="--http: address to bind (default 127.0.0.1, this machine only; any other address "
                        "needs --api-key or --no-auth)")
    p.add_argument("--port", type=int, default=8000, help="--http: port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="--http: require 'Authorization: Bearer KEY' on every request (default: $PINFER_API_KEY, "
                        "which keeps the key out of `ps`); no TLS, so use it on trusted networks or behind a proxy")
    p.add_argument("--no-auth", action="store_true",
                   help="--http: serve a non-loopback --host without an API key (anyone who reaches it can "
                        "use the engine)")
    add_engine_args(p, is_hybrid=True)            # --local: an in-process engine behind --http, no Ray
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("stop", help="stop a served engine", description="Stop an engine started by pinfer serve.")
    p.add_argument("--name", default=None, help="engine actor name (default: configs/engine.yaml)")
    p.add_argument("--address", default=None,
                   help="Ray cluster the engine runs on (default: RAY_ADDRESS, else 'auto': the local `ray start` "
                        "cluster); never starts one")
    p.set_defaults(fn=cmd_stop)

    offline.add_parsers(sub)                      # profile, calibrate, train-predictors, prepare, place
    models.add_parsers(sub)                       # convert, models, download
    batch.add_parser(sub)                         # batch
    evaluate.add_parser(sub)                      # eval humaneval
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
