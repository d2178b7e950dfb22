"""Ray is private by default: an embedded cluster's processes may listen beyond loopback, but every one of
them belongs to a cluster with token authentication on, whose token only its owner can read, and a client
without the token is refused."""
from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from runtime.hybrid.cluster import RAY_ENV, ensure_auth_token, ensure_ray

CONNECT = "import ray, sys; ray.init(address=sys.argv[1]); print('connected', ray.cluster_resources().get('CPU'))"


@pytest.fixture(scope="module")
def embedded() -> str:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    assert ensure_ray()                                                 # pinfer's own embedded cluster
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append((c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()))
    return out


def _client(gcs: str, env: dict[str, str], timeout: float = 10) -> tuple[bool, str]:
    """(connected, its stderr) of a Ray client of ``gcs`` (a refused one retries until the timeout)."""
    try:
        r = subprocess.run([sys.executable, "-c", CONNECT, gcs], env=env, capture_output=True, text=True, check=False,
                           timeout=timeout)
        return "connected" in r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        err = e.stderr or b""
        return False, err.decode(errors="replace") if isinstance(err, bytes) else err


def test_an_embedded_cluster_asks_every_client_for_its_token(embedded: str, tmp_path: Path) -> None:
    ray_pids = {p.pid for p in psutil.Process().children(recursive=True)}
    sockets = _listening(ray_pids)
    assert sockets, "the embedded cluster's processes should listen somewhere"
    public = [s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback]
    if public:                                        # reachable from the network: the token is what guards them
        assert RAY_ENV["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_MODE"] == "token", public
    token = ensure_auth_token()
    assert token is not None and stat.S_IMODE(token.stat().st_mode) == 0o600
    stranger = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    stranger["HOME"] = str(tmp_path)                  # no ~/.ray/auth_token of the cluster's owner
    for env in (stranger, {**stranger, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}):
        connected, err = _client(embedded, env)       # no token: no channel; a wrong one: InvalidAuthToken
        assert not connected and ("InvalidAuthToken" in err or "Failed to connect to GCS" in err), err[-2000:]
    connected, err = _client(embedded, {**os.environ, **RAY_ENV}, timeout=120)      # the same address, reachable
    assert connected, err[-2000:]
