"""The int8/uint8 ranges of an embedding model: fixed by one calibration file, made reproducibly from the corpus
shipped with the project (calibration_corpus.txt beside this file).

Where the ranges live, and why there. Vectors a client stored last month must compare with today's, so the ranges
must not move: not per request, not per replica, not when a replica runs on another device or a newer torch. Ranges
derived at start-up from the corpus would move with all of those (bf16 on a GPU and fp32 on a CPU embed the corpus
a little differently, and the buckets with them). So they are computed once, by this module's command, and kept
in a file that the model's config names (`calibration:`); every replica of the model, on any machine, reads the
same file, and the same file gives the same ranges for as long as it is kept. Changing it is a deliberate act,
like changing the weights: stored int8 vectors must then be re-embedded. At start-up the replica checks that the
file belongs to its weights (it embeds the file's first texts again and compares), so a file made for other
weights fails the start-up instead of quietly producing wrong buckets.

What the file holds (.npz, no pickles): `embeddings`, float32 [2n, native], the corpus's n texts embedded as
documents and then as web-search queries (the two forms clients store), at the native dimension, unit norm; the
texts of the check; the source, revision, corpus SHA-256, device and dtype it was made with. The ranges of a
dimension setting d are the per-dimension minimum and maximum of those embeddings cut to their first d values and
L2-normalised again, exactly as the model makes a d-dimensional vector: so every setting from 32 to native has
its own fixed ranges, and a file is small (512 texts x 2 x 1024 values x 4 bytes = 4 MiB for the 0.6B).

    python -m serve_app.replica.quantization.calibration --config configs/local.yaml --model qwen3-embedding-0.6b
    python -m serve_app.replica.quantization.calibration --source Qwen/Qwen3-Embedding-0.6B --out calibration/0.6b.npz

numpy only at import (the gateway imports the package); the command loads the engine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve_app.config import is_local_path, load_config_file
from serve_app.replica.instructions import WEB_SEARCH_QUERY
from serve_app.replica.weights import fetch_weights, resolve_local_path

CORPUS_PATH = Path(__file__).with_name("calibration_corpus.txt")
FILE_FORMAT = 1
# Texts embedded again at start-up to check that a file belongs to the loaded weights, and the least cosine each
# must reach: bf16 against an fp32 file of the same weights stays above 0.99; other weights fall far below.
CHECK_TEXTS = 8
MIN_CHECK_COSINE = 0.99
RANGES_CACHED = 64  # dimension settings whose ranges a replica keeps computed


class CalibrationError(ValueError):
    """The calibration file cannot be used for this model (missing, malformed, or made from other weights)."""


def corpus_texts(path: Path = CORPUS_PATH) -> list[str]:
    """The corpus: one text per line; lines that start with '# ' are comments (an empty line is a text)."""
    lines = path.read_text(encoding="utf-8").removesuffix("\n").split("\n")
    return [line for line in lines if not line.startswith("# ")]


def corpus_sha256(path: Path = CORPUS_PATH) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Calibration:
    embeddings: np.ndarray  # float32 [texts, native], unit norm
    check_texts: list[str]  # embedded as documents, they are the first rows of `embeddings`
    source: str
    revision: str | None
    corpus_sha256: str
    made_with: str  # device and dtype
    _ranges: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def native_dimensions(self) -> int:
        return int(self.embeddings.shape[1])

    def ranges(self, dimensions: int) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi), float32 [dimensions]: the fixed quantization ranges of that dimension setting."""
        if not 1 <= dimensions <= self.native_dimensions:
            raise ValueError(f"dimensions must be 1 to {self.native_dimensions}; got {dimensions}")
        cached = self._ranges.get(dimensions)
        if cached is None:
            cut = self.embeddings[:, :dimensions].astype(np.float64)
            cut /= np.sqrt((cut * cut).sum(axis=1, keepdims=True))
            cached = (cut.min(axis=0).astype(np.float32), cut.max(axis=0).astype(np.float32))
            if len(self._ranges) >= RANGES_CACHED:
                self._ranges.pop(next(iter(self._ranges)))
            self._ranges[dimensions] = cached
        return cached

    def check_matches(self, embed_documents) -> float:
        """Embed the check texts with `embed_documents(texts) -> [n, native] float32` (the loaded engine) and
        compare with the file's rows; the least cosine, or CalibrationError when the weights are not the file's."""
        fresh = np.asarray(embed_documents(self.check_texts), dtype=np.float64)
        if fresh.shape[1] != self.native_dimensions:
            raise CalibrationError(f"the calibration file has {self.native_dimensions} dimensions; the model "
                                   f"makes {fresh.shape[1]}: it was made for another model")
        stored = self.embeddings[:len(self.check_texts)].astype(np.float64)
        cosine = float((fresh * stored).sum(axis=1).min())
        if cosine < MIN_CHECK_COSINE:
            raise CalibrationError(f"the calibration file was made from other weights than these (source "
                                   f"{self.source!r}): the same texts embed with cosine {cosine:.3f} to its "
                                   f"vectors (at least {MIN_CHECK_COSINE} expected)")
        return cosine

    # ---- the file ---------------------------------------------------------------------------------------

    def save(self, path: Path | str) -> Path:
        """Write atomically (a replica reading it never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        with open(partial, "wb") as out:
            np.savez(out, format=np.array(FILE_FORMAT), embeddings=self.embeddings.astype(np.float32),
                     check_texts=np.array(self.check_texts, dtype=str), source=np.array(self.source),
                     revision=np.array(self.revision or ""), corpus_sha256=np.array(self.corpus_sha256),
                     made_with=np.array(self.made_with))
        os.replace(partial, path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> Calibration:
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["format"]) != FILE_FORMAT:
                    raise CalibrationError(f"{path}: calibration file format {int(data['format'])}; this version "
                                           f"reads format {FILE_FORMAT}")
                return cls(embeddings=data["embeddings"].astype(np.float32),
                           check_texts=[str(text) for text in data["check_texts"]], source=str(data["source"]),
                           revision=str(data["revision"]) or None, corpus_sha256=str(data["corpus_sha256"]),
                           made_with=str(data["made_with"]))
        except (OSError, KeyError, ValueError) as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f"{path}: not a calibration file ({type(exc).__name__}: {exc})") from None


def calibrate(engine, *, source: str, revision: str | None = None, texts: list[str] | None = None,
              corpus_digest: str | None = None) -> Calibration:
    """Embed the corpus with `engine` (a models.Qwen3Embedder) as documents and as web-search queries."""
    texts = corpus_texts() if texts is None else texts
    documents = engine.embed(texts).embeddings
    queries = engine.embed(texts, instruction=WEB_SEARCH_QUERY).embeddings
    facts = engine.describe()
    return Calibration(embeddings=np.concatenate([documents, queries]).astype(np.float32),
                       check_texts=texts[:CHECK_TEXTS], source=source, revision=revision,
                       corpus_sha256=corpus_digest or corpus_sha256(), made_with=f"{facts['device']} {facts['dtype']}")


# ---- the command ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", help="a serve config file; with --model, the embedder to calibrate")
    which.add_argument("--source", help="a hub id or local checkpoint directory")
    parser.add_argument("--model", help="with --config: the model's name")
    parser.add_argument("--revision", default=None, help="with --source: the hub revision")
    parser.add_argument("--out", default=None, help="the file to write (default with --config: its `calibration`)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 (default: the weights as exactly as possible)")
    args = parser.parse_args(argv)

    from models import Qwen3Embedder  # torch: only when a calibration is made

    if args.config:
        configs = {model.name: model for model in load_config_file(args.config).model_configs()
                   if model.task == "embed"}
        if args.model not in configs:
            parser.error(f"--model must name an embedder of {args.config}: {', '.join(sorted(configs))}")
        config = configs[args.model]
        source, revision, weights = config.source, config.revision, fetch_weights(config)
        out = args.out or config.calibration
        if out is None:
            parser.error(f"{args.model} has no `calibration` path in {args.config}: give --out")
    else:
        source, revision = args.source, args.revision
        weights = resolve_local_path(source) if is_local_path(source) else source
        if args.out is None:
            parser.error("--out is required with --source")
        out = args.out
    engine = Qwen3Embedder.from_pretrained(str(weights), revision=None if args.config else revision,
                                           device=args.device, dtype=args.dtype)
    path = calibrate(engine, source=source, revision=revision).save(resolve_local_path(out))
    print(f"{path}: calibration of {source} from {len(corpus_texts())} texts (corpus {corpus_sha256()[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
