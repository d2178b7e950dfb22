"""The HumanEval harness: sandbox verdicts, pass@k, chat code extraction, resumable runs, the CLI."""
from __future__ import annotations

import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from runtime.evals.harness import EvalConfig, run_humaneval, sample_seed
from runtime.evals.humaneval import Problem, build_prompt, code_blocks, extract_code, load_problems, solution_source
from runtime.evals.passk import mean_pass_at_k, pass_at_k
from runtime.evals import sandbox as sandbox_module
from runtime.evals.sandbox import Sandbox, SandboxLimits, WeakSandboxError, isolation_report, missing_features, \
    namespaces_available, run_program, sandbox_features

FAST = SandboxLimits(timeout_s=2.0)


def need(*features: str) -> None:
    """Skip unless the sandbox gives programs ``features`` on this machine."""
    lacking = [f for f in features if f not in sandbox_features()]
    if lacking:
        pytest.skip(f"the sandbox lacks {', '.join(lacking)} here (needs root and a working unshare)")


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
    ("    from operator import max\n", "error", "from 'operator' (<python>/lib/"),   # no machine path recorded
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
    leaver = (f"import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n    time.sleep(3)\n"
              f"    posix.write(posix.open({str(marker)!r}, posix.O_WRONLY | posix.O_CREAT), b'x')\n"
              f"    posix._exit(0)\ntime.sleep(60)\n")
    r = run_program(leaver, FAST, frozenset({"network", "pid"}))      # a root program may fork: namespaces only
    assert r.status == "timeout", r
    time.sleep(4)
    assert not marker.exists()
    assert "namespace" in isolation_report()
    if "user" in sandbox_features():                    # its own user cannot fork at all
        r = run_program(leaver, FAST)
        assert r.status == "error" and "BlockingIOError" in r.detail, r


# What the kernel answers a write outside the program's dir: read-only, or (a path under a hidden directory, e.g.
# a checkout in /tmp) not there at all.
REFUSED = ("Read-only file system", "No such file or directory")

ESCAPES = {      # each tries to create TARGET past the Python-level guards; only the kernel can refuse it
    "FileIO": "import _io\n_io.FileIO(TARGET, 'w').write(b'x')\n",
    "posix.open": "import posix\nposix.write(posix.open(TARGET, posix.O_WRONLY | posix.O_CREAT, 0o644), b'x')\n",
    "ctypes open": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                   "assert libc.open(TARGET.encode(), os.O_WRONLY | os.O_CREAT, 0o644) >= 0, "
                   "os.strerror(ctypes.get_errno())\n",
    "ctypes creat": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                    "assert libc.creat(TARGET.encode(), 0o644) >= 0, os.strerror(ctypes.get_errno())\n",
    "raw openat": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"      # SYS_openat on x86-64
                  "assert libc.syscall(257, -100, TARGET.encode(), os.O_WRONLY | os.O_CREAT, 0o644) >= 0, "
                  "os.strerror(ctypes.get_errno())\n",
}


@pytest.mark.parametrize("how", ESCAPES)
def test_the_kernel_refuses_writes_outside_the_program_dir(how: str) -> None:
    need("filesystem")
    name = f"pinfer-escape-{secrets.token_hex(4)}"
    targets = [Path("/tmp") / name, Path(__file__).resolve().parent / name]     # shared scratch, the repo
    try:
        for target in targets:
            r = run_program(f"TARGET = {str(target)!r}\n" + ESCAPES[how], FAST)
            assert r.status != "passed" and any(m in r.detail for m in REFUSED), (target, r)
            assert not target.exists()
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_hostile_programs_cannot_undo_the_read_only_mounts_from_a_user_namespace_of_their_own() -> None:
    need("filesystem", "user")
    target = Path(__file__).resolve().parent / f"pinfer-escape-{secrets.token_hex(4)}"
    program = ("import _io, ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "assert libc.unshare(0x10000000 | 0x20000) == 0\n"          # CLONE_NEWUSER | CLONE_NEWNS: 'root'
               "print(libc.umount2(b'/root', 2), libc.umount2(b'/tmp', 2),\n"              # MNT_DETACH
               "      libc.mount(None, b'/', None, ctypes.c_ulong(0x20 | 0x1000), None))\n"    # remount rw
               f"_io.FileIO({str(target)!r}, 'w')\n")
    try:
        r = run_program(program, FAST)
        assert r.status == "error" and any(m in r.detail for m in REFUSED), r
        assert r.output.splitlines()[0] == "-1 -1 -1" and not target.exists(), r
    finally:
        target.unlink(missing_ok=True)


