"""Hugging Face Text Embeddings Inference's HTTP API, for the clients built against a TEI server (LlamaIndex's
`TextEmbeddingsInference` embedder and rerank postprocessor, Haystack's HuggingFaceAPI embedders and TEI ranker,
LangChain's `HuggingFaceEndpointEmbeddings`, `huggingface_hub.InferenceClient`): they send no model name, because a
TEI server hosts one model, so each model gets a base URL of its own, `/tei/<model name or alias>`:

    POST /tei/<model>/embed      {"inputs": str | [str] | [int] | [[int]], "normalize"?: true, "truncate"?,
                                  "truncation_direction"?: "right", "prompt_name"?, "dimensions"?}  -> [[float]]
    POST /tei/<model>/rerank     {"query", "texts", "raw_scores"?, "return_text"?, "truncate"?,
                                  "truncation_direction"?}  -> [{"index", "score", "text"?}], best first
    POST /tei/<model>            TEI's root: /embed for an embed model, /rerank for a reranker
    POST /tei/<model>/tokenize   {"inputs": str | [str], "add_special_tokens"?: true, "prompt_name"?}
                                 -> [[{"id", "text", "special", "start", "stop"}]]
    POST /tei/<model>/decode     {"ids": [int] | [[int]], "skip_special_tokens"?: true}  -> [str]
    GET  /tei/<model>/info       TEI's fields with the model's real limits
    GET  /tei/<model>/health     200 (empty) while the model is served; GET /tei/<model> too, as TEI's root

The bare paths POST /embed, /decode and GET /info (and POST /rerank and /tokenize with TEI's bodies, told apart from
Cohere's and vLLM's by the body: serve_app/gateway/ingress.py, serve_app/gateway/vllm.py) serve the gateway's default
model of the task (`default_models`), or the model a `model` field names (an extension; TEI has none). Without
either they answer 400 naming the per-model base URLs.

- `prompt_name` picks Qwen3-Embedding's query instruction (serve_app/replica/instructions.py PROMPT_NAME_INSTRUCTIONS:
  "query" is the model card's web-search instruction, "document" none, Cohere's input types too); `instruction`
  (an extension, as on /v1/embeddings) gives the instruction itself.
- `truncate` left out is the gateway's `tei.auto_truncate` (TEI's --auto-truncate, false by default: a text longer
  than the model's max_length is refused with 413). `truncation_direction` "left" cuts the start of an embedding
  input (the instruction stays); the reranker's prompt always keeps a document's start, so it refuses "left".
- `normalize: false` returns the last token's state as pooled (cut to `dimensions`), not L2-normalised.
- `/tokenize` counts exactly what the model computes: with `add_special_tokens` (the default) an embedder's tokens
  are its instruction prompt, the text and the end token; a reranker's are its whole prompt with the text as the
  document (and the `query` extension as its query), so the counts are what embed and rerank bill. Never cut.

Usage, keys, rate limits, credit and metrics are those of every route: /embed and /rerank are billed (one ledger
row, `X-Usage-Id`), /tokenize, /decode and /info are not (and are answered to a key whose credit is spent). Every
route needs the key when auth is on, /tei/<model>/health too (only /health and /ready are open).

Errors on these routes are TEI's `{"error": message, "error_type": kind}` with TEI's statuses where TEI has the case
(`tei_error`): 400 Empty (no inputs), 413 Validation (too many inputs, a body over the limit, a text too long, a
value TEI also checks: unknown prompt_name, dimensions), 422 Validation (a body that is not TEI's schema), 424
Backend (a model of the other task), 429 Overloaded (a model's queue full, a key's rate limit or spent credit); our
own statuses with the nearest kind for cases TEI does not have (401, 404 unknown model, 503 Unhealthy). The bare
paths TEI shares with other APIs (/rerank with Cohere's, /tokenize with vLLM's) answer every body in the OpenAI error
shape their other clients read (TEI clients there still get a 4xx with a JSON `error`). Batch lines (endpoint
"/embed", or "/rerank" with TEI's body) are answered as online, errors in the OpenAI shape as every batch error
line.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from serve_app import SERVICE_VERSION
from serve_app.errors import InsufficientQuota, InvalidRequest, Overloaded, PayloadTooLarge, RateLimited, ServingError
from serve_app.gateway import protocol
from serve_app.gateway.bodies import json_body, read_json, validate, validation_error
from serve_app.gateway.handling import (RERANK, Endpoint, RequestContext, Served, detokenize_ids, embed_inputs, rank,
                                        rerank_documents, tokenize_texts)
from serve_app.replica.instructions import PROMPT_NAME_INSTRUCTIONS

router = APIRouter()

TEI_PREFIX = "/tei/"
# Bare paths that only TEI has here (bare /rerank and /tokenize are shared: the body says whose they are).
BARE_TEI_PATHS = frozenset({"/embed", "/decode", "/info"})
# Which end of a too-long input a cut drops: TEI's direction names the side that is cut.
TRUNCATE_SIDES = {"right": "end", "left": "start"}

# ---- errors ------------------------------------------------------------------------------------------------------

# InvalidRequest codes (set where the gateway knows the case) -> TEI's status and error type. Any other invalid
# value gets 413 Validation: TEI's status for every input it validates.
_INVALID = {"empty": (400, "Empty"), "invalid_json": (400, "Validation"), "invalid_body": (422, "Validation"),
            "no_default_model": (400, "Validation"), "model_conflict": (400, "Validation"),
            "wrong_model_task": (424, "Backend")}


def is_tei_path(path: str) -> bool:
    return path.startswith(TEI_PREFIX) or path in BARE_TEI_PATHS


def speaks_tei(request: Request) -> bool:
    """Whether the request's errors take TEI's shape: TEI's own paths. The bare paths TEI shares with others
    (/rerank with Cohere, /tokenize with vLLM) keep the OpenAI shape their other clients read, whatever the body."""
    return is_tei_path(request.scope["path"])


def tei_error(error: ServingError) -> tuple[int, str]:
    """(status, error_type) of an error on a TEI route: TEI's where it has the case (see the module docstring)."""
    if isinstance(error, PayloadTooLarge):
        return 413, "Validation"
    if isinstance(error, InvalidRequest):
        return _INVALID.get(error.code, (413, "Validation"))
    if isinstance(error, (RateLimited, InsufficientQuota, Overloaded)):
        return 429, "Overloaded"
    if error.status >= 500:
        return error.status, "Unhealthy" if error.status == 503 else "Backend"
    return error.status, "Validation"


