"""One evaluation run on disk: its settings (sidecar JSON), per-sample JSONL records (resumable), the summary."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from runtime.errors import PinferError
from runtime.jsonl_log import JsonlLog

logger = logging.getLogger(__name__)

HARNESS_VERSION = 1          # bump when prompts, stop strings or program building change


class SettingsMismatchError(PinferError, ValueError):
    """A result file holds records made under other settings (they must not mix)."""


@dataclass(slots=True, frozen=True)
class RunSettings:
    """Everything that decides a sample's text or verdict; records made under other settings must not mix."""

    model: str
    prompt_format: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    dtype: str
    sparsity: str
    activation_sparsity: float
    hot_fraction: float | None
    timeout_s: float
    memory_mb: int
    stop: tuple[str, ...]
    sparsity_artifacts: str | None = None      # digest of the thresholds / predictors used (sparsity.online)
    harness_version: int = HARNESS_VERSION
    weights: str = "fp32"                       # weight format (q8/q4/fp32): it changes the tokens
    prompt_compute: str | None = None           # quantized weights: the float type prompt rows are multiplied in

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))          # tuples -> lists, as read back from disk


@dataclass(slots=True)
class SampleRecord:
    """One judged sample: one JSONL line."""

    task_id: str
    sample: int
    prompt_format: str
    completion: str           # the model's text (stop string excluded)
    solution: str             # the source that was tested (without the tests)
    token_ids: list[int]
    num_tokens: int
    finish_reason: str
    passed: bool
    status: str               # passed | failed | timeout | error
    detail: str
    gen_s: float              # its request's time in the engine: queue + prefill + decode
    prefill_s: float          # its own prompt's prefill
    decode_s: float           # its decode time (first token to finish), batched with others
    exec_s: float             # sandbox wall time

    @property
    def key(self) -> tuple[str, int]:
        return self.task_id, self.sample


def sidecar(path: Path, kind: str) -> Path:
    """``results.jsonl`` -> ``results.<kind>.json``."""
    return path.with_name(f"{path.stem if path.suffix == '.jsonl' else path.name}.{kind}.json")


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class ResultStore:
    """Append-only JSONL (``JsonlLog``) of ``SampleRecord``s beside ``<name>.settings.json``; reopening resumes it."""

    def __init__(self, path: str | Path, settings: RunSettings) -> None:
        self.path = Path(path)
        self.settings_path = sidecar(self.path, "settings")
        self.settings = settings
        self._check_settings()
        self.records: dict[tuple[str, int], SampleRecord] = {}
        names = {f.name for f in fields(SampleRecord)}

        def load(r: dict[str, Any]) -> None:
            record = SampleRecord(**{k: v for k, v in r.items() if k in names})
            self.records[record.key] = record

        self._log = JsonlLog(self.path, key=lambda r: (r["task_id"], r["sample"]), on_record=load)
        if self.records:
            logger.info("%s: resuming with %d samples already judged", self.path, len(self.records))

    def _check_settings(self) -> None:
        mine = self.settings.to_json()
        if self.settings_path.exists():
            theirs = json.loads(self.settings_path.read_text())
            theirs.setdefault("weights", "fp32")         # recorded before the setting existed: float weights
            diff = {k: (mine.get(k), theirs.get(k)) for k in sorted(set(mine) | set(theirs))
                    if mine.get(k) != theirs.get(k)}
            if diff:
                said = "; ".join(f"{k}: {a!r} now vs {b!r} there" for k, (a, b) in diff.items())
                raise SettingsMismatchError(f"{self.path} holds results made with other settings ({said}); choose "
                                            f"another --output or delete {self.path} and {self.settings_path}")
        elif self.path.exists() and self.path.stat().st_size:
            raise ValueError(f"{self.path} has results but no {self.settings_path} to say how they were made; "
                             f"choose another --output")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.settings_path, mine)

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self.records

    def append(self, record: SampleRecord) -> None:
        """Record one sample durably (see ``JsonlLog``), from any thread."""
        self.records[record.key] = record
        self._log.append(asdict(record))

    def close(self) -> None:
        self._log.close()

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
