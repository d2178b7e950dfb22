"""``pinfer batch``: a resumable JSONL job. Every finished result is appended durably at once (``JsonlLog``); a rerun
skips ids already in the output; bad lines go to an errors file with their line number and the job
goes on.

Input lines: ``{"id": ..., "prompt": "..."}`` or ``{"id": ..., "messages": [...]}`` (chat template), plus
any of the sampling fields below, which override the job's defaults for that line.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.api import EngineClient, generate_retrying
from runtime.errors import InvalidRequestError
from runtime.jsonl_log import JsonlLog
from runtime.outputs import RequestOutput
from runtime.sampling import SamplingParams

logger = logging.getLogger(__name__)
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos")
LINE_FIELDS = {"id", "prompt", "messages", *SAMPLING_FIELDS}


@dataclass(slots=True)
class Job:
    line: int
    id: str
    prompt: str | None
    messages: list[dict[str, str]] | None
    params: SamplingParams


@dataclass(slots=True)
class Summary:
    input_lines: int = 0
    already_done: int = 0
    completed: int = 0
    errors: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    error_lines: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"input_lines": self.input_lines, "already_done": self.already_done, "completed": self.completed,
                "errors": self.errors, "completion_tokens": self.completion_tokens, "wall_s": round(self.wall_s, 3),
                "tokens_per_s": round(self.tokens_per_s, 2), "error_lines": self.error_lines[:50]}


def open_output(output: Path, done: set[str]) -> JsonlLog:
    """The job's output log (see ``JsonlLog``), the ids it already holds added to ``done``: a torn last line is
    cut and redone; a file that is not a pinfer batch output is refused."""
    try:
        return JsonlLog(output, key=lambda r: str(r["id"]), ensure_ascii=False,
                        on_record=lambda r: done.add(str(r["id"])))
    except ValueError as e:
        raise ValueError(f"{e}; it is not a pinfer batch output (move it away to start over)") from None


def finished_ids(output: Path) -> set[str]:
    """Ids already in ``output``: a record counts only with its newline."""
    done: set[str] = set()
    open_output(output, done).close()
    return done


def parse_jobs(lines: Iterator[str | bytes], defaults: dict[str, Any],
               errors: Callable[[int, Any, str], None]) -> Iterator[Job]:
    """Valid jobs in input order; lines that are not UTF-8, malformed or too deeply nested JSON, invalid fields
    and duplicate ids are reported through ``errors``."""
    seen: set[str] = set()
    for n, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                errors(n, None, f"not UTF-8 text: {e}")
                continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            errors(n, None, f"malformed JSON: {e}" if isinstance(e, ValueError) else "JSON nested too deeply")
            continue
        if not isinstance(obj, dict):
            errors(n, None, f"a line must be a JSON object, got {type(obj).__name__}")
            continue
        rid = obj.get("id")
        problem = _check_line(obj)
        if problem is None and str(rid) in seen:
            problem = f"duplicate id {rid!r} (first seen earlier in the input)"
        if problem is None:
            try:
                params = SamplingParams(**{**defaults, **{k: obj[k] for k in SAMPLING_FIELDS if k in obj}})
            except (InvalidRequestError, TypeError) as e:
                problem = str(e)
        if problem is not None:
            errors(n, rid, problem)
            continue
        seen.add(str(rid))
        yield Job(n, str(rid), obj.get("prompt"), obj.get("messages"), params)


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a string anywhere in ``value`` holds a lone UTF-16 surrogate (JSON allows "\\ud800"; UTF-8 cannot
    encode it, so neither the tokenizer nor the output file could take it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    return isinstance(value, list) and any(_has_lone_surrogate(v) for v in value)


def _check_line(obj: dict[str, Any]) -> str | None:
    if _has_lone_surrogate(obj):
        return "a string holds a lone surrogate (not valid Unicode text)"
    unknown = sorted(set(obj) - LINE_FIELDS)
    if unknown:
        return f"unknown field(s) {unknown}; allowed: {sorted(LINE_FIELDS)}"
    rid = obj.get("id")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or rid == "":
        return f"'id' must be a non-empty string or an integer, got {rid!r}"
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        return "a line needs exactly one of 'prompt' or 'messages'"
    if has_prompt and not (isinstance(obj["prompt"], str) and obj["prompt"]):
        return "'prompt' must be a non-empty string"
    if has_messages and not (isinstance(obj["messages"], list) and obj["messages"] and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in obj["messages"])):
        return "'messages' must be a non-empty list of {role, content} strings"
    return None


class BatchJob:
    """Runs a JSONL file on ``client``: an ``LLM`` (in process or hybrid) or a served engine's ``Client``."""

    def __init__(self, client: EngineClient, concurrency: int = 32) -> None:
        self.client = client
        self.concurrency = concurrency

    def run(self, input_path: Path, output: Path, errors_path: Path, defaults: dict[str, Any],
            progress: bool = True) -> Summary:
        from tqdm import tqdm

        summary = Summary()
        t0 = time.perf_counter()
        errors_path.write_bytes(b"")                     # this run's errors; an error may quote bad text: escaped
        done: set[str] = set()
        with input_path.open("rb") as f_in, open_output(output, done) as out_log, \
                JsonlLog(errors_path, key=lambda r: r["line"]) as err_log:

            def error(line: int, rid: Any, message: str) -> None:
                summary.errors += 1
                summary.error_lines.append(line)
                err_log.append({"line": line, "id": rid, "error": message})

            lines = f_in.readlines()
            summary.input_lines = sum(1 for ln in lines if ln.strip())
            jobs = [j for j in parse_jobs(iter(lines), defaults, error) if j.id not in done]
            summary.already_done = len(done)
            bar = tqdm(total=len(jobs), desc="batch", unit="req", disable=not progress, dynamic_ncols=True)
            with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="pinfer-batch") as pool:
                pending: dict[Future, Job] = {}
                queue = iter(jobs)
                while True:
                    while len(pending) < self.concurrency and (job := next(queue, None)) is not None:
                        pending[pool.submit(self._one, job)] = job
                    if not pending:
                        break
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        job = pending.pop(fut)
                        try:
                            out = fut.result()
                        except Exception as e:  # noqa: BLE001 - bad prompt, failed request, dead engine: this line only
                            error(job.line, job.id, f"{type(e).__name__}: {e}")
                        else:
                            out_log.append({"id": job.id, "line": job.line, "text": out.text,
                                            "finish_reason": out.finish_reason, "token_ids": out.token_ids,
                                            "prompt_tokens": len(out.prompt_token_ids),
                                            "completion_tokens": len(out.token_ids), "metrics": out.metrics})
                            summary.completed += 1
                            summary.completion_tokens += len(out.token_ids)
                        bar.update(1)
                        elapsed = time.perf_counter() - t0
                        bar.set_postfix_str(f"{summary.completion_tokens / max(elapsed, 1e-9):.1f} tok/s, "
                                            f"{summary.errors} errors")
            bar.close()
        summary.wall_s = time.perf_counter() - t0
        return summary

    def _one(self, job: Job) -> RequestOutput:
        prompt = job.prompt if job.prompt is not None else self.client.apply_chat_template(job.messages)
        return generate_retrying(self.client, prompt, job.params)
