"""The HumanEval run: generate (requests continuously batched), judge each sample in the sandbox as it comes,
resume, summarize."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.evals.humaneval import FORMATS, Problem, PromptFormat, build_prompt, load_problems, solution_source, \
    stop_strings
from runtime.evals.passk import mean_pass_at_k
from runtime.evals.results import ResultStore, RunSettings, SampleRecord, sidecar, write_json
from runtime.evals.sandbox import ExecResult, Sandbox, SandboxLimits, require_isolation
from runtime.api import generate_retrying
from runtime.config import EngineConfig, prompt_compute_dtype
from runtime.llm import LLM
from runtime.model.registry import open_model
from runtime.outputs import RequestOutput
from runtime.sampling import SamplingParams
from runtime.sparsity.online import artifacts_digest

logger = logging.getLogger(__name__)

PASS_KS = (1, 10, 100)


@dataclass(slots=True)
class EvalConfig:
    """One ``pinfer eval humaneval`` invocation: what to ask, how to judge, and the engine that answers."""

    output: Path
    engine: EngineConfig = field(default_factory=EngineConfig.load)
    prompt_format: PromptFormat = "raw"
    limit: int | None = None
    tasks: list[str] | None = None
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    max_tokens: int = 512
    batch_size: int = 16
    num_workers: int | None = None
    timeout_s: float = 10.0
    memory_mb: int = 1024
    allow_weak_sandbox: bool = False      # run even where the sandbox lacks isolation features (see sandbox.py)

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        problems = []
        if self.prompt_format not in FORMATS:
            problems.append(f"prompt format must be one of {FORMATS}, got {self.prompt_format!r}")
        for name in ("num_samples", "max_tokens", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.num_workers is not None and self.num_workers < 1:
            problems.append(f"workers must be >= 1, got {self.num_workers!r}")
        if problems:
            raise ValueError("; ".join(problems))
        SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        SandboxLimits(self.timeout_s, self.memory_mb)

    def run_settings(self, engine: EngineConfig, sparsity_artifacts: str | None = None) -> RunSettings:
        """What decides a sample, with ``engine`` resolved for the model (its name is the model's)."""
        return RunSettings(engine.model, self.prompt_format, self.max_tokens, float(self.temperature),
                           float(self.top_p), self.seed if self.temperature > 0 else None, engine.dtype,
                           engine.sparsity, float(engine.activation_sparsity),
                           engine.hot_fraction if engine.is_hybrid else None, float(self.timeout_s), self.memory_mb,
                           tuple(stop_strings(self.prompt_format)), sparsity_artifacts, weights=engine.weights,
                           prompt_compute=None if engine.weights == "fp32" else prompt_compute_dtype())


def sample_seed(seed: int | None, task_id: str, sample: int) -> int | None:
    """A seed per (task, sample), independent of batching, so a resumed run draws the same samples."""
    if seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{seed}/{task_id}/{sample}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def run_humaneval(cfg: EvalConfig, llm: LLM | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Evaluate ``cfg`` and return the summary, also written to disk. ``llm``: an already loaded model (whose
    sparsity settings must be ``cfg.engine``'s; its own config is recorded), else one is loaded from
    ``cfg.engine`` when there is anything to generate. Refuses (``WeakSandboxError``) before anything else where
    the sandbox cannot isolate model-written code, unless ``cfg.allow_weak_sandbox``."""
    t0 = time.perf_counter()
    require_isolation(cfg.allow_weak_sandbox)
    problems = load_problems(cfg.limit, cfg.tasks)
    if llm is not None and (llm.config.sparsity, llm.config.activation_sparsity) != \
            (cfg.engine.sparsity, cfg.engine.activation_sparsity):
        raise ValueError(f"the given LLM runs sparsity {llm.config.sparsity!r} at {llm.config.activation_sparsity}, "
                         f"the config says {cfg.engine.sparsity!r} at {cfg.engine.activation_sparsity}; results "
                         f"would be recorded under the wrong settings")
    engine, model_dir = (llm.config, llm.model_dir) if llm is not None else open_model(cfg.engine)[:2]
    settings = cfg.run_settings(engine, artifacts_digest(model_dir, engine))
    if cfg.num_samples > 1 and cfg.temperature == 0:
        logger.warning("greedy decoding with --n %d: every sample of a problem is the same", cfg.num_samples)
    with ResultStore(cfg.output, settings) as store:
        todo = [(p, s) for p in problems for s in range(cfg.num_samples) if (p.task_id, s) not in store]
        logger.info("%d problems x %d samples: %d to run, %d already in %s", len(problems), cfg.num_samples,
                    len(todo), len(problems) * cfg.num_samples - len(todo), cfg.output)
        owns_llm = llm is None and bool(todo)
        if owns_llm:
            llm = LLM(config=engine)
        try:
            if todo:
                gen_wall = _generate_and_judge(cfg, llm, store, todo, len(problems), show_progress)
                new_tokens = sum(store.records[(p.task_id, s)].num_tokens for p, s in todo if (p.task_id, s) in store)
            summary = summarize(cfg, settings, problems, store, llm, time.perf_counter() - t0, len(todo))
            if todo:
                summary["throughput_tokens_per_s"] = round(new_tokens / gen_wall, 2)    # this run, all in flight
                summary["generation_wall_s"] = round(gen_wall, 2)
        finally:
            if owns_llm:
                llm.shutdown()
    if todo:
        summary["machine"] = machine(settings.hot_fraction is not None)
    else:
        previous, achieved = _previous_run(cfg.output)
        summary.update(previous)
        summary["engine"]["achieved_sparsity"] = achieved
    if engine.sparsity == "predictor":        # the store holds only runs of these predictors (their digest)
        from runtime.sparsity.predictor import predictor_report

        report = predictor_report(model_dir, engine.activation_sparsity)
        summary["engine"]["predictor_recall"] = None if report is None else report["mean"]["recall"]
    write_json(sidecar(cfg.output, "summary"), summary)
    return summary


def machine(hybrid: bool) -> dict[str, Any]:
    """Where this run's samples were generated: speeds from different machines do not compare (Pass@1 does)."""
    import torch

    from runtime.model.kernels.build import cpu_model

    gpu = torch.cuda.get_device_name(0) if hybrid and torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "cpu": cpu_model(), "gpu": gpu}


def _previous_run(output: Path) -> tuple[dict[str, Any], float | None]:
    """A rerun that generated nothing keeps what its summary measured (the run that generated the samples did):
    the machine and the times, and the achieved sparsity."""
    try:
        old = json.loads(sidecar(output, "summary").read_text())
    except (OSError, ValueError):
        return {"machine": None}, None
    return ({"machine": old.get("machine"),
             **{k: old[k] for k in ("wall_s", "throughput_tokens_per_s", "generation_wall_s") if k in old}},
            (old.get("engine") or {}).get("achieved_sparsity"))


class _Progress:
    """Counts each problem's outstanding samples; ticks the bar when a problem's last one is judged."""

    def __init__(self, todo: list[tuple[Problem, int]], num_problems: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.left = Counter(p.task_id for p, _ in todo)
        self.num_passed = 0
        self.lock = threading.Lock()
        self.bar = tqdm(total=num_problems, initial=num_problems - len(self.left), unit="problem",
                        desc="humaneval", disable=not enabled, dynamic_ncols=True)

    def done(self, record: SampleRecord) -> None:
        with self.lock:
            self.num_passed += record.passed
            self.left[record.task_id] -= 1
            if self.left[record.task_id] == 0:
                self.bar.update(1)
            self.bar.set_postfix(passed=self.num_passed, refresh=False)


def _generate_and_judge(cfg: EvalConfig, llm: LLM, store: ResultStore, todo: list[tuple[Problem, int]],
                        num_problems: int, show_progress: bool) -> float:
    """Keep ``batch_size`` requests in flight (the engine batches them continuously, a finished one making
    room for the next at once); each answer goes to the sandbox pool as it arrives and is recorded when
    judged. Returns the generation wall time."""
    progress = _Progress(todo, num_problems, show_progress)
    failures: list[BaseException] = []
    judged: list[Future[ExecResult]] = []
    stop = stop_strings(cfg.prompt_format)

    def generate(item: tuple[Problem, int]) -> RequestOutput:
        problem, sample = item
        prompt = build_prompt(problem, cfg.prompt_format, llm.tokenizer.apply_chat_template)
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                seed=sample_seed(cfg.seed, problem.task_id, sample), stop=stop)
        return generate_retrying(llm, prompt, params)

    t0 = time.perf_counter()
    with Sandbox(cfg.num_workers, SandboxLimits(cfg.timeout_s, cfg.memory_mb)) as sandbox, \
            ThreadPoolExecutor(cfg.batch_size, thread_name_prefix="humaneval-gen") as pool:
        answers = {pool.submit(generate, item): item for item in todo}
        for fut in as_completed(answers):
            (problem, sample), out = answers[fut], fut.result()
            solution = solution_source(problem, cfg.prompt_format, out.text)
            job = sandbox.submit(problem.program(solution))
            job.add_done_callback(_recorder(store, progress, failures, problem, sample, cfg.prompt_format, out,
                                            solution))
            judged.append(job)
        gen_wall = time.perf_counter() - t0
        for job in judged:
            job.result()
    progress.bar.close()
    if failures:
        raise RuntimeError(f"could not record {len(failures)} results: {failures[0]!r}") from failures[0]
    return gen_wall


def _recorder(store: ResultStore, progress: _Progress, failures: list[BaseException], problem: Problem, sample: int,
              fmt: str, out: RequestOutput, solution: str):
    def record(fut: Future[ExecResult]) -> None:
        try:
            r = fut.result()
            m = out.metrics
            rec = SampleRecord(problem.task_id, sample, fmt, out.text, solution, list(out.token_ids),
                               len(out.token_ids), out.finish_reason, r.passed, r.status, r.detail,
                               round(m.get("total_s", 0.0), 4), round(m.get("prefill_s", 0.0), 4),
                               round(m.get("decode_s", 0.0), 4), round(r.elapsed_s, 4))
            store.append(rec)
            progress.done(rec)
        except BaseException as e:              # a callback's exception would vanish; keep it for the caller
            failures.append(e)
    return record


def summarize(cfg: EvalConfig, settings: RunSettings, problems: list[Problem], store: ResultStore,
              llm: LLM | None, wall_s: float, num_new: int) -> dict[str, Any]:
    """pass@k over the selected problems from every recorded sample, with counts, tokens and engine settings."""
    records = [store.records[(p.task_id, s)] for p in problems for s in range(cfg.num_samples)
               if (p.task_id, s) in store]
    per_task = Counter(r.task_id for r in records)
    correct = Counter(r.task_id for r in records if r.passed)
    num_tokens = sum(r.num_tokens for r in records)
    gen_s = sum(r.gen_s for r in records)
    decode_s = sum(r.decode_s for r in records)
    num_decoded = sum(max(r.num_tokens - 1, 0) for r in records)     # the first token comes from prefill
    engine = {"model": settings.model, "weights": settings.weights, "dtype": settings.dtype,
              "sparsity": settings.sparsity,
              "activation_sparsity": settings.activation_sparsity, "hot_fraction": settings.hot_fraction,
              "achieved_sparsity": llm.achieved_sparsity() if llm is not None and num_new else None,
              "runtime": "hybrid" if settings.hot_fraction is not None else "in-process"}
    return {
        "benchmark": "humaneval",
        "output": cfg.output.name,                    # the JSONL beside this summary (no machine paths)
        "prompt_format": settings.prompt_format,
        "num_problems": len(problems),
        "samples_per_problem": cfg.num_samples,
        **mean_pass_at_k(((per_task[p.task_id], correct[p.task_id]) for p in problems if per_task[p.task_id]),
                         PASS_KS),
        "num_samples": len(records),
        "num_passed": sum(r.passed for r in records),
        "num_new_samples": num_new,
        "status": dict(Counter(r.status for r in records)),
        "finish_reasons": dict(Counter(r.finish_reason for r in records)),
        "num_generated_tokens": num_tokens,
        "request_s": round(gen_s, 2),                 # summed over requests (they overlap in time)
        "decode_tokens_per_s": round(num_decoded / decode_s, 2) if decode_s > 0 else None,   # per request
        "wall_s": round(wall_s, 2),
        "engine": engine,
        "settings": {**settings.to_json(), "batch_size": cfg.batch_size,
                     "workers": cfg.num_workers, "limit": cfg.limit, "tasks": cfg.tasks},
    }

