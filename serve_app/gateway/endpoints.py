"""The endpoints a request can name, by path: what the HTTP routes serve and what a batch's `endpoint` may be.

Each is an `Endpoint` (serve_app/gateway/handling.py): the body's wire schema and the handler that serves a parsed body.
The HTTP routes (serve_app/gateway/ingress.py, serve_app/gateway/cohere_embed.py) and the batch runner (serve_app/gateway/batches/) take
them from here, so a batch line is answered exactly as the same body sent online. TEI's /embed and /rerank lines
name their model in `model` or are served by the gateway's default model, as on the bare HTTP paths (TEI's per-model
URLs are not batch endpoints: a batch has one endpoint and its lines may name different models).
"""

from __future__ import annotations

from serve_app.gateway.cohere_embed import COHERE_EMBED
from serve_app.gateway.handling import EMBEDDINGS, RERANK, Endpoint
from serve_app.gateway.tei import ANY_RERANK, TEI_EMBED
from serve_app.gateway.vllm import SCORE

ENDPOINTS: dict[str, Endpoint] = {
    "/v1/embeddings": EMBEDDINGS,
    "/v1/rerank": RERANK,
    "/v2/embed": COHERE_EMBED,
    "/embed": TEI_EMBED,  # TEI's
    "/rerank": ANY_RERANK,  # Cohere's body or TEI's (`texts`), as the HTTP route
    "/score": SCORE,  # vLLM's
    "/v1/score": SCORE,
}