def test_hostile_programs_see_nothing_of_the_harness_home_or_scratch_dirs() -> None:
    need("filesystem")
    home = Path.home().resolve()
    secret = next((p for p in sorted(home.iterdir()) if p.is_file()), None)   # e.g. ~/.bashrc, ~/.ray/auth_token
    if secret is None:
        pytest.skip(f"{home} holds no file to look for")
    program = (f"import json, os, sys\nprint(json.dumps([sorted(os.listdir({str(home)!r})), sorted(os.listdir("
               f"'/tmp')), sorted(os.listdir(os.path.dirname(sys.base_prefix))), os.getcwd()]))\n"
               f"open({str(secret)!r}).read()\n")
    r = run_program(program, FAST)
    assert r.status == "error" and "FileNotFoundError" in r.detail, r
    in_home, in_tmp, beside_python, cwd = json.loads(r.output.splitlines()[0])
    python = Path(sys.base_prefix).resolve()
    assert set(in_home) <= ({python.relative_to(home).parts[0]} if python.is_relative_to(home) else set())
    assert secret.name not in in_home and set(os.listdir(home)) - set(in_home)
    if python.is_relative_to(home):                   # the Python installation alone, not its siblings
        assert beside_python == [python.name]
    if cwd.startswith("/tmp/"):     # Ray's sockets, other sandboxes: gone; the Python installation may live there
        python_dirs = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path) if p}
        allowed = {Path(cwd).name} | {p.relative_to("/tmp").parts[0] for p in python_dirs
                                      if p.is_relative_to("/tmp") and p != Path("/tmp")}
        assert Path(cwd).name in in_tmp and set(in_tmp) <= allowed, (in_tmp, allowed)


def test_hostile_programs_run_as_an_unprivileged_user_that_cannot_regain_root_or_fork() -> None:
    need("user")
    program = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "status = dict(line.split(':\\t') for line in open('/proc/self/status').read().splitlines())\n"
               "print(os.getuid(), os.geteuid(), os.getgid(), os.getgroups(), status['NoNewPrivs'], status['CapEff'])\n"
               "print(libc.setuid(0), libc.setresuid(0, 0, 0), libc.setgid(0), os.getuid())\n"
               "pid = libc.fork()\n"
               "if pid == 0:\n    libc._exit(0)\n"
               "print(pid, os.strerror(ctypes.get_errno()))\n")
    r = run_program(program, FAST)
    assert r.passed, r
    ids, setuid, fork = r.output.splitlines()
    uid = FAST.uid
    assert ids == f"{uid} {uid} {uid} [] 1 0000000000000000"
    assert setuid == f"-1 -1 -1 {uid}"
    assert fork == "-1 Resource temporarily unavailable"      # RLIMIT_NPROC = 0 holds for a non-root user


def test_hostile_programs_cannot_signal_processes_outside_their_namespace() -> None:
    need("pid")
    victim = subprocess.Popen(["sleep", "60"], user=FAST.uid if os.geteuid() == 0 else None)  # the program's uid
    try:
        program = (f"import os, posix, signal\nfor pid in ({victim.pid}, -1, 1, 0, os.getppid()):\n"
                   f"    try:\n        posix.kill(pid, signal.SIGKILL)\n    except OSError as e:\n"
                   f"        print(pid, type(e).__name__)\n")
        r = run_program(program, FAST)
        assert r.passed and f"{victim.pid} ProcessLookupError" in r.output, r   # kill(-1) reached nothing of ours
        assert victim.poll() is None
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()


