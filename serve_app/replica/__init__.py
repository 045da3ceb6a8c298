"""A model replica: the Serve deployment that wraps one engine from models/, and what it needs to start.

    deployment.py    ModelServer: tokenize, token-budget `@serve.batch` micro-batching, the engine thread, stats
    passes.py        bounded engine runs: what one run takes from the queue, a long request in parts
    autoscaling.py   the autoscaling signal (tokens held, tokens per second) and the queued-work policy Serve runs
    routing.py       the queued-work request router (the replica holding the fewest tokens)
    loading.py       a ModelConfig into a loaded engine (device, threads, calibration) with start-up log lines
    weights.py       fetching weights (hub, cache, offline checkpoints) and `python -m serve_app.replica.weights`
    instructions.py  Qwen3-Embedding's query instructions by input type
    quantization/    compressed embedding types (numpy only) and their calibration files

May import: the top-level modules (config, errors, metrics) and models/. Never the gateway or accounts: a replica
knows nothing of HTTP, keys or billing. quantization/__init__.py and instructions.py stay free of torch, since the
gateway uses them.
"""
