"""Cross-request packing: forward passes and padded token slots of many concurrent rerank requests.

Workload (fixed, deterministic): 64 requests, each a query of 5 to 25 words and 8 documents of 20 to 120 words
(bench.engine_bench.make_texts), at a GPU-size token budget (32768). The counters (models.base.WorkCounters)
do not depend on the device or the layer count, so a CPU run with few layers gives the GPU's figures.

  before: each request in its own `run` call (what the engine did before issue 14: its own head pass, then its
          documents in micro-batches of their own)
  after:  all requests in one `run` call (heads in shared passes, documents length-sorted across requests)

Useful tokens = each request's query head once + every document token; slots/useful = padding overhead.

    python bench/packing_bench.py --shape tiny
    python bench/packing_bench.py --shape 0.6b --layers 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.engine_bench import make_texts  # noqa: E402
from models import Qwen3Reranker  # noqa: E402
from models.checkpoints import build_checkpoint, checkpoint_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=["tiny", "0.6b", "4b", "8b"])
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's own")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--documents", type=int, default=8, help="documents per request")
    parser.add_argument("--token-budget", type=int, default=32768)
    parser.add_argument("--max-batch-items", type=int, nargs="+", default=[64, 96, 1024],
                        help="rows per micro-batch, one 'after' row each")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoints", default=str(REPO / "checkpoints"))
    args = parser.parse_args()

    path = build_checkpoint(Path(args.checkpoints) / checkpoint_name("rerank", args.shape, args.layers),
                            "rerank", args.shape, args.layers)
    engine = Qwen3Reranker.from_pretrained(str(path), device=args.device, token_budget=args.token_budget)
    queries = make_texts(args.requests, 5, 25, seed=3)
    documents = make_texts(args.requests * args.documents, 20, 120, seed=4)
    jobs = [engine.tokenize(query, documents[i * args.documents:(i + 1) * args.documents])
            for i, query in enumerate(queries)]
    useful = sum(len(job.head_ids) + sum(len(tail) for tail in job.tail_ids) for job in jobs)
    print(f"# shape {args.shape} layers {args.layers or 'all'} | {args.requests} requests x {args.documents} "
          f"documents | token budget {args.token_budget} | useful tokens {useful}")

    def measure(label: str, runs) -> list[float]:
        before = engine.work.snapshot()
        start = time.perf_counter()
        scores = [score for run in runs for result in run() for score in result.scores]
        seconds = time.perf_counter() - start
        work = engine.work.since(before)
        print(f"{label:<30} {work.micro_batches:>6} {work.computed_slots:>8} {work.computed_slots / useful:>12.3f} "
              f"{work.slots_per_pass:>10.0f} {seconds:>8.2f}")
        return scores

    print(f"{'':<30} {'passes':>6} {'slots':>8} {'slots/useful':>12} {'slots/pass':>10} {'wall s':>8}")
    engine.max_batch_items = args.max_batch_items[0]
    reference = measure(f"before (max_batch_items {engine.max_batch_items})",
                        [lambda job=job: engine.run([job]) for job in jobs])
    for max_items in args.max_batch_items:
        engine.max_batch_items = max_items
        scores = measure(f"after (max_batch_items {max_items})", [lambda: engine.run(jobs)])
        assert max(abs(a - b) for a, b in zip(scores, reference, strict=True)) <= 1e-5


if __name__ == "__main__":
    main()
