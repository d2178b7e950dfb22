"""Ray connection: attach to the cluster named by ``address`` or ``RAY_ADDRESS`` (``"auto"``: the local
``ray start --head`` cluster), or else start an embedded one bound to localhost.

Without an address pinfer never probes for a cluster: on a shared machine "the latest cluster" may
be somebody else's embedded one.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

NAMESPACE = "pinfer"
# Environment every pinfer driver and cluster shares (see README, "Ray settings").
RAY_ENV = {
    "RAY_worker_niceness": "0",                    # executors are Ray workers; default niceness 15 starves them
    "RAY_AUTH_MODE": "disabled",                   # one auth mode everywhere: embedded init would enable tokens
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",      # keep Ray's ports on loopback
    "RAY_USAGE_STATS_ENABLED": "0",
    "OMP_WAIT_POLICY": "PASSIVE",                  # see runtime/__init__.py: spinning OpenMP threads starve the kernel
}


def ensure_ray(address: str | None = None, object_store_bytes: int = 512 * 2**20) -> bool:
    """Connect this process to Ray; returns True when it started an embedded cluster (then it owns it)."""
    import ray

    if ray.is_initialized():
        return False
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
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
