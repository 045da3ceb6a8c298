"""Handle-call latency, floor vs our model replica: where a one-document request's time goes past the gateway.

One local Serve instance holds the floor (bench/floor_app.py) and the tiny (or shape-true) models; this process,
as a driver, calls handles sequentially and prints p10 / p50 / p90 of each:

  floor Constants.rerank()    Serve's own cost of a handle call to a deployment that returns constants
  model describe(), stats()   the same hop to our model replica, no model work
  model rerank(1 doc)         the hop plus tokenize, the engine queue and thread, and one forward pass
  engine run                  the replica's own engine seconds per rerank call, against the same run in this
                              process (after Serve has stopped), back to back and after idle gaps

The difference between `rerank` and `describe` is what the replica spends on a request; BENCHMARKS.md (serving
path) sets it against the replica's own step timings and a py-spy GIL profile.

    python bench/handle_probe.py                 # tiny models: the path itself
    python bench/handle_probe.py --shape 0.6b    # shape-true widths, 4 layers
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.floor_bench import floor_application  # noqa: E402
from bench.serve_bench import ONE_DOCUMENT, serve_config, serving_checkpoints  # noqa: E402

QUERY = "what frees objects"


async def measure(calls: dict, rounds: int, samples: int) -> dict[str, list[float]]:
    for call in calls.values():  # warm every path first
        for _ in range(30):
            await call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):  # rounds alternate the calls, so drift on the shared cores falls on all of them
        for name, call in calls.items():
            for _ in range(samples):
                start = time.perf_counter()
                await call()
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=["tiny", "0.6b"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=60, help="sequential calls per round and call")
    parser.add_argument("--checkpoints", default=str(REPO / "checkpoints"))
    args = parser.parse_args()
    paths = serving_checkpoints(Path(args.checkpoints), args.shape, None if args.shape == "tiny" else args.layers)

    from ray import serve

    from tests.serving import ServeInstance, free_port

    port = free_port()
    instance = ServeInstance.start_on(port, num_cpus=8, num_gpus=0)
    try:
        database = f"sqlite:///{Path(tempfile.mkdtemp(prefix='handle-probe-')) / 'bench.db'}"
        instance.deploy(serve_config(paths["rerank"], paths["embed"], port, 1, None, database_url=database),
                        unchecked_applications=[floor_application()])
        constants = serve.get_deployment_handle("Constants", "floor")
        model = serve.get_app_handle("bench-reranker")
        calls = {
            "floor Constants.rerank()": lambda: constants.rerank.remote(),
            "model describe()": lambda: model.describe.remote(),
            "model stats()": lambda: model.stats.remote(),
            "model rerank(1 doc)": lambda: model.rerank.remote(QUERY, ONE_DOCUMENT, None, None, True, None),
        }
        before = model.stats.remote().result()
        times = asyncio.run(measure(calls, args.rounds, args.samples))
        after = model.stats.remote().result()
    finally:
        instance.stop()
    for name, values in times.items():
        values.sort()
        print(f"{name:<28} p10 {values[len(values) // 10] * 1e3:6.2f} ms   p50 {statistics.median(values) * 1e3:6.2f} ms"
              f"   p90 {values[9 * len(values) // 10] * 1e3:6.2f} ms")
    # The replica's own reading of its forward runs (warm-up calls included): the part of `rerank` that is the model.
    jobs, engine_seconds = after["jobs"] - before["jobs"], after["engine_seconds"] - before["engine_seconds"]
    print(f"{'engine run per rerank call':<28} mean {1e3 * engine_seconds / jobs:6.2f} ms"
          f"   ({jobs} calls, {after['engine_runs'] - before['engine_runs']} runs)")
    for idle_ms, in_process in in_process_run_ms(paths["rerank"], args.rounds * args.samples).items():
        label = "engine run in this process" if not idle_ms else f"  after {idle_ms:g} ms idle"
        print(f"{label:<28} mean {statistics.mean(in_process):6.2f} ms   p50 {statistics.median(in_process):6.2f} ms"
              + ("   (the same job, 1 torch thread, no Serve threads beside it)" if not idle_ms else ""))


IDLE_GAPS_MS = (0, 2, 10, 50)


def in_process_run_ms(path: Path, samples: int) -> dict[float, list[float]]:
    """The one-document job's forward run in a plain process: what the replica's engine run would cost if nothing
    else in its process wanted the GIL meanwhile (torch releases it around every op). Back to back, and after each
    idle gap of IDLE_GAPS_MS: a served request's forward pass follows an idle spell (the rest of the request's path),
    and a CPU that has idled runs the same ops slower (measured, BENCHMARKS.md; the cause is not separated: cold caches
    and predictors, the VM's vCPU descheduled, CPU power states)."""
    import torch

    from models.reranker import Qwen3Reranker

    torch.set_num_threads(1)  # as the replica (num_cpus 1)
    engine = Qwen3Reranker.from_pretrained(str(path), device="cpu")
    job = engine.tokenize(QUERY, ONE_DOCUMENT)
    for _ in range(30):
        engine.run([job])
    times: dict[float, list[float]] = {}
    for idle_ms in IDLE_GAPS_MS:
        times[idle_ms] = []
        for _ in range(min(samples, 100) if idle_ms else samples):
            if idle_ms:
                time.sleep(idle_ms / 1000)
            start = time.perf_counter()
            engine.run([job])
            times[idle_ms].append((time.perf_counter() - start) * 1e3)
    return times


if __name__ == "__main__":
    main()
