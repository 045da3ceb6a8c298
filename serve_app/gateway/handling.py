"""One inference request, whoever carries it: parsed body -> model lookup -> handle call -> response body and usage.

The HTTP routes (serve_app/gateway/ingress.py) and the batch runner (serve_app/gateway/batches/runner.py) both serve a request
through `ENDPOINTS[path]`, so a batch line is answered exactly as the same body sent online: same validation, same
errors, same model call, same response. What differs stays with the carrier: the gateway bills each request in
the ledger before answering and adds headers; the runner bills the lines of a checkpoint in one transaction and
writes them to the output file.

An endpoint is an `Endpoint`: its wire schema and a handler that takes the parsed body and a `RequestContext` and
returns `Served`. OpenAI's embeddings and the Cohere / Jina / vLLM rerank are here; Cohere's /v2/embed is in
serve_app/gateway/cohere_embed.py, TEI's routes in serve_app/gateway/tei.py, vLLM's score and tokenizer helpers in
serve_app/gateway/vllm.py; serve_app/gateway/endpoints.py lists the ones a request (and a batch) can name. What they
all share is here: `embed_inputs`, `rerank_documents`, `tokenize_texts`, and model lookup with its defaults.

Prepaid credit (serve_app/accounts/credit) is checked where a request resolves its model, before any model call, so every
endpoint and both carriers refuse a spent key the same way.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import numpy as np
from pydantic import BaseModel
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from serve_app.config import GatewayConfig
from serve_app.errors import (InvalidRequest, ModelNotFound, ModelUnavailable, Overloaded, PayloadTooLarge,
                              RequestTimeout, ServingError)
from serve_app.gateway import protocol
from serve_app.gateway.directory import ModelDirectory, ModelEntry
from serve_app.gateway.hop_sharing import HopSharer, shareable
from serve_app.replica.quantization import base64_float32

if TYPE_CHECKING:
    from serve_app.accounts.credit.guard import CreditGuard

logger = logging.getLogger("ray.serve")

# How often a request waiting on a model checks that the model is still deployed (see ModelCalls._await_while_served).
REMOVAL_CHECK_S = 1.0

# Cohere bills one search unit per query with up to 100 documents.
DOCUMENTS_PER_SEARCH_UNIT = 100


def search_units(documents: int) -> int:
    return math.ceil(documents / DOCUMENTS_PER_SEARCH_UNIT)


def rank(scores: list[float], top_n: int | None) -> list[int]:
    """Indices by score, best first; ties keep input order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order[:top_n] if top_n is not None else order


