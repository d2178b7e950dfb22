"""Engine replicas on a local multi-node Ray cluster: aggregate throughput, latency and balance with 1, 2, 3 replicas
against one engine served without Serve, in one run.

A head node (no CPUs for work: Serve's controller) and one node per replica (``--cpus-per-node`` logical CPUs)
start as separate raylets on this machine (``ray.cluster_utils.Cluster``). For each setting, ``--requests`` greedy
requests (distinct prompts, ``--tokens`` new tokens each) are sent ``--concurrency`` at a time through one client;
settings rotate over ``--runs`` rounds (medians). ``direct`` is one engine actor (``pinfer serve`` without
``--replicas``): the same hybrid engine without Serve's router. The nodes share this machine's cores, so the
numbers measure routing overhead and balance (requests per replica, p50/p99 latency), not scaling; the README's
capacity model turns per-node throughput (``bench_batch.py``) into a multi-node estimate.

    python benchmarks/bench_replicas.py --model smollm2-135m
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from _common import cpu_model, quiet_logs

TASKS = ["checks whether a number is prime", "reverses a linked list", "merges two sorted lists",
         "computes the n-th Fibonacci number", "parses a CSV line", "flattens a nested list",
         "counts words in a string", "finds the median of a list", "validates an e-mail address",
         "converts Roman numerals to integers", "implements binary search", "removes duplicates from a list"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def load(client, prompts: list[str], params, concurrency: int) -> dict:
    """Send every prompt (``concurrency`` in flight) and time it."""
    def one(p: str):
        t = time.perf_counter()
        out = client.generate([p], [params])[0]
        return time.perf_counter() - t, out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for _, o in done)
    lat = [t for t, _ in done]
    per_replica = Counter(o.metrics.get("replica", "direct") for _, o in done)
    return {"wall_s": wall, "tok_s": tokens / wall, "req_s": len(done) / wall, "p50_s": percentile(lat, 0.5),
            "p99_s": percentile(lat, 0.99), "per_replica": sorted(per_replica.values(), reverse=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--weights", default="q8", choices=["q8", "q4", "fp32"])
    ap.add_argument("--replicas", default="1,2,3", help="replica counts to measure")
    ap.add_argument("--cpus-per-node", type=int, default=2,
                    help="logical CPUs of each worker node: one replica's (1 GPU-executor thread, the rest CPU-executor)")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    quiet_logs()

    from runtime import SamplingParams                # first: `import runtime` sets Ray's environment (token auth)
    from runtime.config import EngineConfig
    from runtime.hybrid.cluster import NAMESPACE, ensure_auth_token
    from runtime.model.registry import resolve_model
    from runtime.model.tokenizer import TextTokenizer
    from runtime.serving.client import connect
    from runtime.serving.replicas import start_replicas, stop_replicas
    from runtime.serving.service import start_service, stop_service

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    counts = [int(r) for r in args.replicas.split(",")]
    ensure_auth_token()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(max(counts)):
        cluster.add_node(num_cpus=args.cpus_per_node)
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    cluster.wait_for_nodes()

    tok = TextTokenizer(resolve_model(args.model))
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write a Python function that {TASKS[i % len(TASKS)]}"
                                         f" (variant {i})."}]) for i in range(args.requests)]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    config = EngineConfig.resolve(model=args.model, weights=args.weights, gpu_threads=1,
                                  cpu_threads=max(1, args.cpus_per_node - 1))
    settings = ["direct"] + [f"replicas={n}" for n in counts]
    results: dict[str, list[dict]] = {s: [] for s in settings}
    try:
        for run in range(args.runs):
            order = settings[run % len(settings):] + settings[:run % len(settings)]      # rotate: alternate engines
            for s in order:
                name = f"bench-{s.replace('=', '')}"
                cfg = replace(config, engine_name=name)
                if s == "direct":
                    start_service(cfg)
                    client, stop = connect(cluster.address, name), stop_service
                else:
                    client, stop = start_replicas(cfg, int(s.split("=")[1])), stop_replicas
                try:
                    load(client, prompts[:args.concurrency], params, args.concurrency)           # warm-up
                    r = load(client, prompts, params, args.concurrency)
                finally:
                    stop(name)
                results[s].append(r)
                print(f"[run {run}] {s}: {r['tok_s']:.1f} tok/s, p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s, "
                      f"requests per replica {r['per_replica']}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()

    base = statistics.median(r["tok_s"] for r in results["direct"])
    summary = {}
    print(f"\n{args.model} {args.weights}, {args.requests} requests x {args.tokens} tokens, {args.concurrency} in "
          f"flight, nodes of {args.cpus_per_node} CPU(s) on one {cpu_model()} (medians of {args.runs})")
    print(f"{'setting':<12} {'tok/s':>7} {'vs direct':>9} {'p50 s':>6} {'p99 s':>6}  requests per replica (last run)")
    for s in settings:
        med = {k: statistics.median(r[k] for r in results[s]) for k in ("tok_s", "req_s", "p50_s", "p99_s")}
        summary[s] = {**{k: round(v, 3) for k, v in med.items()}, "vs_direct": round(med["tok_s"] / base, 3),
                      "per_replica_last": results[s][-1]["per_replica"],
                      "all_tok_s": [round(r["tok_s"], 2) for r in results[s]]}
        print(f"{s:<12} {med['tok_s']:7.1f} {med['tok_s'] / base:8.2f}x {med['p50_s']:6.2f} {med['p99_s']:6.2f}  "
              f"{results[s][-1]['per_replica']}")
    print("RESULT " + json.dumps({"bench": "replicas", "model": args.model, "weights": args.weights, "cpu": cpu_model(),
                                  "cpus_per_node": args.cpus_per_node, "requests": args.requests,
                                  "tokens": args.tokens, "concurrency": args.concurrency, "runs": args.runs,
                                  "settings": summary}))


if __name__ == "__main__":
    main()
