"""Hop sharing on vs off (serve_app/gateway/hop_sharing.py), side by side in one Serve instance, alternating.

Our stack (auth on a real key, SQLite ledger, tiny models, one gateway replica; the HAProxy ingress unless
`--python-proxy`) in one local Serve instance; the gateway is redeployed with each of `--variants` (hop_sharing off,
on, on with 2 calls in flight) in turn, `--rounds` times, the order rotating, and each time, for one-document rerank
and one-input embedding requests:

  sequential   one client, `--latency-samples` requests: p50 (a lone request takes the same path either way)
  light        `--light-clients` closed-loop clients (default 4), `--requests` / 4 requests: requests/s and p50,
               where a request that meets a call in flight waits for it rather than going in parallel
  saturation   `--concurrency` closed-loop clients, `--requests` requests: requests/s and the p50 under that load
  cpu          CPU seconds (user + system, from /proc) the ingress (haproxy or Serve's proxy), the gateway replica and
               the model replica spent per 1,000 requests of the saturation phase: what the serving path costs,
               whatever the client costs
  groups       from the model replica's stats: the share of the saturation requests that came in a group, and the
               mean group size

    python bench/hop_sharing_bench.py
    python bench/hop_sharing_bench.py --variants on on-2 off --rounds 3

The load generator (aiohttp) runs in this process, on the same cores as the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serve_bench import ONE_DOCUMENT, body, serve_config, serving_checkpoints  # noqa: E402
from serve_app.config import GATEWAY_DEPLOYMENT_NAME, MODEL_DEPLOYMENT_NAME  # noqa: E402

ROUTES = {"rerank": "/v1/rerank", "embed": "/v1/embeddings"}
VARIANTS = {  # the gateway's hop_sharing per variant
    "off": {"enabled": False},
    "on": {"enabled": True, "max_calls_in_flight": 1},
    "on-2": {"enabled": True, "max_calls_in_flight": 2},
}
MODEL_APPS = {"rerank": "bench-reranker", "embed": "bench-embedder"}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have spent so far (/proc/<pid>/stat fields 14 and 15, all threads)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def serve_pids(kind: str, instance) -> dict[str, list[int]]:
    """The processes on a request's path: the ingress (haproxy, or Serve's Python proxy actor), the gateway replica
    and the model replica."""
    from ray.serve.context import _get_global_client

    from serve_app.cluster import haproxy

    details = _get_global_client().get_serve_details()

    def replica_pid(app: str, deployment: str) -> int:
        replicas = details["applications"][app]["deployments"][deployment]["replicas"]
        return next(replica["pid"] for replica in replicas if replica["state"] == "RUNNING")

    if instance.on_haproxy:
        ingress = sorted(haproxy.recorded_haproxies(instance.ingress[haproxy.RUN_DIR]))
    else:
        ingress = [pid for pid in [proxy_pid()] if pid is not None]
    return {"ingress": ingress, "gateway": [replica_pid("gateway", GATEWAY_DEPLOYMENT_NAME)],
            "model": [replica_pid(MODEL_APPS[kind], MODEL_DEPLOYMENT_NAME)]}


def proxy_pid() -> int | None:
    """Serve's HTTP proxy actor of this Ray instance: a worker process of our raylet titled ray::ProxyActor (Serve's
    details carry no pid for proxies, and other Ray instances may run on the machine)."""
    import ray
    from ray._private import ray_constants

    raylet = ray._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    for proc in Path("/proc").iterdir():
        try:
            parent = int(proc.joinpath("stat").read_text().rpartition(")")[2].split()[1])
            title = proc.joinpath("cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if parent == raylet and title.startswith(b"ray::ProxyActor"):
            return int(proc.name)
    return None


async def post(session, path: str, payload: dict, headers: dict) -> float:
    start = time.perf_counter()
    async with session.post(path, json=payload, headers=headers) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}: {await response.text()}")
    return time.perf_counter() - start


async def closed_loop(session, path: str, payload: dict, headers: dict, clients: int,
                      total: int) -> tuple[list[float], float]:
    """`clients` clients sending `total` requests back to back: each request's latency, and the seconds taken."""
    remaining, latencies = total, []

    async def client():
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            latencies.append(await post(session, path, payload, headers))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - start


