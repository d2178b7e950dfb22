"""An append-only JSONL file that loses no finished record.

Each record is flushed and fsynced as it is appended. Opening cuts a line left without its newline by a kill or a
full disk (that record is made again). A file replaced under a running job (a ``git checkout`` or ``stash`` of a
tracked results file, an editor's save) is noticed at the next append: the path is rewritten with every record
of the file this log appended to (still readable through its open handle) and every other record the replacement
brought, instead of appending on into a deleted file.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Key = Callable[[dict[str, Any]], Hashable]


def _complete_lines(data: bytes) -> list[tuple[int, bytes]]:
    """(byte offset, line) of each non-blank line that has its newline."""
    out, at = [], 0
    for raw in data[:data.rfind(b"\n") + 1].split(b"\n")[:-1]:
        if raw.strip():
            out.append((at, raw))
        at += len(raw) + 1
    return out


class JsonlLog:
    """``key`` names a record's identity: on a rewrite, a record of this log's file wins over the replacement's
    record with the same key. ``on_record`` receives each record the file held when opened (in file order); the
    log itself keeps none."""

    def __init__(self, path: str | Path, key: Key, ensure_ascii: bool = True,
                 on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path, self.key, self.ensure_ascii = Path(path), key, ensure_ascii
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")
        try:
            self._read_existing(on_record)
        except ValueError:
            self._file.close()
            raise

    def _read_existing(self, on_record: Callable[[dict[str, Any]], None] | None) -> None:
        self._file.seek(0)
        data = self._file.read()
        for at, raw in _complete_lines(data):
            try:
                obj = json.loads(raw)
                self.key(obj)
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{self.path} has a corrupt line at byte {at}") from None
            if on_record:
                on_record(obj)
        end = data.rfind(b"\n") + 1
        if end < len(data):
            logger.warning("%s: dropping an incomplete last line (%d bytes)", self.path, len(data) - end)
            self._file.truncate(end)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably, from any thread."""
        line = (json.dumps(record, ensure_ascii=self.ensure_ascii) + "\n").encode("utf-8")
        with self._lock:
            if self._replaced():
                self._rewrite()
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())

    def _replaced(self) -> bool:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return True
        mine = os.fstat(self._file.fileno())
        return (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev)

    def _rewrite(self) -> None:
        self._file.seek(0)
        lines = [ln for _, ln in _complete_lines(self._file.read())]
        known = {self._key_of(ln) for ln in lines} | {None}          # None: a line of theirs that is no record
        try:
            theirs = [ln for _, ln in _complete_lines(self.path.read_bytes())]
        except FileNotFoundError:
            theirs = []
        lines += [ln for ln in theirs if self._key_of(ln) not in known]
        logger.warning("%s was replaced or removed during the run: rewriting it with its %d records", self.path,
                       len(lines))
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.writelines(ln + b"\n" for ln in lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file.close()
        self._file = open(self.path, "a+b")

    def _key_of(self, line: bytes) -> Hashable | None:
        try:
            return self.key(json.loads(line))
        except (ValueError, KeyError, TypeError):
            logger.warning("%s: the replacement's line %.60r is not a record: left out", self.path, line)
            return None

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
