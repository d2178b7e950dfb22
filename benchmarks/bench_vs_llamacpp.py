"""Decode speed and memory of pinfer side by side with llama.cpp and transformers fp32, one machine, one run.

Every engine ("config") decodes greedily, batch 1, exactly ``--tokens`` new tokens from the same
chat-formatted prompt on the same GGUF (llama.cpp reads the file itself; transformers and pinfer use
pinfer's conversion of it), with the same thread count. Each config is loaded ONCE in its own worker
process (this file run with a hidden ``--worker``), so each engine's RSS is its own and no two engines
share a process. The driver sends JSON-line requests on the worker's stdin and reads JSON-line answers
on a private pipe (the worker's stdout and stderr go to a log file). Configs alternate, the order
rotating each round: 1 warm-up, then ``--runs`` timed runs each; medians. Before every run the driver
waits (at most 60 s) until processes outside the benchmark use < 0.15 core, and records what they used.

Per config: decode tok/s = (tokens - 1) / (time from the first generated token to the last), prefill
tok/s = prompt tokens / time to the first token, peak RSS (and, for the hybrid runtime, the peak RSS and
PSS summed over the worker and its executor processes), bytes of weights read per decoded token,
achieved GB/s and its share of the machine's measured memory read bandwidth, every ratio to llama.cpp,
and the first 24 generated tokens as text (greedy agreement). The last line is ``RESULT {json}``.

llama.cpp comes from the optional package ``llama_cpp`` (llama-cpp-python); when it is missing the
driver says how to build it and skips it (the ratios are then null).

    python benchmarks/bench_vs_llamacpp.py --model qwen2.5-coder-0.5b --threads 2 --runs 3 \\
        --configs llama.cpp,transformers,pinfer-q8,pinfer-q8-hybrid --out benchmarks/results/vs_llamacpp.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import cpu_model, quiet_logs

# name -> (engine, pinfer LLM options). pinfer configs always also get num_threads=--threads.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama.cpp": ("llama.cpp", {}),
    "transformers": ("transformers", {}),
    "pinfer-fp32": ("pinfer", {"weights": "fp32"}),
    "pinfer-q8": ("pinfer", {"weights": "q8"}),
    "pinfer-q4": ("pinfer", {"weights": "q4"}),
    "pinfer-q8-hybrid": ("pinfer", {"weights": "q8", "is_hybrid": True, "hot_fraction": 0.5}),
    "pinfer-q4-hybrid": ("pinfer", {"weights": "q4", "is_hybrid": True, "hot_fraction": 0.5}),
    "pinfer-q8-gate30": ("pinfer", {"weights": "q8", "sparsity": "gate", "activation_sparsity": 0.3}),
    "pinfer-q8-gate50": ("pinfer", {"weights": "q8", "sparsity": "gate", "activation_sparsity": 0.5}),
    "pinfer-q4-gate30": ("pinfer", {"weights": "q4", "sparsity": "gate", "activation_sparsity": 0.3}),
    "pinfer-q8-down50": ("pinfer", {"weights": "q8", "sparsity": "down", "activation_sparsity": 0.5}),
    "pinfer-q8-down70": ("pinfer", {"weights": "q8", "sparsity": "down", "activation_sparsity": 0.7}),
    "pinfer-q8-hybrid-down70": ("pinfer", {"weights": "q8", "sparsity": "down", "activation_sparsity": 0.7,
                                           "is_hybrid": True, "hot_fraction": 0.5}),
}
# q8 is the format within 1% of fp32's perplexity (benchmarks/bench_quality.py); gate 30% keeps HumanEval Pass@1
DEFAULT_CONFIGS = ["llama.cpp", "transformers", "pinfer-fp32", "pinfer-q8", "pinfer-q4", "pinfer-q8-hybrid",
                   "pinfer-q8-gate30", "pinfer-q4-gate30"]

PROMPT = "Write a Python function that checks whether a number is prime."
REFERENCE = "llama.cpp"            # the config every ratio is taken against
TEXT_TOKENS = 24                   # generated tokens shown as text for the greedy-agreement check
QUIET_CORES = 0.15                 # wait before a run until other processes use less than this...
QUIET_MAX_WAIT_S = 60.0            # ...but no longer than this
LOAD_TIMEOUT_S = 1800.0
RUN_TIMEOUT_S = 600.0
BANDWIDTH_BYTES = 2**30            # the array the read-bandwidth test sums
GB = 1e9

LLAMA_CPP_BUILD = (
    "CMAKE_ARGS=\"-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
    "-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'\" "
    "pip install --no-deps --no-cache-dir llama-cpp-python==0.3.36 diskcache"
)


def is_hybrid(options: dict[str, Any]) -> bool:
    return bool(options.get("is_hybrid")) or "hot_fraction" in options


# ==== worker side: one engine, loaded once, answering requests =========================================

def proc_kib(pid: int, file: str, key: str) -> int | None:
    """A ``key: N kB`` value of /proc/<pid>/<file> (status: VmHWM, VmRSS; smaps_rollup: Pss), or None."""
    try:
        with open(f"/proc/{pid}/{file}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def timing(prompt_tokens: int, ids: list[int], tokens: int, prefill_s: float, decode_s: float,
           wall_s: float, **extra: Any) -> dict[str, Any]:
    if len(ids) != tokens:
        raise RuntimeError(f"generated {len(ids)} tokens, expected {tokens}")
    return {"prompt_tokens": prompt_tokens, "n_gen": len(ids), "token_ids": [int(t) for t in ids],
            "prefill_s": prefill_s, "decode_s": decode_s, "wall_s": wall_s,
            "decode_tok_s": (len(ids) - 1) / decode_s if decode_s > 0 else None,
            "prefill_tok_s": prompt_tokens / prefill_s if prefill_s > 0 else None,
            "e2e_tok_s": len(ids) / wall_s if wall_s > 0 else None, **extra}


class Engine:
    """One loaded engine in a worker process."""

    info: dict[str, Any]

    def run(self, prompt: str, prompt_ids: list[int], tokens: int) -> dict[str, Any]:
        raise NotImplementedError

    def executor_pids(self) -> list[int]:
        return []

    def close(self) -> None:
        pass

    def memory(self) -> dict[str, Any]:
        """Peak RSS of this process (and, summed, of its executors) and current PSS, in bytes."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024          # Linux: KiB
        pss_kib = proc_kib(os.getpid(), "smaps_rollup", "Pss")
        executors = {}
        for pid in self.executor_pids():
            hwm, pss = proc_kib(pid, "status", "VmHWM"), proc_kib(pid, "smaps_rollup", "Pss")
            executors[str(pid)] = {"peak_rss_bytes": None if hwm is None else hwm * 1024,
                                   "pss_bytes": None if pss is None else pss * 1024}

        def tree(own: int | None, key: str) -> int | None:
            parts = [own, *(e[key] for e in executors.values())]
            return None if any(p is None for p in parts) else sum(parts)

        pss = None if pss_kib is None else pss_kib * 1024
        return {"peak_rss_bytes": peak, "pss_bytes": pss, "executors": executors,
                "peak_rss_tree_bytes": tree(peak, "peak_rss_bytes"), "pss_tree_bytes": tree(pss, "pss_bytes")}


