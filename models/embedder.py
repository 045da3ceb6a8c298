"""Qwen3-Embedding (0.6B / 4B / 8B): last-token pooling, Matryoshka dimensions, the official query prompt.

Queries may carry an instruction in the official form `Instruct: {task}\\nQuery:{text}` (no space after
`Query:`); documents get none. Every input must end with `<|endoftext|>` (the official tokenizer appends it
through a post-processor; without it embeddings are wrong), so we append it whenever a tokenizer or a
token-id input lacks it. For `dimensions=d` the vector is cut to its first d values, then L2-normalised (unless
the caller asks for the raw pooled state: TEI's `normalize: false`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModel

from models.base import DEFAULT_MAX_LENGTH, Qwen3Engine, Runtime, TextTokens, TokenIds, join_ids
from models.errors import EngineInputError

END_OF_TEXT = "<|endoftext|>"
MIN_DIMENSIONS = 32
# Which end of a too-long input a cut drops: "end" keeps its beginning (the model card's truncation).
TRUNCATE_SIDES = ("end", "start")


def query_text(text: str, instruction: str) -> str:
    return f"Instruct: {instruction}\nQuery:{text}"


@dataclass(frozen=True)
class _TokenLimit:
    """Tokens an input may take: the model's max_length, or the request's max_tokens when smaller."""

    max_length: int
    max_tokens: int | None

    @property
    def capped(self) -> bool:
        return self.max_tokens is not None and self.max_tokens < self.max_length

    @property
    def tokens(self) -> int:
        return self.max_tokens if self.capped else self.max_length

    @property
    def named(self) -> str:
        return " (max_tokens)" if self.capped else ""


@dataclass
class EmbedJob:
    input_ids: list[TokenIds]
    dimensions: int
    normalize: bool = True  # False: the last token's state cut to `dimensions`, as pooled (TEI's normalize: false)

    @property
    def token_counts(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    @property
    def num_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def unit_work(self) -> list[int]:
        """Tokens the engine computes for each input (nothing is shared between inputs: `shared_work` is 0)."""
        return self.token_counts

    shared_work = 0

    def part(self, start: int, end: int) -> EmbedJob:
        """Inputs start..end-1 as a job of their own: a long request runs in parts (each vector is its input's
        alone)."""
        return EmbedJob(input_ids=self.input_ids[start:end], dimensions=self.dimensions, normalize=self.normalize)


@dataclass
class EmbedResult:
    embeddings: np.ndarray  # float32 [n, dimensions], unit L2 norm (unless not asked to normalize), input order
    token_counts: list[int]

    @classmethod
    def joined(cls, parts: list[EmbedResult]) -> EmbedResult:
        """The result of a job run in parts (EmbedJob.part), the parts in input order."""
        return cls(embeddings=np.concatenate([part.embeddings for part in parts]),
                   token_counts=[x for part in parts for x in part.token_counts])


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
                 dimensions: int | None = None, truncate: bool = True, truncate_side: str = "end",
                 max_tokens: int | None = None, normalize: bool = True) -> EmbedJob:
        """Texts or token-id lists -> token ids ending in <|endoftext|>, at most max_length (and `max_tokens`)
        long. `normalize` False leaves the vectors as pooled (cut to `dimensions`, not L2-normalised).

        `max_tokens` caps every token the model embeds for an input (instruction and end token included, as they
        are billed). A longer input is cut, keeping the end token, or rejected when `truncate` is False. The cut
        drops the text's end (`truncate_side="end"`, the model card's `truncation=True`) or its start
        (`"start"`: the instruction stays, then the text's last tokens).
        """
        if not inputs:
            raise EngineInputError("input must contain at least one item", param="input")
        if truncate_side not in TRUNCATE_SIDES:
            raise EngineInputError(f"truncate_side must be one of {', '.join(TRUNCATE_SIDES)}", param="truncate")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise EngineInputError(f"max_tokens must be a positive integer; got {max_tokens!r}", param="max_tokens")
        dimensions = self._check_dimensions(dimensions)
        limit = _TokenLimit(self.max_length, max_tokens)
        if all(isinstance(item, str) for item in inputs):
            texts = list(inputs)
            head = self.encode_text(query_text("", instruction)) if instruction is not None else None

            def fit(position: int, ids: list[int]) -> TokenIds:
                if not self.tokenizer_appends_eos:
                    ids = ids + [self.eos_id]
                text_ids = (lambda: self.encode_text(texts[position])) if instruction is not None else None
                return self._fit(ids, position, truncate, truncate_side, limit, head, text_ids)

            prompts = [query_text(text, instruction) for text in texts] if instruction is not None else texts
            sequences = self.encode_texts(prompts, fit, add_special_tokens=True)
        elif all(isinstance(item, list) for item in inputs):
            if instruction is not None:
                raise EngineInputError("instruction applies to text inputs only, not token ids", param="instruction")
            sequences = [self._fit(self._checked_token_ids(seq, position), position, truncate, truncate_side, limit)
                         for position, seq in enumerate(inputs)]
        else:
            raise EngineInputError("input must be all strings or all lists of token ids", param="input")
        return EmbedJob(input_ids=sequences, dimensions=dimensions, normalize=normalize)

    def text_tokens(self, texts: list[str], instruction: str | None = None,
                    add_special_tokens: bool = True) -> list[TextTokens]:
        """Each text's tokens, never cut: with `add_special_tokens`, exactly the sequence `embed` computes for it
        (instruction prompt and end token included; its length is what a request is billed, as long as it fits
        max_length), else the prompt's own tokens without the end token."""
        appended = [self.eos_id] if add_special_tokens and not self.tokenizer_appends_eos else []
        return [self.text_tokens_of([(query_text(text, instruction) if instruction is not None else text,
                                      add_special_tokens)], appended) for text in texts]

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

    def _fit(self, seq: list[int], position: int, truncate: bool, side: str, limit: _TokenLimit,
             head: TokenIds | None = None, text_ids=None) -> TokenIds:
        """`seq` (ending in the end token) within the limit: as it is, cut, or refused. `head` is the instruction's
        own tokens and `text_ids()` the text's alone, for a cut from the start that keeps the instruction."""
        if len(seq) <= limit.tokens:
            return join_ids(seq)
        if not truncate:
            raise EngineInputError(f"input[{position}] has {len(seq)} tokens; the limit is {limit.tokens}"
                                   f"{limit.named}", param="input")
        head_length = 0 if head is None else len(head)
        room = limit.tokens - 1 - head_length  # text tokens that fit beside the instruction and the end token
        if room < 1:
            what = f"the instruction's {head_length} tokens and " if head_length else ""
            raise EngineInputError(f"the limit of {limit.tokens} tokens{limit.named} leaves no room for text "
                                   f"beside {what}the end token",
                                   param="max_tokens" if limit.capped else "instruction")
        if side == "end":
            return join_ids(seq[:limit.tokens - 1], [self.eos_id])
        if not head_length:
            return join_ids(seq[len(seq) - limit.tokens:-1], [self.eos_id])
        # The text's own tokens: the joint tokenization of instruction + text may merge across their boundary,
        # and a cut text is new text anyway; an uncut one above keeps the joint tokens, exactly as the card.
        text = text_ids()
        return join_ids(head, text[max(0, len(text) - room):], [self.eos_id])

    # ---- forward + postprocess -------------------------------------------------------------------------

    def run(self, jobs: list[EmbedJob]) -> list[EmbedResult]:
        """Embed many requests in shared micro-batches; each job gets its own dimensions."""
        sequences = [seq for job in jobs for seq in job.input_ids]
        pooled = self.last_token_states(sequences)
        results, start = [], 0
        for job in jobs:
            count = len(job.input_ids)
            # Matryoshka: cut first, then normalise (normalising the full vector and cutting is wrong).
            vectors = pooled[start:start + count, :job.dimensions]
            if job.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            results.append(EmbedResult(embeddings=vectors.cpu().numpy(), token_counts=job.token_counts))
            start += count
        return results

    def embed(self, inputs: list[str] | list[list[int]], instruction: str | None = None,
              dimensions: int | None = None, truncate: bool = True, truncate_side: str = "end",
              max_tokens: int | None = None, normalize: bool = True) -> EmbedResult:
        """Convenience: tokenize and run one request."""
        return self.run([self.tokenize(inputs, instruction, dimensions, truncate, truncate_side, max_tokens,
                                       normalize)])[0]
