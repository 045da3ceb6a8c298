"""vLLM's tokenizer helpers and score API, as vLLM's OpenAI-compatible server answers them:

    POST /tokenize      {"model"?, "prompt", "add_special_tokens"?: true, "return_token_strs"?: false}
                        -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize    {"model"?, "tokens": [int]}  -> {"prompt"}
    POST /score, /v1/score   rerankers: {"model"?, "text_1", "text_2"} or {"queries", "documents"} (or vLLM's
                        "data_1" / "data_2"), each a text or a list of texts, "use_activation"?: true
                        -> {"id", "object": "list", "created", "model", "data": [{"index", "object": "score",
                            "score"}], "usage": {"prompt_tokens", "total_tokens", "completion_tokens": 0}}

- `/tokenize` counts exactly what the model computes (serve_app/gateway/tei.py says how, for both tasks): with
  `add_special_tokens` (vLLM's default) an embedder's tokens are the text (with the `instruction` extension's prompt)
  and its end token, a reranker's the whole prompt with the text as the document and the `query` extension as its
  query; `count` is then what /v1/embeddings and /v1/rerank bill for it, and `max_model_len` the model's max_length.
  `messages` (vLLM's chat form) is refused: these models take text. A body with TEI's `inputs` instead of `prompt`
  is TEI's /tokenize (bare array of token objects).
- `/score` pairs one query with every document (a single `text_1`), or the i-th query with the i-th document (lists
  of equal length), and scores each pair exactly as /v1/rerank does (P(yes); the logit with `use_activation: false`),
  in input order. One ledger row per request, its tokens and pairs (`documents`); `id` is the ledger id.
- No `model`: the gateway's default model (`default_models`; embed, else rerank for tokenize and detokenize).

Errors are the OpenAI shape, as vLLM's (`{"error": {"message", "type", "param", "code"}}`). /score is a batch
endpoint (as /score and /v1/score); tokenize and detokenize are not billed and need no credit.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serve_app.errors import InvalidRequest
from serve_app.gateway import protocol, tei
from serve_app.gateway.bodies import json_body, parse_body, read_json, validate
from serve_app.gateway.handling import Endpoint, RequestContext, Served, Usage, detokenize_ids, rerank_documents, \
    tokenize_texts

router = APIRouter()

# vLLM's score forms, by its field names: (queries' field, documents' field).
SCORE_FORMS = (("queries", "documents"), ("text_1", "text_2"), ("data_1", "data_2"))


def score_pairs(body: protocol.ScoreRequest) -> tuple[list[str], list[str], tuple[str, str]]:
    """(query of each pair, document of each pair, the field names the body used)."""
    given = [form for form in SCORE_FORMS if any(getattr(body, name) is not None for name in form)]
    if len(given) != 1:
        names = " or ".join(f"{first} and {second}" for first, second in SCORE_FORMS)
        raise InvalidRequest(f"send one pair of fields: {names}", param=given[1][0] if given else "queries")
    first, second = form = given[0]
    queries, documents = getattr(body, first), getattr(body, second)
    for name, value in ((first, queries), (second, documents)):
        if value is None:
            raise InvalidRequest(f"{name} is missing: send {first} and {second}", param=name)
        if not value:
            raise InvalidRequest(f"{name} must not be empty", param=name)
    queries = [queries] if isinstance(queries, str) else list(queries)
    documents = [documents] if isinstance(documents, str) else list(documents)
    for query in queries:
        if not query.strip():
            raise InvalidRequest(f"{first}: a query must not be empty or only whitespace", param=first)
    if len(queries) == 1:
        queries = queries * len(documents)
    elif len(queries) != len(documents):
        raise InvalidRequest(f"{first} has {len(queries)} texts and {second} {len(documents)}: send one {first} text "
                             f"(scored against every {second} text) or as many as {second} (scored in pairs)",
                             param=second)
    return queries, documents, form


async def serve_score(body: protocol.ScoreRequest, context: RequestContext) -> Served:
    """vLLM's score: every pair scored as /v1/rerank scores a document, one model call per distinct query."""
    queries, documents, (_, second) = score_pairs(body)
    context.check_document_count(len(documents), second)
    by_query: dict[str, list[int]] = {}
    for index, query in enumerate(queries):
        by_query.setdefault(query, []).append(index)
    entry = await context.resolve(body.model, "rerank")
    answers = await asyncio.gather(*(
        rerank_documents(context, entry.name, query, [documents[i] for i in indices], param=second,
                         instruction=body.instruction, max_tokens_per_doc=body.max_tokens_per_doc,
                         max_chunks_per_doc=body.max_chunks_per_doc)
        for query, indices in by_query.items()))
    scores: list[float] = [0.0] * len(documents)
    tokens = windows = 0
    for indices, (_, out, usage) in zip(by_query.values(), answers):
        values = out["logits"] if body.use_activation is False else out["scores"]
        for index, value in zip(indices, values):
            scores[index] = value
        tokens += usage.input_tokens
        windows += usage.windows or 0
    usage = Usage(entry.name, tokens, documents=len(documents), windows=windows)
    return Served({
        "id": context.request_id,
        "object": "list",
        "created": int(time.time()),
        "model": entry.name,
        "data": [{"index": index, "object": "score", "score": score} for index, score in enumerate(scores)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    }, usage)


SCORE = Endpoint(protocol.ScoreRequest, serve_score)


async def tokenize(body: protocol.VLLMTokenizeRequest, context: RequestContext) -> dict[str, Any]:
    entry = await context.lookup(body.model, None)
    out = await tokenize_texts(context, entry, [body.prompt], param="prompt",
                               add_special_tokens=body.add_special_tokens, instruction=body.instruction,
                               query=body.query)
    tokens = out["texts"][0]
    return {"count": len(tokens["ids"]), "max_model_len": out["max_length"], "tokens": tokens["ids"],
            "token_strs": tokens["pieces"] if body.return_token_strs else None}


async def detokenize(body: protocol.VLLMDetokenizeRequest, context: RequestContext) -> dict[str, str]:
    entry = await context.lookup(body.model, None)
    # vLLM decodes a prompt's tokens as they are: special tokens stay in the text.
    texts = await detokenize_ids(context, entry, [list(body.tokens)], param="tokens", skip_special_tokens=False)
    return {"prompt": texts[0]}


# ---- routes ------------------------------------------------------------------------------------------------------

@router.post("/tokenize", responses={200: {"model": protocol.VLLMTokenizeResponse}},
             openapi_extra=json_body(protocol.VLLMTokenizeRequest, protocol.TEITokenizeRequest))
async def tokenize_route(request: Request) -> JSONResponse:
    """vLLM's body (`prompt`), or TEI's (`inputs`): told apart by the body."""
    raw = await read_json(request)
    if isinstance(raw, dict) and "inputs" in raw and "prompt" not in raw:
        return await tei.tokenize_response(request, raw)
    if isinstance(raw, dict) and "messages" in raw and "prompt" not in raw:
        raise InvalidRequest("chat `messages` are not tokenized here: these models take text, not a chat; send "
                             "`prompt`", param="messages")
    body = validate(request, raw, protocol.VLLMTokenizeRequest)
    return await request.app.state.gateway.answer(request, lambda context: tokenize(body, context))


@router.post("/detokenize", responses={200: {"model": protocol.VLLMDetokenizeResponse}},
             openapi_extra=json_body(protocol.VLLMDetokenizeRequest))
async def detokenize_route(request: Request) -> JSONResponse:
    body = await parse_body(request, protocol.VLLMDetokenizeRequest)
    return await request.app.state.gateway.answer(request, lambda context: detokenize(body, context))


@router.post("/score", responses={200: {"model": protocol.ScoreResponse}},
             openapi_extra=json_body(protocol.ScoreRequest))
@router.post("/v1/score", include_in_schema=False)
async def score_route(request: Request) -> JSONResponse:
    return await request.app.state.gateway.respond(request, SCORE, await parse_body(request, SCORE.schema))