class LlamaCppEngine(Engine):
    def __init__(self, spec: dict[str, Any]) -> None:
        import llama_cpp
        from llama_cpp import Llama

        threads = spec["threads"]
        self.llm = Llama(model_path=spec["gguf"], n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                         n_batch=512, seed=0, verbose=False)
        self.info = {"llama_cpp_python": llama_cpp.__version__, "n_threads": threads,
                     "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()}

    def run(self, prompt: str, prompt_ids: list[int], tokens: int) -> dict[str, Any]:
        llm = self.llm
        toks = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        llm.reset()                                   # no KV-cache reuse of the previous run's prefix
        ids: list[int] = []
        times: list[float] = []
        clock = time.perf_counter
        t0 = clock()
        for tok in llm.generate(toks, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            times.append(clock())
            ids.append(tok)
            if len(ids) == tokens:
                break
        t_end = clock()
        return timing(len(toks), ids, tokens, times[0] - t0, times[-1] - times[0], t_end - t0)


class TransformersEngine(Engine):
    def __init__(self, spec: dict[str, Any]) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
        from transformers.generation.streamers import BaseStreamer
        from transformers.utils import logging as hf_logging

        class Clock(BaseStreamer):
            """Time of every ``put``: once for the prompt, then once per generated token."""

            def __init__(self) -> None:
                self.times: list[float] = []

            def put(self, value: Any) -> None:
                self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        hf_logging.set_verbosity_error()
        torch.set_num_threads(spec["threads"])
        self.torch, self.clock_cls = torch, Clock
        self.model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
        cfg = self.model.generation_config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        self.pad_id = (pad[0] if isinstance(pad, list) else pad) if pad is not None else 0
        params = sum(p.numel() for p in self.model.parameters())                  # tied weights once
        embed = self.model.get_input_embeddings().weight
        head = self.model.get_output_embeddings()
        tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
        read = params - (0 if tied else embed.numel())
        self.info = {"torch": torch.__version__, "transformers": transformers.__version__,
                     "threads": torch.get_num_threads(), "params": params, "embed_params": embed.numel(),
                     "tied_embedding": tied, "param_dtype": str(next(self.model.parameters()).dtype),
                     "bytes_per_token": 4 * read,
                     "bytes_per_token_basis": "4 x parameters, untied input embedding excluded"}

    def run(self, prompt: str, prompt_ids: list[int], tokens: int) -> dict[str, Any]:
        torch = self.torch
        ids = torch.tensor([prompt_ids])
        mask = torch.ones_like(ids)
        clock = self.clock_cls()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens,
                                      min_new_tokens=tokens, do_sample=False, streamer=clock,
                                      pad_token_id=self.pad_id)
        t_end = time.perf_counter()
        gen = out[0, ids.shape[1]:].tolist()
        times = clock.times[1:]                       # times[0]: the prompt's put
        if len(times) != len(gen):
            raise RuntimeError(f"streamer saw {len(times)} tokens, generate returned {len(gen)}")
        return timing(len(prompt_ids), gen, tokens, times[0] - t0, times[-1] - times[0], t_end - t0)


class PinferEngine(Engine):
    def __init__(self, spec: dict[str, Any]) -> None:
        from runtime import LLM, SamplingParams

        self.sampling = SamplingParams
        self.llm = LLM(spec["model"], num_threads=spec["threads"], **spec["options"])
        self.hybrid = bool(self.llm.config.is_hybrid)
        self.pids = {k: int(v) for k, v in self.llm.executor_pids().items()} if self.hybrid else {}
        self.info = {"config": json.loads(json.dumps(asdict(self.llm.config), default=str)),
                     "is_hybrid": self.hybrid, "executor_pids": self.pids}

    def executor_pids(self) -> list[int]:
        return list(self.pids.values())

    def _sparsity(self, reset: bool) -> float | None:
        try:
            return self.llm.achieved_sparsity(reset=reset)
        except Exception:                             # noqa: BLE001 - not every runtime counts it
            return None

    def run(self, prompt: str, prompt_ids: list[int], tokens: int) -> dict[str, Any]:
        params = self.sampling(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        self._sparsity(reset=True)
        t0 = time.perf_counter()
        out = self.llm.generate([prompt], params)[0]
        t_end = time.perf_counter()
        m = out.metrics
        return timing(len(out.prompt_token_ids), out.token_ids, tokens, m["prefill_s"], m["decode_s"],
                      t_end - t0, queue_s=m.get("queue_s"), achieved_sparsity=self._sparsity(reset=True))

    def close(self) -> None:
        closer = getattr(self.llm, "shutdown", None) or getattr(self.llm, "close", None)
        if closer is not None:
            closer()


ENGINES: dict[str, type[Engine]] = {"llama.cpp": LlamaCppEngine, "transformers": TransformersEngine,
                                    "pinfer": PinferEngine}


def worker_main(spec_json: str) -> None:
    """Load one engine; answer {"op": "run" | "memory" | "quit"} lines on stdin on the private fd."""
    spec = json.loads(spec_json)
    fd = int(spec["result_fd"])
    os.set_inheritable(fd, False)                     # executors and helpers must not hold the pipe open
    channel = os.fdopen(fd, "w", buffering=1)

    def send(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    def failure(e: BaseException) -> dict[str, Any]:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}

    quiet_logs()
    t0 = time.perf_counter()
    try:
        engine = ENGINES[spec["engine"]](spec)
    except BaseException as e:                        # noqa: BLE001 - reported to the driver
        send(failure(e))
        return
    send({"ok": True, "info": {**engine.info, "load_s": time.perf_counter() - t0, "pid": os.getpid()}})
    try:
        for line in sys.stdin:
            request = json.loads(line)
            if request["op"] == "quit":
                break
            try:
                if request["op"] == "run":
                    send({"ok": True, **engine.run(request["prompt"], request["prompt_ids"], request["tokens"])})
                elif request["op"] == "memory":
                    send({"ok": True, **engine.memory()})
                else:
                    send({"ok": False, "error": f"unknown op {request['op']!r}"})
            except Exception as e:                    # noqa: BLE001 - reported to the driver
                send(failure(e))
    finally:
        engine.close()


# ==== driver side: machine, CPU accounting, workers ====================================================

HZ = os.sysconf("SC_CLK_TCK")


def machine_info(threads: int) -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text()
    lines = text.splitlines()
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    mem_kib = next((int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                    if ln.startswith("MemTotal:")), 0)
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "threads": threads, "mem_total_gb": round(mem_kib * 1024 / GB, 2),
            "isa": {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
                    "avx512_vnni": "avx512_vnni" in flags, "amx": any(f.startswith("amx") for f in flags)},
            "amx_flags": sorted(f for f in flags if f.startswith("amx")),
            "python": platform.python_version(), "kernel": platform.release()}


def read_bandwidth(threads: int, reps: int = 5) -> float:
    """GB/s of ``threads`` threads each summing its share of a 1 GiB float32 array (numpy drops the GIL)."""
    import numpy as np

    a = np.ones(BANDWIDTH_BYTES // 4, dtype=np.float32)
    parts = np.array_split(a, threads)

    def one_pass() -> float:
        workers = [threading.Thread(target=p.sum) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - t0

    one_pass()                                        # pages touched, threads warm
    best = min(one_pass() for _ in range(reps))
    return a.nbytes / best / GB


def busy_jiffies() -> int:
    """CPU time of every process on the machine (all cores), in clock ticks, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4]                       # minus idle and iowait


def proc_jiffies(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])      # utime + stime, all threads
    except (OSError, IndexError, ValueError):
        return 0


def process_tree(roots: list[int]) -> list[int]:
    """``roots`` and all their descendants (a hybrid worker's Ray processes and executors)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass(slots=True)
class CpuSnapshot:
    t: float
    busy: int
    trees: dict[str, int]
    driver_s: float


def snapshot(trees: dict[str, list[int]]) -> CpuSnapshot:
    return CpuSnapshot(time.perf_counter(), busy_jiffies(),
                       {k: sum(proc_jiffies(p) for p in pids) for k, pids in trees.items()}, self_cpu_s())


def cores_used(a: CpuSnapshot, b: CpuSnapshot, running: str | None) -> dict[str, float]:
    """Cores used between two snapshots by the running worker's tree, the idle workers' trees and the
    rest of the machine (this driver excluded)."""
    dt = b.t - a.t
    per = {k: (b.trees[k] - a.trees[k]) / HZ for k in a.trees}
    engines = sum(per.values())
    others = max(0.0, (b.busy - a.busy) / HZ - engines - (b.driver_s - a.driver_s))
    return {"engine_cores": round(per.get(running, 0.0) / dt, 3) if running else 0.0,
            "idle_engines_cores": round((engines - per.get(running, 0.0)) / dt, 3),
            "others_cores": round(others / dt, 3)}


class WorkerError(RuntimeError):
    def __init__(self, message: str, traceback_text: str | None = None) -> None:
        super().__init__(message)
        self.traceback_text = traceback_text


class Worker:
    """A worker process running one config; requests on its stdin, answers on a private pipe."""

    def __init__(self, name: str, spec: dict[str, Any], env: dict[str, str], log_path: Path) -> None:
        self.name, self.log_path = name, log_path
        read_fd, write_fd = os.pipe()
        argv = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps({**spec, "result_fd": write_fd})]
        with open(log_path, "wb") as log:             # the worker keeps its own copy of the descriptor
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                         pass_fds=(write_fd,), env=env, start_new_session=True)
        os.close(write_fd)
        self.fd, self.buf = read_fd, b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_bytes()[-chars:].decode("utf-8", "replace")
        except OSError:
            return ""

    def recv(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"no answer within {timeout:.0f} s")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    time.sleep(0.5)
                    raise WorkerError(f"worker process ended (exit status {self.proc.poll()})")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as e:
            raise WorkerError(f"worker not listening ({e}); exit status {self.proc.poll()}") from None
        answer = self.recv(timeout)
        if not answer.get("ok"):
            raise WorkerError(answer.get("error") or "unknown error", answer.get("traceback"))
        return answer

    def stop(self, grace_s: float = 60.0) -> None:
        """Ask the worker to quit (it shuts its engine down); kill its process group if it does not."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(grace_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)      # its own session: leftovers of this worker only
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        try:
            os.close(self.fd)
        except OSError:
            pass


# ==== driver ===========================================================================================

def gguf_bytes_per_token(path: Path) -> tuple[int, str]:
    """GGUF tensor bytes read per decode step: all tensors, less ``token_embd`` when a separate
    ``output.weight`` makes it a pure lookup table."""
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    if "output.weight" in sizes and "token_embd.weight" in sizes:
        return sum(sizes.values()) - sizes["token_embd.weight"], "GGUF tensor bytes less token_embd.weight"
    return sum(sizes.values()), "GGUF tensor bytes (embedding tied to the output head)"


def pinfer_bytes_per_token(model_dir: Path, options: dict[str, Any]) -> tuple[int | None, str]:
    weights = options.get("weights", "fp32")
    try:
        from runtime.model.qweights import bytes_per_token

        value = int(bytes_per_token(model_dir, weights))
    except Exception as e:                            # noqa: BLE001 - optional: report null
        return None, f"unavailable: runtime.model.qweights.bytes_per_token failed ({type(e).__name__}: {e})"
    basis = f"qweights.bytes_per_token(model_dir, {weights!r})"
    if options.get("sparsity", "dense") != "dense":
        basis += ", dense-equivalent (skipped neurons not subtracted)"
    return value, basis


def median(values: list[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def rounded(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def fmt(x: float | None, spec: str) -> str:
    """``x`` formatted by ``spec`` (e.g. "12.2f"), or "-" right-aligned to the same width when it is None."""
    return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0] or 0))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="configs: " + ", ".join(CONFIGS))
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="registry name (e.g. qwen2.5-coder-0.5b, "
                                                                    "smollm2-135m) or a .gguf file")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"comma-separated config names (default: {','.join(DEFAULT_CONFIGS)}; all: {','.join(CONFIGS)})")
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens generated per run")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per config (after 1 warm-up)")
    ap.add_argument("--context-tokens", type=int, default=0,
                    help="put about this many tokens of held-out stdlib source before the question (a longer "
                         "prompt: prefill speed where the prompt path's float products run)")
    ap.add_argument("--out", type=Path, default=None, help="also write the result JSON here")
    ap.add_argument("--log-dir", type=Path, default=None, help="worker logs (default: a new temp dir)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker_main(args.worker)
        return

    quiet_logs()
    base_env = dict(os.environ)                       # before importing runtime (it sets OMP_WAIT_POLICY)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        ap.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    if args.tokens < 2 or args.runs < 1 or args.threads < 1:
        ap.error("need --tokens >= 2, --runs >= 1, --threads >= 1")

    from runtime.model.registry import resolve_model, source_gguf
    from runtime.model.tokenizer import TextTokenizer

    machine = machine_info(args.threads)
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, ISA "
          + " ".join(k for k, v in machine["isa"].items() if v) + f", {args.threads} threads", flush=True)
    model_dir = resolve_model(args.model)             # converts the GGUF on first use
    tokenizer = TextTokenizer(model_dir)
    question = PROMPT
    if args.context_tokens > 0:
        from runtime.sparsity.corpus import token_windows

        source = tokenizer.decode(token_windows(tokenizer.encode, "heldout", args.context_tokens,
                                                window=args.context_tokens)[0])
        question = f"```python\n{source}\n```\n{PROMPT}"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}])
    prompt_ids = tokenizer.encode(prompt)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench_vs_llamacpp_"))
    log_dir.mkdir(parents=True, exist_ok=True)

    configs: dict[str, dict[str, Any]] = {}
    for name in names:
        engine, options = CONFIGS[name]
        configs[name] = {"engine": engine, "options": options, "status": "pending", "error": None,
                         "info": None, "warmup": None, "runs": []}

    # ---- bytes read per token (driver side: keeps the workers' RSS clean) ------------------------------
    gguf_path: Path | None = None
    try:
        gguf_path = source_gguf(args.model)
    except Exception as e:                            # noqa: BLE001
        if REFERENCE in configs:
            configs[REFERENCE].update(status="failed", error=f"no GGUF for llama.cpp: {e}")
    for name, c in configs.items():
        if c["engine"] == "llama.cpp" and gguf_path is not None:
            c["bytes_per_token"], c["bytes_per_token_basis"] = gguf_bytes_per_token(gguf_path)
        elif c["engine"] == "pinfer":
            c["bytes_per_token"], c["bytes_per_token_basis"] = pinfer_bytes_per_token(model_dir, c["options"])

    llama_available = importlib.util.find_spec("llama_cpp") is not None
    for name, c in configs.items():
        if c["engine"] == "llama.cpp" and not llama_available and c["status"] == "pending":
            c.update(status="skipped", error="llama_cpp (llama-cpp-python) is not installed")
            print("\nllama.cpp SKIPPED: the Python package `llama_cpp` (llama-cpp-python) is not installed, so "
                  "every ratio to llama.cpp is null.\nTo get it, build it from source with AMX compiled out "
                  "(llama.cpp's AMX path crashes on these VMs), about 10-20 min on 2 cores, with the pip of "
                  f"this Python ({sys.executable} -m pip):\n\n    {LLAMA_CPP_BUILD}\n\n"
                  "A plain `pip install llama-cpp-python` or a pip extra of this project will not do: they do "
                  "not pass these build flags.\n", flush=True)

    # ---- CPU accounting ----------------------------------------------------------------------------------
    workers: dict[str, Worker] = {}

    def trees() -> dict[str, list[int]]:
        return {k: process_tree([w.pid]) for k, w in workers.items() if w.proc.poll() is None}

    def wait_quiet() -> dict[str, Any]:
        start = time.perf_counter()
        while True:
            t = trees()
            a = snapshot(t)
            time.sleep(1.0)
            used = cores_used(a, snapshot(t), None)
            waited = time.perf_counter() - start - 1.0
            if used["others_cores"] < QUIET_CORES or waited >= QUIET_MAX_WAIT_S:
                return {"others_cores_before": used["others_cores"],
                        "idle_engines_cores_before": used["idle_engines_cores"],
                        "waited_s": round(max(0.0, waited), 1), "quiet": used["others_cores"] < QUIET_CORES,
                        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}
            time.sleep(2.0)

    def fail(name: str, error: str, traceback_text: str | None = None) -> None:
        c = configs[name]
        w = workers.pop(name, None)
        tail = w.log_tail() if w is not None else ""
        c.update(status="failed", error=error, traceback=traceback_text, log_tail=tail or None)
        print(f"[{name}] FAILED: {error}" + (f"\n{traceback_text}" if traceback_text else "")
              + (f"\n--- log tail ({w.log_path}) ---\n{tail}" if w else ""), flush=True)
        if w is not None:
            w.stop(grace_s=10.0)

    def run_once(name: str) -> dict[str, Any] | None:
        quiet = wait_quiet()
        t = trees()
        a = snapshot(t)
        try:
            r = workers[name].request({"op": "run", "prompt": prompt, "prompt_ids": prompt_ids,
                                       "tokens": args.tokens}, RUN_TIMEOUT_S)
        except WorkerError as e:
            fail(name, f"run: {e}", e.traceback_text)
            return None
        used = cores_used(a, snapshot(t), name)
        r.pop("ok", None)
        r.update(quiet)
        r.update({"engine_cores_during": used["engine_cores"], "idle_engines_cores_during": used["idle_engines_cores"],
                  "others_cores_during": used["others_cores"]})
        return r

    try:
        quiet = wait_quiet()
        bandwidth = read_bandwidth(args.threads)
        print(f"memory read bandwidth ({args.threads} threads, 1 GiB): {bandwidth:.1f} GB/s "
              f"(other processes {quiet['others_cores_before']} cores)", flush=True)

        # ---- start every worker, one at a time ------------------------------------------------------------
        for name, c in configs.items():
            if c["status"] != "pending":
                continue
            env = dict(base_env)
            if not (c["engine"] == "pinfer" and is_hybrid(c["options"])):   # executors set their own threads
                env["OMP_NUM_THREADS"] = str(args.threads)
            spec = {"engine": c["engine"], "options": c["options"], "threads": args.threads, "model": args.model,
                    "model_dir": str(model_dir), "gguf": None if gguf_path is None else str(gguf_path)}
            print(f"[{name}] loading...", flush=True)
            workers[name] = Worker(name, spec, env, log_dir / f"{name}.log")
            try:
                ready = workers[name].recv(LOAD_TIMEOUT_S)
            except WorkerError as e:
                fail(name, f"load: {e}")
                continue
            if not ready.get("ok"):
                fail(name, f"load: {ready.get('error') or 'failed'}", ready.get("traceback"))
                continue
            c["info"] = ready["info"]
            c["status"] = "ok"
            if c["engine"] == "transformers":
                c["bytes_per_token"] = c["info"].get("bytes_per_token")
                c["bytes_per_token_basis"] = c["info"].get("bytes_per_token_basis")
            print(f"[{name}] ready in {c['info'].get('load_s', 0):.1f} s (pid {workers[name].pid})", flush=True)

        # ---- warm-up, then rounds with rotating order ----------------------------------------------------
        for name in list(workers):
            r = run_once(name)
            if r is not None:
                configs[name]["warmup"] = r
                print(f"[{name}] warm-up: decode {fmt(r['decode_tok_s'], '.2f')} tok/s", flush=True)
        for rnd in range(args.runs):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                if name not in workers:
                    continue
                r = run_once(name)
                if r is None:
                    continue
                r["round"] = rnd
                configs[name]["runs"].append(r)
                print(f"[{name}] round {rnd}: decode {fmt(r['decode_tok_s'], '.2f')} tok/s, prefill "
                      f"{fmt(r['prefill_tok_s'], '.1f')} tok/s, engine {r['engine_cores_during']} cores, others "
                      f"{r['others_cores_before']}/{r['others_cores_during']} cores", flush=True)

        # ---- memory after the runs -----------------------------------------------------------------------
        for name in list(workers):
            try:
                mem = workers[name].request({"op": "memory"}, 120.0)
                mem.pop("ok", None)
                configs[name]["memory"] = mem
            except WorkerError as e:
                fail(name, f"memory report: {e}", e.traceback_text)
    finally:
        for w in workers.values():
            w.stop()
        workers.clear()

    # ---- summary -----------------------------------------------------------------------------------------
    for name, c in configs.items():
        runs = c["runs"]
        if c["status"] != "ok" or not runs:
            continue
        mem = c.get("memory", {})
        tokens_all = [r.pop("token_ids") for r in [c["warmup"], *runs] if r]
        c["token_ids"] = tokens_all[-len(runs)]                     # the first timed run
        c["same_tokens_every_run"] = all(t == tokens_all[0] for t in tokens_all)
        c["text_first_tokens"] = tokenizer.decode(c["token_ids"][:TEXT_TOKENS])
        decode = [r["decode_tok_s"] for r in runs]
        c.update({
            "prompt_tokens": runs[0]["prompt_tokens"],
            "decode_tok_s": rounded(median(decode), 2),
            "decode_tok_s_min": rounded(min((d for d in decode if d is not None), default=None), 2),
            "decode_tok_s_max": rounded(max((d for d in decode if d is not None), default=None), 2),
            "prefill_tok_s": rounded(median([r["prefill_tok_s"] for r in runs]), 2),
            "e2e_tok_s": rounded(median([r["e2e_tok_s"] for r in runs]), 2),
            "others_cores_during_max": max(r["others_cores_during"] for r in runs),
            "peak_rss_gb": rounded(mem["peak_rss_bytes"] / GB) if mem.get("peak_rss_bytes") else None,
            "peak_rss_tree_gb": rounded(mem["peak_rss_tree_bytes"] / GB) if mem.get("peak_rss_tree_bytes") else None,
            "pss_tree_gb": rounded(mem["pss_tree_bytes"] / GB) if mem.get("pss_tree_bytes") else None,
        })
        bpt = c.get("bytes_per_token")
        gbs = bpt * c["decode_tok_s"] / GB if bpt and c["decode_tok_s"] else None
        c["achieved_gbs"] = rounded(gbs, 2)
        c["bandwidth_fraction"] = rounded(gbs / bandwidth if gbs else None)
        if c["engine"] == "pinfer":
            c["achieved_sparsity"] = rounded(median([r.get("achieved_sparsity") for r in runs]))

    ref = configs.get(REFERENCE, {})
    ref_ok = ref.get("status") == "ok" and bool(ref.get("runs"))
    agreement_ref = REFERENCE if ref_ok else next((n for n, c in configs.items() if c.get("token_ids")), None)
    for name, c in configs.items():
        ok = c["status"] == "ok" and bool(c["runs"])
        c["vs_llamacpp"] = {
            "decode": ratio(c.get("decode_tok_s"), ref.get("decode_tok_s")) if ok and ref_ok else None,
            "prefill": ratio(c.get("prefill_tok_s"), ref.get("prefill_tok_s")) if ok and ref_ok else None,
            "peak_rss": ratio(c.get("peak_rss_tree_gb"), ref.get("peak_rss_tree_gb")) if ok and ref_ok else None,
        }
        if ok and agreement_ref is not None:
            c["agree_tokens_vs_ref"] = common_prefix(c["token_ids"], configs[agreement_ref]["token_ids"])

    # ---- report --------------------------------------------------------------------------------------------
    print(f"\n{args.model}: {args.tokens} greedy tokens, batch 1, {args.threads} threads, medians of {args.runs} "
          f"runs; memory read bandwidth {bandwidth:.1f} GB/s; machine {machine['cpu']}")
    header = (f"{'config':<20} {'decode tok/s':>12} {'prefill tok/s':>13} {'peak RSS GB':>11} {'PSS GB':>7} "
              f"{'GB/s':>6} {'BW frac':>7} {'x llama dec':>11} {'x llama pre':>11} {'x llama RSS':>11}")
    print(header)
    print("-" * len(header))
    for name, c in configs.items():
        if c["status"] != "ok" or not c["runs"]:
            print(f"{name:<20} {c['status'].upper()}: {(c['error'] or 'no runs').splitlines()[0][:150]}")
            continue
        v = c["vs_llamacpp"]
        print(f"{name:<20} {fmt(c['decode_tok_s'], '12.2f')} {fmt(c['prefill_tok_s'], '13.1f')} "
              f"{fmt(c['peak_rss_tree_gb'], '11.2f')} {fmt(c['pss_tree_gb'], '7.2f')} {fmt(c['achieved_gbs'], '6.1f')} "
              f"{fmt(c['bandwidth_fraction'], '7.2f')} {fmt(v['decode'], '11.2f')} {fmt(v['prefill'], '11.2f')} "
              f"{fmt(v['peak_rss'], '11.2f')}")
    print("peak RSS: the worker's peak, plus its executors' peaks for hybrid configs; PSS: now, same processes; "
          "GB/s: weight bytes read per token x decode tok/s")
    if agreement_ref is not None:
        print(f"\ngreedy agreement (leading tokens equal to {agreement_ref}'s, of {args.tokens}; "
              f"first {TEXT_TOKENS} tokens as text):")
        for name, c in configs.items():
            if c.get("token_ids"):
                print(f"  {name:<20} {c['agree_tokens_vs_ref']:>3}/{args.tokens}  prompt {c['prompt_tokens']} tok  "
                      f"{c['text_first_tokens']!r}")
    print(f"worker logs: {log_dir}")

    result = {
        "bench": "vs_llamacpp_decode", "model": args.model, "threads": args.threads, "new_tokens": args.tokens,
        "runs": args.runs, "batch": 1, "prompt": prompt, "prompt_tokens_pinfer": len(prompt_ids),
        "gguf": None if gguf_path is None else gguf_path.name,
        "llamacpp_available": llama_available,
        "llamacpp_install": None if llama_available else LLAMA_CPP_BUILD,
        "machine": machine, "mem_read_gbs": round(bandwidth, 2), "mem_read_threads": args.threads,
        "quiet_limit_cores": QUIET_CORES, "agreement_ref": agreement_ref,
        "configs": configs,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
