"""Build a C kernel at first use for the CPU it runs on (``-march=native``) and load it with ctypes.

The library is cached under the pinfer cache, keyed by the source, the compiler and the CPU's flags, so a
cache shared between machines of different instruction sets never loads a library built for another.
ctypes releases the GIL for the duration of each call.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
from functools import cache
from pathlib import Path

from runtime.paths import cache_dir

logger = logging.getLogger(__name__)


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo has none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@cache
def cpu_model() -> str:
    """The CPU's model name (what benchmarks and eval summaries name the machine by)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_library(source: Path) -> ctypes.CDLL | None:
    """The compiled ``source`` (built once per CPU kind), or None when it cannot be built or loaded."""
    cc = os.environ.get("CC", "gcc")
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))     # what it may include
    key = source.read_bytes() + headers + cc.encode() + platform.machine().encode() + \
        " ".join(sorted(cpu_flags())).encode()
    out = cache_dir() / "kernels" / f"{source.stem}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    try:
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(source), "-o", str(tmp),
                            "-lm"], check=True, capture_output=True, timeout=180)
            os.replace(tmp, out)
        return ctypes.CDLL(str(out))
    except subprocess.CalledProcessError as e:
        logger.warning("building %s failed: %s", source.name, e.stderr.decode(errors="replace")[-2000:])
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("kernel %s unavailable: %s", source.name, e)
    return None