async def measure(url: str, headers: dict, instance, args) -> dict:
    results = {}
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=args.concurrency)) as session:
        for kind, path in ROUTES.items():
            payload = body(kind, ONE_DOCUMENT)
            model = instance.model_handle(MODEL_APPS[kind])
            for _ in range(20):  # warm: handles, connections, caches
                await post(session, path, payload, headers)
            await asyncio.gather(*(post(session, path, payload, headers) for _ in range(args.concurrency * 2)))
            sequential = [await post(session, path, payload, headers) for _ in range(args.latency_samples)]
            light, light_seconds = await closed_loop(session, path, payload, headers, args.light_clients,
                                                     args.requests // 4)

            pids = serve_pids(kind, instance)
            stats_before = await model.stats.remote()
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            latencies, elapsed = await closed_loop(session, path, payload, headers, args.concurrency, args.requests)
            cpu = {name: (cpu_seconds(pid) - cpu_before[name]) * 1000 / args.requests for name, pid in pids.items()}
            stats = await model.stats.remote()
            groups = stats["groups"] - stats_before["groups"]
            grouped = stats["grouped_requests"] - stats_before["grouped_requests"]
            results[kind] = {"sequential_p50": statistics.median(sequential) * 1e3,
                             "light_rate": len(light) / light_seconds, "light_p50": statistics.median(light) * 1e3,
                             "rate": args.requests / elapsed,
                             "loaded_p50": statistics.median(latencies) * 1e3, "cpu": cpu,
                             "grouped_share": grouped / args.requests, "group_size": grouped / groups if groups else 0}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant; each round runs every variant, "
                        "the order rotating from round to round")
    parser.add_argument("--variants", nargs="+", default=["on", "off"], choices=sorted(VARIANTS))
    parser.add_argument("--requests", type=int, default=1200, help="requests per saturation phase")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-samples", type=int, default=100, help="sequential requests per run")
    parser.add_argument("--light-clients", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, default=None, help="hop_sharing.max_wait_ms (default: config's)")
    parser.add_argument("--python-proxy", action="store_true", help="Serve's Python proxy instead of HAProxy")
    parser.add_argument("--checkpoints", default=str(REPO / "checkpoints"))
    args = parser.parse_args()
    paths = serving_checkpoints(Path(args.checkpoints), "tiny", None)

    from serve_app.accounts.keys import KeyStore
    from serve_app.accounts.store import connect
    from tests.serving import ServeInstance, application, free_port

    workdir = Path(tempfile.mkdtemp(prefix="hop-sharing-bench-"))
    database = f"sqlite:///{workdir / 'bench.db'}"
    headers = {"Authorization": f"Bearer {KeyStore(connect(database)).create('hop-sharing-bench')[1]}"}
    port = free_port()
    base = serve_config(paths["rerank"], paths["embed"], port, 1, None, auth=True, database_url=database)
    ingress = "Python proxy" if args.python_proxy else "HAProxy"
    print(f"tiny models, auth on, SQLite ledger, 1 gateway replica, {ingress} ingress; variants "
          f"{' '.join(args.variants)}, {args.rounds} rounds, the order rotating; "
          f"sequential {args.latency_samples}, saturation {args.concurrency} clients x {args.requests} requests; "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    instance = ServeInstance.start_on(port, num_cpus=8, num_gpus=0, haproxy_on=not args.python_proxy)
    instance.headers = headers
    rows = []
    try:
        order = [args.variants[(r + i) % len(args.variants)] for r in range(args.rounds)
                 for i in range(len(args.variants))]  # on off | off on | on off ... for two
        for run, variant in enumerate(order):
            config = copy.deepcopy(base)
            sharing = dict(VARIANTS[variant])
            if args.max_wait_ms is not None:
                sharing["max_wait_ms"] = args.max_wait_ms
            application(config, "gateway")["args"]["hop_sharing"] = sharing
            instance.deploy(config)
            results = asyncio.run(measure(instance.url, headers, instance, args))
            for kind, r in results.items():
                cpu = r["cpu"]
                row = (f"run {run + 1} {variant:<4} {kind:<6} seq p50 {r['sequential_p50']:6.2f} ms | "
                       f"{args.light_clients} clients {r['light_rate']:6.1f} req/s p50 {r['light_p50']:6.2f} ms | "
                       f"{args.concurrency} clients {r['rate']:6.1f} req/s p50 {r['loaded_p50']:6.2f} ms | "
                       "CPU s per 1k: "
                       + " ".join(f"{name} {seconds:5.2f}" for name, seconds in cpu.items())
                       + f" sum {sum(cpu.values()):5.2f} | grouped {r['grouped_share']:4.0%} mean group "
                         f"{r['group_size']:4.1f} | load {os.getloadavg()[0]:.1f}")
                print(row, flush=True)
                rows.append((variant, kind, r))
    finally:
        instance.stop()

    first, *others = args.variants
    print(f"\nmedians over the runs ({' / '.join(args.variants)}; change against {first}):")
    for kind in ROUTES:
        def median(key, variant, sub=None):
            values = [r[key] if sub is None else sum(r[key].values()) for v, k, r in rows if v == variant and k == kind]
            return statistics.median(values)

        for label, key, sub in (("sequential p50 ms", "sequential_p50", None),
                                (f"{args.light_clients} clients req/s", "light_rate", None),
                                (f"{args.light_clients} clients p50 ms", "light_p50", None),
                                (f"{args.concurrency} clients req/s", "rate", None),
                                (f"{args.concurrency} clients p50 ms", "loaded_p50", None),
                                ("CPU s per 1k (sum)", "cpu", "sum")):
            values = [median(key, variant, sub) for variant in args.variants]
            changes = "  ".join(f"{variant} {value / values[0] - 1:+.1%}" for variant, value in zip(others, values[1:]))
            print(f"  {kind:<6} {label:<20} " + " / ".join(f"{value:8.2f}" for value in values) + f"  ({changes})")


if __name__ == "__main__":
    main()
