"""The endpoints a request can name, by path: what the HTTP routes serve and what a batch's `endpoint` may be.

Each is an `Endpoint` (serve_app/gateway/handling.py): the body's wire schema and the handler that serves a parsed body.
The HTTP routes (serve_app/gateway/ingress.py, serve_app/gateway/cohere_embed.py) and the batch runner (serve_app/gateway/batches/) take
them from here, so a batch line is answered exactly as the same body sent online.
"""

from __future__ import annotations

from serve_app.gateway.cohere_embed import COHERE_EMBED
from serve_app.gateway.handling import EMBEDDINGS, RERANK, Endpoint

ENDPOINTS: dict[str, Endpoint] = {
    "/v1/embeddings": EMBEDDINGS,
    "/v1/rerank": RERANK,
    "/v2/embed": COHERE_EMBED,
}
