"""Calibration / held-out text: the Python standard library's own sources, split by file.

Always present, real code, and disjoint from HumanEval (held out for the study). A file goes to the
held-out split when the first byte of sha1(its path relative to the stdlib) is below 256 * 0.2, so the
split is stable across machines with the same Python version; tests and vendored third-party code
(``test/``, ``idlelib/``, ``site-packages/``) are skipped.
"""
from __future__ import annotations

import hashlib
import math
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

HELD_OUT_SHARE = 0.2
_SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__",
              "lib2to3", "turtledemo", "ensurepip"}


def stdlib_files(split: str) -> list[Path]:
    """Sorted stdlib ``.py`` files of ``split`` ("calibration" or "heldout")."""
    if split not in ("calibration", "heldout"):
        raise ValueError(f"split must be 'calibration' or 'heldout', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS & set(rel.parts[:-1]):
            continue
        is_held_out = hashlib.sha1(rel.as_posix().encode()).digest()[0] < 256 * HELD_OUT_SHARE
        if is_held_out == (split == "heldout"):
            out.append(path)
    return out


def token_windows(encode, split: str, num_tokens: int, window: int = 256) -> list[list[int]]:
    """Consecutive ``window``-token pieces of the split's files (in order) until ``num_tokens`` are taken."""
    windows: list[list[int]] = []
    taken = 0
    for ids in _file_tokens(encode, split):
        for start in range(0, len(ids) - window + 1, window):
            windows.append(ids[start:start + window])
            taken += window
            if taken >= num_tokens:
                return windows
    if taken < num_tokens:
        raise ValueError(f"the {split} corpus has only {taken} tokens in {window}-token windows, {num_tokens} asked")
    return windows


def sample_windows(encode, split: str, num_tokens: int, window: int = 256, part: str = "all") -> list[list[int]]:
    """``num_tokens`` of ``split`` in ``window``-token windows from files spread evenly over it, a few windows
    per file, spaced evenly inside it. ``part`` "fit" / "validation" takes the calibration files outside /
    inside a fixed eighth of them (by a hash of the path), so thresholds are chosen on files the fit never
    read: a scorer fitted and thresholded on the first few files misjudges the others."""
    def is_validation(path: Path) -> bool:
        return hashlib.sha1("/".join(path.parts[-2:]).encode()).digest()[1] < 32

    files = [p for p in stdlib_files(split) if part == "all" or is_validation(p) == (part == "validation")]
    num_windows = max(1, num_tokens // window)
    per_file = math.ceil(num_windows / max(1, len(files)))
    step = max(1, len(files) * per_file // num_windows)
    windows: list[list[int]] = []
    for path in (files[i] for first in range(step) for i in range(first, len(files), step)):   # spread, then fill
        try:
            ids = encode(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        if len(ids) >= window:
            starts = ((np.arange(per_file) + 0.5) / per_file * (len(ids) - window)).astype(int)
            windows += [ids[i:i + window] for i in dict.fromkeys(starts.tolist())]
        if len(windows) >= num_windows:
            return windows[:num_windows]
    if not windows:
        raise ValueError(f"no {window}-token windows in the {split} corpus ({part} files)")
    return windows


def _file_tokens(encode, split: str) -> Iterator[list[int]]:
    for path in stdlib_files(split):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) > 2000:
            yield encode(text)


def describe() -> dict[str, object]:
    """What the manifest records about the corpus."""
    import sys

    return {"corpus": "python-stdlib", "python": sys.version.split()[0], "held_out_share": HELD_OUT_SHARE,
            "calibration_files": len(stdlib_files("calibration")), "heldout_files": len(stdlib_files("heldout"))}
