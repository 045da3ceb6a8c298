"""One inference request, whoever carries it: parsed body -> model lookup -> handle call -> response body and usage.

The HTTP routes (serve_app/ingress.py) and the batch runner (serve_app/batches/runner.py) both serve a request
through `ENDPOINTS[path]`, so a batch line is answered exactly as the same body sent online: same validation, same
errors, same model call, same response. What differs stays with the carrier: the gateway bills each request in
the ledger before answering and adds headers; the runner bills the lines of a checkpoint in one transaction and
writes them to the output file.

Adding an endpoint (e.g. Cohere's POST /v2/embed) is one entry in ENDPOINTS: its wire schema and a handler that
takes the parsed body and a `RequestContext` and returns `Served`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np
from pydantic import BaseModel
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from serve_app import protocol
from serve_app.config import GatewayConfig
from serve_app.directory import ModelDirectory, ModelEntry
from serve_app.errors import ModelNotFound, ModelUnavailable, Overloaded, PayloadTooLarge, RequestTimeout, ServingError

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
    bounds its calls in flight per model with it)."""

    def __init__(self, directory: ModelDirectory, config: GatewayConfig, *, call_options: dict[str, Any] | None = None,
                 admit: Callable[[str], Any] | None = None):
        self.directory = directory
        self.config = config
        self.call_options = call_options or {}
        self.admit = admit

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
            response = getattr(entry.handle, method).remote(*args, **self.call_options)
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

    async def _await_while_served(self, entry: ModelEntry, response, deadline: float) -> dict[str, Any]:
        """The model's answer, unless its application is removed first or the deadline passes (504; the model
        call is cancelled, which frees its place in the batch queue). A handle to a deleted application waits for
        replicas that never come, so a request that raced a `serve deploy` removing its model would hang; the
        directory's refresh notices the removal and the request gets the same 404 as one sent after."""
        async def answer():
            return await response

        pending = asyncio.ensure_future(answer())
        while True:
            done, _ = await asyncio.wait({pending}, timeout=max(0.0, min(REMOVAL_CHECK_S,
                                                                         deadline - time.monotonic())))
            if done:
                return pending.result()
            if time.monotonic() >= deadline:
                failure: ServingError = RequestTimeout(
                    f"model {entry.name!r} did not answer within {self.config.request_timeout_s} s "
                    "(request_timeout_s); the request was cancelled and not billed",
                    headers={"Retry-After": str(self.config.retry_after_s)})
            elif self.directory.was_removed(entry):
                failure = ModelNotFound(f"model {entry.name!r} was removed while this request waited; served "
                                        f"models: {self.directory.names_text()}", param="model")
            else:
                continue
            response.cancel()
            pending.cancel()
            raise failure


@dataclass
class RequestContext:
    """One request's view of its carrier: its ledger id, and the model it resolved to (a metrics label)."""

    calls: ModelCalls
    request_id: str
    model: str | None = None

    @property
    def config(self) -> GatewayConfig:
        return self.calls.config

    async def resolve(self, name: str | None, task: str) -> ModelEntry:
        """The model a request names; no name (TEI's body) means the one model of that task."""
        directory = self.calls.directory
        entry = await (directory.resolve(name, task) if name is not None else directory.only_model(task))
        self.model = entry.name  # only served names, never what a client typed
        return entry

    async def call(self, entry: ModelEntry, method: str, *args) -> dict[str, Any]:
        return await self.calls.call(entry, method, *args)

    def check_document_count(self, count: int, param: str) -> None:
        if count > self.config.max_rerank_documents:
            raise PayloadTooLarge(f"{count} documents; at most {self.config.max_rerank_documents} per request",
                                  param=param)


@dataclass(frozen=True)
class Usage:
    """What one served request is billed: the columns of its ledger row."""

    model: str
    input_tokens: int
    documents: int = 0
    embeddings: int = 0
    dimensions: int | None = None

    @property
    def search_units(self) -> int:
        return search_units(self.documents)


@dataclass(frozen=True)
class Served:
    body: Any  # the JSON response body
    usage: Usage


# ---- the handlers -------------------------------------------------------------------------------------------

async def serve_embeddings(body: protocol.EmbeddingRequest, context: RequestContext) -> Served:
    inputs = body.inputs()
    if len(inputs) > context.config.max_embedding_inputs:
        raise PayloadTooLarge(f"{len(inputs)} inputs; at most {context.config.max_embedding_inputs} per request",
                              param="input")
    entry = await context.resolve(body.model, "embed")
    out = await context.call(entry, "embed", inputs, body.instruction, body.dimensions, body.truncate)
    vectors: np.ndarray = out["embeddings"]
    if body.encoding_format == "base64":
        # Little-endian float32 bytes: exactly what the openai SDK decodes.
        encoded = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]
    else:
        encoded = vectors.tolist()
    tokens = sum(out["token_counts"])
    return Served({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)],
        "model": entry.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }, Usage(entry.name, tokens, embeddings=len(inputs), dimensions=int(vectors.shape[1])))


async def serve_rerank(body: protocol.RerankRequest, context: RequestContext) -> Served:
    """Cohere v2 / Jina / vLLM rerank."""
    documents = body.document_texts()
    context.check_document_count(len(documents), "documents")
    entry = await context.resolve(body.model, "rerank")
    out = await context.call(entry, "rerank", body.query, documents, body.instruction, body.max_tokens_per_doc)
    tokens = sum(out["token_counts"])
    results = []
    for index in rank(out["scores"], body.top_n):
        result: dict[str, Any] = {"index": index, "relevance_score": out["scores"][index]}
        if body.return_documents:
            result["document"] = {"text": documents[index]}
        results.append(result)
    return Served({
        "id": context.request_id,
        "model": entry.name,
        "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "meta": {"billed_units": {"search_units": search_units(len(documents))}},
    }, Usage(entry.name, tokens, documents=len(documents)))


@dataclass(frozen=True)
class Endpoint:
    schema: type[BaseModel]
    serve: Callable[[Any, RequestContext], Awaitable[Served]]


# Endpoint path -> (body schema, handler): what the HTTP routes and the batch runner share. A batch may name any of
# these paths as its `endpoint`.
ENDPOINTS: dict[str, Endpoint] = {
    "/v1/embeddings": Endpoint(protocol.EmbeddingRequest, serve_embeddings),
    "/v1/rerank": Endpoint(protocol.RerankRequest, serve_rerank),
}