def model_call_error(exc: BaseException, retry_after_s: int) -> ServingError | BaseException:
    """What a failed handle call means for the client."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, ServingError):
        return exc.cause
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, BackPressureError):
        return Overloaded("the model's queue is full; retry shortly", headers=retry)
    if isinstance(exc, (DeploymentUnavailableError, RayActorError)):
        return ModelUnavailable(f"the model is unavailable ({type(exc).__name__}); retry shortly", headers=retry)
    return exc


class ModelCalls:
    """Model lookup and model calls for one carrier (a gateway replica, the batch runner).

    `call_options` go with every handle call (the runner sends `background=True`, so model replicas run its work
    only when no online request waits); `admit(model)` is an async context manager around each call (the runner
    bounds its calls in flight per model with it); `credit` refuses prepaid keys whose credit is spent and learns
    the price of each model a request resolves to (what its debit is computed with). With `hop_sharing` on,
    concurrent calls to one model share handle calls (serve_app/gateway/hop_sharing.py); each is still retried,
    timed out, cancelled and classified here as its own."""

    def __init__(self, directory: ModelDirectory, config: GatewayConfig, *, call_options: dict[str, Any] | None = None,
                 admit: Callable[[str], Any] | None = None, credit: CreditGuard | None = None):
        self.directory = directory
        self.config = config
        self.call_options = call_options or {}
        self.admit = admit
        self.credit = credit
        self.sharer = HopSharer(config.hop_sharing) if config.hop_sharing.enabled else None

    async def call(self, entry: ModelEntry, method: str, *args) -> dict[str, Any]:
        if self.admit is None:
            return await self._call(entry, method, *args)
        async with self.admit(entry.name):
            return await self._call(entry, method, *args)

    async def _call(self, entry: ModelEntry, method: str, *args) -> dict[str, Any]:
        """One model call, retried when the replica died before answering: the models are pure functions of
        their input, so a retry is safe, and usage is recorded only once the answer is here. Bounded by
        model_call_attempts and by the request's deadline (request_timeout_s: 504 past it)."""
        deadline = time.monotonic() + self.config.request_timeout_s
        for attempt in range(1, self.config.model_call_attempts + 1):
            response = self._send(entry, method, args)
            try:
                return await self._await_while_served(entry, response, deadline)
            except (RequestCancelledError, ServingError):
                raise
            except RayActorError as exc:
                if attempt < self.config.model_call_attempts and time.monotonic() < deadline:
                    logger.warning("gateway: a %s replica died before answering (%s); retrying, attempt %d of %d",
                                   entry.name, type(exc).__name__, attempt + 1, self.config.model_call_attempts)
                    continue
                error = model_call_error(exc, self.config.retry_after_s)
            except Exception as exc:  # noqa: BLE001 - classified below
                error = model_call_error(exc, self.config.retry_after_s)
            if isinstance(error, ServingError):
                raise error from None
            raise error

    def _send(self, entry: ModelEntry, method: str, args: tuple):
        """The model call, made now or shared with others (a DeploymentResponse or a SharedCall: both are awaited for
        the answer and cancelled alike). Only the methods the model's replicas list in `serves_groups` share calls
        (rerank and embed, not tokenize or detokenize; none for a replica without serve_group or one Serve scales on
        handle calls), and large requests always get a call of their own."""
        groups = entry.facts.get("serves_groups")
        if self.sharer is not None and isinstance(groups, list) and method in groups and shareable(args):
            return self.sharer.send(entry, method, args, self.call_options)
        return entry.method(method).remote(*args, **self.call_options)

    async def _await_while_served(self, entry: ModelEntry, response, deadline: float) -> dict[str, Any]:
        """The model's answer, unless its application is removed first or the deadline passes (504; the model
        call is cancelled, which frees its place in the batch queue). A handle to a deleted application waits for
        replicas that never come, so a request that raced a `serve deploy` removing its model would hang; the
        directory's refresh notices the removal and the request gets the same 404 as one sent after."""
        async def answer():
            return await response

        pending = asyncio.ensure_future(answer())
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=max(0.0, min(REMOVAL_CHECK_S,
                                                                             deadline - time.monotonic())))
                if done:
                    return pending.result()
                if time.monotonic() >= deadline:
                    raise RequestTimeout(
                        f"model {entry.name!r} did not answer within {self.config.request_timeout_s} s "
                        "(request_timeout_s); the request was cancelled and not billed",
                        headers={"Retry-After": str(self.config.retry_after_s)})
                if self.directory.was_removed(entry):
                    raise ModelNotFound(f"model {entry.name!r} was removed while this request waited; served "
                                        f"models: {self.directory.names_text()}", param="model")
        finally:
            # Whatever ends the wait before the answer (the deadline, the model's removal, or this request being
            # cancelled because its client hung up) cancels the model call: asyncio.wait never cancels what it
            # waits on, and under the HAProxy ingress a client's disconnect reaches us only as that cancellation.
            # A call shared with other requests (a SharedCall) drops this request alone, or is cancelled with the
            # last one.
            if not pending.done():
                response.cancel()
                pending.cancel()


