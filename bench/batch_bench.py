"""Batch API benchmark: batch throughput against online saturation for the same lines, and online latency while a
batch runs against without, in one Serve instance (same checkpoints, same model replicas).

  throughput  `--lines` embedding lines (`--inputs` texts of 20-80 words each) and as many rerank lines (1 query x
              `--inputs` documents): sent online, `--concurrency` in flight (saturation), then as one batch each
              (create -> completed, polled every second and every 0.05 s near the end). Lines per second and the ratio.
  latency     one-input embeddings and one-document reranks, sequential: p50 / p90 with the models otherwise idle
              (half the samples before the busy phase, half after it), and while a batch of `--lines` x
              `--busy-factor` embedding lines (and one of rerank lines) runs; the ratio of the p50s.
  engine      per phase: engine time per line, lines per forward run, padding efficiency, and the CPU share of the
              busiest processes (what the engine's torch threads shared the cores with).

    python bench/batch_bench.py                      # shape-true 0.6B widths, 4 layers (CPU: a few minutes)
    python bench/batch_bench.py --shape tiny         # seconds; overhead-dominated, for a quick check

The load generator runs in this process, on the same cores as the server: on a 2-core machine its cost is part of
what it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.engine_bench import make_texts  # noqa: E402
from bench.serve_bench import ONE_DOCUMENT, body, percentile, serve_config, serving_checkpoints  # noqa: E402

ENDPOINTS = {"embed": "/v1/embeddings", "rerank": "/v1/rerank"}
MODELS = {"embed": "bench-embedder", "rerank": "bench-reranker"}
ENGINE_COUNTERS = ("engine_seconds", "jobs", "engine_runs", "forward_tokens", "padded_slots", "micro_batches")


def batch_lines(kind: str, groups: list[list[str]], prefix: str) -> bytes:
    return "".join(json.dumps({"custom_id": f"{prefix}-{n}", "method": "POST", "url": ENDPOINTS[kind],
                               "body": body(kind, docs)}) + "\n" for n, docs in enumerate(groups)).encode()


async def submit(client: httpx.AsyncClient, kind: str, groups: list[list[str]], prefix: str) -> str:
    uploaded = await client.post("/v1/files", files={"file": ("lines.jsonl", batch_lines(kind, groups, prefix))},
                                 data={"purpose": "batch"})
    uploaded.raise_for_status()
    created = await client.post("/v1/batches", json={"input_file_id": uploaded.json()["id"],
                                                     "endpoint": ENDPOINTS[kind], "completion_window": "24h"})
    created.raise_for_status()
    return created.json()["id"]


async def wait_done(client: httpx.AsyncClient, batch_id: str, poll_s: float = 1.0, final_poll_s: float = 0.05,
                    final_share: float = 0.75) -> dict:
    """Poll until the batch ends: every `poll_s` until `final_share` of its lines are done, then every
    `final_poll_s`, so the end is seen to within that while polling costs the shared cores little (a poll every
    0.1 s throughout kept the proxy and gateway at about 15% of a core, taken from the engine)."""
    while True:
        batch = (await client.get(f"/v1/batches/{batch_id}")).json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return batch
        counts = batch["request_counts"]
        near_end = counts["total"] and counts["completed"] + counts["failed"] >= final_share * counts["total"]
        await asyncio.sleep(final_poll_s if near_end else poll_s)


async def completed_lines(client: httpx.AsyncClient, batch_id: str) -> int:
    return (await client.get(f"/v1/batches/{batch_id}")).json()["request_counts"]["completed"]


async def online_saturation(client: httpx.AsyncClient, kind: str, groups: list[list[str]], concurrency: int) -> float:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(docs):
        async with semaphore:
            response = await client.post(ENDPOINTS[kind], json=body(kind, docs))
            response.raise_for_status()

    await one(groups[0])
    start = time.perf_counter()
    await asyncio.gather(*(one(docs) for docs in groups))
    return time.perf_counter() - start


async def sequential_latency(client: httpx.AsyncClient, kind: str, samples: int, until=None) -> list[float]:
    times = []
    for _ in range(samples):
        if until is not None and until():
            break
        start = time.perf_counter()
        response = await client.post(ENDPOINTS[kind], json=body(kind, ONE_DOCUMENT))
        response.raise_for_status()
        times.append(time.perf_counter() - start)
    return times


def cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """{pid: (name, CPU seconds used so far)}, user + system, from /proc (Linux only). The name is Ray's process
    title cut at its method (e.g. "ray::ServeReplica:bench-embedder:ModelServer"), which changes while it runs."""
    ticks = os.sysconf("SC_CLK_TCK")
    processes = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            title = (stat.parent / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        program = title.split()[0] if title else "?"
        name = program.split(".")[0] if program.startswith("ray::") else Path(program).name
        processes[int(stat.parent.name)] = (name, (int(fields[11]) + int(fields[12])) / ticks)
    return processes


def cpu_since(before: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds used since `before`, by process name (a process started meanwhile counts whole)."""
    used: dict[str, float] = {}
    for pid, (name, seconds) in cpu_seconds_by_process().items():
        spent = seconds - before.get(pid, (name, 0.0))[1]
        if spent > 0:
            used[name] = used.get(name, 0.0) + spent
    return used