STDLIB_PROGRAM = """\
import collections, datetime, decimal, fractions, hashlib, heapq, itertools, json, math, os, re
assert math.comb(5, 2) == 10 and list(itertools.accumulate([1, 2, 3])) == [1, 3, 6]
assert collections.Counter("abca")["a"] == 2 and re.findall(r"\\d+", "a1b22") == ["1", "22"]
assert heapq.nsmallest(2, [5, 1, 3]) == [1, 3] and len(hashlib.sha256(b"x").hexdigest()) == 64
assert json.loads(json.dumps({"a": [1]})) == {"a": [1]} and fractions.Fraction(1, 3) * 3 == 1
assert decimal.Decimal("0.1") + decimal.Decimal("0.2") == decimal.Decimal("0.3")
assert datetime.date(2024, 2, 28) + datetime.timedelta(days=1) == datetime.date(2024, 2, 29)
os.mkdir("sub")
with open("sub/data.txt", "w") as f:
    f.write("kept")
assert open(os.path.join(os.getcwd(), "sub", "data.txt")).read() == "kept"
"""


@pytest.mark.parametrize("features", [None, frozenset()], ids=["all-features", "no-features"])
def test_ordinary_programs_import_the_stdlib_and_write_their_own_dir(features: frozenset[str] | None) -> None:
    r = run_program(STDLIB_PROGRAM, FAST, features)
    assert r.passed, r


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
    weak = bool(missing_features())                   # the refusal has a test of its own
    cfg = EvalConfig(output=out, limit=3, max_tokens=8, batch_size=2, num_workers=2, allow_weak_sandbox=weak)
    first = run_humaneval(cfg, smollm, show_progress=False)
    lines = out.read_text().splitlines()
    assert first["num_samples"] == first["num_new_samples"] == 3 and len(lines) == 3
    rec = json.loads(lines[0])
    assert rec["prompt_format"] == "raw" and rec["num_tokens"] == len(rec["token_ids"]) <= 8
    assert json.loads((tmp_path / "he.summary.json").read_text())["pass@1"] == first["pass@1"]
    assert first["machine"]["cpus"] == os.cpu_count() and first["machine"]["gpu"] is None   # in process: CPU only

    summary_path = tmp_path / "he.summary.json"                       # as a sparse run's summary would say
    measured = json.loads(summary_path.read_text())
    measured["engine"]["achieved_sparsity"] = 0.42
    summary_path.write_text(json.dumps(measured))
    again = run_humaneval(cfg, smollm, show_progress=False)          # nothing left to generate
    assert again["num_new_samples"] == 0 and out.read_text().splitlines() == lines
    assert again["machine"] == first["machine"]                        # where the samples came from, kept
    assert again["engine"]["achieved_sparsity"] == 0.42                # what that run measured, kept
    assert again["wall_s"] == first["wall_s"] and again["throughput_tokens_per_s"] == first["throughput_tokens_per_s"]
    assert {k: again[k] for k in ("pass@1", "num_passed", "status")} == \
        {k: first[k] for k in ("pass@1", "num_passed", "status")}

    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])        # killed while writing the third line
    third = run_humaneval(cfg, smollm, show_progress=False)
    keys = sorted((r["task_id"], r["sample"]) for r in map(json.loads, out.read_text().splitlines()))
    assert third["num_new_samples"] == 1 and keys == [(f"HumanEval/{i}", 0) for i in range(3)]

    with pytest.raises(ValueError, match="max_tokens: 9 now vs 8 there"):
        run_humaneval(EvalConfig(output=out, limit=3, max_tokens=9, allow_weak_sandbox=weak), smollm,
                      show_progress=False)

    from dataclasses import replace

    from runtime.evals.results import ResultStore, RunSettings, SettingsMismatchError

    sidecar = tmp_path / "he.settings.json"
    recorded = json.loads(sidecar.read_text())
    assert recorded["weights"] == smollm.config.weights == "q8"        # the default format
    settings = RunSettings(**{**recorded, "stop": tuple(recorded["stop"])})
    with pytest.raises(SettingsMismatchError, match="weights: 'fp32' now vs 'q8' there"):       # formats never mix
        ResultStore(out, replace(settings, weights="fp32"))
    del recorded["weights"]                                            # written before the setting existed:
    sidecar.write_text(json.dumps(recorded))                           # float weights, the default then
    ResultStore(out, replace(settings, weights="fp32")).close()
    with pytest.raises(ValueError, match="weights: 'q4' now vs 'fp32' there"):
        ResultStore(out, replace(settings, weights="q4"))


