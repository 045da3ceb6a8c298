"""Engine benchmark: the model cards' reference code vs our engines, side by side in one process and one run.

Workloads (fixed, deterministic):
  rerank: 1 query x 32 documents of 50 to 450 words of real English text
  embed:  64 texts of 5 to 250 words
The English text is the docstrings of Python's standard library (real prose, on every machine, offline).

For each workload it prints the reference time, our time, their ratio, and the FLOP floor: the useful FLOPs
(every real token through every layer once, causal attention included, no padding, no LM head, the reranker's
query head counted once, and the last layer only where its output is read: see layer_flops) over the
matrix-multiply peak measured in the same run.

    python bench/engine_bench.py --shape 0.6b              # shape-true 0.6B, all 28 layers (CPU: minutes)
    python bench/engine_bench.py --shape tiny              # seconds: a quick check
    python bench/engine_bench.py --shape 8b --device cuda --skip-reference   # GPU: docs/s and MFU, no Ray
"""

from __future__ import annotations

import argparse
import gc
import inspect
import pkgutil
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models import Qwen3Embedder, Qwen3Reranker  # noqa: E402
from models.base import resolve_runtime  # noqa: E402
from models.checkpoints import build_checkpoint, checkpoint_name  # noqa: E402
from tests.reference import ModelCardEmbedder, ModelCardReranker  # noqa: E402

QUERY = "How does the garbage collector decide when to free memory that is no longer referenced?"


# ---- workload ------------------------------------------------------------------------------------------

def english_words() -> list[str]:
    """Words of the standard library's docstrings, in a fixed order."""
    import collections, json, os, pathlib, re as re_module, string, textwrap, typing  # noqa: E401, F401
    modules = [collections, json, os, pathlib, re_module, string, textwrap, typing, inspect, pkgutil, random,
               statistics, argparse]
    words: list[str] = []
    for module in modules:
        for _, member in sorted(vars(module).items()):
            doc = inspect.getdoc(member) if callable(member) or inspect.ismodule(member) else None
            if doc:
                words.extend(w for w in re.split(r"\s+", doc) if w)
    return words


def make_texts(count: int, min_words: int, max_words: int, seed: int) -> list[str]:
    words = english_words()
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        n = rng.randint(min_words, max_words)
        start = rng.randrange(0, len(words) - n)
        texts.append(" ".join(words[start:start + n]))
    return texts


# ---- FLOP accounting -----------------------------------------------------------------------------------

def layer_flops(config, tokens: int, context_start: int = 0, read: int = 1) -> float:
    """FLOPs a sequence needs: `tokens` consecutive tokens through every layer, attending to `context_start`
    earlier ones. The last layer's output is needed only for the `read` last tokens (1: the state the engines
    pool; 0: a prefix kept only for its keys and values), so there only keys and values are counted at every
    token, and queries, attention, o_proj and MLP for the read ones (models/forward.py skips the rest)."""
    h, heads, kv, d, ffn = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                            config.head_dim, config.intermediate_size)
    kv_params = 2 * h * kv * d
    other_params = h * heads * d + heads * d * h + 3 * h * ffn
    # Causal attention: token at position p does QK^T and AV over p+1 keys: 4 * heads * d * (p + 1).
    positions = tokens * context_start + tokens * (tokens + 1) / 2
    every_token = 2 * (kv_params + other_params) * tokens + 4 * heads * d * positions
    last_layer = 2 * kv_params * tokens + read * (2 * other_params + 4 * heads * d * (context_start + tokens))
    return (config.num_hidden_layers - 1) * every_token + last_layer


def rerank_flops(config, job) -> float:
    """A rerank job with the query head run once (its keys and values reused by every document)."""
    head = len(job.head_ids)
    return layer_flops(config, head, read=0) + sum(layer_flops(config, len(tail), context_start=head)
                                                   for tail in job.tail_ids)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sync(device)
        start = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 1):
            torch.mm(a, b)
        sync(device)
        elapsed = time.perf_counter() - start
        best = max(best, (10 if device.type == "cuda" else 1) * 2 * n ** 3 / elapsed)
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int, warmup: bool = True) -> tuple[float, object]:
    """Best-of-`repeats` wall time, after one warm-up call when asked."""
    result = fn() if warmup else None
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times), result


# ---- benchmarks ----------------------------------------------------------------------------------------

