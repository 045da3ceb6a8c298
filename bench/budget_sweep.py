"""Token-budget sweep for the reranker engine: time over the FLOP floor for each budget, in one process.

    python bench/budget_sweep.py --layers 4 --budgets 256 512 1024 2048 4096
    python bench/budget_sweep.py --layers 4 --budgets 1024 2048 --no-prefix-reuse
"""

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.engine_bench import QUERY, make_texts, matmul_peak_flops, rerank_flops  # noqa: E402
from models import Qwen3Reranker  # noqa: E402
from models.checkpoints import build_checkpoint, checkpoint_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="0.6b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--no-prefix-reuse", action="store_true")
    args = parser.parse_args()
    path = build_checkpoint(REPO / "checkpoints" / checkpoint_name("rerank", args.shape, args.layers), "rerank",
                            args.shape, args.layers)
    engine = Qwen3Reranker.from_pretrained(str(path), device="cpu")
    engine.reuse_query_prefix = not args.no_prefix_reuse
    job = engine.tokenize(QUERY, make_texts(32, 50, 450, seed=1))
    config = engine.backbone.config
    useful = rerank_flops(config, job)
    floor = useful / matmul_peak_flops(torch.device("cpu"), torch.float32)
    print(f"# {args.shape} x {args.layers} layers, prefix reuse {engine.reuse_query_prefix}, floor {floor:.2f} s")
    for budget in args.budgets:
        engine.token_budget = budget
        engine.run([job])
        start = time.perf_counter()
        engine.run([job])
        elapsed = time.perf_counter() - start
        print(f"budget {budget:>6}: {elapsed:6.2f} s  ours/floor {elapsed / floor:.2f}")


if __name__ == "__main__":
    main()
