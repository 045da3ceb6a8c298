"""Serving benchmark: the same workloads through HTTP (proxy -> gateway -> model replica) vs the engine in-process.

One run, same machine, same checkpoints, same torch thread count (the replica gets `--cpus` CPUs, which Ray turns
into torch threads; the in-process engine is set to the same count):

  latency     one-document rerank and one-input embedding, sequential: p50 / p90 of each path; the difference of
              the p50s is what HTTP + gateway + handle hop + batch queue add.
  saturation  `--requests` rerank requests (1 query x `--docs` documents) and embedding requests (`--docs`
              inputs), `--concurrency` in flight over HTTP; in-process, the same jobs in one engine.run call
              (the best batching the engine can get). Throughput in documents per second, and the ratio.

    python bench/serve_bench.py                          # shape-true 0.6B widths, 4 layers (CPU: ~2 minutes)
    python bench/serve_bench.py --shape tiny             # seconds; overhead-dominated, for a quick check

The load generator runs in this process (aiohttp), on the same cores as the server: on a 2-core machine its cost
is part of what HTTP costs here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.engine_bench import QUERY, make_texts  # noqa: E402
from models import Qwen3Embedder, Qwen3Reranker  # noqa: E402
from models.checkpoints import build_checkpoint, checkpoint_name  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ---- in-process ------------------------------------------------------------------------------------------

def in_process(rerank_path: Path, embed_path: Path, workload: dict, args) -> dict:
    torch.set_num_threads(args.cpus)
    reranker = Qwen3Reranker.from_pretrained(str(rerank_path), device="cpu")
    embedder = Qwen3Embedder.from_pretrained(str(embed_path), device="cpu")
    results = {}
    for name, call in (("rerank", lambda: reranker.rerank(QUERY, workload["one_doc"])),
                       ("embed", lambda: embedder.embed(workload["one_doc"]))):
        call()
        times = []
        for _ in range(args.latency_samples):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        results[f"{name}_latency"] = times
    # Saturation: tokenize and forward every request's job, all in one run call.
    for name, engine, make_job in (
            ("rerank", reranker, lambda docs: reranker.tokenize(QUERY, docs)),
            ("embed", embedder, lambda docs: embedder.tokenize(docs))):
        engine.run([make_job(workload["requests"][0])])
        start = time.perf_counter()
        engine.run([make_job(docs) for docs in workload["requests"]])
        results[f"{name}_seconds"] = time.perf_counter() - start
    del reranker, embedder
    gc.collect()
    return results


# ---- over HTTP ------------------------------------------------------------------------------------------

def serving_checkpoints(folder: Path, shape: str, layers: int | None) -> dict[str, Path]:
    """{task: checkpoint} of a reranker and an embedder of one shape, built offline on first use. Absolute paths:
    a config's relative `source` without "./" would name a hub repository."""
    folder = folder.resolve()
    return {task: build_checkpoint(folder / checkpoint_name(task, shape, layers), task, shape, layers)
            for task in ("rerank", "embed")}


ONE_DOCUMENT = ["The garbage collector frees objects once no reference to them is left."]


def model_application(name: str, task: str, path: Path, cpus: int, max_wait_ms: float | None = None) -> dict:
    """One model's application (no route of its own: the gateway calls it by handle)."""
    batching = {} if max_wait_ms is None else {"max_wait_ms": max_wait_ms}
    return {"name": name, "route_prefix": None, "import_path": "serve_app.app:model_app",
            "args": {"name": name, "task": task, "source": str(path), "device": "cpu", "batching": batching,
                     "deployment": {"num_cpus": cpus, "max_ongoing_requests": 256, "max_queued_requests": -1}}}


def stack_config(port: int, models: list[dict], *, auth: bool = False, database_url: str | None = None) -> dict:
    """Our gateway on `port` in front of the `models` applications."""
    gateway = {"auth": {"enabled": auth}, "deployment": {"num_cpus": 0}}
    if database_url is not None:
        gateway["database_url"] = database_url
    return {"http_options": {"host": "127.0.0.1", "port": port},
            "applications": [{"name": "gateway", "route_prefix": "/", "import_path": "serve_app.app:gateway_app",
                              "args": gateway}, *models]}


def serve_config(rerank_path: Path, embed_path: Path, port: int, cpus: int, max_wait_ms: float | None, *,
                 auth: bool = False, database_url: str | None = None) -> dict:
    return stack_config(port, [model_application("bench-reranker", "rerank", rerank_path, cpus, max_wait_ms),
                               model_application("bench-embedder", "embed", embed_path, cpus, max_wait_ms)],
                        auth=auth, database_url=database_url)


def start_serve(port: int, num_cpus: int):
    """A Ray instance of the benchmark's own (never one another process started) with Serve on `port`, started as the
    tests start theirs (tests/serving.py): behind HAProxy unless the project's switch in this process's environment
    says otherwise (QWEN3_SERVE_HAPROXY=0: Serve's Python proxy)."""
    from serve_app.cluster import haproxy
    from tests.serving import ServeInstance

    return ServeInstance.start_on(port, num_cpus=num_cpus, num_gpus=0, haproxy_on=haproxy.enabled())