def error_response(error: ServingError) -> JSONResponse:
    status, error_type = tei_error(error)
    return JSONResponse({"error": error.message, "error_type": error_type}, status_code=status,
                        headers=error.headers)


# ---- bodies ------------------------------------------------------------------------------------------------------

def is_tei_rerank(raw: Any) -> bool:
    """TEI's rerank body, not Cohere's (both go to /rerank): `texts` instead of `documents`."""
    return isinstance(raw, dict) and "texts" in raw and "documents" not in raw


async def parse_tei(request: Request, schema: type) -> Any:
    """The body of a request to a TEI path as a TEI schema (a schema violation is 422, as TEI's)."""
    try:
        raw = await read_json(request)
    except InvalidRequest as exc:
        exc.code = "invalid_json"
        raise
    try:
        return validate(request, raw, schema)
    except InvalidRequest as exc:
        exc.code = "invalid_body"
        raise


def parse_line(schema: type, raw: Any) -> Any:
    """A batch line's body as a TEI schema (the runner's errors are in the OpenAI shape)."""
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def for_model(request: Request, body, name: str):
    """A body sent to /tei/<name>/...: the URL names the model. A `model` in the body must name the same one."""
    name = name.rstrip("/")
    if body.model is not None and body.model != name:
        directory = request.app.state.models
        if (await directory.resolve(body.model, None)).app_name != (await directory.resolve(name, None)).app_name:
            raise InvalidRequest(f"this URL serves model {name!r}, but the body names model {body.model!r}; leave "
                                 "`model` out of TEI bodies sent to a model's own URL", param="model",
                                 code="model_conflict")
    return body.model_copy(update={"model": name})


