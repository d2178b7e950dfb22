"""``pinfer profile | calibrate | train-predictors | prepare | place``: the offline pipeline, once per model."""
from __future__ import annotations

import argparse

from runtime.cli.args import add_engine_args, engine_config


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
                                       args.rank, args.cost, args.recall, args.max_gap,
                                       criterion=args.criterion), per_layer=True)
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


def cmd_prepare(args: argparse.Namespace) -> int:
    """profile (unless present) -> calibrate each target sparsity -> one predictor fit for all of them."""
    from runtime.sparsity import artifacts
    from runtime.sparsity.predictor import train_predictors
    from runtime.sparsity.profile import PROFILE, calibrate, has_neuron_samples, profile

    model_dir, model, encode = _dense_model(args)
    try:
        if not has_neuron_samples(artifacts.load(model_dir, PROFILE, "")[0]):
            raise artifacts.MissingArtifactError("the profile predates wina mode")
        print("profile: present")
    except artifacts.MissingArtifactError:
        print(f"profile: wrote {profile(model, model_dir, encode)}")
    for s in args.sparsity:
        print(f"calibrate {s:.2f}: wrote {calibrate(model_dir, s)}")
    _print_predictors(train_predictors(model, model_dir, encode, args.sparsity, args.tokens, args.heldout_tokens,
                                       args.rank, args.cost, args.recall, args.max_gap,
                                       criterion=args.criterion), per_layer=False)
    return 0


def cmd_place(args: argparse.Namespace) -> int:
    """The hot neurons the engine would hold under these engine options, solved (or found cached) as it does."""
    from runtime.hybrid.placement import GpuMemory, coverage, place
    from runtime.model.registry import open_model
    from runtime.sparsity.online import activation_frequencies

    config, model_dir, model_cfg = open_model(engine_config(args))
    splits = place(config, model_dir, model_cfg)
    calibrated = activation_frequencies(model_dir, config)
    hot, total = sum(len(s.hot) for s in splits), model_cfg.num_hidden_layers * model_cfg.intermediate_size
    memory = GpuMemory.of(model_cfg, config)
    covered = f"cover {coverage(splits, calibrated[0]):.1%} of activations ({calibrated[1]})" if calibrated else \
        "(not calibrated: the first neurons of each layer)"
    print(f"{config.placement}: {hot} hot neurons ({hot / total:.1%} of {total}, {hot * memory.per_neuron / 2**20:.0f} "
          f"MiB {config.dtype}) {covered}; GPU executor {memory.describe(hot)}; per layer "
          f"{[len(s.hot) for s in splits]}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
        q.add_argument("--criterion", default="wina", choices=["wina", "act"],
                       help="the exact mask the predictors aim at: 'wina' (|a_j| ||W_down[:, j]|| > tau_wina, the "
                            "default) or 'act' (|a_j| > tau_act)")
    q = sub.add_parser("place", help="choose the hot neurons for a GPU memory budget",
                       description="Choose the GPU executor's hot neurons as the engine would under these engine "
                                   "options (--placement topk|ilp with --memory-budget-mb and/or --tau-hot, from "
                                   "the calibrated activation frequencies), and cache the answer beside the model "
                                   "in sparsity/ for the engine to reuse.")
    add_engine_args(q, is_hybrid=True)
    q.set_defaults(fn=cmd_place, placement="topk")