def test_results_survive_their_file_being_replaced_during_a_run(tmp_path: Path) -> None:
    """A checkout or stash of a tracked results file replaces it under a running sweep: the store notices at its
    next sample and rewrites the file with every sample it holds (and any the replacement brought), instead of
    appending to the deleted file."""
    from runtime.evals.results import ResultStore, RunSettings, SampleRecord

    settings = RunSettings(model="m", prompt_format="raw", max_tokens=8, temperature=0.0, top_p=1.0, seed=None,
                           dtype="float32", sparsity="dense", activation_sparsity=0.0, hot_fraction=None,
                           timeout_s=1.0, memory_mb=64, stop=())

    def record(i: int) -> SampleRecord:
        return SampleRecord(f"HumanEval/{i}", 0, "raw", "x", "x", [1], 1, "stop", True, "passed", "", 0.1, 0.0,
                            0.1, 0.1)

    def on_disk() -> list[str]:
        return [json.loads(line)["task_id"] for line in out.read_text().splitlines()]

    out = tmp_path / "he.jsonl"
    with ResultStore(out, settings) as store:
        store.append(record(0))
        store.append(record(1))
        older = tmp_path / "older.jsonl"                            # the file as an older commit has it, plus a
        older.write_text(out.read_text().splitlines()[0] + "\n" + json.dumps(asdict(record(7))) + "\n")
        os.replace(older, out)                                      # sample this run never made
        store.append(record(2))
        assert sorted(on_disk()) == ["HumanEval/0", "HumanEval/1", "HumanEval/2", "HumanEval/7"]
        out.unlink()
        store.append(record(3))
        store.append(record(4))                                     # and appends to the new file from then on
    assert sorted(on_disk()) == [f"HumanEval/{i}" for i in (0, 1, 2, 3, 4, 7)]
    assert len(ResultStore(out, settings).records) == 6


def test_eval_refuses_a_weak_sandbox_unless_allowed(smollm, tmp_path: Path, monkeypatch, capsys) -> None:
    from runtime.cli.main import main

    monkeypatch.setattr(sandbox_module, "sandbox_features", lambda: frozenset())      # e.g. not root
    out = tmp_path / "weak.jsonl"
    with pytest.raises(WeakSandboxError, match="no network, pid, filesystem, user isolation.*--allow-weak-sandbox"):
        run_humaneval(EvalConfig(output=out, limit=1, max_tokens=4, num_workers=1), smollm, show_progress=False)
    assert main(["eval", "humaneval", "--limit", "1", "--output", str(out)]) == 2       # before loading a model
    assert "--allow-weak-sandbox" in capsys.readouterr().err and not out.exists()
    summary = run_humaneval(EvalConfig(output=out, limit=1, max_tokens=4, num_workers=1, allow_weak_sandbox=True),
                            smollm, show_progress=False)
    assert summary["num_samples"] == 1 and len(out.read_text().splitlines()) == 1


def pinfer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_help() -> None:
    r = pinfer("eval", "humaneval", "--help")
    assert r.returncode == 0 and "usage: pinfer eval humaneval" in r.stdout and "--format" in r.stdout
    assert "--allow-weak-sandbox" in r.stdout


def test_cli_runs_and_refuses_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    weak = ["--allow-weak-sandbox"] if missing_features() else []
    r = pinfer("eval", "humaneval", "--tasks", "2", "--max-tokens", "4", "--workers", "1", "--output", str(out), *weak)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "cli.summary.json").read_text())
    assert summary["num_samples"] == 1 and summary["engine"]["model"] == "smollm2-135m"
    assert "[humaneval raw on smollm2-135m: pass@1" in r.stdout
    r = pinfer("eval", "humaneval", "--tasks", "2", "--format", "chat", "--output", str(out), *weak)
    assert r.returncode == 2 and "prompt_format: 'chat' now vs 'raw' there" in r.stderr
