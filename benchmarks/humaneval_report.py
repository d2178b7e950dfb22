"""The threshold study's report: Pass@1 per point with its standard error and a paired McNemar test
against the model's dense run, token-level equality across the hot sweep, a plot, and the knees.

Reads what ``threshold_sweep.py`` wrote (``results/humaneval/<model>/<format>-<point>.jsonl`` and the
summaries beside them); points that are not finished yet are reported as partial.

    python benchmarks/humaneval_report.py [--format raw]
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from _common import quiet_logs

RESULTS = Path(__file__).resolve().parent / "results"
NAME = re.compile(r"^(?P<mode>dense|gate|predictor)-s(?P<s>\d+)(?:-hot(?P<h>\d+))?$")
NUM_PROBLEMS = 164
KNEE_RETAINED = 0.9          # the knee: the last sparsity keeping >= 90% of the dense Pass@1


@dataclass
class Run:
    model: str
    mode: str
    sparsity: float
    hot_fraction: float | None
    passed: dict[str, bool]                  # task_id -> passed (sample 0)
    tokens: dict[str, list[int]]
    summary: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.passed)

    @property
    def pass1(self) -> float:
        return sum(self.passed.values()) / self.n if self.n else float("nan")

    @property
    def se(self) -> float:
        p = self.pass1
        return math.sqrt(p * (1 - p) / self.n) if self.n else float("nan")

    @property
    def achieved(self) -> float | None:
        return (self.summary.get("engine") or {}).get("achieved_sparsity")


def load_runs(root: Path, fmt: str, dtype: str) -> list[Run]:
    runs = []
    for path in sorted(root.glob(f"*/{fmt}-{dtype}-*.jsonl")):
        m = NAME.match(path.stem.removeprefix(f"{fmt}-{dtype}-"))
        if not m:
            continue
        passed, tokens = {}, {}
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("sample", 0) == 0 and "task_id" in r:
                passed[r["task_id"]], tokens[r["task_id"]] = bool(r["passed"]), r["token_ids"]
        summary_path = path.with_name(path.stem + ".summary.json")
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if passed:                                # a point that never started (e.g. no predictors yet) is skipped
            runs.append(Run(path.parent.name, m["mode"], int(m["s"]) / 100,
                            None if m["h"] is None else int(m["h"]) / 100, passed, tokens, summary))
    return runs


def mcnemar(base: Run, other: Run) -> tuple[int, int, float]:
    """Discordant pairs on the common problems (b: only dense passes, c: only ``other`` passes) and the
    exact two-sided McNemar p-value (binomial on b + c)."""
    from scipy.stats import binomtest

    common = base.passed.keys() & other.passed.keys()
    b = sum(base.passed[t] and not other.passed[t] for t in common)
    c = sum(other.passed[t] and not base.passed[t] for t in common)
    return b, c, (binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0)


def predictor_recall(model: str, sparsity: float) -> float | None:
    """Held-out mean recall of the model's predictors at this level (their manifest beside the model)."""
    try:
        from runtime.model.registry import resolve_model
        from runtime.sparsity.artifacts import sparsity_tag

        manifest = json.loads((resolve_model(model) / "sparsity" / "predictors.json").read_text())
        return float(manifest["levels"][sparsity_tag(sparsity)]["mean"]["recall"])
    except Exception:            # not trained at this level: the table says so
        return None


@dataclass(frozen=True)
class Point:
    achieved: float
    target: float
    pass1: float
    kept: float          # Pass@1 over the dense Pass@1 on the same problems
    n: int


def retained(base: Run, r: Run) -> tuple[float, float]:
    """Dense Pass@1 on ``r``'s problems, and the share of it ``r`` keeps."""
    common = [t for t in r.passed if t in base.passed]
    dense = sum(base.passed[t] for t in common) / len(common) if common else float("nan")
    point = sum(r.passed[t] for t in common) / len(common) if common else float("nan")
    return dense, (point / dense if dense else float("nan"))


