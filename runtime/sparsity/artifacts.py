"""Offline results beside the model: ``<model_dir>/sparsity/<name>.safetensors`` + ``<name>.json``.

Each manifest records the model fingerprint, the corpus and the parameters; loading checks the
fingerprint so results from another model (or an older conversion) are never used silently.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from runtime.errors import PinferError
from runtime.paths import checkpoint_files


class MissingArtifactError(PinferError, FileNotFoundError):
    """An offline step has not been run for this model and these parameters."""


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and each weight file's name, size, first and last MiB (fast, content-bound);
    computed once per process for files that have not changed since."""
    files = [Path(model_dir) / "config.json", *checkpoint_files(Path(model_dir))]
    return _fingerprint(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=64)
def _fingerprint(files: tuple[tuple[str, int, int], ...]) -> str:
    (config, _, _), *weights = files
    h = hashlib.sha256(Path(config).read_bytes())
    for name, size, _ in weights:
        h.update(f"{Path(name).name}:{size}".encode())
        with open(name, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def artifact_dir(model_dir: Path) -> Path:
    return Path(model_dir) / "sparsity"


def sparsity_tag(activation_sparsity: float) -> str:
    return f"s{round(activation_sparsity * 100):02d}"


def save(model_dir: Path, name: str, arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> Path:
    d = artifact_dir(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(d / f"{name}.safetensors"))
    full = {"name": name, "model_fingerprint": model_fingerprint(Path(model_dir)), **manifest}
    (d / f"{name}.json").write_text(json.dumps(full, indent=1, default=_jsonable))
    return d / f"{name}.safetensors"


def load(model_dir: Path, name: str, how_to_make: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    d = artifact_dir(model_dir)
    if not (d / f"{name}.json").is_file():
        raise MissingArtifactError(f"{d / name} not found; create it with `{how_to_make}`")
    manifest = json.loads((d / f"{name}.json").read_text())
    if manifest.get("model_fingerprint") != model_fingerprint(Path(model_dir)):
        raise MissingArtifactError(f"{d / name} was made for other weights; rerun `{how_to_make}`")
    return load_file(str(d / f"{name}.safetensors")), manifest


VOLATILE = ("seconds",)       # manifest keys that differ between two runs making the same arrays


def manifest_digest(model_dir: Path, names: list[str], how_to_make: str, level: str | None = None) -> str:
    """16 hex digits of sha256 over the named manifests (each rewritten whenever its arrays are). A manifest of
    several ``levels`` (the predictors') counts by what makes ``level``'s arrays: its parameters and that
    level's report, not the time it took or the other levels trained beside it, so that the same offline step
    rerun (deterministic on one machine) gives the same digest."""
    h = hashlib.sha256()
    for name in names:
        path = artifact_dir(model_dir) / f"{name}.json"
        if not path.is_file():
            raise MissingArtifactError(f"{artifact_dir(model_dir) / name} not found; create it with `{how_to_make}`")
        raw = path.read_bytes()
        manifest = json.loads(raw)
        if level is None or "levels" not in manifest:
            h.update(raw)
            continue
        kept = {k: v for k, v in manifest.items() if k not in VOLATILE}
        kept["levels"] = {level: manifest["levels"].get(level)}
        h.update(json.dumps(kept, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)
