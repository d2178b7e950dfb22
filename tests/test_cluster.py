"""Three ways in, one code path: a `ray start --head` cluster, `pinfer serve` + clients in several processes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.hybrid.cluster import RAY_ENV, ensure_auth_token

VENV_BIN = Path(sys.executable).parent
CLIENT = """
import asyncio, json, sys
from runtime import SamplingParams
from runtime.serving.client import connect
client = connect("auto", name="pinfer-test-engine")
p, sp = sys.argv[1:], SamplingParams(max_tokens=12, temperature=0.0)

def streamed(prompt):
    chunks = list(client.stream(prompt, sp))
    out = chunks[-1].output
    assert chunks[-1].finished and "".join(c.text for c in chunks) == out.text
    assert [t for c in chunks for t in c.token_ids] == out.token_ids
    return out

async def main():                      # all three kinds of call at once
    return await asyncio.gather(asyncio.to_thread(client.generate, p[:2], sp), client.agenerate(p[2], sp),
                                asyncio.to_thread(streamed, p[3]))

gen, agen, stream = asyncio.run(main())
print(json.dumps([o.token_ids for o in [*gen, agen, stream]]))
"""
ATTACH = """
import json
from runtime import LLM, SamplingParams
llm = LLM("smollm2-135m", address="auto", hot_fraction=0.3)
out = llm.generate(["def fib(n):"], SamplingParams(max_tokens=8, temperature=0.0))[0]
llm.shutdown()
print(json.dumps(out.token_ids))
"""
SERVED = """
import json, sys
from runtime import SamplingParams
from runtime.serving.client import connect
client = connect("auto", name=sys.argv[1])
outs = client.generate(sys.argv[2:], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
print(json.dumps({"config": client.info()["config"], "tokens": [o.token_ids for o in outs]}))
"""
PROMPTS = [["def fib(n):", "The capital of France is", "import os", "class Stack:"],
           ["# sort a list", "for i in range(", "Hello, my name is", "SELECT * FROM"],
           ["x = [1, 2, 3]\n", "The sky is", "def add(a, b):", "import numpy as np\n"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory):
    env = dict(os.environ, **RAY_ENV)
    env.pop("RAY_ADDRESS", None)
    ensure_auth_token()                                 # as the README's `ray start` steps do
    port = _free_port()
    subprocess.run([str(VENV_BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
                    "--object-store-memory=500000000"], env=env, check=True, capture_output=True, timeout=120)
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    yield env
    subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def _py(code: str, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_llm_attaches_to_a_ray_start_cluster(ray_head: dict) -> None:
    from runtime import LLM, SamplingParams

    p = _py(ATTACH, ray_head)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    local = LLM("smollm2-135m").generate(["def fib(n):"], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert json.loads(out.strip().splitlines()[-1]) == local.token_ids


def test_serve_batches_three_client_processes_generate_agenerate_stream(ray_head: dict) -> None:
    from runtime import LLM, SamplingParams

    pinfer = [str(VENV_BIN / "pinfer")]
    serve = subprocess.run([*pinfer, "serve", "--detach", "--address", "auto", "--name", "pinfer-test-engine",
                            "--hot-fraction", "0.5", "--weights", "fp32"],     # fp32: the tokens of the in-process
                           env=ray_head, capture_output=True, text=True, timeout=300)   # engine, bit for bit
    assert serve.returncode == 0, serve.stderr
    try:
        clients = [_py(CLIENT, ray_head, *prompts) for prompts in PROMPTS]
        results = []
        for c in clients:
            out, err = c.communicate(timeout=300)
            assert c.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        local = LLM("smollm2-135m", weights="fp32")    # each prompt alone: no batching at all
        for prompts, got in zip(PROMPTS, results):
            assert got == [local.generate(p, SamplingParams(max_tokens=12, temperature=0.0))[0].token_ids
                           for p in prompts]
    finally:
        stop = subprocess.run([*pinfer, "stop", "--name", "pinfer-test-engine"], env=ray_head,
                              capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    again = subprocess.run([*pinfer, "stop", "--name", "pinfer-test-engine"], env=ray_head,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "no engine named" in again.stderr


@pytest.mark.parametrize("replicas", [[], ["--replicas", "1"]], ids=["one engine", "replicas"])
def test_serve_until_interrupted_stops_its_engine(ray_head: dict, replicas: list[str]) -> None:
    """`pinfer serve` without --detach serves until Ctrl-C, then stops its engine (one actor, or Serve replicas)."""
    import signal

    pinfer, name = [str(VENV_BIN / "pinfer")], "pinfer-foreground"
    serve = subprocess.Popen([*pinfer, "serve", "--address", "auto", "--name", name, *replicas], env=ray_head,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = serve.stdout.readline()                  # printed once the engine answers
        assert f"engine {name!r} serves" in line, serve.stderr.read() if serve.wait(timeout=5) is not None else line
        client = _py(f"from runtime.serving.client import connect\n"
                     f"print(connect('auto', {name!r}).generate(['def fib(n):'])[0].text)", ray_head)
        assert client.wait(timeout=120) == 0, client.stderr.read()
        serve.send_signal(signal.SIGINT)
        out, err = serve.communicate(timeout=120)
        assert serve.returncode == 0 and f"engine {name!r} stopped" in out, err
    finally:
        if serve.poll() is None:
            serve.kill()
    again = subprocess.run([*pinfer, "stop", "--name", name], env=ray_head, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 2 and "no engine named" in again.stderr


def test_a_served_engine_honours_every_engine_flag(ray_head: dict, calibrated_tiny: Path) -> None:
    """`pinfer serve --sparsity gate ...` serves a gate-mode engine: the in-process gate engine's tokens, not
    the dense engine's."""
    from runtime import LLM, SamplingParams

    pinfer, name = [str(VENV_BIN / "pinfer")], "pinfer-gate-engine"
    prompts = ["hello tiny model", "def f(a, b):", "x = [1, 2, 3]"]
    serve = subprocess.run([*pinfer, "serve", "--detach", "--address", "auto", "--name", name, "--model",
                            str(calibrated_tiny), "--sparsity", "gate", "--activation-sparsity", "0.5",
                            "--hot-fraction", "0.4", "--max-batch-size", "4", "--dtype", "float32"],
                           env=ray_head, capture_output=True, text=True, timeout=300)
    assert serve.returncode == 0, serve.stderr
    try:
        client = _py(SERVED, ray_head, name, *prompts)
        out, err = client.communicate(timeout=300)
        assert client.returncode == 0, err
        served = json.loads(out.strip().splitlines()[-1])
    finally:
        subprocess.run([*pinfer, "stop", "--name", name], env=ray_head, capture_output=True, timeout=120)
    config = served["config"]
    assert (config["sparsity"], config["activation_sparsity"], config["hot_fraction"], config["max_batch_size"],
            config["is_hybrid"]) == ("gate", 0.5, 0.4, 4, True)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    gate = LLM(str(calibrated_tiny), sparsity="gate", activation_sparsity=0.5)
    dense = LLM(str(calibrated_tiny))
    assert served["tokens"] == [o.token_ids for o in gate.generate(prompts, params)]
    assert served["tokens"] != [o.token_ids for o in dense.generate(prompts, params)]
