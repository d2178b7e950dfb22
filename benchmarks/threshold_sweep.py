"""The threshold study's runs: HumanEval Pass@1 across hot and activation thresholds, for each model.

Points (each one ``pinfer eval humaneval`` run with its own JSONL under ``--out``, resumed on rerun, so
a long sweep finishes over several invocations; interrupt it at any time):
- ``dense``: the anchor of each model (in process);
- ``gate`` / ``predictor`` / ``down`` / ``wina`` at each target activation sparsity (in process: the same
  neurons as the hybrid runtime at any split, which ``tests/test_sparsity.py`` checks);
- ``hot``: the hybrid Ray runtime at each GPU share of neurons, the mask fixed (``--hot-mode``), and the
  in-process engine on one thread (``-t1``) beside it; the report checks the completions token by token.

    python benchmarks/threshold_sweep.py --models qwen2.5-coder-0.5b,qwen2.5-coder-1.5b
    python benchmarks/humaneval_report.py          # table, plot, McNemar, answer
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from _common import quiet_logs

RESULTS = Path(__file__).resolve().parent / "results" / "humaneval"
SPARSE_MODES = ("predictor", "gate", "down", "wina")
logger = logging.getLogger("threshold_sweep")


@dataclass(frozen=True, slots=True)
class Point:
    model: str
    mode: str                           # dense | gate | predictor | down | wina
    sparsity: float = 0.0               # target activation sparsity
    hot_fraction: float | None = None   # None: in process; else the hybrid runtime with this GPU share
    threads: int | None = None          # in process on this many threads (default: every core)

    @property
    def name(self) -> str:
        name = f"{self.mode}-s{round(self.sparsity * 100):02d}"
        if self.hot_fraction is not None:
            name += f"-hot{round(self.hot_fraction * 100):03d}"
        return name if self.threads is None else f"{name}-t{self.threads}"


def points(models: list[str], kinds: list[str], sparsities: list[float], hot_fractions: list[float],
           hot_mode: str, hot_sparsity: float) -> list[Point]:
    """Most informative first: every model's anchor, then the activation points, then the hot sweep."""
    out = [Point(m, "dense") for m in models]
    for s in sparsities:
        out += [Point(m, mode, s) for mode in SPARSE_MODES if mode in kinds and s > 0 for m in models]
    if "hot" in kinds:          # and the in-process engine on one thread, as each executor runs on 2 cores
        out += [Point(m, hot_mode, hot_sparsity, h) for m in models for h in hot_fractions]
        out += [Point(m, hot_mode, hot_sparsity, threads=1) for m in models]
    return out


def output_path(out: Path, fmt: str, dtype: str, p: Point) -> Path:
    return out / p.model / f"{fmt}-{dtype}-{p.name}.jsonl"


def main() -> None:
    from runtime.config import WEIGHT_FORMATS  # pure Python: no torch yet

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    ap.add_argument("--format", default="raw", choices=["raw", "chat"], help="prompt format (see pinfer eval)")
    ap.add_argument("--kinds", default="predictor,gate,hot",
                    help=f"which point kinds besides dense: {', '.join(SPARSE_MODES)}, hot")
    ap.add_argument("--sparsities", default="0.3,0.5,0.7,0.8,0.9")
    ap.add_argument("--hot-fractions", default="0,0.25,0.5,0.75,1.0")
    ap.add_argument("--hot-mode", default="dense", choices=["dense", *SPARSE_MODES],
                    help="sparsity mode held fixed during the hot sweep")
    ap.add_argument("--hot-sparsity", type=float, default=0.0, help="its activation sparsity")
    ap.add_argument("--hot-limit", type=int, default=None, help="problems for the (slow) hot sweep; default all")
    ap.add_argument("--limit", type=int, default=None, help="first N problems only (quick looks)")
    ap.add_argument("--only", default=None, help="comma-separated point names to run (e.g. dense-s00,predictor-s50)")
    ap.add_argument("--batch-size", type=int, default=16, help="requests in flight at once")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="bfloat16 (default) doubles batched decode speed on CPUs with avx512_bf16")
    ap.add_argument("--weights", default="fp32", choices=WEIGHT_FORMATS,
                    help="weight format of every point: fp32 (default; the grid measured so far, in --dtype) or "
                         "q8/q4 (results named after the format instead of the dtype)")
    ap.add_argument("--gpu-share", type=float, default=None,
                    help="run the activation points on the hybrid runtime with this GPU share of neurons too (on a "
                         "CUDA machine: attention and the hot neurons on the GPU; see gpu_sweep.sh); default in process")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--budget-minutes", type=float, default=None, help="start no new point after this long")
    args = ap.parse_args()
    quiet_logs()
    logging.getLogger("threshold_sweep").setLevel(logging.INFO)

    from runtime import EngineConfig
    from runtime.evals.harness import EvalConfig, run_humaneval
    from runtime.evals.results import SettingsMismatchError
    from runtime.model.registry import resolve_model
    from runtime.sparsity.artifacts import MissingArtifactError
    from runtime.sparsity.online import artifacts_digest

    grid = points(args.models.split(","), args.kinds.split(","), [float(s) for s in args.sparsities.split(",")],
                  [float(h) for h in args.hot_fractions.split(",")], args.hot_mode, args.hot_sparsity)
    if args.only:
        wanted = set(args.only.split(","))
        grid = [p for p in grid if p.name in wanted]
    t0 = time.perf_counter()
    done, skipped = [], []
    for p in grid:
        if args.budget_minutes is not None and time.perf_counter() - t0 > args.budget_minutes * 60:
            logger.info("time budget spent; rerun to go on")
            break
        engine = EngineConfig.resolve(model=p.model, weights=args.weights, dtype=args.dtype, sparsity=p.mode,
                                      activation_sparsity=p.sparsity,
                                      hot_fraction=args.gpu_share if p.hot_fraction is None else p.hot_fraction,
                                      num_threads=p.threads)
        kind = args.dtype if args.weights == "fp32" else args.weights
        cfg = EvalConfig(output=output_path(args.out, args.format, kind, p), engine=engine,
                         prompt_format=args.format,
                         limit=args.hot_limit if (p.hot_fraction is not None or p.threads) and args.hot_limit
                         else args.limit,
                         max_tokens=args.max_tokens, batch_size=args.batch_size)
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
        logger.info("point %s / %s", p.model, p.name)
        try:                                     # a mode whose offline results are missing is skipped
            artifacts_digest(resolve_model(p.model), engine)
            summary = run_humaneval(cfg)
        except MissingArtifactError as e:
            logger.warning("skipping %s %s: %s", p.model, p.name, e)
            continue
        except SettingsMismatchError as e:      # e.g. made with thresholds/predictors since re-prepared: kept as is
            logger.warning("skipping %s %s: %s", p.model, p.name, e)
            skipped.append(p.name)
            continue
        done.append({"model": p.model, "point": p.name, "pass@1": summary["pass@1"],
                     "num_problems": summary["num_problems"], "wall_s": summary["wall_s"]})
        print(json.dumps(done[-1]), flush=True)
    print(f"threshold sweep: {len(done)} points run or resumed in {time.perf_counter() - t0:.0f} s"
          + (f"; {len(skipped)} skipped, their results made with other settings: {', '.join(skipped)}" if skipped
             else ""))
    print("RESULT " + json.dumps({"bench": "threshold_sweep", "points": done}))


if __name__ == "__main__":
    main()