@dataclass
class RequestContext:
    """One request's view of its carrier: its ledger id, its API key's id (None with auth off), the model it
    resolved to (a metrics label), and the base URL it came to (named in errors that point to another URL)."""

    calls: ModelCalls
    request_id: str
    key_id: str | None = None
    model: str | None = None
    base_url: str = ""

    @property
    def config(self) -> GatewayConfig:
        return self.calls.config

    async def resolve(self, name: str | None, task: str | None) -> ModelEntry:
        """The model a request names, of `task` (None: of any task); no name (TEI's bodies, vLLM's without
        `model`) means the gateway's default model of that task (`default_models`). Every endpoint resolves its
        model before calling it, so this is where a key whose credit is spent is refused (429)."""
        credit = self.calls.credit
        if credit is not None and self.key_id is not None:
            credit.admit(self.key_id)
        entry = await self.lookup(name, task)
        if credit is not None:
            credit.pricing.note(entry)  # the price this request's debit is computed with
        return entry

    async def lookup(self, name: str | None, task: str | None) -> ModelEntry:
        """`resolve` without the credit check, for what is never billed (tokenize, decode, info): a key whose credit
        is spent can still count tokens, as it can still read its usage."""
        directory = self.calls.directory
        entry = await (directory.resolve(name, task) if name is not None else self._default_model(task))
        self.model = entry.name  # only served names, never what a client typed
        return entry

    async def _default_model(self, task: str | None) -> ModelEntry:
        """`default_models`' model of `task` (None: the embed model, else the rerank model), or 400 naming the
        per-model TEI base URLs a client that sends no model name can use instead."""
        defaults = self.config.default_models
        for candidate in (task,) if task is not None else ("embed", "rerank"):
            name = getattr(defaults, candidate)
            if name is not None:
                try:
                    return await self.calls.directory.resolve(name, candidate)
                except (ModelNotFound, InvalidRequest) as exc:
                    exc.message = f"the gateway's default {candidate} model (default_models.{candidate}): {exc.message}"
                    exc.args = (exc.message,)
                    raise
        served = [entry.name for entry in await self.calls.directory.entries() if task in (None, entry.task)]
        what = f"{task} model" if task is not None else "model"
        urls = ", ".join(f"{self.base_url.rstrip('/')}/tei/{name}" for name in served) or "none (no such model runs)"
        raise InvalidRequest(f"this request names no model and the gateway has no default {what} (its config's "
                             f"`default_models`): name the model in `model`, or send TEI requests to the model's own "
                             f"base URL: {urls}", param="model", code="no_default_model")

    async def call(self, entry: ModelEntry, method: str, *args) -> dict[str, Any]:
        return await self.calls.call(entry, method, *args)

    def check_document_count(self, count: int, param: str) -> None:
        if count > self.config.max_rerank_documents:
            raise PayloadTooLarge(f"{count} documents; at most {self.config.max_rerank_documents} per request",
                                  param=param)

    def check_input_count(self, count: int, param: str, what: str = "inputs") -> None:
        """max_embedding_inputs, for texts to embed or tokenize and sequences to decode (413 naming `param`)."""
        if count > self.config.max_embedding_inputs:
            raise PayloadTooLarge(f"{count} {what}; at most {self.config.max_embedding_inputs} per request",
                                  param=param)


@dataclass(frozen=True)
class Usage:
    """What one served request is billed: the columns of its ledger row."""

    model: str
    input_tokens: int
    documents: int = 0
    embeddings: int = 0
    dimensions: int | None = None
    windows: int | None = None  # rerank prompts scored, when documents were split into chunks

    @property
    def search_units(self) -> int:
        """Cohere bills chunks: each window counts as a document."""
        return search_units(self.documents if self.windows is None else self.windows)


@dataclass(frozen=True)
class Served:
    body: Any  # the JSON response body
    usage: Usage


# ---- the handlers -------------------------------------------------------------------------------------------

async def embed_inputs(context: RequestContext, model: str | None, inputs: list[str] | list[list[int]], *,
                       param: str, instruction: str | None = None, dimensions: int | None = None,
                       truncate: bool = True, truncate_side: str = "end", max_tokens: int | None = None,
                       with_ranges: bool = False, normalize: bool = True) -> tuple[ModelEntry, dict[str, Any], Usage]:
    """What every embeddings endpoint does (OpenAI's, Cohere's, TEI's): the input limit (413 naming `param`), the
    model (None: the default embed model), one model call. Returns the model, its answer (float32 vectors, token
    counts and, with `with_ranges`, the model's fixed int8/uint8 ranges for these dimensions) and the usage to
    bill."""
    context.check_input_count(len(inputs), param)
    entry = await context.resolve(model, "embed")
    out = await context.call(entry, "embed", inputs, instruction, dimensions, truncate, truncate_side, max_tokens,
                             with_ranges, normalize)
    usage = Usage(entry.name, sum(out["token_counts"]), embeddings=len(inputs),
                  dimensions=int(out["embeddings"].shape[1]))
    return entry, out, usage


