"""The gateway: the HTTP ingress deployment and everything a request meets before and after the model.

    ingress.py       the Gateway Serve deployment: middleware (request ids, auth, rate limits, body limits, metrics,
                     the usage ledger) and the OpenAI / Jina / vLLM / Voyage rerank (TEI's body too on /rerank) and
                     embeddings routes
    cohere_embed.py  Cohere v2 embed, compressed vector types too (a router)
    tei.py           Text Embeddings Inference's API: /tei/<model>/... per model, the bare TEI paths served by the
                     default models, TEI's error shape (a router)
    vllm.py          vLLM's /tokenize, /detokenize and /score (a router)
    admin.py         /v1/admin/keys: key and credit management for admin keys (a router)
    probes.py        /health and /ready (a router)
    bodies.py        reading, size-limiting and validating request bodies
    protocol.py      wire schemas of the inference routes (no serving logic)
    endpoints.py     the endpoints a request or a batch line can name: wire schema + handler
    handling.py      the shared path of a parsed body: model lookup, credit check, handle call, response shaping
    hop_sharing.py   concurrent requests for one model sharing the handle call to it, each keeping its own fate
    directory.py     the model directory: {model name or alias: Serve handle}, found at run time
    responses.py     orjson responses
    batches/         the OpenAI Batch API: its routes, and the BatchRunner deployment that runs lines through
                     handling.py (it is deployed in the gateway's application)

May import: the top-level modules (config, errors, metrics, periodic), accounts/, and replica/'s torch-free parts
(quantization, instructions). Never torch, transformers or models/: the gateway runs on CPU-only nodes.
"""