@contextlib.contextmanager
def local_serve(port: int, num_cpus: int):
    """start_serve(), stopped on the way out."""
    instance = start_serve(port, num_cpus)
    try:
        yield instance
    finally:
        instance.stop()  # also ends, by its pid file, any haproxy of this instance that Ray left running
        for pid in instance.leftovers:
            print(f"haproxy pid {pid} outlived its Ray instance (ended)", flush=True)


def body(kind: str, docs: list[str]) -> dict:
    if kind == "rerank":
        return {"model": "bench-reranker", "query": QUERY, "documents": docs}
    return {"model": "bench-embedder", "input": docs, "encoding_format": "base64"}


async def over_http(url: str, workload: dict, args, instance) -> dict:
    results = {}

    async def engine_seconds(kind: str) -> float:
        handle = instance.model_handle("bench-reranker" if kind == "rerank" else "bench-embedder")
        return (await handle.stats.remote())["engine_seconds"]

    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(url, connector=connector) as session:
        async def post(path, payload):
            async with session.post(path, json=payload) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{path}: HTTP {response.status}: {await response.text()}")

        for kind, path in (("rerank", "/v1/rerank"), ("embed", "/v1/embeddings")):
            for _ in range(5):
                await post(path, body(kind, workload["one_doc"]))
            times = []
            for _ in range(args.latency_samples):
                start = time.perf_counter()
                await post(path, body(kind, workload["one_doc"]))
                times.append(time.perf_counter() - start)
            results[f"{kind}_latency"] = times

            await post(path, body(kind, workload["requests"][0]))
            pending = list(workload["requests"])
            semaphore = asyncio.Semaphore(args.concurrency)

            async def one(docs):
                async with semaphore:
                    await post(path, body(kind, docs))

            busy_before = await engine_seconds(kind)
            start = time.perf_counter()
            await asyncio.gather(*(one(docs) for docs in pending))
            results[f"{kind}_seconds"] = time.perf_counter() - start
            results[f"{kind}_engine_seconds"] = await engine_seconds(kind) - busy_before
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="0.6b", choices=["tiny", "0.6b", "4b", "8b"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--docs", type=int, default=8, help="documents (or inputs) per saturation request")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-samples", type=int, default=50)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="torch threads on both paths")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="batching.max_wait_ms (default: config's)")
    parser.add_argument("--checkpoints", default=str(REPO / "checkpoints"))
    args = parser.parse_args()

    layers = None if args.shape == "tiny" else args.layers
    paths = serving_checkpoints(Path(args.checkpoints), args.shape, layers)
    texts = make_texts(args.requests * args.docs, 20, 80, seed=1)
    workload = {"one_doc": ONE_DOCUMENT,
                "requests": [texts[i * args.docs:(i + 1) * args.docs] for i in range(args.requests)]}
    documents = args.requests * args.docs
    print(f"shape {args.shape} layers {layers or 'all'}; {args.requests} requests x {args.docs} docs "
          f"(20-80 words), concurrency {args.concurrency}, {args.cpus} torch threads; "
          f"max_wait_ms {args.max_wait_ms if args.max_wait_ms is not None else 'default'}; "
          f"RAY_SERVE_THROUGHPUT_OPTIMIZED={os.environ.get('RAY_SERVE_THROUGHPUT_OPTIMIZED', '0')}", flush=True)

    local = in_process(paths["rerank"], paths["embed"], workload, args)

    from tests.serving import ServeInstance, free_port

    port = free_port()
    instance = ServeInstance.start_on(port, num_cpus=2 * args.cpus + 1, num_gpus=0)
    try:
        instance.deploy(serve_config(paths["rerank"], paths["embed"], port, args.cpus, args.max_wait_ms))
        remote = asyncio.run(over_http(instance.url, workload, args, instance))
    finally:
        instance.stop()

    print(f"\n{'workload':<10} {'metric':<26} {'in-process':>12} {'HTTP':>12} {'ratio / added':>14}")
    for kind in ("rerank", "embed"):
        p50_local, p50_http = (statistics.median(r[f"{kind}_latency"]) * 1e3 for r in (local, remote))
        p90_local, p90_http = (percentile(r[f"{kind}_latency"], 0.9) * 1e3 for r in (local, remote))
        rate_local, rate_http = (documents / r[f"{kind}_seconds"] for r in (local, remote))
        print(f"{kind:<10} {'p50 one-document (ms)':<26} {p50_local:>12.2f} {p50_http:>12.2f} "
              f"{p50_http - p50_local:>+13.2f}ms")
        print(f"{kind:<10} {'p90 one-document (ms)':<26} {p90_local:>12.2f} {p90_http:>12.2f} "
              f"{p90_http - p90_local:>+13.2f}ms")
        print(f"{kind:<10} {'saturation (docs/s)':<26} {rate_local:>12.1f} {rate_http:>12.1f} "
              f"{rate_http / rate_local:>13.1%}")
        busy = remote[f"{kind}_engine_seconds"]
        print(f"{kind:<10} {'  engine seconds':<26} {local[f'{kind}_seconds']:>12.2f} {busy:>12.2f} "
              f"{'busy ' + format(busy / remote[f'{kind}_seconds'], '.0%'):>14}")


if __name__ == "__main__":
    main()