def paired(runs: list[Run], dense: dict[str, Run]) -> tuple[list[str], dict[tuple[str, str, float], float]]:
    """Each (mode, sparsity) run by every model, on the problems all of them (and their dense runs) share:
    table rows, and each model's Pass@1 kept there, keyed (model, mode, sparsity)."""
    models = sorted(dense)
    by_point: dict[tuple[str, float], dict[str, Run]] = {}
    for r in runs:
        if r.hot_fraction is None and r.mode != "dense" and r.model in dense:
            by_point.setdefault((r.mode, r.sparsity), {})[r.model] = r
    rows, kept = [], {}
    for (mode, s), got in sorted(by_point.items()):
        if len(models) < 2 or set(got) != set(models):
            continue
        common = set.intersection(*(set(got[m].passed) & set(dense[m].passed) for m in models))
        if not common:
            continue
        cells = []
        for m in models:
            d = sum(dense[m].passed[t] for t in common) / len(common)
            p = sum(got[m].passed[t] for t in common) / len(common)
            kept[(m, mode, s)] = p / d if d else float("nan")
            cells.append(f"{fmt_pct(d)} -> {fmt_pct(p)} ({fmt_pct(kept[(m, mode, s)])})")
        if len(models) == 2:
            lo, hi = kept_difference_ci(dense, got, models, sorted(common))
            cells.append(f"{fmt_pts(kept[(models[1], mode, s)] - kept[(models[0], mode, s)])} "
                         f"[{fmt_pts(lo)}, {fmt_pts(hi)}]")
        rows.append(f"| {mode} | {fmt_pct(s)} | {len(common)} | " + " | ".join(cells) + " |")
    return rows, kept


