"""The gateway: HTTP routes -> model lookup -> one handle call -> response shaping. No torch here.

Routes (design.md section 5):
    POST /v1/embeddings, /embeddings            OpenAI embeddings
    POST /v2/embed                              Cohere v2 embed, compressed types too (serve_app/gateway/cohere_embed.py)
    POST /v1/rerank, /v2/rerank, /rerank        Cohere v2 / Jina / vLLM / Voyage rerank; TEI's body on /rerank
    /tei/<model>/..., /embed, /decode, /info    Text Embeddings Inference's API (serve_app/gateway/tei.py)
    POST /tokenize, /detokenize, /score         vLLM's helpers and score (serve_app/gateway/vllm.py); TEI's body on
                                                /tokenize
    GET  /v1/models, /v1/models/{id}            OpenAI model objects
    GET  /v1/usage                              the caller's usage totals and credit (every key's for an admin key)
    GET, POST /v1/admin/keys, DELETE /v1/admin/keys/{id}   key management, admin keys only (serve_app/gateway/admin.py)
    GET, POST /v1/admin/keys/{id}/credit        a key's credit journal; top-ups and adjustments
    /v1/files, /v1/batches                      the OpenAI Batch API (serve_app/gateway/batches/)
    GET  /health, /ready                        liveness and readiness, no auth (serve_app/gateway/probes.py)

Every served request is written to the usage ledger (serve_app/accounts/ledger.py) before its response is sent, and that
response carries its ledger id in `X-Usage-Id` (Serve's own X-Request-ID is its trace id, kept in the row). A
prepaid key is debited in that same transaction, and refused (429) once its credit is spent (serve_app/accounts/credit). Every
error leaves as {"error": {"message", "type", "param", "code"}} with the status of its kind (serve_app/errors.py);
client mistakes are 4xx, never 5xx. Bodies are parsed in serve_app/gateway/bodies.py; what happens to a parsed body (model
lookup, handle call, response shaping) is serve_app/gateway/handling.py, shared with the batch runner.
"""

import asyncio
import logging
import time
import uuid
from datetime import date
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from ray import serve
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import SERVICE_VERSION
from serve_app.accounts.auth import OPEN_PATHS, KeyGuard
from serve_app.accounts.credit.book import CreditBook
from serve_app.accounts.credit.guard import CreditGuard
from serve_app.accounts.keys import KeyStore
from serve_app.accounts.ledger import (MAX_IDEMPOTENCY_KEY_CHARS, Ledger, UsageRecord, fingerprint, request_id,
                                       sum_totals, usage_totals)
from serve_app.accounts.ratelimit import limiter_handle
from serve_app.accounts.store import connect, database_url
from serve_app.config import GATEWAY_DEPLOYMENT_NAME, GatewayConfig
from serve_app.errors import (IdempotencyConflict, InternalError, InvalidRequest, MethodNotAllowed, ModelNotFound,
                              NotFound, PayloadTooLarge, RateLimited, ServingError, StoreUnavailable)
from serve_app.gateway import admin, cohere_embed, probes, protocol, tei, vllm
from serve_app.gateway.batches import routes as batch_routes
from serve_app.gateway.batches.service import BatchService
from serve_app.gateway.bodies import (body_limit, ignored_fields_header, json_body, parse_body, read_json, validate,
                                      validation_error)
from serve_app.gateway.directory import ModelDirectory, ModelEntry
from serve_app.gateway.handling import EMBEDDINGS, RERANK, Endpoint, ModelCalls, RequestContext, Usage
from serve_app.gateway.responses import OrjsonResponse
from serve_app.metrics import GatewayMetrics

logger = logging.getLogger("ray.serve")

api = FastAPI(title="qwen3-serve", version=SERVICE_VERSION,
              description="Qwen3-Reranker and Qwen3-Embedding behind OpenAI, Cohere, Jina and TEI routes.")
api.include_router(admin.router)
api.include_router(probes.router)
api.include_router(cohere_embed.router)
api.include_router(batch_routes.router)
api.include_router(tei.router)
api.include_router(vllm.router)


# ---- errors: one place turns every failure into the OpenAI error body (TEI's on TEI's routes) ------------------

