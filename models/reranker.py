"""Qwen3-Reranker (0.6B / 4B / 8B): the model card's recipe, computed with one dot product per document.

Prompt (design.md s1): PREFIX + "<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}" + SUFFIX,
tokenized without special tokens. Score = softmax([logit_no, logit_yes])[1] at the last token, which, since the
LM head has no bias, equals sigmoid((W[yes] - W[no]) . h_last). We keep only that fp32 difference vector and
never compute the 151669-wide logits.

The prompt splits into a per-request head (PREFIX + instruction + query) and a per-document tail
("<Document>: {doc}" + SUFFIX); tokenizing the two apart and concatenating gives exactly the joint tokens.
So the head runs once per request and its keys/values serve every document (exact under causal attention).
The documents of all requests in a `run` share length-sorted micro-batches, each row reading its own request's
head; the heads share passes too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from models.base import DEFAULT_MAX_LENGTH, Qwen3Engine, Runtime, TextTokens, TokenIds, join_ids
from models.errors import EngineInputError

PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
          "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def query_head_text(query: str, instruction: str) -> str:
    return f"<Instruct>: {instruction}\n<Query>: {query}\n"


def document_text(document: str) -> str:
    return f"<Document>: {document}"


@dataclass
class RerankJob:
    """One request, tokenized: a shared head and, per document, one tail (document + SUFFIX) per window."""

    head_ids: TokenIds
    tail_ids: list[TokenIds]  # every document's windows, in order
    # Windows of each document (a long document split into chunks has several); None: one each.
    window_counts: list[int] | None = None

    @property
    def windows(self) -> list[int]:
        return self.window_counts if self.window_counts is not None else [1] * len(self.tail_ids)

    @property
    def token_counts(self) -> list[int]:
        """Tokens of each document's prompts (one per window) exactly as the model card would feed them."""
        counts, start = [], 0
        for windows in self.windows:
            counts.append(sum(len(self.head_ids) + len(tail) for tail in self.tail_ids[start:start + windows]))
            start += windows
        return counts

    @property
    def num_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def unit_work(self) -> list[int]:
        """Tokens the engine computes for each document (its windows), the query head apart (`shared_work`): it
        runs once per run, for all the documents of the job in that run."""
        counts, start = [], 0
        for windows in self.windows:
            counts.append(sum(len(tail) for tail in self.tail_ids[start:start + windows]))
            start += windows
        return counts

    @property
    def shared_work(self) -> int:
        return len(self.head_ids)

    def part(self, start: int, end: int) -> RerankJob:
        """Documents start..end-1 as a job of their own (the same head): a long request runs in parts, and each
        document's score does not depend on the others, so the parts' results joined are the whole's (to rounding: a
        micro-batch of other rows, or a one-document part run without the shared head, rounds differently)."""
        first = sum(self.windows[:start])
        last = first + sum(self.windows[start:end])
        counts = None if self.window_counts is None else self.window_counts[start:end]
        return RerankJob(head_ids=self.head_ids, tail_ids=self.tail_ids[first:last], window_counts=counts)


@dataclass
class RerankResult:
    scores: list[float]  # P(yes) per document, in input order (a chunked document: its best window's)
    token_counts: list[int]
    # logit(P(yes)) = (W[yes] - W[no]) . h_last, kept exact for clients that ask for raw scores (TEI).
    logits: list[float]
    windows: list[int]  # prompts scored per document: 1, or its chunks

    @classmethod
    def joined(cls, parts: list[RerankResult]) -> RerankResult:
        """The result of a job run in parts (RerankJob.part), the parts in document order."""
        return cls(scores=[x for part in parts for x in part.scores],
                   token_counts=[x for part in parts for x in part.token_counts],
                   logits=[x for part in parts for x in part.logits],
                   windows=[x for part in parts for x in part.windows])


