"""Engine replicas (``pinfer serve --replicas``) on a multi-node Ray cluster on this machine: one raylet per
node (``ray.cluster_utils.Cluster``), the default small model. Requests spread over replicas on different nodes
with each replica's executors on its own node; a batch job survives losing a node mid-run (every line written
once), and Serve brings the lost replica back when a node with room joins, or replaces a replica whose GPU
executor died; the HTTP API and the HumanEval harness run over the replicas."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from runtime import LLM, SamplingParams
from runtime.config import EngineConfig
from runtime.evals.harness import EvalConfig, run_humaneval
from runtime.serving.batch_job import BatchJob
from runtime.serving.http_api import BackgroundHttpServer

MODEL = "smollm2-135m"
PROMPTS = ["def fib(n):", "The capital of France is", "import os", "class Stack:"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs for work (Serve's controller) and two two-CPU nodes: one replica (1 + 1 executor
    threads) fits on each."""
    import ray
    from ray.cluster_utils import Cluster

    from runtime.hybrid.cluster import NAMESPACE, ensure_auth_token

    if ray.is_initialized():
        ray.shutdown()
    ensure_auth_token()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [c.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=c.address, namespace=NAMESPACE, log_to_driver=False)
    c.wait_for_nodes()
    yield c, nodes
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    c.shutdown()


def _until(what: str, check, timeout: float = 120.0, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _running_replicas(name: str) -> int:
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        return 0
    return app.deployments["engine"].replica_states.get("RUNNING", 0)


def test_replicas_spread_over_nodes_and_survive_a_lost_node(cluster, tmp_path: Path) -> None:
    from runtime.serving.client import connect
    from runtime.serving.replicas import start_replicas, stop_replicas

    c, nodes = cluster
    # Every neuron on the GPU executor's side: a replica's tokens then equal the in-process engine's bit for bit
    # (a hot/cold split sums the same partials in another order: equal up to rounding, tests/test_quantized.py).
    config = EngineConfig.resolve(model=MODEL, hot_fraction=1.0, engine_name="replicas-test")   # 1 + 1 threads
    with pytest.raises(ValueError, match="do not fit"):            # 3 two-CPU replicas, 2 x 2 CPUs: refused at once
        start_replicas(config, 3)
    client = start_replicas(config, 2)
    assert connect(c.address, "replicas-test").model_name == MODEL  # the name finds the replicas too

    # Two replicas on two nodes, each with both executors on its own node (the data plane never crosses nodes).
    infos: dict[str, dict] = {}
    _until("both replicas to answer", lambda: infos.update({(i := client.info())["replica"]: i}) or len(infos) == 2,
           timeout=60, every=0.1)
    assert len({i["node"] for i in infos.values()}) == 2
    for i in infos.values():
        assert i["executor_nodes"] == {"gpu": i["node"], "cpu": i["node"]} and i["placement_group"] is not None

    # Every replica computes what one in-process engine does, and requests go to both.
    local = LLM(MODEL, weights="q8", num_threads=1)
    want = [o.token_ids for o in local.generate(PROMPTS, GREEDY)]
    local.shutdown()
    outs = client.generate(PROMPTS * 4, GREEDY)
    assert [o.token_ids for o in outs] == want * 4
    assert {o.metrics["replica"] for o in outs} == set(infos)
    assert "".join(ch.text for ch in client.stream(PROMPTS[0], GREEDY)) == outs[0].text

    # A batch job loses a node mid-run: requests in flight there fail and are sent again; each line is written once.
    lines = [{"id": i, "prompt": PROMPTS[i % 4] + " " * (i // 4), "max_tokens": 24, "temperature": 0.0}
             for i in range(48)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    job = BatchJob(client, concurrency=8)
    result = {}
    runner = threading.Thread(target=lambda: result.update(s=job.run(src, out, tmp_path / "err.jsonl", {},
                                                                     progress=False)))
    runner.start()
    _until("a few results", lambda: out.exists() and len(out.read_text().splitlines()) >= 6, every=0.1)
    c.remove_node(nodes[0], allow_graceful=False)
    runner.join(timeout=300)
    assert not runner.is_alive(), "the batch job did not finish after losing a node"
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(map(int, ids)) == list(range(48)) and result["s"].errors == 0       # each once, none failed
    assert client.generate(PROMPTS[:1], GREEDY)[0].token_ids == want[0]       # the endpoint keeps answering

    # A node with room joins: Serve places the lost replica there.
    nodes[0] = c.add_node(num_cpus=2)
    _until("the lost replica to come back", lambda: _running_replicas("replicas-test") == 2, timeout=180)

    # One replica's GPU executor dies: its requests fail and are sent again, its health check fails, and Serve
    # replaces it (a new replica with new executors); the batch job loses nothing.
    victim = client.info()
    os.kill(victim["executor_pids"]["gpu"], signal.SIGKILL)
    out2 = tmp_path / "out2.jsonl"
    summary = job.run(src, out2, tmp_path / "err2.jsonl", {}, progress=False)
    assert summary.completed == 48 and summary.errors == 0
    replicas_now: set[str] = set()
    _until("the broken replica to be replaced",
           lambda: replicas_now.add(client.info()["replica"]) or (_running_replicas("replicas-test") == 2 and
                                                                   len(replicas_now - {victim["replica"]}) == 2),
           timeout=120, every=0.2)

    # The OpenAI-compatible API and the HumanEval harness over the replicas.
    with BackgroundHttpServer(client) as server:
        body = json.dumps({"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}).encode()
        request = urllib.request.Request(server.url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert json.loads(r.read())["choices"][0]["text"] == outs[0].text
    summary = run_humaneval(EvalConfig(output=tmp_path / "he.jsonl", engine=client.config, limit=3, max_tokens=32,
                                       allow_weak_sandbox=True), llm=client, show_progress=False)
    assert summary["num_problems"] == 3 and summary["engine"]["runtime"] == "hybrid"
    assert stop_replicas("replicas-test") and not stop_replicas("replicas-test")


@pytest.mark.slow
def test_replicas_grow_under_load_and_shrink_when_idle(cluster) -> None:
    """--max-replicas: Serve adds a replica while more than max_batch_size requests per replica are in flight,
    and removes it once idle (delays shortened for the test)."""
    from runtime.serving.replicas import start_replicas, stop_replicas

    config = EngineConfig.resolve(model=MODEL, max_batch_size=2, engine_name="autoscale-test")
    client = start_replicas(config, 1, 2, upscale_delay_s=1.0, downscale_delay_s=3.0, metrics_interval_s=0.5,
                            look_back_period_s=2.0)
    try:
        assert _running_replicas("autoscale-test") == 1
        load = threading.Thread(target=client.generate, args=(PROMPTS * 6, SamplingParams(max_tokens=64)))
        load.start()
        _until("a second replica under load", lambda: _running_replicas("autoscale-test") == 2, timeout=90)
        load.join(timeout=300)
        _until("back to one replica when idle", lambda: _running_replicas("autoscale-test") == 1, timeout=120)
    finally:
        stop_replicas("autoscale-test")
