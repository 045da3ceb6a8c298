"""Response rendering: Starlette's JSONResponse (json.dumps) vs serve_app.gateway.responses.OrjsonResponse, side by side.

    python bench/json_bench.py                 # an OpenAI embeddings body of 100 x 1024 floats, and a 1000-result rerank

Both render the same body in one process, alternating; the JSON values are checked equal.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from starlette.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_app.gateway.responses import OrjsonResponse  # noqa: E402


def bodies() -> dict[str, object]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((100, 1024)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    embeddings = {"object": "list", "model": "m", "usage": {"prompt_tokens": 900, "total_tokens": 900},
                  "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in
                           enumerate(vectors.tolist())]}
    scores = rng.random(1000).tolist()
    rerank = {"id": "req_x", "model": "m", "usage": {"prompt_tokens": 9000, "total_tokens": 9000},
              "results": [{"index": i, "relevance_score": s, "document": {"text": f"document {i}"}}
                          for i, s in enumerate(scores)]}
    return {"embeddings 100 x 1024 floats": embeddings, "rerank 1000 results": rerank}


def main() -> None:
    for name, body in bodies().items():
        assert json.loads(OrjsonResponse(body).body) == json.loads(JSONResponse(body).body)
        times = {"json.dumps": [], "orjson": []}
        for _ in range(10):
            for label, response in (("json.dumps", JSONResponse), ("orjson", OrjsonResponse)):
                start = time.perf_counter()
                response(body)
                times[label].append(time.perf_counter() - start)
        slow, fast = (statistics.median(times[label]) * 1e3 for label in ("json.dumps", "orjson"))
        print(f"{name:<30} json.dumps {slow:8.2f} ms   orjson {fast:7.2f} ms   ratio {slow / fast:5.1f}x")


if __name__ == "__main__":
    main()