def prompt_instruction(prompt_name: str | None, instruction: str | None) -> str | None:
    """The query instruction a TEI body asks for: `prompt_name`'s (PROMPT_NAME_INSTRUCTIONS) or `instruction`."""
    if prompt_name is None:
        return instruction
    if instruction is not None:
        raise InvalidRequest("send prompt_name or instruction, not both", param="prompt_name")
    if prompt_name not in PROMPT_NAME_INSTRUCTIONS:
        raise InvalidRequest(f"prompt_name {prompt_name!r} is not a prompt of this model; prompt names: "
                             f"{', '.join(PROMPT_NAME_INSTRUCTIONS)}", param="prompt_name")
    return PROMPT_NAME_INSTRUCTIONS[prompt_name]


def truncation(context: RequestContext, truncate: bool | None) -> bool:
    return context.config.tei.auto_truncate if truncate is None else truncate


# ---- the inference endpoints (billed; a batch can name them) -----------------------------------------------------

async def serve_tei_embed(body: protocol.TEIEmbedRequest, context: RequestContext) -> Served:
    """TEI's /embed: a bare array of vectors, in input order."""
    inputs = body.input_list()
    if not inputs:
        raise InvalidRequest("`inputs` cannot be empty", param="inputs", code="empty")
    if len({isinstance(item, str) for item in inputs}) > 1:
        raise InvalidRequest("inputs: send texts or token-id lists, not both in one request", param="inputs")
    instruction = prompt_instruction(body.prompt_name, body.instruction)
    renamed = {"input": "inputs", "truncate": "truncation_direction",
               "instruction": "prompt_name" if body.prompt_name is not None else "instruction"}
    try:
        _, out, usage = await embed_inputs(
            context, body.model, inputs, param="inputs", instruction=instruction, dimensions=body.dimensions,
            truncate=truncation(context, body.truncate),
            truncate_side=TRUNCATE_SIDES[body.truncation_direction.lower()], normalize=body.normalize)
    except InvalidRequest as exc:
        exc.param = renamed.get(exc.param, exc.param)
        raise
    return Served(out["embeddings"].tolist(), usage)


async def serve_tei_rerank(body: protocol.TEIRerankRequest, context: RequestContext) -> Served:
    """TEI's /rerank: a bare array of {index, score, text?}, best first."""
    if not body.texts:
        raise InvalidRequest("`texts` cannot be empty", param="texts", code="empty")
    truncate = truncation(context, body.truncate)
    if truncate and body.truncation_direction.lower() == "left":
        raise InvalidRequest("truncation_direction 'left' is not supported for reranking: the reranker's prompt "
                             "keeps the start of each text and cuts its end ('right')", param="truncation_direction")
    _, out, usage = await rerank_documents(context, body.model, body.query, body.texts, param="texts",
                                           truncate=truncate)
    values = out["logits"] if body.raw_scores else out["scores"]
    ranks = []
    for index in rank(out["scores"], None):
        item: dict[str, Any] = {"index": index, "score": values[index]}
        if body.return_text:
            item["text"] = body.texts[index]
        ranks.append(item)
    return Served(ranks, usage)


TEI_EMBED = Endpoint(protocol.TEIEmbedRequest, serve_tei_embed)
TEI_RERANK = Endpoint(protocol.TEIRerankRequest, serve_tei_rerank)


class AnyRerankBody(protocol.WireModel):
    """/rerank in a batch: Cohere's body or TEI's, told apart as the HTTP route tells them apart."""

    model_config = {"extra": "allow"}