async def serve_embeddings(body: protocol.EmbeddingRequest, context: RequestContext) -> Served:
    """OpenAI's embeddings."""
    entry, out, usage = await embed_inputs(context, body.model, body.inputs(), param="input",
                                           instruction=body.instruction, dimensions=body.dimensions,
                                           truncate=body.truncate)
    vectors: np.ndarray = out["embeddings"]
    encoded = base64_float32(vectors) if body.encoding_format == "base64" else vectors.tolist()
    return Served({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)],
        "model": entry.name,
        "usage": {"prompt_tokens": usage.input_tokens, "total_tokens": usage.input_tokens},
    }, usage)


async def rerank_documents(context: RequestContext, model: str | None, query: str, documents: list[str], *,
                           param: str = "documents", instruction: str | None = None,
                           max_tokens_per_doc: int | None = None, truncate: bool = True,
                           max_chunks_per_doc: int | None = None) -> tuple[ModelEntry, dict[str, Any], Usage]:
    """What every rerank endpoint does (Cohere's and the others', TEI's, vLLM's score): the document limit (413
    naming `param`), the model (None: the default rerank model), one model call scoring every document against
    `query` (P(yes), the logits, tokens and windows per document). A document the model refuses is named by
    `param`."""
    context.check_document_count(len(documents), param)
    entry = await context.resolve(model, "rerank")
    try:
        out = await context.call(entry, "rerank", query, documents, instruction, max_tokens_per_doc, truncate,
                                 max_chunks_per_doc)
    except InvalidRequest as exc:
        if exc.param == "documents":
            exc.param = param
        raise
    usage = Usage(entry.name, sum(out["token_counts"]), documents=len(documents), windows=sum(out["windows"]))
    return entry, out, usage


async def tokenize_texts(context: RequestContext, entry: ModelEntry, texts: list[str], *, param: str,
                         add_special_tokens: bool = True, instruction: str | None = None,
                         query: str | None = None) -> dict[str, Any]:
    """TEI's and vLLM's /tokenize: each text's tokens as the model's embed or rerank computes them (template and
    instruction included with `add_special_tokens`), from the replica that holds the tokenizer. Not billed: no
    forward pass runs."""
    context.check_input_count(len(texts), param)
    return await context.call(entry, "tokenize", texts, add_special_tokens, instruction, query)


async def detokenize_ids(context: RequestContext, entry: ModelEntry, sequences: list[list[int]], *, param: str,
                         skip_special_tokens: bool) -> list[str]:
    """TEI's /decode and vLLM's /detokenize: token ids back to text by the model's tokenizer. Not billed."""
    context.check_input_count(len(sequences), param, what="sequences")
    try:
        out = await context.call(entry, "detokenize", sequences, skip_special_tokens)
    except InvalidRequest as exc:
        exc.param = param if exc.param == "ids" else exc.param
        raise
    return out["texts"]


async def serve_rerank(body: protocol.RerankRequest, context: RequestContext) -> Served:
    """Cohere v2 / Jina / vLLM / Voyage rerank."""
    documents = body.document_texts()
    context.check_document_count(len(documents), "documents")
    if body.top_n is not None and body.top_k is not None and body.top_n != body.top_k:
        raise InvalidRequest(f"top_k is Voyage's name for top_n: send one (got top_n {body.top_n}, top_k "
                             f"{body.top_k})", param="top_k")
    entry, out, usage = await rerank_documents(context, body.model, body.query, documents,
                                               instruction=body.instruction,
                                               max_tokens_per_doc=body.max_tokens_per_doc,
                                               max_chunks_per_doc=body.max_chunks_per_doc)
    tokens = usage.input_tokens
    results = []
    for index in rank(out["scores"], body.top_n if body.top_n is not None else body.top_k):
        result: dict[str, Any] = {"index": index, "relevance_score": out["scores"][index]}
        if body.return_documents:
            result["document"] = {"text": documents[index]}
        results.append(result)
    return Served({
        "id": context.request_id,
        "model": entry.name,
        "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "meta": {"billed_units": {"search_units": usage.search_units}},
    }, usage)


@dataclass(frozen=True)
class Endpoint:
    schema: type[BaseModel]
    serve: Callable[[Any, RequestContext], Awaitable[Served]]


EMBEDDINGS = Endpoint(protocol.EmbeddingRequest, serve_embeddings)
RERANK = Endpoint(protocol.RerankRequest, serve_rerank)