def kept_difference_ci(dense: dict[str, Run], got: dict[str, Run], models: list[str], tasks: list[str],
                       resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval (problems resampled) of the second model's Pass@1 kept minus the first's."""
    import numpy as np

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(tasks), size=(resamples, len(tasks)))

    def kept(m: str) -> np.ndarray:
        d = np.array([dense[m].passed[t] for t in tasks], float)[idx].mean(1)
        p = np.array([got[m].passed[t] for t in tasks], float)[idx].mean(1)
        return np.divide(p, d, out=np.full_like(p, np.nan), where=d > 0)

    diff = kept(models[1]) - kept(models[0])
    return tuple(np.nanpercentile(diff, [2.5, 97.5]).tolist())


def knee(points: list[tuple[float, float]], dense: float) -> float | None:
    """Largest sparsity up to which every point keeps >= KNEE_RETAINED of ``dense`` (Pass@1 or 1.0 for shares)."""
    best = 0.0
    for s, p in sorted(points):
        if p < KNEE_RETAINED * dense:
            break
        best = s
    return best if points else None


def where(summary: dict) -> str:
    """The runtime and machine a point's samples came from (tok/s and wall s compare only on one machine)."""
    m, runtime = summary.get("machine") or {}, (summary.get("engine") or {}).get("runtime", "n/a")
    if not m:
        return runtime
    return f"{runtime}, {m.get('cpus')} CPUs" + (f" + {m['gpu']}" if m.get("gpu") else "")


def fmt_pts(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:+.1f} pts"


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="raw", choices=["raw", "chat"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--root", type=Path, default=RESULTS / "humaneval")
    ap.add_argument("--out", type=Path, default=None, help="default: results/humaneval_threshold (+ -FORMAT-DTYPE "
                    "when not raw/bfloat16)")
    args = ap.parse_args()
    quiet_logs()
    if args.out is None:
        suffix = "" if (args.format, args.dtype) == ("raw", "bfloat16") else f"-{args.format}-{args.dtype}"
        args.out = RESULTS / f"humaneval_threshold{suffix}"

    runs = load_runs(args.root, args.format, args.dtype)
    models = sorted({r.model for r in runs})
    dense = {r.model: r for r in runs if r.mode == "dense" and r.hot_fraction is None}
    rows, curves, knees, hot_rows = [], {}, {}, []
    for model in models:
        base = dense.get(model)
        for r in sorted((r for r in runs if r.model == model and r.hot_fraction is None),
                        key=lambda r: (r.mode != "dense", r.mode, r.sparsity)):
            b, c, p = mcnemar(base, r) if base and r is not base else (0, 0, 1.0)
            recall = predictor_recall(model, r.sparsity) if r.mode == "predictor" else None
            s = r.summary
            same = retained(base, r) if base else (float("nan"), float("nan"))
            rows.append(f"| {model} | {r.mode} | {fmt_pct(r.sparsity)} | {fmt_pct(r.achieved)} | "
                        f"{fmt_pct(r.pass1)} ± {fmt_pct(r.se)} | {fmt_pct(same[0])} | {fmt_pct(same[1])} | "
                        f"{r.n}/{NUM_PROBLEMS} | "
                        f"{'' if r is base else f'{b} / {c}, p={p:.3g}'} | {'' if recall is None else f'{recall:.3f}'} | "
                        f"{s.get('throughput_tokens_per_s', 'n/a')} | {s.get('wall_s', 'n/a')} | {where(s)} |")
            if r.mode != "dense" and base:
                curves.setdefault((model, r.mode), []).append(
                    Point(r.achieved if r.achieved is not None else r.sparsity, r.sparsity, r.pass1, same[1], r.n))
        if base:
            for mode in ("gate", "predictor"):
                pts = [(p.target, p.kept) for p in curves.get((model, mode), [])]
                knees[(model, mode)] = knee(pts, 1.0) if pts else None
        hot = sorted((r for r in runs if r.model == model and r.hot_fraction is not None), key=lambda r: r.hot_fraction)
        if hot:                  # the reference: the in-process engine at the same mask, else the first split
            ref = next((r for r in runs if r.model == model and r.hot_fraction is None and r.mode == hot[0].mode
                        and r.sparsity == hot[0].sparsity), hot[0])
            ref_name = "in-process" if ref.hot_fraction is None else f"hot={ref.hot_fraction:.2f}"
            for r in hot:
                common = sorted(ref.tokens.keys() & r.tokens.keys())
                same = sum(ref.tokens[t] == r.tokens[t] for t in common)
                hot_rows.append(f"| {model} | {r.mode} {fmt_pct(r.sparsity)} | {r.hot_fraction:.2f} | {fmt_pct(r.pass1)} | "
                                f"{r.n} | {same}/{len(common)} token-identical to {ref_name} |")
    paired_rows, paired_kept = paired(runs, dense)

    if curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for (model, mode), pts in sorted(curves.items()):
            base = dense[model].pass1
            style = dict(marker="o" if mode == "predictor" else "s", linestyle="-" if mode == "predictor" else "--",
                         label=f"{model} {mode}")
            full = sorted([(0.0, base)] + [(p.achieved, p.pass1) for p in pts if p.n == dense[model].n])
            ax.plot([100 * x for x, _ in full], [100 * y for _, y in full], **style)
            kept = sorted([(0.0, 1.0)] + [(p.achieved, paired_kept.get((model, mode, p.target), p.kept)) for p in pts])
            ax2.plot([100 * x for x, _ in kept], [100 * y for _, y in kept], **style)
        ax.set(xlabel="achieved activation sparsity (%)", ylabel="HumanEval Pass@1 (%)",
               title=f"Pass@1, all 164 problems ({args.format} prompts, greedy)")
        ax2.set(xlabel="achieved activation sparsity (%)", ylabel="% of dense Pass@1 kept (same problems)",
                title="Pass@1 kept vs own dense run (same problems; both models' where both ran)")
        ax2.axhline(100 * KNEE_RETAINED, color="gray", ls=":", lw=1)
        for a in (ax, ax2):
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=120)

    table = "\n".join(["| model | mode | target sparsity | achieved | Pass@1 ± SE | dense on these problems | kept "
                       "| problems | McNemar vs dense "
                       "(dense-only / point-only passes, exact p) | predictor recall | tok/s (all in flight) | wall s | where |",
                       "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows])
    diff_col = [f"kept, {models[1]} minus {models[0]} [95% paired bootstrap]"] if len(models) == 2 else []
    paired_table = "\n".join(["| mode | target | problems both ran | " + " | ".join(
        [f"{m}: dense -> point (kept)" for m in models] + diff_col) + " |",
        "|---|---|---|" + "---|" * (len(models) + len(diff_col)), *paired_rows]) if paired_rows \
        else "(no point run by both models yet)"
    hot_table = "\n".join(["| model | fixed mask | GPU share | Pass@1 | problems | completions |", "|---|---|---|---|---|---|",
                           *hot_rows]) if hot_rows else "(no hot-sweep points yet)"
    def knee_line(m: str, mode: str, k: float) -> str:
        later = sorted(p.target for p in curves[(m, mode)] if p.target > k)
        where = f"between {fmt_pct(k)} and {fmt_pct(later[0])}" if later else f"past {fmt_pct(k)} (the last point run)"
        return (f"- {m} {mode}: knee {where} target sparsity (the last point keeping >= {KNEE_RETAINED:.0%} of the "
                f"dense Pass@1 on the same problems, and the next)")

    knee_lines = "\n".join(knee_line(m, mode, k) for (m, mode), k in sorted(knees.items()) if k is not None)
    args.out.with_suffix(".tables.md").write_text(
        f"<!-- generated by benchmarks/humaneval_report.py --format {args.format} -->\n\n## Pass@1 by point\n\n{table}\n\n"
        f"## Small vs large on the same problems\n\n{paired_table}\n\n"
        f"## Hot-neuron threshold (fixed mask)\n\n{hot_table}\n\n## Knees\n\n{knee_lines or '(not enough points)'}\n")
    print(table)
    print(paired_table)
    print(hot_table)
    print(knee_lines)
    result = {"bench": "humaneval_report", "format": args.format,
              "pass@1": {f"{r.model}/{r.mode}-s{round(100 * r.sparsity):02d}"
                         + ("" if r.hot_fraction is None else f"-hot{round(100 * r.hot_fraction):03d}"): round(r.pass1, 4)
                         for r in runs},
              "knees": {f"{m}/{mode}": k for (m, mode), k in knees.items()}}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