async def serve_any_rerank(body: AnyRerankBody, context: RequestContext) -> Served:
    raw = body.model_dump()
    if is_tei_rerank(raw):
        return await serve_tei_rerank(parse_line(protocol.TEIRerankRequest, raw), context)
    return await RERANK.serve(parse_line(RERANK.schema, raw), context)


ANY_RERANK = Endpoint(AnyRerankBody, serve_any_rerank)


# ---- tokenize, decode, info (not billed) -------------------------------------------------------------------------

async def tokenize(body: protocol.TEITokenizeRequest, context: RequestContext) -> list[list[dict[str, Any]]]:
    """TEI's /tokenize: per input, its tokens {id, text, special, start, stop} (a special token's text is its
    vocabulary string and it has no offsets; the others' text is their span of the prompt)."""
    texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    if not texts:
        raise InvalidRequest("`inputs` cannot be empty", param="inputs", code="empty")
    entry = await context.lookup(body.model, None)
    if body.prompt_name is not None and entry.task != "embed":
        raise InvalidRequest(f"prompt_name applies to embed models; {entry.name!r} is a reranker (send its "
                             "`instruction` and `query` instead)", param="prompt_name")
    instruction = prompt_instruction(body.prompt_name, body.instruction)
    out = await tokenize_texts(context, entry, texts, param="inputs", add_special_tokens=body.add_special_tokens,
                               instruction=instruction, query=body.query)
    answer = []
    for tokens in out["texts"]:
        text = tokens["text"]
        answer.append([{"id": token, "text": piece if span is None else text[span[0]:span[1]], "special": special,
                        "start": None if span is None else span[0], "stop": None if span is None else span[1]}
                       for token, piece, span, special in zip(tokens["ids"], tokens["pieces"], tokens["offsets"],
                                                              tokens["special"])])
    return answer


async def decode(body: protocol.TEIDecodeRequest, context: RequestContext) -> list[str]:
    """TEI's /decode: one string per id list."""
    if not body.ids:
        raise InvalidRequest("`ids` cannot be empty", param="ids", code="empty")
    sequences = [list(body.ids)] if all(isinstance(token, int) for token in body.ids) else [list(s) for s in body.ids]
    entry = await context.lookup(body.model, None)
    return await detokenize_ids(context, entry, sequences, param="ids", skip_special_tokens=body.skip_special_tokens)


async def info(model: str | None, context: RequestContext) -> dict[str, Any]:
    """TEI's /info for a model, with its real limits (what a client chunking by tokens needs: max_input_length)."""
    entry = await context.lookup(model, None)
    facts, config = entry.facts, context.config
    if entry.task == "embed":
        model_type: dict[str, Any] = {"embedding": {"pooling": "last_token"}}
        batch = config.max_embedding_inputs
    else:  # one label, as TEI's rerankers: the score is P(yes)
        model_type = {"reranker": {"id2label": {"0": "yes"}, "label2id": {"yes": 0}}}
        batch = config.max_rerank_documents
    return protocol.TEIInfo(
        model_id=facts["source"], model_sha=facts.get("revision"), model_dtype=facts["dtype"], model_type=model_type,
        max_concurrent_requests=facts.get("max_ongoing_requests", 0), max_input_length=facts["max_length"],
        max_batch_tokens=facts.get("max_batch_tokens") or facts.get("token_budget"), max_batch_requests=None,
        max_client_batch_size=batch, auto_truncate=config.tei.auto_truncate, tokenization_workers=1,
        version=f"qwen3-serve {SERVICE_VERSION}", sha=None, docker_label=None, model_name=entry.name,
    ).model_dump()


# ---- routes ------------------------------------------------------------------------------------------------------

def _gateway(request: Request):
    return request.app.state.gateway


@router.post("/tei/{model:path}/embed", responses={200: {"model": list[list[float]]}},
             openapi_extra=json_body(protocol.TEIEmbedRequest))
async def model_embed(request: Request, model: str) -> JSONResponse:
    body = await for_model(request, await parse_tei(request, TEI_EMBED.schema), model)
    return await _gateway(request).respond(request, TEI_EMBED, body)