async def measure(url: str, groups: dict[str, list[list[str]]], busy_groups: dict[str, list[list[str]]],
                  args, instance) -> dict:
    results: dict = {}

    async def engine_work(kind: str) -> dict:
        stats = await instance.model_handle(MODELS[kind]).stats.remote()
        return {key: stats[key] for key in ENGINE_COUNTERS}

    async def work_since(kind: str, before: dict) -> dict:
        after = await engine_work(kind)
        return {key: after[key] - before[key] for key in ENGINE_COUNTERS}

    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        for kind in ("embed", "rerank"):
            await sequential_latency(client, kind, 5)
            before, cpu = await engine_work(kind), cpu_seconds_by_process()
            results[f"{kind}_online_seconds"] = await online_saturation(client, kind, groups[kind], args.concurrency)
            results[f"{kind}_online_cpu"] = cpu_since(cpu)
            results[f"{kind}_online_work"] = await work_since(kind, before)
            before, cpu, start = await engine_work(kind), cpu_seconds_by_process(), time.perf_counter()
            batch = await wait_done(client, await submit(client, kind, groups[kind], f"{kind}-alone"))
            results[f"{kind}_batch_seconds"] = time.perf_counter() - start
            results[f"{kind}_batch_cpu"] = cpu_since(cpu)
            results[f"{kind}_batch_work"] = await work_since(kind, before)
            assert batch["status"] == "completed" and batch["request_counts"]["failed"] == 0, batch
        # Idle latency is sampled before and after the busy phase (half each), so drift on the shared cores falls
        # on both sides of the ratio.
        idle_samples = max(1, args.latency_samples // 2)
        for kind in ("embed", "rerank"):
            results[f"{kind}_idle_latency"] = await sequential_latency(client, kind, idle_samples)
        for kind in ("embed", "rerank"):
            batch_id = await submit(client, kind, busy_groups[kind], f"{kind}-busy")
            state = {"running": False, "done": False}

            async def watch():
                while True:
                    batch = (await client.get(f"/v1/batches/{batch_id}")).json()
                    state["running"] = batch["status"] == "in_progress" and batch["request_counts"]["completed"] > 0
                    if batch["status"] not in ("validating", "in_progress"):
                        state["done"] = True
                        return batch
                    await asyncio.sleep(1.0)  # as seldom as a client would: polls load the shared cores

            watcher = asyncio.create_task(watch())
            while not state["running"] and not state["done"]:
                await asyncio.sleep(0.05)
            # The batch's own progress while online requests ran: lines checkpointed in that window (to +-1 chunk),
            # read afresh at both ends rather than from the watcher's last poll.
            completed_before, started = await completed_lines(client, batch_id), time.perf_counter()
            times = await sequential_latency(client, kind, args.latency_samples, until=lambda: state["done"])
            completed_after, elapsed = await completed_lines(client, batch_id), time.perf_counter() - started
            results[f"{kind}_busy_batch_rate"] = (completed_after - completed_before) / elapsed
            results[f"{kind}_busy_latency"] = times
            results[f"{kind}_busy_batch_left"] = not state["done"]
            await client.post(f"/v1/batches/{batch_id}/cancel")
            await watcher
            await wait_done(client, batch_id)  # cancelled: the lines already sent have finished
        for kind in ("embed", "rerank"):
            results[f"{kind}_idle_latency"] += await sequential_latency(client, kind, idle_samples)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="0.6b", choices=["tiny", "0.6b", "4b", "8b"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lines", type=int, default=48)
    parser.add_argument("--inputs", type=int, default=8, help="embedding inputs / rerank documents per line")
    parser.add_argument("--busy-factor", type=int, default=4, help="the latency phase's batch: lines x this")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-samples", type=int, default=40)
    parser.add_argument("--in-flight", type=int, default=16, help="batches.max_in_flight_per_model")
    parser.add_argument("--grace-ms", type=float, default=None, help="models' batching.background_grace_ms")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="torch threads of each model replica")
    parser.add_argument("--checkpoints", default=str(REPO / "checkpoints"))
    args = parser.parse_args()

    layers = None if args.shape == "tiny" else args.layers
    paths = serving_checkpoints(Path(args.checkpoints), args.shape, layers)
    texts = make_texts(args.lines * args.inputs * (1 + args.busy_factor), 20, 80, seed=3)
    chunks = [texts[i * args.inputs:(i + 1) * args.inputs] for i in range(len(texts) // args.inputs)]
    groups = {kind: chunks[:args.lines] for kind in ("embed", "rerank")}
    busy = {kind: chunks[args.lines:] for kind in ("embed", "rerank")}
    print(f"shape {args.shape} layers {layers or 'all'}; {args.lines} lines x {args.inputs} inputs (20-80 words), "
          f"online concurrency {args.concurrency}, batch max_in_flight_per_model {args.in_flight}, {args.cpus} torch "
          f"threads; busy batch {len(busy['embed'])} lines; background_grace_ms "
          f"{args.grace_ms if args.grace_ms is not None else 'default'}", flush=True)

    from tests.serving import ServeInstance, free_port

    folder = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    port = free_port()
    config = serve_config(paths["rerank"], paths["embed"], port, args.cpus, None,
                          database_url=f"sqlite:///{folder / 'bench.db'}")
    if args.grace_ms is not None:
        for app in config["applications"][1:]:
            app["args"]["batching"]["background_grace_ms"] = args.grace_ms
    config["applications"][0]["args"]["batches"] = {
        "storage": {"kind": "local", "path": str(folder / "files")}, "max_in_flight_per_model": args.in_flight,
        "checkpoint_lines": 64, "checkpoint_s": 2, "poll_s": 0.2, "lease_s": 5,
        "runner": {"num_cpus": 0, "num_replicas": 1}}
    instance = ServeInstance.start_on(port, num_cpus=2 * args.cpus + 2, num_gpus=0)
    try:
        instance.deploy(config)
        results = asyncio.run(measure(instance.url, groups, busy, args, instance))
    finally:
        instance.stop()

    print(f"\n{'workload':<8} {'metric':<34} {'online':>10} {'batch':>10} {'ratio':>8}")
    for kind in ("embed", "rerank"):
        online_rate = args.lines / results[f"{kind}_online_seconds"]
        batch_rate = args.lines / results[f"{kind}_batch_seconds"]
        online_work, batch_work = results[f"{kind}_online_work"], results[f"{kind}_batch_work"]
        busy_share = batch_work["engine_seconds"] / results[f"{kind}_batch_seconds"]
        print(f"{kind:<8} {'throughput (lines/s)':<34} {online_rate:>10.2f} {batch_rate:>10.2f} "
              f"{batch_rate / online_rate:>8.1%}   (engine busy {busy_share:.0%} during the batch)")
        # What the forward passes held in each phase: where a throughput gap with the engine always busy comes from.
        for label, metric in (("engine ms per line", lambda w: 1e3 * w["engine_seconds"] / max(w["jobs"], 1)),
                              ("lines per engine run", lambda w: w["jobs"] / max(w["engine_runs"], 1)),
                              ("padding efficiency", lambda w: w["forward_tokens"] / max(w["padded_slots"], 1)),
                              ("micro-batches per line", lambda w: w["micro_batches"] / max(w["jobs"], 1))):
            print(f"{kind:<8} {label:<34} {metric(online_work):>10.2f} {metric(batch_work):>10.2f}")
        # Who else used the two cores meanwhile: on a small machine that is taken from the engine's torch threads.
        online_cpu, batch_cpu = results[f"{kind}_online_cpu"], results[f"{kind}_batch_cpu"]
        busiest = sorted(set(online_cpu) | set(batch_cpu), key=lambda n: -(online_cpu.get(n, 0) + batch_cpu.get(n, 0)))
        for name in busiest[:6]:
            print(f"{kind:<8} {'CPU % ' + name.removeprefix('ray::')[:28]:<34} "
                  f"{100 * online_cpu.get(name, 0) / results[f'{kind}_online_seconds']:>10.1f} "
                  f"{100 * batch_cpu.get(name, 0) / results[f'{kind}_batch_seconds']:>10.1f}")
    print(f"\n{'workload':<8} {'metric':<34} {'idle':>10} {'batch on':>10} {'ratio':>8}")
    for kind in ("embed", "rerank"):
        idle, loaded = results[f"{kind}_idle_latency"], results[f"{kind}_busy_latency"]
        if not loaded:  # its first checkpoint was its end: a larger --busy-factor gives samples
            print(f"{kind:<8} the busy batch ended before any online sample was taken; raise --busy-factor")
            continue
        p50_idle, p50_busy = statistics.median(idle) * 1e3, statistics.median(loaded) * 1e3
        print(f"{kind:<8} {'p50 one-input online (ms)':<34} {p50_idle:>10.2f} {p50_busy:>10.2f} "
              f"{p50_busy / p50_idle:>8.2f}x   ({len(loaded)} samples while the batch ran"
              f"{'' if results[f'{kind}_busy_batch_left'] else '; it ended before the samples did'})")
        print(f"{kind:<8} {'p90 one-input online (ms)':<34} {percentile(idle, 0.9) * 1e3:>10.2f} "
              f"{percentile(loaded, 0.9) * 1e3:>10.2f}")
        print(f"{kind:<8} {'batch lines/s meanwhile':<34} {'':>10} {results[f'{kind}_busy_batch_rate']:>10.2f}")


if __name__ == "__main__":
    main()