def error_response(error: ServingError, request: Request | None = None) -> JSONResponse:
    if request is not None and tei.speaks_tei(request):
        return tei.error_response(error)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@api.exception_handler(ServingError)
async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
    return error_response(exc, request)


@api.exception_handler(RequestValidationError)
async def _request_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(exc), request)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return error_response(NotFound(f"no route {request.method} {request.url.path}"), request)
    if exc.status_code == 405:
        return error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}"), request)
    kind = InvalidRequest if exc.status_code < 500 else InternalError
    error = kind(str(exc.detail))
    error.status = exc.status_code
    return error_response(error, request)


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("gateway: unexpected error on %s %s", request.method, request.url.path)
    return error_response(InternalError("internal error; the request was not completed"), request)


class AdmitAndMeter:
    """The gateway's outermost middleware (inside CORS): authenticate, rate-limit and size-check every request
    before any route runs, then stamp the response's ledger headers and count it with its status and latency (401s
    and 413s included).

    Pure ASGI on purpose: Starlette's BaseHTTPMiddleware (what `@app.middleware("http")` builds) runs every request
    through a task group and memory streams, which the gateway paid on every request (BENCHMARKS.md, serving path).
    `Request(scope)` here and the route's own Request share `scope["state"]`, so what a route records (billed,
    model, ignored fields) is read here when its response starts."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        started = request.state.started = time.perf_counter()
        status = 500  # unless a response starts: an exception escaping the app becomes a 500 outside this

        async def send_stamped(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if getattr(request.state, "billed", False):  # only a response that has a ledger row names one
                    headers["X-Usage-Id"] = request.state.request_id
                if getattr(request.state, "ignored_fields", None):
                    headers["X-Ignored-Fields"] = ignored_fields_header(request.state.ignored_fields)
            await send(message)

        try:
            refusal = await admission_refusal(request)
            await (refusal or self.app)(scope, receive, send_stamped)
        finally:
            metrics = getattr(request.app.state, "metrics", None)
            if metrics is not None:
                metrics.request(getattr(request.state, "model", "-"), route_label(request), status,
                                time.perf_counter() - started)


async def admission_refusal(request: Request) -> JSONResponse | None:
    """The error response for a request that must not reach its route (no or bad key, rate limit, bad
    Idempotency-Key, declared body over the limit), else None, with the key and ledger id set on its state."""
    guard = getattr(request.app.state, "key_guard", None)
    try:
        if guard is not None and request.scope["path"] not in OPEN_PATHS:
            request.state.api_key = await guard.authenticate(request.headers.get("authorization"))
            await enforce_rate_limits(request, request.state.api_key)
        request.state.request_id = ledger_request_id(request)
    except ServingError as error:
        return error_response(error, request)
    limit = body_limit(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return error_response(PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}"), request)
    return None


api.add_middleware(AdmitAndMeter)


async def enforce_rate_limits(request: Request, key) -> None:
    if not (key.requests_per_minute or key.tokens_per_minute):
        return
    try:
        admitted, retry_after, which = await request.app.state.limiter.admit.remote(
            key.id, key.requests_per_minute, key.tokens_per_minute)
    except Exception:  # noqa: BLE001 - a limiter outage must not take the API down: fail open, loudly
        logger.exception("gateway: rate limiter unavailable; request admitted without a limit check")
        return
    if not admitted:
        raise RateLimited(f"rate limit reached for this key ({which}); retry in {retry_after} s",
                          headers={"Retry-After": str(retry_after)})


def route_label(request: Request) -> str:
    """The matched route's template (bounded), never the raw path."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def ledger_request_id(request: Request) -> str:
    """The request's ledger id: repeatable from the client's Idempotency-Key (a retry is billed once), else new."""
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters",
                             param="Idempotency-Key")
    key = getattr(request.state, "api_key", None)
    return request_id(key.id if key else None, idempotency_key, fresh=f"req_{uuid.uuid4().hex}")


def model_card(entry: ModelEntry) -> protocol.ModelCard:
    facts = entry.facts  # what the model replica's describe() returned
    return protocol.ModelCard(id=entry.name, created=int(entry.deployed_at),
                              root=facts["source"], task=entry.task, max_model_len=facts["max_length"],
                              dimensions=facts.get("dimensions"), aliases=list(facts.get("aliases", [])))




