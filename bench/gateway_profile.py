"""Where a replica's Python time goes under saturation: py-spy on the gateway (and the model replica) while closed-loop
clients send one-document requests, summed per thread and per function.

One local Serve instance with our stack (auth on a real key, SQLite ledger, tiny models); after a warm-up, py-spy
records the GIL holder (`--gil`: samples where a thread runs Python, not where it waits) of each profiled replica
while the load runs, and this prints for each:

  threads     samples per thread (Serve's replica loop, the user-code loop, the router loop, the ledger writer ...)
  self        functions at the top of the stack
  inclusive   functions anywhere on the stack; `--focus serve_app` keeps ours

One sample is 1 / --rate seconds of GIL time; samples x that / requests served while recording is the time per
request. BENCHMARKS.md (serving path) holds what it showed and what was cut.

    python bench/gateway_profile.py                          # rerank, gateway + model replica
    python bench/gateway_profile.py --kind embed --focus serve_app
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serve_bench import ONE_DOCUMENT, body, serve_config, serving_checkpoints  # noqa: E402
from serve_app.config import GATEWAY_DEPLOYMENT_NAME, MODEL_DEPLOYMENT_NAME  # noqa: E402

MODEL_APPS = {"rerank": "bench-reranker", "embed": "bench-embedder"}
ROUTES = {"rerank": "/v1/rerank", "embed": "/v1/embeddings"}


def replica_pid(app: str, deployment: str) -> int:
    """The pid of a running replica of `deployment` in `app` (the gateway app also holds the batch runner)."""
    from ray.serve.context import _get_global_client

    replicas = _get_global_client().get_serve_details()["applications"][app]["deployments"][deployment]["replicas"]
    return next(replica["pid"] for replica in replicas if replica["state"] == "RUNNING")


async def load(url: str, headers: dict, kind: str, clients: int, seconds: float) -> int:
    """Closed-loop clients for `seconds`; returns the requests served."""
    payload, path, served = body(kind, ONE_DOCUMENT), ROUTES[kind], 0
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=clients)) as session:
        async def client():
            nonlocal served
            while time.monotonic() < stop:
                async with session.post(path, json=payload, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{path}: HTTP {response.status}: {await response.text()}")
                served += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return served


def summary(raw: Path, focus: str | None, top: int) -> str:
    """py-spy's raw output ("thread;frame;...;frame count" per line) as per-thread, self and inclusive counts."""
    threads, leaf, inclusive, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames, samples = stack.split(";"), int(count)
        total += samples
        threads[frames[0]] += samples
        leaf[re.sub(r":\d+\)$", ")", frames[-1])] += samples
        for function in {re.sub(r":\d+\)$", ")", frame) for frame in frames[1:]}:  # once per stack
            inclusive[function] += samples
    if not total:
        return "  no samples (the replica never held the GIL while recorded?)"
    lines = [f"  {total} samples"]
    lines += [f"  thread    {n:6d} {n / total:6.1%}  {name[:100]}" for name, n in threads.most_common(8)]
    lines += [f"  self      {n:6d} {n / total:6.1%}  {name[:140]}" for name, n in leaf.most_common(top)]
    chosen = [(name, n) for name, n in inclusive.most_common() if not focus or focus in name][:top]
    lines += [f"  inclusive {n:6d} {n / total:6.1%}  {name[:140]}" for name, n in chosen]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="rerank", choices=sorted(ROUTES))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=12, help="recording time (the load runs 2 s longer)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--focus", default=None, help="inclusive rows only for functions whose name contains this")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--checkpoints", default=str(REPO / "checkpoints"))
    args = parser.parse_args()
    paths = serving_checkpoints(Path(args.checkpoints), "tiny", None)

    from serve_app.accounts.keys import KeyStore
    from serve_app.accounts.store import connect
    from tests.serving import ServeInstance, free_port

    workdir = Path(tempfile.mkdtemp(prefix="gateway-profile-"))
    database = f"sqlite:///{workdir / 'bench.db'}"
    headers = {"Authorization": f"Bearer {KeyStore(connect(database)).create('gateway-profile')[1]}"}
    port = free_port()
    instance = ServeInstance.start_on(port, num_cpus=8, num_gpus=0)
    try:
        instance.headers = headers
        instance.deploy(serve_config(paths["rerank"], paths["embed"], port, 1, None, auth=True, database_url=database))
        asyncio.run(load(instance.url, headers, args.kind, args.clients, 5))  # warm-up
        targets = {"gateway": replica_pid("gateway", GATEWAY_DEPLOYMENT_NAME),
                   MODEL_APPS[args.kind]: replica_pid(MODEL_APPS[args.kind], MODEL_DEPLOYMENT_NAME)}
        spy = Path(sys.executable).with_name("py-spy")
        recorders = {name: subprocess.Popen(
            [str(spy), "record", "-p", str(pid), "-d", str(args.seconds), "-r", str(args.rate), "--gil",
             "--threads", "--nonblocking", "-f", "raw", "-o", str(workdir / f"{name}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for name, pid in targets.items()}
        served = asyncio.run(load(instance.url, headers, args.kind, args.clients, args.seconds + 2))
        for name, recorder in recorders.items():
            _, errors = recorder.communicate()
            if recorder.returncode != 0 or not (workdir / f"{name}.txt").exists():
                raise RuntimeError(f"py-spy on {name} failed (exit {recorder.returncode}): {errors.strip()}")
    finally:
        instance.stop()
    print(f"{args.kind}: {served / (args.seconds + 2):.1f} requests/s under the profiler, {args.clients} clients; "
          f"one sample = {1000 / args.rate:g} ms of GIL time")
    for name in targets:
        print(f"\n{name} (py-spy --gil)\n{summary(workdir / f'{name}.txt', args.focus, args.top)}")


if __name__ == "__main__":
    main()
