"""Qwen3-Embedding (0.6B / 4B / 8B): last-token pooling, Matryoshka dimensions, the official query prompt.

Queries may carry an instruction in the official form `Instruct: {task}\\nQuery:{text}` (no space after
`Query:`); documents get none. Every input must end with `<|endoftext|>` (the official tokenizer appends it
through a post-processor; without it embeddings are wrong), so we append it whenever a tokenizer or a
token-id input lacks it. For `dimensions=d` the vector is cut to its first d values, then L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModel

from models.base import DEFAULT_MAX_LENGTH, Qwen3Engine, Runtime, TokenIds, join_ids
from models.errors import EngineInputError

END_OF_TEXT = "<|endoftext|>"
MIN_DIMENSIONS = 32


def query_text(text: str, instruction: str) -> str:
    return f"Instruct: {instruction}\nQuery:{text}"


@dataclass
class EmbedJob:
    input_ids: list[TokenIds]
    dimensions: int

    @property
    def token_counts(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    @property
    def num_tokens(self) -> int:
        return sum(self.token_counts)


@dataclass
class EmbedResult:
    embeddings: np.ndarray  # float32 [n, dimensions], unit L2 norm, input order
    token_counts: list[int]


class Qwen3Embedder(Qwen3Engine):
    task = "embed"
    auto_model_class = AutoModel

    def __init__(self, backbone, tokenizer, runtime: Runtime, *, source: str,
                 max_length: int = DEFAULT_MAX_LENGTH, token_budget: int | None = None,
                 max_batch_items: int | None = None):
        super().__init__(backbone, tokenizer, runtime, source=source, max_length=max_length,
                         token_budget=token_budget, max_batch_items=max_batch_items)
        self.eos_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        if self.eos_id is None or self.eos_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {END_OF_TEXT} token: not a Qwen3 tokenizer")
        probe = tokenizer("probe", add_special_tokens=True)["input_ids"]
        self.tokenizer_appends_eos = bool(probe) and probe[-1] == self.eos_id


    @property
    def native_dimensions(self) -> int:
        return self.hidden_size

    # ---- tokenize --------------------------------------------------------------------------------------

    def tokenize(self, inputs: list[str] | list[list[int]], instruction: str | None = None,
                 dimensions: int | None = None, truncate: bool = True) -> EmbedJob:
        """Texts or token-id lists -> token ids ending in <|endoftext|>, at most max_length long.

        Too-long inputs are cut from the right (keeping the end token, as the model card's `truncation=True`
        does), or rejected when `truncate` is False.
        """
        if not inputs:
            raise EngineInputError("input must contain at least one item", param="input")
        dimensions = self._check_dimensions(dimensions)
        if all(isinstance(item, str) for item in inputs):
            if instruction is not None:
                inputs = [query_text(text, instruction) for text in inputs]
            def fit(position: int, ids: list[int]) -> TokenIds:
                if not self.tokenizer_appends_eos:
                    ids = ids + [self.eos_id]
                return self._fit(ids, position, truncate)

            sequences = self.encode_texts(list(inputs), fit, add_special_tokens=True)
        elif all(isinstance(item, list) for item in inputs):
            if instruction is not None:
                raise EngineInputError("instruction applies to text inputs only, not token ids", param="instruction")
            sequences = [self._fit(self._checked_token_ids(seq, position), position, truncate)
                         for position, seq in enumerate(inputs)]
        else:
            raise EngineInputError("input must be all strings or all lists of token ids", param="input")
        return EmbedJob(input_ids=sequences, dimensions=dimensions)

    def _check_dimensions(self, dimensions: int | None) -> int:
        if dimensions is None:
            return self.native_dimensions
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) \
                or not MIN_DIMENSIONS <= dimensions <= self.native_dimensions:
            raise EngineInputError(f"dimensions must be an integer from {MIN_DIMENSIONS} to "
                                   f"{self.native_dimensions}; got {dimensions!r}", param="dimensions")
        return dimensions

    def _checked_token_ids(self, seq: list, position: int) -> list[int]:
        if not seq:
            raise EngineInputError(f"input[{position}] is an empty list of token ids", param="input")
        for token in seq:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise EngineInputError(f"input[{position}] holds {token!r}, not a token id in "
                                       f"[0, {self.vocab_size})", param="input")
        # Pre-tokenized inputs usually come without the end token; pooling needs it at the last position.
        return seq if seq[-1] == self.eos_id else seq + [self.eos_id]

    def _fit(self, seq: list[int], position: int, truncate: bool) -> TokenIds:
        if len(seq) <= self.max_length:
            return join_ids(seq)
        if not truncate:
            raise EngineInputError(f"input[{position}] has {len(seq)} tokens; the limit is {self.max_length}",
                                   param="input")
        return join_ids(seq[:self.max_length - 1], [self.eos_id])

    # ---- forward + postprocess -------------------------------------------------------------------------

    def run(self, jobs: list[EmbedJob]) -> list[EmbedResult]:
        """Embed many requests in shared micro-batches; each job gets its own dimensions."""
        sequences = [seq for job in jobs for seq in job.input_ids]
        pooled = self.last_token_states(sequences)
        results, start = [], 0
        for job in jobs:
            count = len(job.input_ids)
            # Matryoshka: cut first, then normalise (normalising the full vector and cutting is wrong).
            vectors = torch.nn.functional.normalize(pooled[start:start + count, :job.dimensions], p=2, dim=1)
            results.append(EmbedResult(embeddings=vectors.cpu().numpy(), token_counts=job.token_counts))
            start += count
        return results

    def embed(self, inputs: list[str] | list[list[int]], instruction: str | None = None,
              dimensions: int | None = None, truncate: bool = True) -> EmbedResult:
        """Convenience: tokenize and run one request."""
        return self.run([self.tokenize(inputs, instruction, dimensions, truncate)])[0]
