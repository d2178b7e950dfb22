"""Flags shared by the subcommands: the engine's (one per ``EngineConfig`` field, built from the fields
themselves) and sampling's; and the ``LLM`` that the engine flags ask for."""
from __future__ import annotations

import argparse
import types
import typing
from dataclasses import fields
from typing import Any

from runtime.config import EngineConfig

SAMPLING_FLAGS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop")


def add_engine_args(p: argparse.ArgumentParser, is_hybrid: bool | None) -> None:
    """A flag per engine option, defaulting to "not given" (``configs/engine.yaml`` decides). ``is_hybrid``:
    the command's own runtime (True: hybrid unless ``--local``; None: what the options imply)."""
    g = p.add_argument_group("engine (defaults: configs/engine.yaml)")
    hints = typing.get_type_hints(EngineConfig)
    for f in fields(EngineConfig):
        meta = f.metadata
        if not meta.get("cli") or f.name == "is_hybrid":
            continue
        g.add_argument(meta.get("flag") or "--" + f.name.replace("_", "-"), dest=f.name, default=None,
                       type=_scalar(hints[f.name]), choices=meta.get("choices"), help=meta["help"])
    runtime = g.add_mutually_exclusive_group()
    runtime.add_argument("--local", dest="is_hybrid", action="store_false", default=is_hybrid,
                         help="run in this process" + (" instead of the hybrid Ray runtime" if is_hybrid else ""))
    runtime.add_argument("--hybrid", dest="is_hybrid", action="store_true", default=is_hybrid,
                         help="run on the GPU/CPU executor actors over Ray" + (" (the default)" if is_hybrid else ""))


def _scalar(hint: Any) -> type:
    """``float | None`` -> float (argparse converts the flag's text with it)."""
    if isinstance(hint, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def engine_config(args: argparse.Namespace, **fixed: Any) -> EngineConfig:
    """The engine config the flags ask for (on top of configs/engine.yaml), with ``fixed`` options winning."""
    given = {name: getattr(args, name) for name in EngineConfig.option_names() if hasattr(args, name)}
    return EngineConfig.resolve(**{**given, **fixed})


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="RNG seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def llm_from_args(args: argparse.Namespace):
    """The LLM that the engine flags ask for."""
    from runtime import LLM

    return LLM(config=engine_config(args))
