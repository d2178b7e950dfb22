"""Ray connection: attach to a running cluster (``address``, ``RAY_ADDRESS`` or a local ``ray start``),
or start an embedded one bound to localhost."""
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
}


def ensure_ray(address: str | None = None, object_store_bytes: int = 512 * 2**20) -> bool:
    """Connect this process to Ray; returns True when it started an embedded cluster (then it owns it)."""
    import ray

    if ray.is_initialized():
        return False
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS")
    if address is None:
        try:                                             # a local `ray start --head` cluster, if one runs
            ray.init(address="auto", namespace=NAMESPACE, log_to_driver=False)
            logger.info("attached to the running Ray cluster")
            return False
        except ConnectionError:
            pass
    if address is not None:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        logger.info("attached to Ray at %s", address)
        return False
    ray.init(namespace=NAMESPACE, include_dashboard=False, object_store_memory=object_store_bytes,
             _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    logger.info("started an embedded Ray cluster")
    return True


def cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