@router.post("/tei/{model:path}/rerank", responses={200: {"model": list[protocol.TEIRank]}},
             openapi_extra=json_body(protocol.TEIRerankRequest))
async def model_rerank(request: Request, model: str) -> JSONResponse:
    body = await for_model(request, await parse_tei(request, TEI_RERANK.schema), model)
    return await _gateway(request).respond(request, TEI_RERANK, body)


@router.post("/tei/{model:path}/tokenize", responses={200: {"model": list[list[protocol.TEIToken]]}},
             openapi_extra=json_body(protocol.TEITokenizeRequest))
async def model_tokenize(request: Request, model: str) -> JSONResponse:
    body = await for_model(request, await parse_tei(request, protocol.TEITokenizeRequest), model)
    return await _gateway(request).answer(request, lambda context: tokenize(body, context))


@router.post("/tei/{model:path}/decode", responses={200: {"model": list[str]}},
             openapi_extra=json_body(protocol.TEIDecodeRequest))
async def model_decode(request: Request, model: str) -> JSONResponse:
    body = await for_model(request, await parse_tei(request, protocol.TEIDecodeRequest), model)
    return await _gateway(request).answer(request, lambda context: decode(body, context))


@router.get("/tei/{model:path}/info", response_model=protocol.TEIInfo)
async def model_info(request: Request, model: str) -> JSONResponse:
    return await _gateway(request).answer(request, lambda context: info(model.rstrip("/"), context))


@router.get("/tei/{model:path}/health")
async def model_health(request: Request, model: str) -> Response:
    """TEI's health: 200 with an empty body while the model is served (404 unknown, 503 while it starts)."""
    await _gateway(request).context(request).lookup(model.rstrip("/"), None)
    return Response(status_code=200)


# The catch-all paths last: /tei/{model:path} would take /tei/<model>/health as a model named "<model>/health".
@router.get("/tei/{model:path}", include_in_schema=False)
async def model_root_health(request: Request, model: str) -> Response:
    """TEI's GET / is its health check."""
    return await model_health(request, model)


@router.post("/tei/{model:path}", openapi_extra=json_body(protocol.TEIEmbedRequest, protocol.TEIRerankRequest))
async def model_root(request: Request, model: str) -> JSONResponse:
    """TEI's root: /embed for an embed model, /rerank for a reranker."""
    entry = await _gateway(request).context(request).lookup(model.rstrip("/"), None)
    endpoint = TEI_EMBED if entry.task == "embed" else TEI_RERANK
    body = await for_model(request, await parse_tei(request, endpoint.schema), model)
    return await _gateway(request).respond(request, endpoint, body)


@router.post("/embed", responses={200: {"model": list[list[float]]}},
             openapi_extra=json_body(protocol.TEIEmbedRequest))
async def bare_embed(request: Request) -> JSONResponse:
    """TEI's /embed for the default embed model (or the body's `model`)."""
    return await _gateway(request).respond(request, TEI_EMBED, await parse_tei(request, TEI_EMBED.schema))


@router.post("/decode", responses={200: {"model": list[str]}}, openapi_extra=json_body(protocol.TEIDecodeRequest))
async def bare_decode(request: Request) -> JSONResponse:
    body = await parse_tei(request, protocol.TEIDecodeRequest)
    return await _gateway(request).answer(request, lambda context: decode(body, context))


@router.get("/info", response_model=protocol.TEIInfo)
async def bare_info(request: Request) -> JSONResponse:
    """TEI's /info for the default model (embed, else rerank)."""
    return await _gateway(request).answer(request, lambda context: info(None, context))


async def tokenize_response(request: Request, raw: Any) -> JSONResponse:
    """TEI's /tokenize body on the bare /tokenize (serve_app/gateway/vllm.py tells it from vLLM's)."""
    body = validate(request, raw, protocol.TEITokenizeRequest)
    return await _gateway(request).answer(request, lambda context: tokenize(body, context))
