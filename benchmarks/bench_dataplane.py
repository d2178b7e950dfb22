"""Per-layer data-plane round trip (broadcast + dispatch + gather, empty work) for three mechanisms.

Each mechanism has two executors (a "GPU" one for hot neurons, a "CPU" one for cold neurons) whose
per-layer work does nothing, so what is timed is pure coordination cost:

1. plain Ray actor calls: the driver does ``ray.get([gpu.ffn.remote(l), cpu.ffn.remote(l)])``;
2. a Ray Compiled Graph (``MultiOutputNode`` of both actors, ``ray.get(compiled.execute(l))``);
3. pinfer's channel, timed inside the GPU-executor actor: ``pinfer_doorbell`` writes one hidden row
   (float32, ``--hidden``) into the shared arena, rings the cold executor over the AF_UNIX SEQPACKET
   doorbell and waits for its answer (``scheduler/channel.py``); ``pinfer_hop`` is the whole
   ``LayerScheduler.ffn`` (the same, plus the empty hot call and the torch gather + add).

Mechanisms 1-2 are timed per iteration in the driver and carry only the layer index. Rounds
interleave the mechanisms; warm-up iterations are excluded. The compiled graph is compiled and torn
down in each round, because its actors busy-poll (a full core each, even idle) and would starve the
others on a small machine. Plain Ray is ~1 ms a call, so it gets ``max(300, iters // 5)`` timed
iterations. Prints one summary line, then ``RESULT {json}``.

    .venv/bin/python benchmarks/bench_dataplane.py [--iters 3000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from typing import Any, Callable

import numpy as np

from _common import quiet_logs

from scheduler.channel import ArenaLayout, ArenaRef, ColdChannel, LayerArena, serve_cold
from scheduler.doorbell import Doorbell, DoorbellListener
from scheduler.layer_scheduler import ArenaViews, LayerScheduler

N_LAYERS = 24                    # qwen2.5-coder-0.5b
TARGET_US = 50.0


class Echo:
    """An executor whose per-layer work is nothing (mechanisms 1 and 2)."""

    def ffn(self, layer: int) -> None:
        return None


class EchoColdPeer:
    """The CPU-executor role of mechanism 3: answers every FFN request through serve_cold, as CPUExecutor does,
    with no work."""

    def attach(self, arena: ArenaRef) -> str:
        self._arena = LayerArena(arena.layout, name=arena.name)
        self._listener = DoorbellListener()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self._listener.path

    def _serve(self) -> None:
        serve_cold(self._listener.accept(), lambda layer, n: None)

    def shutdown(self) -> None:
        self._listener.close()
        self._thread.join(timeout=5)
        self._arena.close()


class SchedulerHost:
    """The GPU-executor role of mechanism 3: owns the arena and runs the real LayerScheduler hop in-process,
    with empty hot work (write x, ring, hot, wait, gather + add)."""

    def __init__(self, hidden: int) -> None:
        import torch

        self.arena = LayerArena(ArenaLayout(max_rows=1, hidden_size=hidden, num_neurons=1))
        self.views = ArenaViews(*(torch.from_numpy(a) for a in (self.arena.x, self.arena.y_cold, self.arena.mask)),
                                device=torch.device("cpu"), dtype=torch.float32)
        self.row = torch.from_numpy(np.random.default_rng(0).standard_normal((1, hidden)).astype(np.float32))
        self.scheduler: LayerScheduler | None = None

    def arena_ref(self) -> ArenaRef:
        return self.arena.ref()

    def connect(self, path: str) -> None:
        channel = ColdChannel(Doorbell.connect(path))
        channel.ping()
        every = [True] * N_LAYERS
        self.scheduler = LayerScheduler(channel, self.views, lambda layer, h, mask: h, None, every, every)

    def measure(self, n_iters: int, n_layers: int, whole_hop: bool) -> list[float]:
        """Per-layer latency (us) of ``n_iters`` layer round trips: the channel alone (write the row, ring, wait),
        or the whole hop (``LayerScheduler.ffn``: also the hot call and the gather + add)."""
        assert self.scheduler is not None, "connect() first"
        row, clock, channel, x = self.row, time.perf_counter_ns, self.scheduler.channel, self.arena.x
        row_np = row.numpy()
        out = []
        for i in range(n_iters):
            t0 = clock()
            if whole_hop:
                self.scheduler.ffn(i % n_layers, row)
            else:
                x[0] = row_np[0]
                channel.wait(channel.request(i % n_layers, 1), i % n_layers)
            out.append((clock() - t0) / 1e3)
        return out

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        self.arena.close()


def time_driver(step: Callable[[int], Any], n: int) -> list[float]:
    """Per-iteration latency (us) of ``step(layer)`` timed in the driver."""
    out = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        step(i % N_LAYERS)
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def stats(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"available": False}
    a = np.asarray(samples)
    med = float(np.median(a))
    return {"available": True, "n": len(a), "median_us": round(med, 1),
            "p99_us": round(float(np.percentile(a, 99)), 1), "per_token_us_24_layers": round(med * N_LAYERS, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=3000, help="timed layer round trips (doorbell, compiled graph)")
    ap.add_argument("--warmup", type=int, default=200, help="untimed iterations per mechanism (and per compile)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds the iterations are split into")
    ap.add_argument("--hidden", type=int, default=896, help="hidden size of the broadcast row (float32)")
    args = ap.parse_args()
    quiet_logs()

    import ray
    from ray.dag import InputNode, MultiOutputNode
    from runtime.hybrid.cluster import RAY_ENV

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(address="local", include_dashboard=False, object_store_memory=512 * 2**20,
             _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    actor = lambda cls: ray.remote(num_cpus=0)(cls)  # noqa: E731
    arena_name, cg_error = None, ""
    try:
        ray_gpu, ray_cpu, cg_gpu, cg_cpu = (actor(Echo).remote() for _ in range(4))
        host, peer = actor(SchedulerHost).remote(args.hidden), actor(EchoColdPeer).remote()
        arena = ray.get(host.arena_ref.remote())
        arena_name = arena.name
        ray.get(host.connect.remote(ray.get(peer.attach.remote(arena))))

        def compiled_graph(n: int) -> list[float]:
            # Compiled-graph actors busy-poll their channels (a full core each, even idle), so the graph
            # lives only while it is measured; otherwise it would starve the other mechanisms.
            nonlocal cg_error
            if cg_error:
                return []
            try:
                with InputNode() as inp:                         # a DAG compiles once: build it anew
                    dag = MultiOutputNode([cg_gpu.ffn.bind(inp), cg_cpu.ffn.bind(inp)])
                compiled = dag.experimental_compile()
            except Exception as e:                               # report, don't crash
                cg_error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                return []
            try:
                step = lambda layer: ray.get(compiled.execute(layer))  # noqa: E731
                time_driver(step, args.warmup)
                return time_driver(step, n)
            finally:
                compiled.teardown()

        def ray_calls(n: int) -> list[float]:
            return time_driver(lambda layer: ray.get([ray_gpu.ffn.remote(layer), ray_cpu.ffn.remote(layer)]), n)

        runs: dict[str, Callable[[int], list[float]]] = {
            "pinfer_doorbell": lambda n: ray.get(host.measure.remote(n, N_LAYERS, False)),
            "pinfer_hop": lambda n: ray.get(host.measure.remote(n, N_LAYERS, True)),
            "compiled_graph": compiled_graph, "ray_calls": ray_calls}
        counts = {"pinfer_doorbell": args.iters, "pinfer_hop": args.iters, "compiled_graph": args.iters,
                  "ray_calls": max(300, args.iters // 5)}
        samples: dict[str, list[float]] = {k: [] for k in runs}
        for warm_up in (runs["pinfer_doorbell"], runs["pinfer_hop"], ray_calls):                 # discarded
            warm_up(args.warmup)
        for r in range(args.rounds):                                         # interleaved rounds
            for name, run in runs.items():
                samples[name] += run(counts[name] // args.rounds + (r < counts[name] % args.rounds))
        ray.get(host.close.remote())
        ray.get(peer.shutdown.remote())
    finally:
        ray.shutdown()
        if arena_name and os.path.exists(f"/dev/shm/{arena_name}"):         # an actor died before unlinking
            os.unlink(f"/dev/shm/{arena_name}")

    res = {k: stats(v) for k, v in samples.items()}
    if cg_error:
        res["compiled_graph"]["error"] = cg_error
    pin, cores = res["pinfer_doorbell"], os.cpu_count()
    met = pin["median_us"] <= TARGET_US

    def vs(name: str, label: str) -> str:
        s = res[name]
        if not s["available"]:
            return f"{label} unavailable ({s.get('error', '')})"
        return f"{label} {s['median_us']:.0f} us (p99 {s['p99_us']:.0f}, {s['median_us'] / pin['median_us']:.1f}x)"

    print(f"dataplane per-layer round trip (2 executors, empty work, {cores} cores): pinfer doorbell "
          f"{pin['median_us']:.0f} us median (p99 {pin['p99_us']:.0f}) vs {vs('compiled_graph', 'compiled graph')} "
          f"vs {vs('ray_calls', 'ray calls')}; x{N_LAYERS} layers = {pin['per_token_us_24_layers'] / 1e3:.2f} ms/token"
          f"; whole hop {res['pinfer_hop']['median_us']:.0f} us -> target <= {TARGET_US:.0f} us: "
          f"{'met' if met else 'NOT met'}")
    print("RESULT " + json.dumps({"mechanisms": res, "target_us": TARGET_US, "target_met": met, "cores": cores,
                                  "n_layers": N_LAYERS, "hidden": args.hidden, "rounds": args.rounds,
                                  "warmup": args.warmup, "ray_calls_iters": "max(300, iters // 5)"}))


if __name__ == "__main__":
    main()
