"""Overload: 10x the sustainable request rate for 60 s against the real served app, side by side with unloaded.

One run, one process (Ray Serve started here, load generated here):
  1. unloaded    sequential requests: latency p50 / p99
  2. sustainable closed loop at --concurrency: the throughput the deployment sustains (requests/s)
  3. overload    open loop, arrivals at --factor x that rate for --seconds: how many were accepted, their latency
                 against unloaded, how fast the refused ones (429/503) were answered and whether they carried
                 Retry-After, and the replicas' resident memory sampled every 5 s

    python bench/overload_bench.py                 # shape-true 0.6B widths, 4 layers, 8 docs/request (CPU)
    python bench/overload_bench.py --shape tiny --seconds 20

The model deployment is bounded the way prod.yaml bounds it: max_ongoing_requests (what one batch can take) and a
short max_queued_requests, past which Serve refuses at once (the gateway answers 503 with Retry-After).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.engine_bench import QUERY, make_texts  # noqa: E402
from bench.serve_bench import percentile  # noqa: E402
from models.checkpoints import build_checkpoint, checkpoint_name  # noqa: E402

MODEL = "overload-reranker"


def serve_config(path: Path, port: int, args) -> dict:
    return {"http_options": {"host": "127.0.0.1", "port": port},
            "applications": [
                {"name": "gateway", "route_prefix": "/", "import_path": "serve_app.app:gateway_app",
                 "args": {"auth": {"enabled": False}, "database_url": f"sqlite:////tmp/overload-{port}.db",
                          "deployment": {"num_cpus": 0, "max_ongoing_requests": args.gateway_ongoing,
                                         "max_queued_requests": args.gateway_queued}}},
                {"name": MODEL, "route_prefix": None, "import_path": "serve_app.app:model_app",
                 "args": {"name": MODEL, "task": "rerank", "source": str(path), "device": "cpu",
                          "batching": {"max_waiting_requests": args.max_waiting},
                          "deployment": {"num_cpus": args.cpus, "max_ongoing_requests": args.max_ongoing,
                                         "max_queued_requests": args.max_queued}}}]}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def replica_pids() -> dict[str, int]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()["applications"]
    return {app: replica["pid"] for app, info in details.items() for deployment in info["deployments"].values()
            for replica in deployment["replicas"] if replica["state"] == "RUNNING"}


async def run(url: str, documents: list[str], args) -> dict:
    payload = {"model": MODEL, "query": QUERY, "documents": documents}
    results: dict = {}
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def post() -> tuple[int, float, bool]:
            start = time.perf_counter()
            async with session.post("/v1/rerank", json=payload) as response:
                await response.read()
                return response.status, time.perf_counter() - start, "Retry-After" in response.headers

        for _ in range(5):
            await post()
        results["unloaded"] = [(await post())[1] for _ in range(args.latency_samples)]

        done = 0
        stop = time.perf_counter() + 15

        async def closed_loop():
            nonlocal done
            while time.perf_counter() < stop:
                status, _, _ = await post()
                done += status == 200

        start = time.perf_counter()
        await asyncio.gather(*(closed_loop() for _ in range(args.concurrency)))
        results["sustainable_rps"] = done / (time.perf_counter() - start)

        rate = args.factor * results["sustainable_rps"]
        outcomes: list[tuple[int, float, bool]] = []
        memory: list[dict[str, float]] = []
        pids = replica_pids()

        async def sample_memory():
            while True:
                memory.append({app: rss_mib(pid) for app, pid in pids.items()})
                await asyncio.sleep(5)

        async def one():
            outcomes.append(await post())

        sampler = asyncio.create_task(sample_memory())
        tasks = []
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < args.seconds:
            tasks.append(asyncio.create_task(one()))
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
        sampler.cancel()
        memory.append({app: rss_mib(pid) for app, pid in pids.items()})
        results.update(offered_rps=n / args.seconds, outcomes=outcomes, memory=memory)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="0.6b", choices=["tiny", "0.6b"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="closed-loop clients measuring the sustainable rate (default: --max-ongoing, so that "
                             "none is refused; refused clients would spin and steal the cores)")
    parser.add_argument("--factor", type=float, default=10)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--latency-samples", type=int, default=30)
    parser.add_argument("--max-ongoing", type=int, default=16)
    parser.add_argument("--max-queued", type=int, default=16)
    parser.add_argument("--max-waiting", type=int, default=None,
                        help="the model's batching.max_waiting_requests (default: unbounded, Serve's limits only)")
    parser.add_argument("--gateway-ongoing", type=int, default=256, help="the gateway's max_ongoing_requests")
    parser.add_argument("--gateway-queued", type=int, default=1024, help="the gateway's max_queued_requests")
    # One torch thread by default: on a 2-core machine the model would otherwise take both cores from the proxy,
    # the gateway and this load generator, and the run would measure CPU starvation of the front end.
    parser.add_argument("--cpus", type=int, default=1, help="the model replica's CPUs (torch threads)")
    args = parser.parse_args()

    args.concurrency = args.concurrency or args.max_ongoing
    layers = None if args.shape == "tiny" else args.layers
    path = build_checkpoint(REPO / "checkpoints" / checkpoint_name("rerank", args.shape, layers), "rerank",
                            args.shape, layers)
    documents = make_texts(args.docs, 20, 80, seed=3)
    print(f"shape {args.shape} layers {layers or 'all'}; rerank 1 query x {args.docs} docs; model replica "
          f"{args.cpus} CPU, max_ongoing_requests {args.max_ongoing}, max_queued_requests {args.max_queued}, "
          f"max_waiting_requests {args.max_waiting}; "
          f"gateway {args.gateway_ongoing}/{args.gateway_queued}; overload "
          f"{args.factor:g}x for {args.seconds:g} s", flush=True)

    from tests.serving import ServeInstance, free_port

    port = free_port()
    instance = ServeInstance.start_on(port, num_cpus=2 * args.cpus + 1, num_gpus=0)
    try:
        instance.deploy(serve_config(path, port, args))
        r = asyncio.run(run(instance.url, documents, args))
    finally:
        instance.stop()

    unloaded_p50, unloaded_p99 = statistics.median(r["unloaded"]) * 1e3, percentile(r["unloaded"], 0.99) * 1e3
    accepted = [latency for status, latency, _ in r["outcomes"] if status == 200]
    refused = [(status, latency, retry) for status, latency, retry in r["outcomes"] if status in (429, 503)]
    other = sorted({status for status, _, _ in r["outcomes"] if status not in (200, 429, 503)})
    print(f"\nunloaded        p50 {unloaded_p50:.1f} ms   p99 {unloaded_p99:.1f} ms")
    print(f"sustainable     {r['sustainable_rps']:.2f} requests/s (closed loop, {args.concurrency} clients)")
    print(f"offered         {r['offered_rps']:.2f} requests/s for {args.seconds:g} s "
          f"({len(r['outcomes'])} requests, {r['offered_rps'] / r['sustainable_rps']:.1f}x)")
    if accepted:
        p50, p99 = statistics.median(accepted) * 1e3, percentile(accepted, 0.99) * 1e3
        print(f"accepted        {len(accepted)} ({len(accepted) / args.seconds:.2f}/s)   p50 {p50:.1f} ms "
              f"({p50 / unloaded_p50:.2f}x unloaded)   p99 {p99:.1f} ms ({p99 / unloaded_p99:.2f}x unloaded)")
    if refused:
        latencies = [latency for _, latency, _ in refused]
        print(f"refused         {len(refused)} (statuses {sorted({s for s, _, _ in refused})})   p50 "
              f"{statistics.median(latencies) * 1e3:.1f} ms   p99 {percentile(latencies, 0.99) * 1e3:.1f} ms   "
              f"max {max(latencies) * 1e3:.1f} ms   with Retry-After: {sum(retry for _, _, retry in refused)}")
    print(f"other statuses  {other or 'none'}")
    for app in r["memory"][0]:
        series = [sample[app] for sample in r["memory"]]
        print(f"RSS {app:<20} start {series[0]:.0f} MiB  max {max(series):.0f} MiB  end {series[-1]:.0f} MiB "
              f"({len(series)} samples)")


if __name__ == "__main__":
    main()
