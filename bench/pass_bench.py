"""Bounded engine runs (batching.max_pass_seconds) in one model replica: how long short requests wait behind a long
rerank, and what running it in parts costs the long one. Side by side in one process, on the same weights.

The replica is the real ModelServer class, driven without Ray (tests.helpers.replica_without_ray, as
tests/test_deployment.py does: `@serve.batch`, which needs a running Serve replica, is replaced by a one-job
stand-in). For each setting of max_pass_seconds (`--settings`, `none` = unbounded, as before bounded runs existed):
one long rerank (`--documents` passages: 41 tokens of engine work each on average, the prompt's document markers
included) alone, then the same rerank while a client sends one-document reranks one after another. Reported: the short
requests' latencies (p50, max), how many finished while the long one ran, the long one's time, the engine runs
meanwhile (its parts and the short ones, which may share them), the long one's time alone (what the parts
themselves cost) and the replica's measured tokens/s. The long request's scores are checked against the unbounded
run's.

    python bench/pass_bench.py                                  # shape-true 0.6B widths, 4 layers, CPU
    python bench/pass_bench.py --shape tiny --documents 4000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models.checkpoints import build_checkpoint, checkpoint_name  # noqa: E402
from serve_app.replica.deployment import ModelServer  # noqa: E402
from tests.helpers import replica_without_ray  # noqa: E402

PASSAGE = ("The giant panda lives in the mountain forests of central China, where it eats bamboo for most of the "
           "day and sleeps in between.")  # about 30 tokens; documents repeat it with their index
SHORT_QUERY, SHORT_DOCUMENT = "what do pandas eat?", "Pandas eat bamboo."


def replica(checkpoint: Path, max_pass_seconds: float | None, threads: int) -> ModelServer:
    return replica_without_ray({"name": "bench", "task": "rerank", "source": str(checkpoint), "device": "cpu",
                                "deployment": {"num_cpus": threads}}, max_pass_seconds=max_pass_seconds)[0]


async def measure(server: ModelServer, documents: list[str]) -> dict:
    await server.rerank(SHORT_QUERY, [SHORT_DOCUMENT] * 4)  # warm-up: the replica measures its throughput
    await server.rerank(SHORT_QUERY, documents[:64])
    started = time.perf_counter()
    await server.rerank("Which passage is about pandas?", documents)  # alone: what running in parts costs it
    alone_s = time.perf_counter() - started
    runs_before = server._stats["engine_runs"]
    started = time.perf_counter()
    long = asyncio.create_task(server.rerank("Which passage is about pandas?", documents))
    while not server._busy:
        await asyncio.sleep(0.001)
    short: list[float] = []
    while not long.done():
        sent = time.perf_counter()
        await server.rerank(SHORT_QUERY, [SHORT_DOCUMENT])
        short.append(time.perf_counter() - sent)
    answer = await long
    long_s = time.perf_counter() - started
    return {"short": short, "long_s": long_s, "alone_s": alone_s, "runs": server._stats["engine_runs"] - runs_before,
            "scores": answer["scores"], "tokens_per_s": server.work.tokens_per_s()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="0.6b", choices=["tiny", "0.6b"])
    parser.add_argument("--layers", type=int, default=4, help="layers of the shape-true checkpoint (not tiny)")
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--settings", nargs="+", default=["none", "0.25"], help="max_pass_seconds values")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoints", default=str(REPO / "checkpoints"))
    args = parser.parse_args()
    layers = None if args.shape == "tiny" else args.layers
    checkpoint = build_checkpoint(Path(args.checkpoints) / checkpoint_name("rerank", args.shape, layers), "rerank",
                                  args.shape, layers)
    documents = [f"{i}. {PASSAGE}" for i in range(args.documents)]
    print(f"{checkpoint.name}, {args.threads} torch threads; long rerank: {args.documents} documents; short: one "
          "document, one after another while it runs", flush=True)
    print(f"{'max_pass_seconds':>16} {'short p50 s':>11} {'short max s':>11} {'shorts':>6} {'long s':>7} "
          f"{'runs':>5} {'long alone s':>12} {'tokens/s':>9} {'max score diff':>14}")
    baseline = None
    for setting in args.settings:
        max_pass_seconds = None if setting == "none" else float(setting)
        result = asyncio.run(measure(replica(checkpoint, max_pass_seconds, args.threads), documents))
        baseline = baseline or result["scores"]
        diff = max(abs(a - b) for a, b in zip(result["scores"], baseline))
        short = result["short"]
        print(f"{setting:>16} {statistics.median(short):>11.3f} {max(short):>11.3f} {len(short):>6} "
              f"{result['long_s']:>7.2f} {result['runs']:>5} {result['alone_s']:>12.2f} "
              f"{result['tokens_per_s']:>9.0f} {diff:>14.2e}", flush=True)


if __name__ == "__main__":
    main()
