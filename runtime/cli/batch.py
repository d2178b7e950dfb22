"""``pinfer batch``: argument parsing and the engine choice for the resumable JSONL job runner."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.cli.args import add_engine_args, add_sampling_args, llm_from_args
from runtime.serving.batch_job import SAMPLING_FIELDS, BatchJob, finished_ids


def cmd_batch(args: argparse.Namespace) -> int:
    if not args.input.is_file():
        raise FileNotFoundError(f"no input file {args.input}")
    errors = args.errors or args.output.with_name(args.output.name + ".errors.jsonl")
    for path in (args.output, errors):                    # before the model loads: a bad path fails at once
        if not path.parent.is_dir():
            raise FileNotFoundError(f"no directory {path.parent} for {path}")
    finished_ids(args.output)                             # an output that is not one of ours is refused now too
    defaults = {k: getattr(args, k) for k in SAMPLING_FIELDS if k != "ignore_eos"}
    llm = None
    if args.engine:                       # a served engine (`pinfer serve`) on the cluster
        from runtime.serving.client import connect

        client = connect(args.address or "auto", args.engine)
    else:
        client = llm = llm_from_args(args)
    try:
        summary = BatchJob(client, args.concurrency).run(args.input, args.output, errors, defaults,
                                                         progress=not args.no_progress)
    finally:
        if llm is not None:
            llm.shutdown()
    print(json.dumps({"summary": summary.to_dict(), "output": str(args.output), "errors": str(errors)}))
    if summary.errors:
        print(f"[{summary.errors} line(s) failed; see {errors}]", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", help="run a JSONL file of prompts (resumable)",
        description="Run every line of a JSONL file ({\"id\", \"prompt\" | \"messages\", optional sampling "
                    "fields}) and append each result to the output as soon as it finishes. A rerun skips ids "
                    "already in the output; malformed lines and duplicate ids go to the errors file with their "
                    "line number. Also runs as `ray job submit -- pinfer batch ...`.")
    p.add_argument("--input", type=Path, required=True, help="prompts, one JSON object per line")
    p.add_argument("--output", type=Path, required=True, help="results JSONL (appended; resumed from)")
    p.add_argument("--errors", type=Path, default=None, help="bad lines (default: OUTPUT.errors.jsonl)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once (default 32)")
    p.add_argument("--engine", default=None, metavar="NAME",
                   help="send the prompts to the engine NAME started by `pinfer serve` instead of loading one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_args(p, is_hybrid=True)
    add_sampling_args(p)
    p.set_defaults(fn=cmd_batch)