def measure(name: str, engine, items: list[str], job, useful_flops: float, run_ours, make_reference,
            run_reference, max_abs_diff, args, peak: float) -> dict:
    """Time our engine, free it, then time the model card's code on the same items (unless skipped)."""
    device = engine.runtime.device
    ours_s, ours = timed(run_ours, device, args.repeats)
    row = {"workload": name, "tokens": job.num_tokens, "ours_s": ours_s, "floor_s": useful_flops / peak,
           "items_per_s": len(items) / ours_s}
    del engine, run_ours
    gc.collect()
    if not args.skip_reference:
        reference = make_reference()
        reference.model.to(device)
        # One run, no warm-up on CPU: it takes minutes there, and one-time costs are milliseconds.
        ref_s, expected = timed(lambda: run_reference(reference), device, 1, warmup=device.type == "cuda")
        row.update(reference_s=ref_s, max_abs_diff=max_abs_diff(ours, expected))
        del reference
        gc.collect()
    return row


def bench_rerank(path: Path, args, peak: float) -> dict:
    documents = make_texts(32, 50, 450, seed=1)
    engine = Qwen3Reranker.from_pretrained(str(path), device=args.device, dtype=args.dtype)
    engine.cut_last_layer = not args.full_last_layer
    config = engine.backbone.config
    job = engine.tokenize(QUERY, documents)
    useful = rerank_flops(config, job)
    # Reference in chunks of 8 pairs: all 32 at once need ~13 GB of logits and were OOM-killed at 24 GB.
    return measure("rerank 1x32", engine, documents, job, useful, lambda: engine.rerank(QUERY, documents),
                   lambda: ModelCardReranker(str(path)),
                   lambda reference: reference.scores(QUERY, documents, batch_size=8),
                   lambda ours, expected: max(abs(a - b) for a, b in zip(ours.scores, expected)), args, peak)


def bench_embed(path: Path, args, peak: float) -> dict:
    texts = make_texts(64, 5, 250, seed=2)
    engine = Qwen3Embedder.from_pretrained(str(path), device=args.device, dtype=args.dtype)
    engine.cut_last_layer = not args.full_last_layer
    job = engine.tokenize(texts)
    useful = sum(layer_flops(engine.backbone.config, n) for n in job.token_counts)
    return measure("embed 64", engine, texts, job, useful, lambda: engine.embed(texts),
                   lambda: ModelCardEmbedder(str(path)), lambda reference: reference.embeddings(texts),
                   lambda ours, expected: float((torch.from_numpy(ours.embeddings) - expected.cpu()).abs().max()),
                   args, peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=["tiny", "0.6b", "4b", "8b"])
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's own")
    parser.add_argument("--task", default="both", choices=["rerank", "embed", "both"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of our engine (best is kept)")
    parser.add_argument("--skip-reference", action="store_true", help="GPU sizes: our engine only")
    parser.add_argument("--checkpoints", default=str(REPO / "checkpoints"))
    parser.add_argument("--full-last-layer", action="store_true",
                        help="our engine without the last-layer cut (models/forward.py), for comparison")
    args = parser.parse_args()

    torch.manual_seed(0)
    runtime = resolve_runtime(args.device, args.dtype)  # the engines resolve "auto" the same way
    device, dtype = runtime.device, runtime.dtype
    peak = matmul_peak_flops(device, dtype)
    print(f"# shape {args.shape} layers {args.layers or 'all'} | device {device} {dtype} | "
          f"torch {torch.__version__} threads {torch.get_num_threads()} | matmul peak {peak / 1e9:.0f} GFLOP/s")
    rows = []
    for task, bench in (("rerank", bench_rerank), ("embed", bench_embed)):
        if args.task in (task, "both"):
            path = build_checkpoint(Path(args.checkpoints) / checkpoint_name(task, args.shape, args.layers),
                                    task, args.shape, args.layers)
            rows.append(bench(path, args, peak))
    # ref/floor bounds the speed-up any engine can show: ours cannot beat the floor, so speed-up <= ref/floor.
    header = f"{'workload':<12} {'tokens':>6} {'reference s':>11} {'ours s':>8} {'speed-up':>8} " \
             f"{'floor s':>8} {'ref/floor':>9} {'ours/floor':>10} {'items/s':>8} {'MFU':>5} {'max|diff|':>9}"
    print(header)
    for row in rows:
        ref = row.get("reference_s") or float("nan")
        print(f"{row['workload']:<12} {row['tokens']:>6} {ref:>11.3f} "
              f"{row['ours_s']:>8.3f} {ref / row['ours_s']:>7.2f}x "
              f"{row['floor_s']:>8.3f} {ref / row['floor_s']:>8.2f}x {row['ours_s'] / row['floor_s']:>9.2f}x "
              f"{row['items_per_s']:>8.1f} {row['floor_s'] / row['ours_s']:>5.0%} "
              f"{row.get('max_abs_diff', float('nan')):>9.1e}")


if __name__ == "__main__":
    main()
