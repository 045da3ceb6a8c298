"""Embedding types: float vectors as clients store them, full size or compressed. numpy only (the gateway imports
this; it never imports torch).

Definitions, over the final vector (cut to its dimensions, then L2-normalised), per vector of d values:

    float    the float32 values
    base64   base64 of the little-endian float32 bytes (what the openai SDK decodes)
    ubinary  the sign bits packed 8 per byte, first value in the high bit: numpy.packbits(x > 0) (ceil(d / 8)
             bytes, a last partial byte padded with zero bits); compare with Hamming distance
    binary   the same bytes minus 128, as int8 (Cohere's signed form)
    uint8    scalar quantization over fixed per-dimension ranges [lo_j, hi_j]:
             q_j = clip(floor((x_j - lo_j) / (hi_j - lo_j) * 255), 0, 255), in float64; lo_j -> 0, hi_j -> 255,
             values below or above the range clip to 0 / 255
    int8     uint8 minus 128 (-128..127): the same buckets

ubinary and binary are sentence-transformers' `quantize_embeddings` (and Cohere's). uint8 is its uint8 (buckets of
width (hi - lo) / 255) for values inside the ranges, but for rounding at bucket edges: it divides by that width,
which sends hi itself to 254 in about one dimension of eight, where the fraction of the range, times 255, is exact
at both ends. Outside the ranges it clips where sentence-transformers wraps around. Its int8 truncates toward zero,
which puts half of the values one bucket off its own uint8, so here int8 is uint8 - 128, as binary is ubinary -
128. The ranges are
the model's, fixed by its calibration file for every dimension setting (serve_app/replica/quantization/calibration.py),
never computed per request or per replica, so vectors stored months apart compare.
"""

from __future__ import annotations

import base64

import numpy as np

EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")
# The types that need the model's calibration ranges.
CALIBRATED_TYPES = frozenset({"int8", "uint8"})
# A dimension whose calibration values are all equal gets this width, so its step is never zero.
MIN_RANGE_WIDTH = 1e-12


def base64_float32(vectors: np.ndarray) -> list[str]:
    """Base64 of each vector's little-endian float32 bytes."""
    return [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]


def ubinary(vectors: np.ndarray) -> np.ndarray:
    """[n, d] floats -> [n, ceil(d / 8)] uint8: the sign bits (x > 0), packed big-endian, zero-padded."""
    return np.packbits(vectors > 0, axis=1)


def binary(vectors: np.ndarray) -> np.ndarray:
    """ubinary - 128, as int8."""
    return (ubinary(vectors).astype(np.int16) - 128).astype(np.int8)


def uint8(vectors: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """[n, d] floats -> [n, d] uint8 buckets over the per-dimension ranges [lo, hi] (float64 arithmetic)."""
    lo = np.asarray(lo, dtype=np.float64)
    width = np.maximum(np.asarray(hi, dtype=np.float64) - lo, MIN_RANGE_WIDTH)
    # The fraction of the range first: exactly 0 at lo and 1 at hi, so the ends are buckets 0 and 255.
    buckets = np.floor((np.asarray(vectors, dtype=np.float64) - lo) / width * 255)
    return np.clip(buckets, 0, 255).astype(np.uint8)


def int8(vectors: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """uint8 - 128, as int8."""
    return (uint8(vectors, lo, hi).astype(np.int16) - 128).astype(np.int8)


def encode(vectors: np.ndarray, types: list[str], ranges: tuple[np.ndarray, np.ndarray] | None = None
           ) -> dict[str, list]:
    """{type: one JSON-ready value per vector} for each of `types`; int8 and uint8 need `ranges` (lo, hi) of the
    vectors' dimension setting."""
    encoded: dict[str, list] = {}
    for kind in types:
        if kind == "float":
            encoded[kind] = vectors.tolist()
        elif kind == "base64":
            encoded[kind] = base64_float32(vectors)
        elif kind == "ubinary":
            encoded[kind] = ubinary(vectors).tolist()
        elif kind == "binary":
            encoded[kind] = binary(vectors).tolist()
        elif kind in CALIBRATED_TYPES:
            if ranges is None:
                raise ValueError(f"{kind} embeddings need the model's calibration ranges")
            encoded[kind] = (uint8 if kind == "uint8" else int8)(vectors, *ranges).tolist()
        else:
            raise ValueError(f"unknown embedding type {kind!r}")
    return encoded
