"""Exceptions users meet: each says what was wrong and what to do about it."""
from __future__ import annotations


class PinferError(Exception):
    """Base class of pinfer's own errors."""


class ModelNotFoundError(PinferError, LookupError):
    """A model name that is neither in the registry nor a model directory / GGUF file."""


class MissingPackageDataError(PinferError, FileNotFoundError):
    """A registry model whose PyPI data packages are not installed."""


class ChecksumMismatchError(PinferError):
    """Model bytes whose sha256 differs from the pinned one."""


class InvalidRequestError(PinferError, ValueError):
    """A prompt or sampling parameter the engine cannot serve."""


class EngineDeadError(PinferError, RuntimeError):
    """An executor died or the engine was shut down while serving a request."""
