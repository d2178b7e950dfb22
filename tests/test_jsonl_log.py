"""JsonlLog: durable appends, a torn last line redone, a replaced or removed file rewritten with every record."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from runtime.jsonl_log import JsonlLog


def _ids(path: Path) -> list[int]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def _log(path: Path, seen: list | None = None) -> JsonlLog:
    return JsonlLog(path, key=lambda r: r["id"], on_record=None if seen is None else seen.append)


def test_reopening_keeps_complete_records_and_cuts_a_torn_line(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out.jsonl"
    seen: list = []
    with _log(out, seen) as log:
        assert seen == []
        log.append({"id": 1, "text": "é"})
    with open(out, "ab") as f:
        f.write(b'{"id": 2, "te')                                   # killed mid-write
    with _log(out, seen) as log:
        assert seen == [{"id": 1, "text": "é"}]
        log.append({"id": 2})
    assert _ids(out) == [1, 2] and "\\u00e9" in out.read_text()    # escaped unless asked otherwise


def test_a_corrupt_line_is_refused_with_its_offset(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1}\n\n{"nokey": 2}\n')
    with pytest.raises(ValueError, match="corrupt line at byte 11"):
        _log(out)


def test_a_replaced_or_removed_file_is_rewritten_with_every_record(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with _log(out) as log:
        log.append({"id": 0, "v": "run"})
        log.append({"id": 1, "v": "run"})
        older = tmp_path / "older.jsonl"                 # e.g. a checkout of an older commit of a tracked file
        older.write_text('{"id": 0, "v": "old"}\n{"id": 7, "v": "old"}\nnot json\n{"id": 8')
        os.replace(older, out)
        log.append({"id": 2, "v": "run"})
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert records == [{"id": 0, "v": "run"}, {"id": 1, "v": "run"},     # this run's records win, the
                           {"id": 7, "v": "old"}, {"id": 2, "v": "run"}]     # replacement's others stay
        out.unlink()
        log.append({"id": 3, "v": "run"})
        log.append({"id": 4, "v": "run"})                # and appends go to the new file from then on
    assert sorted(_ids(out)) == [0, 1, 2, 3, 4, 7]
    assert not list(tmp_path.glob("*.tmp"))


def test_appends_from_many_threads_all_land_whole(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with _log(out) as log:
        threads = [threading.Thread(target=lambda t=t: [log.append({"id": t * 100 + i, "pad": "x" * 5000})
                                                        for i in range(25)]) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(_ids(out)) == sorted(t * 100 + i for t in range(8) for i in range(25))
