"""The OpenAI Batch API: bulk embeddings and rerank through the same model deployments, keys and ledger.

    routes.py    the HTTP routes, a FastAPI router of the gateway: /v1/files, /v1/batches (as the openai SDK calls them)
    service.py   what the routes do: uploads (limits counted as the file streams to storage), ownership, batch objects
    protocol.py  wire shapes: OpenAI's file and batch objects, the input line, output and error lines
    lines.py     validating an input file (the `validating` step) and reading it from a checkpoint on
    storage.py   where file bytes live: a local directory or S3-compatible object storage (fsspec / s3fs)
    store.py     durable state in the gateway's database: files, batches, progress checkpoints, runner leases
    runner.py    the BatchRunner Serve deployment: runs lines through serve_app/gateway/handling.py at background priority,
                 checkpoints output and billing together, resumes after a crash

A line goes through exactly the code an online request does (serve_app/gateway/handling.py ENDPOINTS), so its answer is
the one the same body gets online.
"""
