"""`pinfer batch`: results flushed as they finish, bad lines reported and skipped, kill + resume loses and
duplicates nothing."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime import LLM, SamplingParams
from runtime.serving.batch_job import finished_ids, parse_jobs

PINFER = [sys.executable, "-m", "runtime.cli"]
N_GOOD = 40


def _input(tmp_path: Path) -> Path:
    lines = [json.dumps({"id": f"p{i}", "prompt": f"item {i}:", "max_tokens": 120, "ignore_eos": True})
             for i in range(N_GOOD)]
    lines.insert(3, '{"id": "broken", "prompt": ')                            # malformed JSON
    lines.insert(7, json.dumps({"id": "p1", "prompt": "again"}))               # duplicate id
    lines.insert(9, json.dumps({"id": "hot", "prompt": "x", "temperature": -1}))   # bad sampling value
    lines.insert(11, json.dumps({"id": "long", "prompt": "y" * 400}))          # beyond the tiny model's context
    lines.insert(13, "")                                                       # blank lines are ignored
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_parse_reports_each_bad_line_with_its_number() -> None:
    errors: list[tuple[int, object, str]] = []
    lines = ['{"id": 1, "prompt": "a"}', "not json", '{"id": 1, "prompt": "b"}', '{"prompt": "c"}',
             '{"id": 2, "prompt": "d", "colour": 1}', '{"id": 3, "messages": [{"role": "user", "content": "e"}]}',
             '{"id": 4, "prompt": "f", "max_tokens": 0}', "[1, 2]", '{"id": 5, "prompt": "g", "prompt2": ""}']
    jobs = list(parse_jobs(iter(lines), {"max_tokens": 8}, lambda n, rid, msg: errors.append((n, rid, msg))))
    assert [(j.line, j.id) for j in jobs] == [(1, "1"), (6, "3")]
    assert jobs[0].params.max_tokens == 8 and jobs[1].messages[0]["content"] == "e"
    assert [e[0] for e in errors] == [2, 3, 4, 5, 7, 8, 9]
    assert "malformed JSON" in errors[0][2] and "duplicate id" in errors[1][2] and "max_tokens" in errors[4][2]


def test_torn_last_line_is_cut_before_appending(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "text": "x"}\n{"id": "b", "te')
    assert finished_ids(out) == {"a"}
    assert out.read_text() == '{"id": "a", "text": "x"}\n'
    out.write_text('{"id": "a"}\ngarbage\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="corrupt line"):
        finished_ids(out)


def test_a_record_without_its_newline_is_not_done(tmp_path: Path) -> None:
    """A full disk can stop a write right before the newline: the record is redone, the next starts a new line."""
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\n{"id": "b"}')
    assert finished_ids(out) == {"a"} and out.read_text() == '{"id": "a"}\n'


def test_poison_lines_go_to_the_errors_file_and_the_job_finishes(tiny_model_dir: Path, tmp_path: Path) -> None:
    good = [json.dumps({"id": f"g{i}", "prompt": f"item {i}:", "max_tokens": 4}).encode() for i in range(3)]
    poison = [b"[" * 100_000,                                                  # RecursionError in json
              b'{"id": "u", "prompt": "caf\xe9"}',                             # not UTF-8
              b'{"id": "s", "prompt": "a \\ud800 b"}',                        # a lone surrogate in the prompt
              b'{"id": "\\udfff", "prompt": "x"}',                            # ... in the id
              b'{"id": "big", "prompt": "x", "seed": 100000000000000000000000}',
              b'{"id": "cold", "prompt": "x", "max_tokens": 4, "temperature": 1e-40}']    # greedy: fine
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b"\n".join([good[0], *poison, *good[1:]]) + b"\n")
    cmd = [*PINFER, "batch", "--input", str(inp), "--output", str(out), "--model", str(tiny_model_dir), "--local",
           "--threads", "1", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(finished_ids(out)) == ["cold", "g0", "g1", "g2"]
    errors = [json.loads(line) for line in Path(str(out) + ".errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [2, 3, 4, 5, 6]
    assert "nested too deeply" in errors[0]["error"] and "UTF-8" in errors[1]["error"]
    assert all("surrogate" in e["error"] for e in errors[2:4]) and "seed" in errors[4]["error"]
    bad_dir = subprocess.run([*cmd[:7], str(tmp_path / "nowhere" / "out.jsonl"), *cmd[8:]], capture_output=True,
                             text=True, timeout=60)
    assert bad_dir.returncode != 0 and "no directory" in bad_dir.stderr


def test_killed_job_resumes_without_losing_or_duplicating(tiny_model_dir: Path, tmp_path: Path) -> None:
    inp, out = _input(tmp_path), tmp_path / "out.jsonl"
    cmd = [*PINFER, "batch", "--input", str(inp), "--output", str(out), "--model", str(tiny_model_dir),
           "--local", "--threads", "1", "--concurrency", "2", "--no-progress"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while (not out.exists() or out.read_text().count("\n") < 3) and time.monotonic() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    first = finished_ids(out)
    assert 3 <= len(first) < N_GOOD, "the job should have been killed mid-run"

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])["summary"]
    assert summary["already_done"] == len(first) and summary["completed"] == N_GOOD - len(first)
    assert summary["errors"] == 4

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(f"p{i}" for i in range(N_GOOD))      # each id exactly once
    llm = LLM(str(tiny_model_dir))
    try:
        for r in records[::7]:
            i = int(r["id"][1:])
            want = llm.generate(f"item {i}:", SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True))[0]
            assert r["token_ids"] == want.token_ids and r["text"] == want.text
    finally:
        llm.shutdown()
    errors = [json.loads(line) for line in Path(str(out) + ".errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["id"]) for e in errors] == [(4, None), (8, "p1"), (10, "hot"), (12, "long")]
    assert "exceeds the model context" in errors[3]["error"]

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)      # nothing left to do
    assert json.loads(again.stdout.strip().splitlines()[-1])["summary"]["completed"] == 0
    assert len(out.read_text().splitlines()) == N_GOOD
