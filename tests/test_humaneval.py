"""The HumanEval harness: sandbox verdicts, pass@k, chat code extraction, resumable runs, the CLI."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.evals.harness import EvalConfig, run_humaneval, sample_seed
from runtime.evals.humaneval import Problem, build_prompt, code_blocks, extract_code, load_problems, solution_source
from runtime.evals.passk import mean_pass_at_k, pass_at_k
from runtime.evals.sandbox import Sandbox, SandboxLimits, isolation_report, namespaces_available, run_program

FAST = SandboxLimits(timeout_s=2.0)


@pytest.fixture(scope="module")
def problems() -> dict[str, Problem]:
    return {p.task_id: p for p in load_problems()}


def test_every_canonical_solution_passes(problems: dict[str, Problem]) -> None:
    assert len(problems) == 164
    programs = [p.program(p.prompt + p.canonical_solution) for p in problems.values()]
    with Sandbox(4, SandboxLimits(timeout_s=20.0)) as sandbox:
        results = sandbox.map(programs)
    failed = {tid: (r.status, r.detail) for tid, r in zip(problems, results) if not r.passed}
    assert not failed


@pytest.mark.parametrize("body, status, detail", [
    ("    return True\n", "failed", "AssertionError"),                         # wrong answer
    ("    return numbers[\n", "error", "SyntaxError"),
    ("    while True:\n        pass\n", "timeout", "timed out"),
    ("    x = bytearray(8 * 2**30)\n", "error", "MemoryError"),                 # over RLIMIT_AS, not the box's RAM
    ("    import sys\n    sys.exit(0)\n", "error", "exited"),                    # an early exit never ran check()
    ("    import os\n    os._exit(0)\n", "error", "PermissionError"),
    ("    import subprocess\n    subprocess.run(['true'])\n", "error", "PermissionError"),
    ("    import posix\n    posix._exit(0)\n", "error", "no completion token"),      # a faked pass
])
def test_broken_completions_do_not_pass(problems: dict[str, Problem], body: str, status: str, detail: str) -> None:
    p = problems["HumanEval/0"]
    r = run_program(p.program(p.prompt + body), FAST)
    assert (r.status, r.passed) == (status, False) and detail in r.detail, r


@pytest.mark.skipif(not namespaces_available(), reason="unshare cannot make namespaces here (needs root)")
def test_hostile_programs_cannot_reach_the_network_the_harness_or_outlive_the_timeout(tmp_path: Path) -> None:
    import socket

    with socket.socket() as server:                    # a loopback service (the HTTP API or Ray would do)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        r = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n", FAST)
        assert r.status == "error" and ("Errno" in r.detail or "refused" in r.detail), r
    me = os.getpid()
    r = run_program(f"print(open('/proc/{me}/environ', 'rb').read()[:40])\n", FAST)       # the harness's secrets
    assert r.status == "error" and "FileNotFoundError" in r.detail, r
    r = run_program(f"import posix, signal\nposix.kill({me}, signal.SIGKILL)\n", FAST)   # kill the harness
    assert r.status == "error" and "ProcessLookupError" in r.detail, r
    marker = tmp_path / "late.txt"                      # a child left behind writes after the timeout
    r = run_program(f"import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n    time.sleep(3)\n"
                    f"    posix.write(posix.open({str(marker)!r}, posix.O_WRONLY | posix.O_CREAT), b'x')\n"
                    f"    posix._exit(0)\ntime.sleep(60)\n", FAST)
    assert r.status == "timeout", r
    time.sleep(4)
    assert not marker.exists()
    assert "namespaces" in isolation_report()


def test_programs_cannot_touch_files_outside_their_private_dir(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    attempts = [f"open({str(target)!r}, 'w').write('x')",
                f"import pathlib; pathlib.Path({str(target)!r}).write_text('x')",
                f"import os; os.system('touch {target}')",
                f"import os; os.remove({str(tmp_path / 'keep.txt')!r})"]
    (tmp_path / "keep.txt").write_text("keep")
    for code in attempts:
        r = run_program(code, FAST)
        assert r.status == "error" and "PermissionError" in r.detail, (code, r)
    assert not target.exists() and (tmp_path / "keep.txt").exists()


def test_each_program_runs_in_a_private_temp_dir_that_is_removed() -> None:
    probe = ("import os, stat, sys\nopen('scratch.txt', 'w').write('ok')\n"
             "print(os.getcwd(), oct(stat.S_IMODE(os.stat('.').st_mode)), os.environ.get('HOME'), "
             "sorted(k for k in os.environ if 'proxy' in k.lower()), sys.flags.isolated)")
    os.environ["HTTPS_PROXY"] = "http://proxy.invalid:1"
    try:
        r = run_program(probe, FAST)
    finally:
        del os.environ["HTTPS_PROXY"]
    cwd, mode, home, proxies, isolated = r.output.split(maxsplit=4)
    assert r.passed and mode == "0o700" and home == cwd and proxies == "[]" and isolated.strip() == "1"
    assert cwd != os.getcwd() and not os.path.exists(cwd)


def test_output_is_truncated_and_keeps_the_error() -> None:
    r = run_program("for i in range(5000): print('line', i)\nraise ValueError('the end')", FAST)
    assert r.status == "error" and r.detail == "ValueError: the end" and len(r.output) < 2100


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 3, 1, 0.3), (3, 1, 2, 2 / 3),
    (10, 3, 5, 1 - 21 / 252),                # 1 - C(7,5)/C(10,5)
    (5, 4, 2, 1.0),                          # n - c < k: every pair holds a correct one
    (200, 10, 100, 1 - math.comb(190, 100) / math.comb(200, 100)),
])
def test_pass_at_k_matches_the_closed_form(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_mean_pass_at_k_skips_k_above_the_sample_count() -> None:
    assert mean_pass_at_k([(2, 1), (2, 0)], (1, 2, 10)) == {"pass@1": 0.25, "pass@2": 0.5}
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


# Answers in the shapes Qwen2.5-Coder-0.5B-Instruct gives to the chat prompt (the harness primes "```python\n").
CHAT_FULL = ("from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
             "    for i in range(len(numbers)):\n        for j in range(i + 1, len(numbers)):\n"
             "            if abs(numbers[i] - numbers[j]) < threshold:\n                return True\n"
             "    return False\n\n"
             "# Check function with provided data points\nprint(has_close_elements([1.0, 2.0, 3.0], 0.5))\n"
             "assert has_close_elements([1.0, 2.0], 5.0) is False  # the model's own (wrong) test\n")
CHAT_PROSE = ("Here is the completed function:\n\n```python\ndef has_close_elements(numbers, threshold):\n"
              "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```\n\n"
              "Example usage:\n```python\nprint(has_close_elements([1.0, 2.8, 3.0], 0.3))\n```\n")
CHAT_BODY = ("for i, a in enumerate(numbers):\n    for b in numbers[i + 1:]:\n        if abs(a - b) < threshold:\n"
             "            return True\nreturn False")
CHAT_MAIN = ("def has_close_elements(numbers, threshold):\n    numbers = sorted(numbers)\n"
             "    return any(b - a < threshold for a, b in zip(numbers, numbers[1:]))\n\n"
             "if __name__ == \"__main__\":\n    import sys\n    sys.exit(0)\n")


@pytest.mark.parametrize("answer", [CHAT_FULL, CHAT_PROSE, CHAT_BODY, CHAT_MAIN])
def test_chat_answers_become_passing_programs(problems: dict[str, Problem], answer: str) -> None:
    p = problems["HumanEval/0"]
    solution = solution_source(p, "chat", answer)
    assert "print(" not in solution and "assert" not in solution and "__main__" not in solution
    assert run_program(p.program(solution), FAST).passed


def test_chat_extraction_keeps_the_prompt_helpers(problems: dict[str, Problem]) -> None:
    p = problems["HumanEval/38"]                       # decode_cyclic needs the prompt's encode_cyclic
    answer = "def decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n"
    solution = solution_source(p, "chat", answer)
    assert solution.startswith(p.preamble) and "def encode_cyclic" in solution
    assert run_program(p.program(solution), FAST).passed


def test_code_blocks_and_extraction_edge_cases() -> None:
    assert code_blocks("```python\ndef f():\n    return 1\n```", starts_in_code=True) == ["def f():\n    return 1"]
    assert code_blocks("def f():\n    return 1\n```\nIt works.", starts_in_code=True) == ["def f():\n    return 1"]
    assert code_blocks("Sure:\n```py\nx = 1\n") == ["x = 1"]                  # cut by max_tokens
    assert extract_code("```\nprint(1)\n```\n```python\ndef g(): pass\n```", "g") == "def g(): pass"
    assert extract_code("no fences here", "g") == "no fences here"


def test_prompts_and_seeds() -> None:
    p = load_problems(tasks=["3"])[0]
    assert p.task_id == "HumanEval/3" and build_prompt(p, "raw", lambda m: "") == p.prompt
    chat = build_prompt(p, "chat", lambda m: f"<user>{m[0]['content']}<assistant>")
    assert chat.endswith("<assistant>```python\n") and "def below_zero" in chat
    assert [q.task_id for q in load_problems(limit=2)] == ["HumanEval/0", "HumanEval/1"]
    with pytest.raises(ValueError, match="unknown HumanEval tasks"):
        load_problems(tasks=["HumanEval/999"])
    assert sample_seed(0, "HumanEval/1", 0) == sample_seed(0, "HumanEval/1", 0) != sample_seed(0, "HumanEval/1", 1)
    assert sample_seed(None, "HumanEval/1", 0) is None


@pytest.fixture(scope="module")
def smollm():
    from runtime import LLM

    llm = LLM("smollm2-135m", num_threads=2)
    yield llm
    llm.shutdown()


def test_runs_resume_and_refuse_other_settings(smollm, tmp_path: Path) -> None:
    out = tmp_path / "he.jsonl"
    cfg = EvalConfig(output=out, limit=3, max_tokens=8, batch_size=2, num_workers=2)
    first = run_humaneval(cfg, smollm, show_progress=False)
    lines = out.read_text().splitlines()
    assert first["num_samples"] == first["num_new_samples"] == 3 and len(lines) == 3
    rec = json.loads(lines[0])
    assert rec["prompt_format"] == "raw" and rec["num_tokens"] == len(rec["token_ids"]) <= 8
    assert json.loads((tmp_path / "he.summary.json").read_text())["pass@1"] == first["pass@1"]
    assert first["machine"]["cpus"] == os.cpu_count() and first["machine"]["gpu"] is None   # in process: CPU only

    again = run_humaneval(cfg, smollm, show_progress=False)          # nothing left to generate
    assert again["num_new_samples"] == 0 and out.read_text().splitlines() == lines
    assert again["machine"] == first["machine"]                        # where the samples came from, kept
    assert {k: again[k] for k in ("pass@1", "num_passed", "status")} == \
        {k: first[k] for k in ("pass@1", "num_passed", "status")}

    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])        # killed while writing the third line
    third = run_humaneval(cfg, smollm, show_progress=False)
    keys = sorted((r["task_id"], r["sample"]) for r in map(json.loads, out.read_text().splitlines()))
    assert third["num_new_samples"] == 1 and keys == [(f"HumanEval/{i}", 0) for i in range(3)]

    with pytest.raises(ValueError, match="max_tokens: 9 now vs 8 there"):
        run_humaneval(EvalConfig(output=out, limit=3, max_tokens=9), smollm, show_progress=False)

    from dataclasses import replace

    from runtime.evals.results import ResultStore, RunSettings

    sidecar = tmp_path / "he.settings.json"
    recorded = json.loads(sidecar.read_text())
    assert recorded["weights"] == smollm.config.weights == "q8"        # the default format
    settings = RunSettings(**{**recorded, "stop": tuple(recorded["stop"])})
    with pytest.raises(ValueError, match="weights: 'fp32' now vs 'q8' there"):       # formats never mix
        ResultStore(out, replace(settings, weights="fp32"))
    del recorded["weights"]                                            # written before the setting existed:
    sidecar.write_text(json.dumps(recorded))                           # float weights, the default then
    ResultStore(out, replace(settings, weights="fp32")).close()
    with pytest.raises(ValueError, match="weights: 'q4' now vs 'fp32' there"):
        ResultStore(out, replace(settings, weights="q4"))


def pinfer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_help() -> None:
    r = pinfer("eval", "humaneval", "--help")
    assert r.returncode == 0 and "usage: pinfer eval humaneval" in r.stdout and "--format" in r.stdout


def test_cli_runs_and_refuses_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    r = pinfer("eval", "humaneval", "--tasks", "2", "--max-tokens", "4", "--workers", "1", "--output", str(out))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "cli.summary.json").read_text())
    assert summary["num_samples"] == 1 and summary["engine"]["model"] == "smollm2-135m"
    assert "[humaneval raw on smollm2-135m: pass@1" in r.stdout
    r = pinfer("eval", "humaneval", "--tasks", "2", "--format", "chat", "--output", str(out))
    assert r.returncode == 2 and "prompt_format: 'chat' now vs 'raw' there" in r.stderr
