"""The threshold study's report: Pass@1 per point with its standard error and a paired McNemar test
against the model's dense run, token-level equality across the hot sweep, a plot, the knees, and Pass@1
against decode speed (a Pareto plot and the fastest setting within 1 and 5 points of dense).

Reads what ``threshold_sweep.py`` wrote (``results/humaneval/<model>/<format>-<point>.jsonl`` and the
summaries beside them); points that are not finished yet are reported as partial. Speeds come from
``sparsity_table.py``'s JSON (``results/sparsity_*.json`` of the same weight format: batch-1 decode tok/s
over dense, measured in one run on one machine).

    python benchmarks/humaneval_report.py [--format raw] [--dtype q8]
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from _common import quiet_logs

RESULTS = Path(__file__).resolve().parent / "results"
NAME = re.compile(r"^(?P<mode>dense|gate|predictor|down|wina)-s(?P<s>\d+)(?:-hot(?P<h>\d+))?$")
SPARSE_MODES = ("gate", "predictor", "down", "wina")
MARKERS = dict(zip(("dense", *SPARSE_MODES), "*osD^"))
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
    path: Path = Path()

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


def read_run(path: Path, mode: str, sparsity: float, hot_fraction: float | None) -> Run | None:
    """One point's results; None for a point that never started (e.g. no predictors yet)."""
    passed, tokens = {}, {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("sample", 0) == 0 and "task_id" in r:
            passed[r["task_id"]], tokens[r["task_id"]] = bool(r["passed"]), r["token_ids"]
    summary_path = path.with_name(path.stem + ".summary.json")
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return Run(path.parent.name, mode, sparsity, hot_fraction, passed, tokens, summary, path) if passed else None


def load_runs(root: Path, fmt: str, dtype: str) -> list[Run]:
    """The grid and hot-sweep points (not the thread-count references, ``-t<N>``: see ``thread_references``)."""
    runs = []
    for path in sorted(root.glob(f"*/{fmt}-{dtype}-*.jsonl")):
        m = NAME.match(path.stem.removeprefix(f"{fmt}-{dtype}-"))
        if m and (run := read_run(path, m["mode"], int(m["s"]) / 100, None if m["h"] is None else int(m["h"]) / 100)):
            runs.append(run)
    return runs


def thread_references(hot: Run) -> list[tuple[int, Run]]:
    """The in-process runs of a hot sweep's mask on a set number of threads (``<point>-t<N>.jsonl``)."""
    stem = hot.path.stem.rsplit("-hot", 1)[0]
    found = ((int(p.stem.rsplit("-t", 1)[1]), read_run(p, hot.mode, hot.sparsity, None))
             for p in sorted(hot.path.parent.glob(f"{stem}-t*.jsonl")))
    return [(t, run) for t, run in found if run]


def identical(a: Run, b: Run) -> tuple[int, int]:
    """Completions token-identical between two runs, and how many they both have."""
    common = a.tokens.keys() & b.tokens.keys()
    return sum(a.tokens[t] == b.tokens[t] for t in common), len(common)


def mcnemar(base: Run, other: Run) -> tuple[int, int, float]:
    """Discordant pairs on the common problems (b: only dense passes, c: only ``other`` passes) and the
    exact two-sided McNemar p-value (binomial on b + c)."""
    from scipy.stats import binomtest

    common = base.passed.keys() & other.passed.keys()
    b = sum(base.passed[t] and not other.passed[t] for t in common)
    c = sum(other.passed[t] and not base.passed[t] for t in common)
    return b, c, (binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0)


def predictor_recall(run: Run) -> str:
    """Held-out mean recall of the predictors the run was made with, as its summary recorded it (runs made before
    summaries did: not recorded; the predictors beside the model now may be others)."""
    recorded = (run.summary.get("engine") or {}).get("predictor_recall")
    return "(not recorded)" if recorded is None else f"{recorded:.3f}"


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


Diff = tuple[float, float, float, int]      # second model's Pass@1 kept minus the first's, 95% interval, problems


def paired(runs: list[Run], dense: dict[str, Run]) -> tuple[list[str], dict[tuple[str, str, float], float],
                                                           dict[tuple[str, float], Diff]]:
    """Each (mode, sparsity) run by every model, on the problems all of them (and their dense runs) share:
    table rows, each model's Pass@1 kept there, keyed (model, mode, sparsity), and for two models the
    difference of what they keep, keyed (mode, sparsity)."""
    models = sorted(dense)
    by_point: dict[tuple[str, float], dict[str, Run]] = {}
    for r in runs:
        if r.hot_fraction is None and r.mode != "dense" and r.model in dense:
            by_point.setdefault((r.mode, r.sparsity), {})[r.model] = r
    rows, kept, diffs = [], {}, {}
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
            diffs[(mode, s)] = (kept[(models[1], mode, s)] - kept[(models[0], mode, s)], lo, hi, len(common))
            cells.append(f"{fmt_pts(diffs[(mode, s)][0])} [{fmt_pts(lo)}, {fmt_pts(hi)}]")
        rows.append(f"| {mode} | {fmt_pct(s)} | {len(common)} | " + " | ".join(cells) + " |")
    return rows, kept, diffs


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


def knee_interval(base: Run, points: list[Run], resamples: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95% bootstrap interval of the knee (problems resampled, the same draw for the dense run and every point, on
    the problems all of them ran): how far the knee can move with which problems HumanEval happens to hold."""
    import numpy as np

    tasks = sorted(set(base.passed).intersection(*(r.passed for r in points)))
    if not tasks or not points:
        return None
    points = sorted(points, key=lambda r: r.sparsity)
    idx = np.random.default_rng(seed).integers(0, len(tasks), size=(resamples, len(tasks)))
    dense = np.array([base.passed[t] for t in tasks], float)[idx].mean(1)                      # [resamples]
    kept = np.stack([np.array([r.passed[t] for t in tasks], float)[idx].mean(1) for r in points], 1)
    ok = kept >= KNEE_RETAINED * dense[:, None]                                                  # [resamples, points]
    levels = np.array([0.0] + [r.sparsity for r in points])
    first_miss = np.where(ok.all(1), len(points), (~ok).argmax(1))        # points kept before the first miss
    knees = levels[first_miss]
    return tuple(np.percentile(knees, [2.5, 97.5], method="inverted_cdf").tolist())   # a level of the grid


def load_speeds(root: Path, kind: str) -> dict[tuple[str, str, float], dict]:
    """(model, mode, target sparsity) -> sparsity_table's row (speed_ratio, tok_s, achieved sparsity, cpu) for the
    tables in ``root`` (``results/``, beside ``humaneval/``) measured in weight format ``kind``."""
    speeds: dict[tuple[str, str, float], dict] = {}
    for path in sorted(root.glob("sparsity_*.json")):
        table = json.loads(path.read_text())
        if table.get("weights") != kind:
            continue
        for row in table["rows"]:
            if row.get("speed_ratio"):
                speeds[(table["model"], row["mode"], round(row["target"], 2))] = {**row, "cpu": table.get("cpu")}
    return speeds


def levels_run(runs: list[Run], model: str, mode: str) -> list[float]:
    """The target sparsities ``model`` ran ``mode`` at (in process), ascending."""
    return sorted(r.sparsity for r in runs if r.model == model and r.mode == mode and r.hot_fraction is None)


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The (speed, Pass@1, name) points no other point beats on both (faster and at least as accurate)."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and (q[0], q[1]) != (p[0], p[1])
                                          for q in points)]
    return sorted(front)


def choices(points: list[tuple[float, float, str]], dense: float) -> list[str]:
    """The fastest setting within 1 and within 5 Pass@1 points of dense."""
    out = []
    for pts in (1, 5):
        ok = [p for p in points if p[1] >= dense - pts / 100 - 1e-9]
        best = max(ok, default=None)
        out.append("n/a" if best is None else f"{best[2]} ({best[0]:.2f}x, {fmt_pct(best[1])})")
    return out


def where(summary: dict) -> str:
    """The runtime and machine a point's samples came from (tok/s and wall s compare only on one machine)."""
    m, runtime = summary.get("machine") or {}, (summary.get("engine") or {}).get("runtime", "n/a")
    if not m:
        return runtime
    cpu = m.get("cpu")
    named = cpu and cpu not in ("x86_64", "aarch64", "arm64")      # early summaries recorded the architecture only
    return (f"{runtime}, {m.get('cpus')} CPUs" + (f" ({cpu})" if named else "")
            + (f" + {m['gpu']}" if m.get("gpu") else ""))


@dataclass
class HotCheck:
    """One model's hot sweep: completions token-identical to the reference at each GPU share."""
    model: str
    mask: str                                                    # the fixed sparsity mask, e.g. "wina 70.0%"
    reference: str
    reference_pass1: float = float("nan")                    # the reference's Pass@1 on the problems swept
    shares: list[tuple[float, int, int, float]] = field(default_factory=list)  # (GPU share, identical, compared, Pass@1)
    # The in-process engine on N threads: (N, its Pass@1, identical to the reference / compared, per share
    # identical to it / compared): whether a split changes tokens as a change of thread count does.
    threads: list[tuple[int, float, tuple[int, int], list[tuple[int, int]]]] = field(default_factory=list)


@dataclass
class Report:
    """What one prompt format and dtype's points say (for the README summary and the study document)."""
    fmt: str
    kind: str
    tables: str                                                  # the generated tables' file name
    runs: list[Run]
    dense: dict[str, Run]
    summary: list[str]                                           # the README bullets
    knees: dict[tuple[str, str], float | None]
    knee_cis: dict[tuple[str, str], tuple | None]
    diffs: dict[tuple[str, float], Diff]
    hot: list[HotCheck]
    speeds: dict[str, list]
    dense_self_ratio: dict[str, float]      # dense against itself in the speed run: how far its ratios wander


def prompt_compute(runs: list[Run]) -> str:
    """How quantized points multiplied their prompts (``prompt_compute`` in their settings): a point run with
    another float type rounds differently, so more than one here means the family mixes numerics."""
    kinds = sorted({k for r in runs if (k := (r.summary.get("settings") or {}).get("prompt_compute"))})
    return f", prompts multiplied in {' and '.join(kinds)}" if kinds else ""


def fmt_pts(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:+.1f} pts"


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


README_BEGIN, README_END = "<!-- study-summary:begin -->", "<!-- study-summary:end -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="raw", choices=["raw", "chat"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "q8", "q4"],
                    help="the runs' float dtype, or their weight format for q8/q4 runs (as threshold_sweep names them)")
    ap.add_argument("--all", action="store_true", help="every format and dtype found under --root, one report each, "
                    "and the study document with its answer, beside --root (results/humaneval_threshold.md)")
    ap.add_argument("--readme", type=Path, default=None,
                    help=f"rewrite the study summary between {README_BEGIN} and {README_END} in this file")
    ap.add_argument("--root", type=Path, default=RESULTS / "humaneval")
    ap.add_argument("--out", type=Path, default=None, help="stem of the files of one report; default (and always "
                    "with --all) beside --root: humaneval_threshold (+ -FORMAT-DTYPE when not raw/bfloat16)")
    args = ap.parse_args()
    quiet_logs()
    combos = sorted({tuple(p.stem.split("-")[:2]) for p in args.root.glob("*/*.jsonl")}) if args.all \
        else [(args.format, args.dtype)]
    reports = []
    for fmt, kind in combos:
        one = argparse.Namespace(**{**vars(args), "format": fmt, "dtype": kind})
        if args.out is None or args.all:
            suffix = "" if (fmt, kind) == ("raw", "bfloat16") else f"-{fmt}-{kind}"
            one.out = args.root.parent / f"humaneval_threshold{suffix}"
        reports.append(report(one))
    if args.all:
        (args.root.parent / "humaneval_threshold.md").write_text(study_document(reports))
    if args.readme is not None:
        text = args.readme.read_text()
        head, rest = text.split(README_BEGIN, 1)
        _, tail = rest.split(README_END, 1)
        summary = [line for r in reports for line in r.summary]
        args.readme.write_text(f"{head}{README_BEGIN}\n" + "\n".join(summary) + f"\n{README_END}{tail}")


def report(args: argparse.Namespace) -> Report:
    """One format and dtype's tables, plots and RESULT line; returns what they found."""
    runs = load_runs(args.root, args.format, args.dtype)
    models = sorted({r.model for r in runs})
    dense = {r.model: r for r in runs if r.mode == "dense" and r.hot_fraction is None}
    rows, curves, knees, knee_cis, hot_rows, hot_checks = [], {}, {}, {}, [], []
    for model in models:
        base = dense.get(model)
        for r in sorted((r for r in runs if r.model == model and r.hot_fraction is None),
                        key=lambda r: (r.mode != "dense", r.mode, r.sparsity)):
            b, c, p = mcnemar(base, r) if base and r is not base else (0, 0, 1.0)
            recall = predictor_recall(r) if r.mode == "predictor" else ""
            s = r.summary
            same = retained(base, r) if base else (float("nan"), float("nan"))
            rows.append(f"| {model} | {r.mode} | {fmt_pct(r.sparsity)} | {fmt_pct(r.achieved)} | "
                        f"{fmt_pct(r.pass1)} ± {fmt_pct(r.se)} | {fmt_pct(same[0])} | {fmt_pct(same[1])} | "
                        f"{r.n}/{NUM_PROBLEMS} | "
                        f"{'' if r is base else f'{b} / {c}, p={p:.3g}'} | {recall} | "
                        f"{s.get('throughput_tokens_per_s', 'n/a')} | {s.get('wall_s', 'n/a')} | {where(s)} |")
            if r.mode != "dense" and base:
                curves.setdefault((model, r.mode), []).append(
                    Point(r.achieved if r.achieved is not None else r.sparsity, r.sparsity, r.pass1, same[1], r.n))
        if base:
            for mode in SPARSE_MODES:
                pts = [(p.target, p.kept) for p in curves.get((model, mode), [])]
                knees[(model, mode)] = knee(pts, 1.0) if pts else None
                knee_cis[(model, mode)] = knee_interval(base, [r for r in runs if r.model == model and r.mode == mode
                                                               and r.hot_fraction is None])
        hot = sorted((r for r in runs if r.model == model and r.hot_fraction is not None), key=lambda r: r.hot_fraction)
        if hot:                  # the reference: the in-process engine at the same mask, else the first split
            ref = next((r for r in runs if r.model == model and r.hot_fraction is None and r.mode == hot[0].mode
                        and r.sparsity == hot[0].sparsity), hot[0])
            swept = set().union(*(r.passed for r in hot)) & ref.passed.keys()
            check = HotCheck(model, f"{hot[0].mode} {fmt_pct(hot[0].sparsity)}",
                             "in-process" if ref.hot_fraction is None else f"hot={ref.hot_fraction:.2f}",
                             sum(ref.passed[t] for t in swept) / len(swept) if swept else float("nan"))
            for r in hot:
                same, n = identical(ref, r)
                check.shares.append((r.hot_fraction, same, n, r.pass1))
                hot_rows.append(f"| {model} | {check.mask} | {r.hot_fraction:.2f} | {fmt_pct(r.pass1)} | "
                                f"{r.n} | {same}/{n} token-identical to {check.reference} |")
            check.threads = [(t, run.pass1, identical(ref, run), [identical(run, r) for r in hot])
                             for t, run in thread_references(hot[0])]
            hot_checks.append(check)
    paired_rows, paired_kept, diffs = paired(runs, dense)
    measured = load_speeds(args.root.parent, args.dtype)
    speed_rows, speeds = pass1_vs_speed(runs, dense, measured, args)
    self_ratio = {m: row["speed_ratio"] for (m, mode, _), row in measured.items() if mode == "dense"}

    if curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for (model, mode), pts in sorted(curves.items()):
            base = dense[model].pass1
            style = dict(marker=MARKERS[mode], linestyle="-" if model == models[-1] else "--", label=f"{model} {mode}")
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
        ci = knee_cis.get((m, mode))
        return (f"- {m} {mode}: knee {where} target sparsity (the last point keeping >= {KNEE_RETAINED:.0%} of the "
                f"dense Pass@1 on the same problems, and the next)"
                + (f"; 95% bootstrap interval of the knee [{fmt_pct(ci[0])}, {fmt_pct(ci[1])}]" if ci else ""))

    knee_lines = "\n".join(knee_line(m, mode, k) for (m, mode), k in sorted(knees.items()) if k is not None)
    args.out.with_suffix(".tables.md").write_text(
        f"<!-- generated by benchmarks/humaneval_report.py --format {args.format} -->\n\n"
        f"{args.format} prompts, {args.dtype}{prompt_compute(runs)}.\n\n## Pass@1 by point\n\n{table}\n\n"
        f"## Small vs large on the same problems\n\n{paired_table}\n\n"
        f"## Hot-neuron threshold (fixed mask)\n\n{hot_table}\n\n## Knees\n\n{knee_lines or '(not enough points)'}\n\n"
        f"## Pass@1 against decode speed\n\n{speed_rows}\n")
    print(table)
    print(paired_table)
    print(hot_table)
    print(knee_lines)
    print(speed_rows)
    result = {"bench": "humaneval_report", "format": args.format,
              "pass@1": {f"{r.model}/{r.mode}-s{round(100 * r.sparsity):02d}"
                         + ("" if r.hot_fraction is None else f"-hot{round(100 * r.hot_fraction):03d}"): round(r.pass1, 4)
                         for r in runs},
              "knees": {f"{m}/{mode}": k for (m, mode), k in knees.items()},
              "knee_intervals": {f"{m}/{mode}": ci for (m, mode), ci in knee_cis.items() if ci},
              "pass1_vs_speed": speeds}
    print("RESULT " + json.dumps(result))
    return Report(args.format, args.dtype, f"{args.out.name}.tables.md", runs, dense,
                  readme_summary(args, runs, dense, knees, knee_cis, speeds), knees, knee_cis, diffs, hot_checks,
                  speeds, self_ratio)


def readme_summary(args: argparse.Namespace, runs: list[Run], dense: dict[str, Run],
                   knees: dict[tuple[str, str], float | None], knee_cis: dict[tuple[str, str], tuple | None],
                   speeds: dict[str, list]) -> list[str]:
    """Bullets of what one format and dtype's runs say: dense Pass@1, each full sparse point against it (paired
    McNemar), the knees, and the fastest setting within 1 and 5 points when speeds were measured."""
    out = [f"- **{args.format} prompts, {args.dtype}{prompt_compute(runs)}** (`{args.out.name}.tables.md`):"]
    for model in sorted(dense):
        base = dense[model]
        points = sorted((r for r in runs if r.model == model and r.hot_fraction is None and r.mode != "dense"
                         and r.n == NUM_PROBLEMS), key=lambda r: (r.mode, r.sparsity))
        cells = [f"{r.mode} {fmt_pct(r.sparsity)}: {fmt_pct(r.pass1)} ({fmt_pts(r.pass1 - base.pass1)}, "
                 f"p={mcnemar(base, r)[2]:.2g})" for r in points]
        partial = sum(1 for r in runs if r.model == model and r.mode != "dense" and r.hot_fraction is None
                      and r.n < NUM_PROBLEMS)
        out.append(f"  - {model}: dense {fmt_pct(base.pass1)} ({base.n} problems)" + (f"; {'; '.join(cells)}" if cells
                   else "") + (f"; {partial} more point(s) on part of the problems" if partial else ""))
        found = []
        for (m, mode), k in sorted(knees.items()):
            if m != model or k is None:
                continue
            later = [s for s in levels_run(runs, model, mode) if s > k]
            ci = knee_cis.get((m, mode))
            found.append((f"{mode} past {fmt_pct(k)}" if not later else f"{mode} below {fmt_pct(later[0])}" if not k
                          else f"{mode} between {fmt_pct(k)} and {fmt_pct(later[0])}")
                         + (f" (95% interval of the knee {fmt_pct(ci[0])}-{fmt_pct(ci[1])})" if ci else ""))
        if found:
            out.append(f"    knee (last target sparsity keeping >= {KNEE_RETAINED:.0%} of dense Pass@1, and the next): "
                       f"{'; '.join(found)}")
        if len(speeds.get(model, [])) > 1:
            fast1, fast5 = choices([tuple(p) for p in speeds[model]], base.pass1)
            out.append(f"    fastest within 1 point of dense: {fast1}; within 5 points: {fast5}")
    return out


def pass1_vs_speed(runs: list[Run], dense: dict[str, Run], speeds: dict[tuple[str, str, float], dict],
                   args: argparse.Namespace) -> tuple[str, dict[str, list]]:
    """Per model, each point run on all problems with a measured speed: a table with the Pareto front marked,
    the fastest setting within 1 and 5 points of dense, and a PNG (Pass@1 over decode speed vs dense)."""
    per_model: dict[str, list[tuple[float, float, str]]] = {}
    for r in runs:
        base = dense.get(r.model)
        speed = 1.0 if r.mode == "dense" else (speeds.get((r.model, r.mode, round(r.sparsity, 2))) or {}).get(
            "speed_ratio")
        if base is None or r.hot_fraction is not None or speed is None or r.n != NUM_PROBLEMS:
            continue
        name = "dense" if r.mode == "dense" else f"{r.mode} {fmt_pct(r.sparsity)}"
        per_model.setdefault(r.model, []).append((speed, r.pass1, name))
    per_model = {m: pts for m, pts in per_model.items() if len(pts) > 1}      # dense alone says nothing
    if not per_model:
        return "(no point with both a full HumanEval run and a measured speed yet)", {}
    lines = ["| model | setting | decode speed vs dense (batch 1) | Pass@1 (164 problems) | vs dense | Pareto |",
             "|---|---|---|---|---|---|"]
    picks = ["", "| model | fastest within 1 point of dense | fastest within 5 points |", "|---|---|---|"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, pts in sorted(per_model.items()):
        front, d = pareto(pts), dense[model].pass1
        for speed, p1, name in sorted(pts):
            lines.append(f"| {model} | {name} | {speed:.2f}x | {fmt_pct(p1)} | {fmt_pts(p1 - d)} | "
                         f"{'yes' if (speed, p1, name) in front else ''} |")
        picks.append(f"| {model} | " + " | ".join(choices(pts, d)) + " |")
        for speed, p1, name in pts:
            ax.scatter(speed, 100 * p1, marker=MARKERS[name.split()[0]], s=40)
            ax.annotate(name, (speed, 100 * p1), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.plot([f[0] for f in front], [100 * f[1] for f in front], "-", alpha=0.6, label=f"{model} Pareto front")
    cpus = sorted({row.get("cpu") or "?" for row in speeds.values()})
    ax.set(xlabel="decode tok/s vs dense (batch 1, same run)", ylabel="HumanEval Pass@1 (%)",
           title=f"Pass@1 against speed ({args.format} prompts, {args.dtype} weights)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = args.out.with_name(args.out.name + "-pareto.png")
    fig.savefig(png, dpi=120)
    note = (f"\nSpeeds: `benchmarks/sparsity_table.py` ({', '.join(cpus)}); Pass@1: greedy, every problem. "
            f"![Pass@1 against speed]({png.name})")
    return "\n".join(lines + picks) + "\n" + note, {m: sorted(p) for m, p in per_model.items()}

LEVELS = (0.3, 0.5, 0.7, 0.8, 0.9)                  # the grid's target sparsities (threshold_sweep's default)
CHAT_MODES = ("wina",)           # chat prompts: dense and the best criterion on raw prompts only (issue 15)
REPRODUCE = [   # every point a resumable `pinfer eval humaneval` run; the speeds one sparsity_table run per model
    ".venv/bin/python benchmarks/threshold_sweep.py --weights q8 --kinds down,gate,predictor,wina",
    ".venv/bin/python benchmarks/threshold_sweep.py --weights q8 --format chat --kinds wina",
    (".venv/bin/python benchmarks/threshold_sweep.py --weights q8 --kinds hot --hot-mode wina --hot-sparsity 0.7 "
     "--hot-limit 20 --models qwen2.5-coder-0.5b"),
    (".venv/bin/python benchmarks/sparsity_table.py --model qwen2.5-coder-0.5b --modes oracle gate down wina "
     "predictor --out benchmarks/results/sparsity_qwen2.5-coder-0.5b.md   # and the same for the 1.5b"),
    ".venv/bin/python benchmarks/humaneval_report.py --all --readme README.md   # this file, the tables, README",
]
STUDY_SETUP = """\
Setup: greedy, up to 512 new tokens, each answer run in the sandbox (10 s timeout), up to 16 requests
continuously batched, sparse points in process (the hybrid runtime computes the same neurons at any split: the
hot sweep below checks its tokens). *raw* prompts continue the HumanEval prompt with Codex's stop sequences;
*chat* prompts go through the model's chat template and the fenced code is extracted. Weights in the engine's
default format (q8: GGUF Q8_0 blocks, 8-bit products for decode, prompt rows multiplied in the named float
type); the float-weight runs of earlier sessions are listed last, never mixed with these. Criteria: **gate**
(CATS: up/down rows skipped where |silu(gate)| < tau), **down** (gate and up dense, down rows skipped where
|a_j| < tau), **wina** (down rows skipped where |a_j| ||W_down[:, j]|| < tau), **predictor** (a per-layer
low-rank scorer trained on WINA's mask picks the rows before the FFN runs). "Target" is the calibrated level
(share of the criterion's scores below tau on held-out stdlib code, never HumanEval); "achieved" is the share of
(token, neuron) pairs skipped on HumanEval. "Kept" is a point's Pass@1 over its model's dense Pass@1 on the same
problems; the knee is the last target keeping >= 90% of it, with a 95% bootstrap interval (problems
resampled); McNemar p is exact, paired on problems.
"""
HOT_NOTE = """\
Every split computes the same neurons; what can differ is rounding. With float weights the partial sums of
the two executors add up to what the in-process engine computes closely enough that no greedy token moved. With
8-bit weights each layer rounds its input activations to 8 bits, so a last-bit difference in a sum (which
executor adds which neurons, how many threads split a reduction) can move an activation by one 8-bit step, and
over hundreds of greedy tokens that can pick another token. The in-process engine on one thread, the count each
executor runs on here, tells the causes apart: where one executor holds every neuron (shares 0 and 1) it adds
them in that engine's order, and any token it changes is a defect; in between, the two executors' partial sums
are added in another order, as a second thread's are. Sums that any split adds in one order (wider partial
sums, a fixed reduction tree) would cost decode and prompt speed on every run; the Pass@1 spread across shares
is instead the study's rounding noise floor, to read the activation points' differences against.
"""
LLAMA_NOTE = """\
qwen2.5-coder-0.5b/1.5b is a 3x step within one SwiGLU family, as LLaMA-33B/70B is a 2x step within one; what
the pair above shows (how the share of Pass@1 kept changes with size at each criterion and level) is what it
suggests for them, no more. It cannot give their numbers: LLaMA-1 33B scores ~22% on HumanEval, where floor
effects make relative losses noisy; redundancy grows with scale; and PowerInfer's 70B is a ReLU model
(ReluLLaMA-70B), whose exact zeros make activation sparsity much cheaper in quality than on SwiGLU. The same
grid runs unchanged on those models with their weights and a GPU (`benchmarks/gpu_sweep.sh`;
`configs/models.yaml` names llama-33b, llama-2-70b and relu-llama-70b).
"""


def study_document(reports: list[Report]) -> str:
    """The study's report, generated from every point: status, setup, the answer (hot threshold, knees, small vs
    large, settings to choose) and what it does not say."""
    quantized = [r for r in reports if r.kind in ("q8", "q4")]
    older = [r for r in reports if r not in quantized]
    models = sorted({m for r in reports for m in r.dense})
    out = [f"# HumanEval Pass@1 vs the hot-neuron and activation thresholds: {' vs '.join(models)}", "",
           "<!-- generated by `benchmarks/humaneval_report.py --all`: edit the script, not this file -->", "",
           "```bash", *REPRODUCE, "```", "", STUDY_SETUP, "## Status", ""]
    for r in quantized:
        out += [f"- {r.fmt} prompts, {r.kind} (`{r.tables}`): " + status(r, models)]
    out += ["", "## Answer", "", "### Hot-neuron threshold", ""]
    checks = [(r, c) for r in quantized + older for c in r.hot]
    for r, c in checks:
        cells = ", ".join(f"{h:.2f}: {same}/{n} ({fmt_pct(p1)})" for h, same, n, p1 in c.shares)
        changed = sum(n - same for _, same, n, _ in c.shares)
        out.append(f"- {c.model} ({r.fmt}, {r.kind}, {c.mask} mask): completions token-identical to the "
                   f"{c.reference} engine (Pass@1 {fmt_pct(c.reference_pass1)} on these problems) at GPU share "
                   f"{cells}: " + ("**no token changed**" if not changed else f"**{changed} completion(s) differ**"))
        for t, p1, (same, n), per_share in c.threads:
            cells = ", ".join(f"{h:.2f}: {s}/{k}" for (h, *_), (s, k) in zip(c.shares, per_share))
            out.append(f"  - against the in-process engine on {t} thread{'s' * (t > 1)} (Pass@1 {fmt_pct(p1)}; "
                       f"{same}/{n} identical to the {c.reference} engine on its default threads): {cells}")
    out += ["", HOT_NOTE] if checks else ["- (no hot sweep run yet)"]
    out += ["", "### Activation threshold: where the knee is", ""]
    for r in quantized:
        for (m, mode), k in sorted(r.knees.items()):
            if k is None:
                continue
            ci = r.knee_cis.get((m, mode))
            full = [x.sparsity for x in r.runs if x.model == m and x.mode == mode and x.hot_fraction is None
                    and x.n == NUM_PROBLEMS]
            out.append(f"- {r.fmt}, {m}, {mode}: " + (f"knee at {fmt_pct(k)} target" if k else
                       f"knee below {fmt_pct(levels_run(r.runs, m, mode)[0])} target "
                       f"(no level run keeps >= {KNEE_RETAINED:.0%})")
                       + (f" (95% interval {fmt_pct(ci[0])}-{fmt_pct(ci[1])})" if ci else "")
                       + f"; levels run on all {NUM_PROBLEMS} problems: {', '.join(fmt_pct(x) for x in sorted(full))}")
    out += ["", "### Does the larger model tolerate it better?", ""]
    verdicts, half_widths = [], []
    for r in quantized:
        for mode in sorted({mode for mode, _ in r.diffs}):
            pts = sorted((s, d) for (md, s), d in r.diffs.items() if md == mode)
            more = [s for s, d in pts if d[1] > 0]
            less = [s for s, d in pts if d[2] < 0]
            verdicts.append((len(pts), len(more), len(less)))
            half_widths += [(d[2] - d[1]) / 2 for _, d in pts]
            cells = "; ".join(f"{fmt_pct(s)}: {fmt_pts(d[0])} [{fmt_pts(d[1])}, {fmt_pts(d[2])}] ({d[3]} problems)"
                              for s, d in pts)
            out.append(f"- {r.fmt}, {mode}: Pass@1 kept, {models[-1]} minus {models[0]}: {cells}. The interval "
                       f"excludes 0 at {len(more) + len(less)} of {len(pts)} levels"
                       + (f" (larger keeps more at {', '.join(fmt_pct(s) for s in more)})" if more else "")
                       + (f" (smaller keeps more at {', '.join(fmt_pct(s) for s in less)})" if less else ""))
    total = [sum(v[i] for v in verdicts) for i in range(3)]
    if total[0]:
        out += ["", f"Over {total[0]} paired (criterion, level) points the larger model keeps measurably more of "
                f"its Pass@1 at {total[1]}, measurably less at {total[2]}, and no difference is resolved at the "
                f"other {total[0] - total[1] - total[2]} (the intervals reach ±{100 * median(half_widths):.0f} points "
                "at the median). "
                + ("No sign that the larger model of this pair tolerates activation sparsity better."
                   if total[1] <= total[2] else "The larger model of this pair tolerates it better at more points "
                   "than it tolerates it worse.")]
    out += ["", "### Which setting to choose (decode speed at batch 1, same machine)", ""]
    for r in quantized:
        for m, pts in sorted(r.speeds.items()):
            fast1, fast5 = choices([tuple(p) for p in pts], r.dense[m].pass1)
            noise = r.dense_self_ratio.get(m)
            out.append(f"- {r.fmt}, {m}: fastest within 1 point of dense: {fast1}; within 5 points: {fast5}"
                       + (f" (dense against itself in the same speed run: {noise:.2f}x)" if noise else ""))
    out += ["", "### What this says and does not say about LLaMA-33B vs LLaMA-70B", "", LLAMA_NOTE,
            "## Every point", "", *[line for r in quantized + older for line in r.summary], ""]
    return "\n".join(out)


def status(r: Report, models: list[str]) -> str:
    """Which points of this format's grid each model has run on all problems, partly, or not at all."""
    modes = CHAT_MODES if r.fmt == "chat" else SPARSE_MODES
    cells = []
    for m in models:
        have = {(x.mode, x.sparsity): x.n for x in r.runs if x.model == m and x.hot_fraction is None}
        grid = [("dense", 0.0)] + [(mode, s) for mode in modes for s in LEVELS]
        full = sum(have.get(g) == NUM_PROBLEMS for g in grid)
        partial = [f"{mode} {fmt_pct(s)} ({have[(mode, s)]})" for mode, s in grid
                   if 0 < have.get((mode, s), 0) < NUM_PROBLEMS]
        missing = [f"{mode} {fmt_pct(s)}" for mode, s in grid if (mode, s) not in have]
        cells.append(f"{m}: {full}/{len(grid)} points on all {NUM_PROBLEMS} problems"
                     + (f"; partial: {', '.join(partial)}" if partial else "")
                     + (f"; not run: {', '.join(missing)}" if missing else ""))
    return "; ".join(cells)


if __name__ == "__main__":
    main()