class Qwen3Reranker(Qwen3Engine):
    task = "rerank"
    auto_model_class = AutoModelForCausalLM

    def __init__(self, causal_lm, tokenizer, runtime: Runtime, *, source: str,
                 max_length: int = DEFAULT_MAX_LENGTH, token_budget: int | None = None,
                 max_batch_items: int | None = None, reuse_query_prefix: bool = True,
                 default_instruction: str = DEFAULT_INSTRUCTION):
        yes_id = tokenizer.convert_tokens_to_ids("yes")
        no_id = tokenizer.convert_tokens_to_ids("no")
        if yes_id in (None, tokenizer.unk_token_id) or no_id in (None, tokenizer.unk_token_id):
            raise ValueError("tokenizer has no 'yes'/'no' tokens: not a Qwen3-Reranker tokenizer")
        head = causal_lm.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("LM head has a bias; the yes/no difference-vector score would be inexact")
        # fp32 difference vector, as vLLM's from_2_way_softmax: it is all the head we need.
        self.score_direction = (head.weight[yes_id].float() - head.weight[no_id].float()).detach().clone()
        self.score_direction = self.score_direction.to(runtime.device)
        backbone = causal_lm.model
        # Drop the LM head: for the untied 8B this frees ~1.2 GB; for tied models it shares the input
        # embeddings and nothing is freed.
        causal_lm.lm_head = None
        super().__init__(backbone, tokenizer, runtime, source=source, max_length=max_length,
                         token_budget=token_budget, max_batch_items=max_batch_items)
        self.reuse_query_prefix = reuse_query_prefix
        self.default_instruction = default_instruction
        self.prefix_ids = self.encode_text(PREFIX)
        self.suffix_ids = self.encode_text(SUFFIX)
        # Smallest document part worth scoring: the "<Document>:" marker itself.
        self._min_document_tokens = len(self.encode_text(document_text("").rstrip()))


    # ---- tokenize --------------------------------------------------------------------------------------

    def tokenize(self, query: str, documents: list[str], instruction: str | None = None,
                 max_tokens_per_doc: int | None = None, truncate: bool = True,
                 max_chunks_per_doc: int = 1) -> RerankJob:
        """Build the official prompts. Only documents are truncated (from the right), as in the model card;
        with `truncate=False` a document that does not fit max_length is refused instead.

        With `max_chunks_per_doc` above 1, a document that does not fit is split into consecutive token windows
        that each fit with the query head, up to that many, each scored as a document: window k is the
        "<Document>:" marker and the document's tokens k * w .. (k + 1) * w - 1 after it (w: the room a window
        has), so the first window is exactly what truncation keeps. Tokens past the last window are cut (or
        refused, with `truncate=False`)."""
        if not documents:
            raise EngineInputError("documents must contain at least one document", param="documents")
        if max_tokens_per_doc is not None and max_tokens_per_doc < 1:
            raise EngineInputError("max_tokens_per_doc must be a positive integer", param="max_tokens_per_doc")
        if isinstance(max_chunks_per_doc, bool) or not isinstance(max_chunks_per_doc, int) or max_chunks_per_doc < 1:
            raise EngineInputError("max_chunks_per_doc must be a positive integer", param="max_chunks_per_doc")
        instruction = self.default_instruction if instruction is None else instruction
        head_ids = join_ids(self.prefix_ids, self.encode_text(query_head_text(query, instruction)))
        room = self.max_length - len(head_ids) - len(self.suffix_ids)
        if room < self._min_document_tokens:
            raise EngineInputError(
                f"query and instruction take {len(head_ids) - len(self.prefix_ids)} tokens, which with the "
                f"prompt template leaves no room for a document within max_length {self.max_length}; "
                "shorten the query or the instruction", param="query")
        if max_tokens_per_doc is not None:
            # The cap counts the document's own tokens, after the "<Document>:" marker.
            room = min(room, self._min_document_tokens + max_tokens_per_doc)
        marker = self._min_document_tokens
        step = room - marker  # document tokens per window, after the marker
        chunks = max_chunks_per_doc if step > 0 else 1

        def windows(position: int, ids: list[int]) -> list[TokenIds]:
            if len(ids) <= room:
                needed = 1
            elif step > 0:
                needed = 1 + math.ceil((len(ids) - room) / step)
            else:  # no room for a document token after the marker: it cannot be split
                needed = 2
            if not truncate and needed > chunks:
                held = f"{chunks} windows of {room}" if chunks > 1 else f"the {room}"
                raise EngineInputError(
                    f"document {position} takes {len(ids)} tokens, more than {held} that fit in "
                    f"max_length {self.max_length} with this query; shorten it or allow truncation",
                    param="documents")
            # ids[:marker] is the "<Document>:" marker (the space after it joins the next token).
            return [join_ids(ids[:marker], ids[marker + k * step:marker + (k + 1) * step], self.suffix_ids)
                    for k in range(min(needed, chunks))]

        per_document = self.encode_texts([document_text(d) for d in documents], windows, add_special_tokens=False)
        return RerankJob(head_ids=head_ids, tail_ids=[tail for tails in per_document for tail in tails],
                         window_counts=[len(tails) for tails in per_document])

    def text_tokens(self, texts: list[str], query: str | None = None, instruction: str | None = None,
                    add_special_tokens: bool = True) -> list[TextTokens]:
        """Each text's tokens, never cut. With `add_special_tokens`, the whole prompt that scores it as a document
        against `query` (None: an empty query): PREFIX, the instruction and query head, the document, SUFFIX, each
        part tokenized as `tokenize` does, so its length is what a rerank request is billed for that document (as
        long as it fits max_length). Without, the text's own tokens."""
        if not add_special_tokens:
            return [self.text_tokens_of([(text, False)]) for text in texts]
        head = query_head_text("" if query is None else query,
                               self.default_instruction if instruction is None else instruction)
        return [self.text_tokens_of([(PREFIX, False), (head, False), (document_text(text), False), (SUFFIX, False)])
                for text in texts]

    # ---- forward + postprocess -------------------------------------------------------------------------

    def run(self, jobs: list[RerankJob]) -> list[RerankResult]:
        """Score many requests at once, their documents sharing micro-batches. With reuse_query_prefix, each
        request's query head runs once (heads share passes too) and its keys/values serve its documents;
        without, every (head + document) prompt runs whole. A run in which no request has a second document has
        no head to reuse, so its prompts run whole too: one pass where heads-then-documents would take two (a lone
        one-document request is the serving path's most common and most latency-bound call)."""
        tails = [tail for job in jobs for tail in job.tail_ids]
        owners = [index for index, job in enumerate(jobs) for _ in job.tail_ids]
        if self.reuse_query_prefix and len(tails) > len(jobs):
            states = self.last_token_states_after_heads([job.head_ids for job in jobs], tails, owners)
        else:
            states = self.last_token_states([join_ids(jobs[owner].head_ids, tail)
                                             for owner, tail in zip(owners, tails)])
        results = []
        for raw, job in zip(self._logits(states).split([len(job.tail_ids) for job in jobs]), jobs):
            if job.window_counts is not None and len(job.window_counts) != len(job.tail_ids):
                # A chunked document scores as its best window (sigmoid is monotonic: max logit = max score).
                raw = torch.stack([windows.max() for windows in raw.split(job.window_counts)])
            results.append(RerankResult(scores=torch.sigmoid(raw).tolist(), token_counts=job.token_counts,
                                        logits=raw.tolist(), windows=job.windows))
        return results

    def _logits(self, last_states: torch.Tensor) -> torch.Tensor:
        return (last_states @ self.score_direction).cpu()

    def rerank(self, query: str, documents: list[str], instruction: str | None = None,
               max_tokens_per_doc: int | None = None, truncate: bool = True,
               max_chunks_per_doc: int = 1) -> RerankResult:
        """Convenience: tokenize and run one request."""
        return self.run([self.tokenize(query, documents, instruction, max_tokens_per_doc, truncate,
                                       max_chunks_per_doc)])[0]