# ---- the gateway deployment ----------------------------------------------------------------------------------

@serve.deployment(name=GATEWAY_DEPLOYMENT_NAME)
@serve.ingress(api)
class Gateway:
    def __init__(self, config: dict[str, Any] | None = None, batch_runner=None):
        self.config = GatewayConfig.model_validate(config or {})
        api.state.max_body_bytes = self.config.max_body_bytes
        api.state.metrics = GatewayMetrics()
        self.store_engine = connect(database_url(self.config.database_url))
        self.credit_book = CreditBook(self.store_engine)
        self.credit: CreditGuard | None = None  # prepaid balances: only keys can hold one
        if self.config.auth.enabled:
            store = KeyStore(self.store_engine)
            self.credit = CreditGuard(self.credit_book, on_refusal=api.state.metrics.credit_refused)
            api.state.key_guard = KeyGuard(store, self.config.auth.key_refresh_s, also_load=self.credit.load)
            api.state.limiter = limiter_handle()
        else:
            api.state.key_guard = None
            logger.warning("gateway: API-key authentication is OFF (auth.enabled: false): every route is open. "
                           "Use this only on a trusted machine (configs/tiny.yaml).")
        if self.config.cors_allow_origins:
            # Outermost middleware: preflight requests (no Authorization header) are answered before auth runs.
            api.add_middleware(CORSMiddleware, allow_origins=self.config.cors_allow_origins,
                               allow_methods=["GET", "POST"],
                               allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
                               expose_headers=["X-Usage-Id", "X-Ignored-Fields", "Retry-After"])
        self.models = api.state.models = ModelDirectory(self.config.model_refresh_s)
        self.calls = ModelCalls(self.models, self.config, credit=self.credit)
        # Prepaid keys are debited in the transaction that writes their usage rows.
        self.ledger = Ledger(self.store_engine, with_rows=self.credit.with_rows if self.credit else None)
        # Files and batches (serve_app/gateway/batches/): their routes read this service from the app state.
        api.state.batches = BatchService(self.config, self.store_engine, batch_runner, credit=self.credit)
        api.state.body_limits = {batch_routes.UPLOAD_PATH: api.state.batches.upload_body_limit()}
        # Routes in router modules (serve_app/gateway/cohere_embed.py) reach the shared serving path through this.
        api.state.gateway = self

    def context(self, request: Request) -> RequestContext:
        key = getattr(request.state, "api_key", None)
        return RequestContext(self.calls, request.state.request_id, key.id if key is not None else None,
                              base_url=str(request.base_url))

    async def respond(self, request: Request, endpoint: Endpoint, body) -> JSONResponse:
        """A parsed body through the shared handling (serve_app/gateway/handling.py), billed before it is answered."""
        context = self.context(request)
        try:
            served = await endpoint.serve(body, context)
        finally:
            if context.model is not None:
                request.state.model = context.model  # metrics label, even when the model call failed
        await self._bill(request, served.usage)
        return OrjsonResponse(served.body)

    async def answer(self, request: Request, work: Callable[[RequestContext], Awaitable[Any]]) -> JSONResponse:
        """What is never billed (tokenize, decode, info): `work`'s answer, with no ledger row and no tokens charged
        to the key's rate limit (the request itself counts in it, as every request does)."""
        context = self.context(request)
        try:
            body = await work(context)
        finally:
            if context.model is not None:
                request.state.model = context.model
        return OrjsonResponse(body)

    async def _bill(self, request: Request, usage: Usage) -> None:
        """Record a served request, durably and once, before its response is sent; then charge its tokens to the
        key's rate limit and count it in the metrics. If the row cannot be written the request fails (503):
        nothing is served unbilled. `windows`: the rerank prompts scored, when documents were split into chunks
        (search units count each, as Cohere bills chunks)."""
        key = getattr(request.state, "api_key", None)
        route = route_label(request)
        # Only a request that carries an Idempotency-Key can meet its id again; others get a fresh id and no
        # fingerprint, so the body (up to max_body_bytes) is hashed only when it can matter, and off the event loop.
        body_fingerprint = ""
        if request.headers.get("idempotency-key") is not None:
            body_fingerprint = await asyncio.to_thread(fingerprint, route, await request.body())
        record = UsageRecord(request_id=request.state.request_id, key_id=key.id if key else None, model=usage.model,
                             fingerprint=body_fingerprint, route=route,
                             input_tokens=usage.input_tokens, documents=usage.documents,
                             search_units=usage.search_units, embeddings=usage.embeddings,
                             dimensions=usage.dimensions, trace_id=request.headers.get("x-request-id"),
                             latency_ms=(time.perf_counter() - request.state.started) * 1000)
        try:
            await self.ledger.record(record)
        except IdempotencyConflict:
            raise
        except Exception as exc:  # noqa: BLE001 - the database is down or refused the row
            raise StoreUnavailable("the usage ledger is unavailable, so the request was not served; retry shortly",
                                   headers={"Retry-After": str(self.config.retry_after_s)}) from exc
        request.state.billed = True
        if key is not None and key.tokens_per_minute:
            request.app.state.limiter.charge_tokens.remote(key.id, key.tokens_per_minute, usage.input_tokens)
        request.app.state.metrics.served(usage.model, route, usage.input_tokens, usage.documents or usage.embeddings)

    # ---- embeddings ---------------------------------------------------------------------------------------

    @api.post("/v1/embeddings", responses={200: {"model": protocol.EmbeddingResponse}},
              openapi_extra=json_body(protocol.EmbeddingRequest))
    @api.post("/embeddings", include_in_schema=False)
    async def embeddings(self, request: Request) -> JSONResponse:
        return await self.respond(request, EMBEDDINGS, await parse_body(request, EMBEDDINGS.schema))

    # ---- rerank -------------------------------------------------------------------------------------------

    @api.post("/v1/rerank", responses={200: {"model": protocol.RerankResponse}},
              openapi_extra=json_body(protocol.RerankRequest))
    @api.post("/v2/rerank", include_in_schema=False)
    async def rerank(self, request: Request) -> JSONResponse:
        return await self.respond(request, RERANK, await parse_body(request, RERANK.schema))

    @api.post("/rerank", responses={200: {"model": protocol.RerankResponse}},
              openapi_extra=json_body(protocol.RerankRequest, protocol.TEIRerankRequest))
    async def rerank_any(self, request: Request) -> JSONResponse:
        """Cohere/Jina/vLLM body, or TEI's (`texts` instead of `documents`): told apart by the body."""
        raw = await read_json(request)
        if tei.is_tei_rerank(raw):
            return await self.respond(request, tei.TEI_RERANK, validate(request, raw, tei.TEI_RERANK.schema))
        return await self.respond(request, RERANK, validate(request, raw, RERANK.schema))

    # ---- models -------------------------------------------------------------------------------------------

    @api.get("/v1/models", response_model=protocol.ModelList)
    async def list_models(self) -> protocol.ModelList:
        return protocol.ModelList(data=[model_card(entry) for entry in await self.models.entries()])

    @api.get("/v1/models/{model_id:path}", response_model=protocol.ModelCard)
    async def get_model(self, model_id: str) -> protocol.ModelCard:
        for entry in await self.models.entries():
            if model_id in entry.served_names:
                return model_card(entry)
        self.models.raise_if_starting(model_id)
        raise ModelNotFound(f"model {model_id!r} does not exist; served models: {self.models.names_text()}",
                            param="model")

    # ---- usage --------------------------------------------------------------------------------------------

    @api.get("/v1/usage", response_model=protocol.UsageReport)
    async def usage(self, request: Request, start: date | None = None, end: date | None = None
                    ) -> protocol.UsageReport:
        """The caller's totals per model and UTC day (every key's for an admin key, or when auth is off);
        start and end are inclusive days, YYYY-MM-DD. `credit`: per prepaid key, its balance now and the credit
        added and used in the period (a spent key can still read it)."""
        if start is not None and end is not None and end < start:
            raise InvalidRequest("end is before start", param="end")
        key = getattr(request.state, "api_key", None)
        only_key = key.id if key is not None and not key.admin else None
        rows = await asyncio.to_thread(usage_totals, self.store_engine, key_id=only_key, since=start, until=end)
        credit = await asyncio.to_thread(self.credit_book.summaries, only_key, start, end)
        return protocol.UsageReport(data=rows, totals=sum_totals(rows), credit=credit)
