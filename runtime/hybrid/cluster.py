"""Ray connection: attach to the cluster named by ``address`` or ``RAY_ADDRESS`` (``"auto"``: the local
``ray start --head`` cluster), or else start an embedded one.

Without an address pinfer never probes for a cluster: on a shared machine "the latest cluster" may
be somebody else's embedded one. Ray's token authentication is on (``RAY_AUTH_MODE=token``): Ray's
processes listen on the machine's interfaces, and every RPC and HTTP entry of the cluster asks for the
token in ``~/.ray/auth_token`` (``RAY_AUTH_TOKEN_PATH`` elsewhere), which only its owner can read.
"""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

logger = logging.getLogger(__name__)

NAMESPACE = "pinfer"
# Environment every pinfer driver and cluster shares (see README, "Ray settings").
RAY_ENV = {
    "RAY_worker_niceness": "0",                    # executors are Ray workers; default niceness 15 starves them
    "RAY_AUTH_MODE": "token",                      # the same on every node and client (see ensure_auth_token)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",      # keep Ray's ports on loopback
    "RAY_USAGE_STATS_ENABLED": "0",
    "OMP_WAIT_POLICY": "PASSIVE",                  # see runtime/__init__.py: OpenMP threads wait for work briefly,
    "GOMP_SPINCOUNT": "100000",                    # ~1-5 ms, then sleep (executors: EXECUTOR_ENV)
}
# The hybrid's two executors share the cores and hand every layer to each other: a thread of one spinning for
# work would take the core the other computes on (qwen2.5-coder-0.5b q8 hybrid@0.5: 23.9 -> 17.4 tok/s).
EXECUTOR_ENV = {**RAY_ENV, "GOMP_SPINCOUNT": "0"}


def ensure_auth_token() -> Path | None:
    """Ray's token file, created (a random 256-bit token) if absent and readable by its owner only; None when
    ``RAY_AUTH_TOKEN`` holds the token itself. Run before ``ray start`` or ``ray.init``."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:                  # another process made it meanwhile
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            logger.info("created Ray's authentication token at %s", path)
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return path


def ensure_ray(address: str | None = None, object_store_bytes: int = 512 * 2**20) -> bool:
    """Connect this process to Ray; returns True when it started an embedded cluster (then it owns it)."""
    for key, value in RAY_ENV.items():          # (``import runtime`` set them already, before Ray's import)
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return False
    if os.environ["RAY_AUTH_MODE"] == "token":
        ensure_auth_token()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        except ConnectionError as e:
            raise ConnectionError(f"no Ray cluster at {address!r} ({e}); start one with `ray start --head` "
                                  f"or leave the address unset for an embedded cluster") from None
        logger.info("attached to Ray at %s", address)
        return False
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", namespace=NAMESPACE, include_dashboard=False, object_store_memory=object_store_bytes,
             _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    logger.info("started an embedded Ray cluster")
    return True


def cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
