"""Model registry: known names, package data found without imports, parts joined and verified."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import yaml

from runtime.model import registry
from runtime.errors import ChecksumMismatchError, MissingPackageDataError, ModelNotFoundError


def _write_registry(tmp: Path, files: list[str], sha: str, size: int) -> Path:
    path = tmp / "models.yaml"
    path.write_text(yaml.safe_dump({"default": "fake", "models": {"fake": {
        "description": "test model", "packages": ["fake-pkg==1.0"], "files": files, "sha256": sha, "size": size}}}))
    return path


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, bytes]:
    """An importable-looking package (whose __init__ would fail) carrying a GGUF split in two parts."""
    pkg = tmp_path / "site" / "fake_model_pkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the registry must not import me')\n")
    payload = b"GGUF" + bytes(range(256)) * 50
    (pkg / "data" / "part01.bin").write_bytes(payload[:5000])
    (pkg / "data" / "part02.bin").write_bytes(payload[5000:])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PINFER_CACHE", str(tmp_path / "cache"))
    return pkg, payload


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ModelNotFoundError) as e:
        registry.resolve_model("no-such-model")
    assert "smollm2-135m" in str(e.value) and "qwen2.5-coder-0.5b" in str(e.value)


def test_registry_rejects_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"default": "m", "models": {"m": {
        "description": "", "packages": [], "files": ["a/b"], "sha256": "0" * 64, "size": 1, "colour": "red"}}}))
    with pytest.raises(ValueError, match="colour"):
        registry.load_registry(path)


def test_parts_are_joined_and_verified(fake_package, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, payload = fake_package
    files = ["fake_model_pkg/data/part01.bin", "fake_model_pkg/data/part02.bin"]
    reg = _write_registry(tmp_path, files, hashlib.sha256(payload).hexdigest(), len(payload))
    source = registry.load_registry(reg)[1]["fake"]
    out = registry._verified_gguf(source)
    assert out.read_bytes() == payload and "fake_model_pkg" not in sys.modules
    assert registry._verified_gguf(source) == out           # second call: stamp hit, no re-hash needed


def test_checksum_mismatch_is_an_error_and_leaves_nothing(fake_package, tmp_path: Path) -> None:
    files = ["fake_model_pkg/data/part01.bin", "fake_model_pkg/data/part02.bin"]
    source = registry.load_registry(_write_registry(tmp_path, files, "ab" * 32, 1))[1]["fake"]
    with pytest.raises(ChecksumMismatchError, match="expected abab"):
        registry._verified_gguf(source)
    assert not list((tmp_path / "cache" / "gguf").glob("fake.gguf*"))


def test_missing_package_data_says_how_to_install(tmp_path: Path) -> None:
    source = registry.load_registry(_write_registry(tmp_path, ["not_installed_pkg_xyz/data/p.bin"], "0" * 64, 1))[1]["fake"]
    with pytest.raises(MissingPackageDataError, match="pinfer download fake"):
        registry.locate(source)


def test_directory_without_config_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="config.json"):
        registry.resolve_model(str(tmp_path))


def test_pickle_checkpoints_are_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    from runtime.model.weights import load_transformer

    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load_transformer(d)


def test_local_hf_directory_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    """The big models of the paper's pair are user-provided directories under $PINFER_MODELS."""
    cfg = tmp_path / "configs"
    cfg.mkdir()
    (cfg / "models.yaml").write_text(yaml.safe_dump({"default": "big", "models": {"big": {
        "description": "a big model", "path": "$PINFER_MODELS/big-hf", "hf_repo": "org/big"}}}))
    monkeypatch.setattr(registry, "CONFIG_DIR", cfg)
    monkeypatch.delenv("PINFER_MODELS", raising=False)
    with pytest.raises(ModelNotFoundError, match="set the variables"):
        registry.resolve_model("big")
    monkeypatch.setenv("PINFER_MODELS", str(tmp_path / "models"))
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download org/big"):
        registry.resolve_model("big")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "big-hf").symlink_to(tiny_model_dir)
    assert registry.resolve_model("big") == tmp_path / "models" / "big-hf"
    with pytest.raises(ModelNotFoundError, match="not on PyPI"):
        registry.download("big")
    real = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "models.yaml").read_text())
    assert {"llama-33b", "llama-2-70b", "relu-llama-70b"} <= set(real["models"])
