"""The threshold study's report: paired McNemar counts, Pass@1 kept on the same problems, small vs large on
the problems both ran, knees and token equality across the hot sweep, from per-problem JSONL alone."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_run(root: Path, model: str, point: str, passed: list[bool], tokens: list[list[int]] | None = None,
              kind: str = "bfloat16") -> None:
    d = root / model
    d.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"task_id": f"HumanEval/{i}", "sample": 0, "passed": ok,
                         "token_ids": tokens[i] if tokens else [i]}) for i, ok in enumerate(passed)]
    (d / f"raw-{kind}-{point}.jsonl").write_text("\n".join(lines) + "\n")


def test_report_pairs_points_with_their_dense_runs(tmp_path: Path) -> None:
    root = tmp_path / "he"
    write_run(root, "small", "dense-s00", [True] * 6 + [False] * 4)               # 60%
    write_run(root, "small", "gate-s30", [True] * 6 + [False] * 4)                # keeps 100%
    write_run(root, "small", "gate-s50", [True, True, False, False, False, False])  # first 6: 6 -> 2 (33% kept)
    write_run(root, "large", "dense-s00", [True] * 8 + [False] * 2)
    write_run(root, "large", "gate-s50", [True, True, True, True, True, False, False, True])  # first 8: 8 -> 6
    write_run(root, "small", "dense-s00-hot050", [True] * 6 + [False] * 4, tokens=[[i] for i in range(9)] + [[0]])
    r = subprocess.run([sys.executable, "benchmarks/humaneval_report.py", "--root", str(root),
                        "--out", str(tmp_path / "report")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "report.tables.md").read_text()
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line for line in md.splitlines()
            if line.startswith("| small") or line.startswith("| large")}
    assert "| 4 / 0, p=0.125 |" in rows[("small", "gate", "50.0%")]            # 4 dense-only passes, none the other way
    assert "| 33.3% ± 19.2% | 100.0% | 33.3% | 6/164 |" in rows[("small", "gate", "50.0%")]
    assert "| 2 / 0, p=0.5 |" in rows[("large", "gate", "50.0%")]
    assert "| gate | 50.0% | 6 | 100.0% -> 83.3% (83.3%) | 100.0% -> 33.3% (33.3%) |" in md   # large, small on 0-5
    assert "(33.3%) | -50.0 pts [" in md                    # small's share kept minus large's, bootstrap interval
    assert "small gate: knee between 30.0% and 50.0%" in md
    # resampled problems: 30% keeps all of them in every draw, 50% loses 4 of 6 in (almost) every draw
    assert "small gate: knee between 30.0% and 50.0% target sparsity" in md and \
        "95% bootstrap interval of the knee [30.0%, 30.0%]" in md
    assert "| small | dense 0.0% | 0.50 | 60.0% | 10 | 9/10 token-identical to in-process |" in md
    assert (tmp_path / "report.png").stat().st_size > 0
    assert r.stdout.splitlines()[-1].startswith("RESULT {")


def test_pass1_against_speed_picks_the_fastest_setting_within_1_and_5_points(tmp_path: Path) -> None:
    root = tmp_path / "results" / "humaneval"
    write_run(root, "m", "dense-s00", [True] * 82 + [False] * 82, kind="q8")                   # 50.0%
    write_run(root, "m", "wina-s50", [True] * 81 + [False] * 83, kind="q8")                    # 49.4%: -0.6 pts
    write_run(root, "m", "wina-s70", [True] * 76 + [False] * 88, kind="q8")                    # 46.3%: -3.7 pts
    write_run(root, "m", "gate-s70", [True] * 40 + [False] * 124, kind="q8")                   # 24.4%
    (root / "m" / "raw-q8-dense-s00.summary.json").write_text(json.dumps({"settings": {"prompt_compute": "bfloat16"}}))
    rows = [{"mode": mode, "target": s, "speed_ratio": v} for mode, s, v in
            (("wina", 0.5, 1.1), ("wina", 0.7, 1.2), ("gate", 0.7, 1.3))]
    (tmp_path / "results" / "sparsity_m.json").write_text(json.dumps({"model": "m", "weights": "q8", "rows": rows}))
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- study-summary:begin -->\nold\n<!-- study-summary:end -->\nafter\n")
    r = subprocess.run([sys.executable, "benchmarks/humaneval_report.py", "--root", str(root), "--dtype", "q8",
                        "--out", str(tmp_path / "report"), "--readme", str(readme)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "report.tables.md").read_text()
    assert "| m | gate 70.0% | 1.30x | 24.4% | -25.6 pts | yes |" in md          # fastest: on the front
    assert "| m | wina 50.0% (1.10x, 49.4%) | wina 70.0% (1.20x, 46.3%) |" in md   # within 1 point, within 5
    assert (tmp_path / "report-pareto.png").stat().st_size > 0
    text = readme.read_text()
    assert text.startswith("before\n<!-- study-summary:begin -->\n- **raw prompts, q8, prompts multiplied in "
                           "bfloat16**") and "old" not in text
    assert "within 5 points: wina 70.0% (1.20x, 46.3%)" in text and text.endswith("<!-- study-summary:end -->\nafter\n")


def test_study_document_states_the_answer_from_every_point(tmp_path: Path) -> None:
    root = tmp_path / "results" / "humaneval"
    for model, dense in (("a-small", 100), ("b-large", 120)):                  # of 164 problems
        write_run(root, model, "dense-s00", [True] * dense + [False] * (164 - dense), kind="q8")
        write_run(root, model, "wina-s50", [True] * dense + [False] * (164 - dense), kind="q8")   # keeps 100%
    write_run(root, "a-small", "wina-s70", [True] * 95 + [False] * 69, kind="q8")     # keeps 95%
    write_run(root, "b-large", "wina-s70", [True] * 40 + [False] * 124, kind="q8")    # keeps 33%: large loses more
    write_run(root, "a-small", "gate-s30", [True] * 10 + [False] * 10, kind="q8")     # on 20 problems only
    same = [[i] for i in range(164)]
    write_run(root, "a-small", "wina-s70-hot050", [True] * 95 + [False] * 69, tokens=same, kind="q8")
    write_run(root, "a-small", "wina-s70-hot100", [True] * 95 + [False] * 69, tokens=[[999]] + same[1:], kind="q8")
    write_run(root, "a-small", "wina-s70-t1", [True] * 95 + [False] * 69, tokens=[[999]] + same[1:], kind="q8")
    rows = [{"mode": mode, "target": t, "speed_ratio": v} for mode, t, v in
            (("dense", 0.0, 1.03), ("wina", 0.5, 1.1), ("wina", 0.7, 1.2))]
    (root.parent / "sparsity_a.json").write_text(json.dumps({"model": "a-small", "weights": "q8", "rows": rows}))
    r = subprocess.run([sys.executable, "benchmarks/humaneval_report.py", "--root", str(root), "--all"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    doc = (tmp_path / "results" / "humaneval_threshold.md").read_text()
    assert (tmp_path / "results" / "humaneval_threshold-raw-q8.tables.md").exists()
    assert "a-small: 3/21 points on all 164 problems; partial: gate 30.0% (20); not run: gate 50.0%" in doc
    assert ("token-identical to the in-process engine (Pass@1 57.9% on these problems) at GPU share 0.50: 164/164 "
            "(57.9%), 1.00: 163/164 (57.9%): **1 completion(s) differ**") in doc
    # the one-thread reference is not a grid point (3/21 above) but tells the split's rounding from a defect
    assert ("against the in-process engine on 1 thread (Pass@1 57.9%; 163/164 identical to the in-process engine "
            "on its default threads): 0.50: 163/164, 1.00: 164/164") in doc
    assert "raw, a-small, wina: knee at 70.0% target" in doc and "raw, b-large, wina: knee at 50.0% target" in doc
    # the large model keeps 33% where the small keeps 95%: an interval well below 0, the only resolved one
    assert "The interval excludes 0 at 1 of 2 levels (smaller keeps more at 70.0%)" in doc
    assert "keeps measurably more of its Pass@1 at 0, measurably less at 1" in doc
    assert "at the median). No sign that the larger model of this pair tolerates activation sparsity better." in doc
    assert "raw, a-small, gate: knee below 30.0% target (no level run keeps >= 90%)" in doc
    assert ("raw, a-small: fastest within 1 point of dense: wina 50.0% (1.10x, 61.0%); within 5 points: wina 70.0% "
            "(1.20x, 57.9%) (dense against itself in the same speed run: 1.03x)"
            ) in doc
