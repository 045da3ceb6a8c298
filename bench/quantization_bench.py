"""Compressed embeddings: how far int8 and binary retrieval agree with float, and what each type costs on the wire.

Workload (fixed, deterministic): a corpus of 1,000 texts of 10 to 60 words and 100 queries of 4 to 16 words
(bench.engine_bench.make_texts: the standard library's docstrings), queries embedded with the web-search
instruction (Cohere's input_type search_query), documents without. The int8/uint8 ranges come from the model's
calibration file, made here from the shipped calibration corpus exactly as `python -m
serve_app.replica.quantization.calibration` makes it (a different text sample than the benchmark's corpus, as in use).

Retrieval, for each query, the 10 nearest corpus texts:
  float   cosine (dot product of the unit vectors): the reference
  int8    dot product of the int8 vectors (what a vector database computes on stored int8)
  binary  Hamming distance of the ubinary bit vectors (binary is the same bits, offset)
  binary + rescore   Hamming top 100, re-ranked by the float query against the int8 corpus vectors
recall@10 = |top10(type) & top10(float)| / 10, averaged over the queries.

Sizes: the JSON bytes of POST /v2/embed's `embeddings` for 96 texts (Cohere's batch) per type, as the gateway
encodes and renders them (serve_app.replica.quantization.encode, orjson as in serve_app/gateway/responses.py).

    python bench/quantization_bench.py --shape 0.6b      # shape-true 0.6B, all 28 layers (CPU: about 15 minutes)
    python bench/quantization_bench.py --shape tiny      # seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.engine_bench import make_texts  # noqa: E402
from models import Qwen3Embedder  # noqa: E402
from models.checkpoints import build_checkpoint, checkpoint_name  # noqa: E402
from serve_app.replica import quantization  # noqa: E402
from serve_app.replica.instructions import WEB_SEARCH_QUERY  # noqa: E402
from serve_app.replica.quantization.calibration import Calibration, calibrate  # noqa: E402

K = 10
RESCORE = 100


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, best first (ties: lower index first)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def hamming_scores(queries: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """Minus the Hamming distance between packed bit vectors (higher = nearer)."""
    differing = np.bitwise_xor(queries[:, None, :], corpus[None, :, :])
    return -np.unpackbits(differing, axis=2).sum(axis=2).astype(np.int64)


def retrieval(queries: np.ndarray, corpus: np.ndarray, ranges) -> dict[str, float]:
    truth = top_k(queries @ corpus.T, K)
    q8, c8 = (quantization.int8(v, *ranges).astype(np.int64) for v in (queries, corpus))
    qb, cb = quantization.ubinary(queries), quantization.ubinary(corpus)
    hamming = hamming_scores(qb, cb)
    shortlist = top_k(hamming, RESCORE)
    rescored = []
    for row, candidates in enumerate(shortlist):
        scores = c8[candidates] @ queries[row]
        rescored.append(candidates[np.argsort(-scores, kind="stable")[:K]])
    return {"int8": recall(top_k(q8 @ c8.T, K), truth), "binary": recall(top_k(hamming, K), truth),
            f"binary + rescore top {RESCORE}": recall(np.array(rescored), truth)}


def clipped_share(vectors: np.ndarray, ranges) -> float:
    lo, hi = ranges
    return float(np.mean((vectors < lo) | (vectors > hi)))


def response_bytes(vectors: np.ndarray, ranges) -> dict[str, int]:
    sizes = {}
    for kind in quantization.EMBEDDING_TYPES:
        encoded = quantization.encode(vectors, [kind], ranges)
        sizes[kind] = len(orjson.dumps({"embeddings": encoded}))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=["tiny", "0.6b", "4b", "8b"])
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's own")
    parser.add_argument("--corpus", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--dimensions", type=int, nargs="+", default=None, help="default: native and 256")
    parser.add_argument("--checkpoints", default=str(REPO / "checkpoints"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    path = build_checkpoint(Path(args.checkpoints) / checkpoint_name("embed", args.shape, args.layers), "embed",
                            args.shape, args.layers)
    engine = Qwen3Embedder.from_pretrained(str(path), device=args.device)
    facts = engine.describe()
    print(f"# {path.name}: {facts['parameters'] / 1e6:.0f}M parameters (random weights), {facts['device']} "
          f"{facts['dtype']}; corpus {args.corpus} texts, {args.queries} queries")

    started = time.perf_counter()
    calibration_file = path.with_name(f"{path.name}.calibration.npz")
    if calibration_file.exists():
        calibration = Calibration.load(calibration_file)
    else:
        calibration = calibrate(engine, source=str(path))
        calibration.save(calibration_file)
    corpus_texts = make_texts(args.corpus, 10, 60, seed=15)
    query_texts = make_texts(args.queries, 4, 16, seed=16)
    corpus = engine.embed(corpus_texts)
    queries = engine.embed(query_texts, instruction=WEB_SEARCH_QUERY)
    tokens = sum(corpus.token_counts) + sum(queries.token_counts)
    print(f"# embedded {tokens} tokens (+ calibration) in {time.perf_counter() - started:.0f} s")

    native = engine.native_dimensions
    for dimensions in args.dimensions or sorted({native, min(256, native)}, reverse=True):
        def cut(vectors):
            part = vectors[:, :dimensions].astype(np.float64)
            return (part / np.linalg.norm(part, axis=1, keepdims=True)).astype(np.float32)

        docs, asks = cut(corpus.embeddings), cut(queries.embeddings)
        ranges = calibration.ranges(dimensions)
        cosines = asks @ docs.T
        print(f"\n## {dimensions} dimensions: recall@{K} against float "
              f"(query-corpus cosine mean {cosines.mean():.3f}, sd {cosines.std():.3f}; values outside the "
              f"calibration ranges: corpus {clipped_share(docs, ranges):.2%}, "
              f"queries {clipped_share(asks, ranges):.2%})")
        for kind, value in retrieval(asks, docs, ranges).items():
            print(f"{kind:28s} {value:.3f}")
        sizes = response_bytes(docs[:96], ranges)
        print(f"\n## {dimensions} dimensions: JSON bytes of `embeddings` for 96 texts, per type (vs float)")
        for kind, size in sizes.items():
            print(f"{kind:8s} {size:>10,d}  {size / 96:>8,.0f} per vector  {size / sizes['float']:.3f}x")


if __name__ == "__main__":
    main()
