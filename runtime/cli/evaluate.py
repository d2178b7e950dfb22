"""``pinfer eval humaneval``: its options and the command."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from runtime.cli.args import add_engine_args, engine_config
from runtime.config import EngineConfig
from runtime.evals.humaneval import FORMATS


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``pinfer eval`` and its benchmarks on the top-level subcommands."""
    p = sub.add_parser("eval", help="score a model on a code benchmark",
                       description="Score a model on a benchmark by running its answers.")
    benches = p.add_subparsers(dest="benchmark", required=True)
    q = benches.add_parser(
        "humaneval", help="HumanEval pass@k (OpenAI, 164 problems)",
        description="Generate completions for the HumanEval problems, run each against its tests in a sandboxed "
                    "child process, and report pass@k. Results are appended to --output as they are judged; "
                    "rerunning with the same --output resumes (and refuses other settings).")
    q.add_argument("--format", dest="prompt_format", choices=FORMATS, default="raw",
                   help="raw: complete the prompt as code; chat: ask through the chat template (default raw)")
    q.add_argument("--output", type=Path, default=None,
                   help="results JSONL (default humaneval-<model>-<format>.jsonl); beside it "
                        "<name>.settings.json and <name>.summary.json")
    q.add_argument("--limit", type=int, default=None, help="only the first N problems")
    q.add_argument("--tasks", nargs="+", default=None, help="only these problems (HumanEval/7 or 7; commas allowed)")
    g = q.add_argument_group("sampling")
    g.add_argument("--n", dest="num_samples", type=int, default=1, help="samples per problem (default 1)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=0, help="base seed of the per-sample seeds (default 0)")
    g.add_argument("--max-tokens", type=int, default=512, help="new tokens per sample at most (default 512)")
    g.add_argument("--batch-size", type=int, default=16, help="requests in flight at once, batched continuously (default 16)")
    add_engine_args(q, is_hybrid=None)           # in process unless a hybrid option (e.g. --hot-fraction) is set
    q.add_argument("--engine", default=None, metavar="NAME",
                   help="send the problems to the engine NAME started by `pinfer serve` (all its replicas) instead "
                        "of loading one; its own engine config is recorded")
    g = q.add_argument_group("sandbox")
    g.add_argument("--workers", dest="num_workers", type=int, default=None,
                   help="programs run at once (default: CPU count, at most 8)")
    g.add_argument("--timeout", dest="timeout_s", type=float, default=10.0, help="seconds per program (default 10)")
    g.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program (default 1024)")
    g.add_argument("--allow-weak-sandbox", action="store_true",
                   help="run even where the sandbox cannot isolate programs (no root or no unshare: no own "
                        "namespaces, read-only file system or user); refused otherwise")
    q.set_defaults(fn=cmd_humaneval)


def default_output(model: str | None, prompt_format: str) -> Path:
    from runtime.model.registry import default_model

    name = re.sub(r"[^\w.-]+", "_", Path(model or default_model()).name)
    return Path(f"humaneval-{name}-{prompt_format}.jsonl")


def cmd_humaneval(args: argparse.Namespace) -> int:
    from runtime.evals.harness import EvalConfig, run_humaneval

    tasks = [t for arg in args.tasks for t in arg.split(",") if t] if args.tasks else None
    client = None
    if args.engine:
        given = sorted(n for n in EngineConfig.option_names() if n != "address" and getattr(args, n, None) is not None)
        if given:
            raise ValueError(f"--engine evaluates the served engine as it runs; drop the engine flags {given}")
        import os

        from runtime.serving.client import connect

        client = connect(args.address or os.environ.get("RAY_ADDRESS") or "auto", args.engine)
        engine = client.config
    else:
        engine = engine_config(args)
    cfg = EvalConfig(output=args.output or default_output(engine.model, args.prompt_format), engine=engine,
                     prompt_format=args.prompt_format, limit=args.limit, tasks=tasks, num_samples=args.num_samples,
                     temperature=args.temperature, top_p=args.top_p, seed=args.seed, max_tokens=args.max_tokens,
                     batch_size=args.batch_size, num_workers=args.num_workers, timeout_s=args.timeout_s,
                     memory_mb=args.memory_mb, allow_weak_sandbox=args.allow_weak_sandbox)
    summary = run_humaneval(cfg, llm=client)
    print(json.dumps(summary, indent=2))
    passes = ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if k.startswith("pass@"))
    print(f"[humaneval {summary['prompt_format']} on {summary['engine']['model']}: {passes} "
          f"({summary['num_passed']}/{summary['num_samples']} samples passed), "
          f"{summary['decode_tokens_per_s']} decode tok/s, {summary['wall_s']:.0f}s]")
    return 0
