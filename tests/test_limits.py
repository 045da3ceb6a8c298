"""A request at every limit at once, on the real served app: it is served, and no replica outgrows its budget.

The limits are the shipped defaults (serve_app.config.GatewayConfig): a 32 MiB body, 2048 embedding inputs, 1000
rerank documents; tokens per input are the model's max_length, here 512 so the forward passes stay short on CPU
(the input side, where request size costs memory, is the same at any max_length: every text is tokenized in full
before it is cut). A replica's budget is its `memory_gib`, the memory Ray reserves for it on its node.
"""

import copy
import json
from pathlib import Path

import httpx

from serve_app.config import GatewayConfig
from tests.serving import EMBEDDER, RERANKER, application

MAX_LENGTH = 512
MODEL_BUDGET_GIB = 1.0


def peak_rss_mib(pid: int) -> float:
    """The process's high-water mark of resident memory (VmHWM), over its whole life so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def replica_pids(app: str) -> list[int]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()["applications"][app]
    return [replica["pid"] for deployment in details["deployments"].values() for replica in deployment["replicas"]
            if replica["state"] == "RUNNING"]


def at_the_body_limit(make_body, count: int, limit: int) -> bytes:
    """The largest body of `count` equal texts ("a a a ...", one token per word) under `limit` bytes."""
    overhead = len(json.dumps(make_body([""] * count)))
    words = (limit - overhead) // count // 2
    body = json.dumps(make_body(["a " * words] * count)).encode()
    assert limit - 2 * count <= len(body) <= limit
    return body


def test_a_request_at_every_limit_stays_within_the_replica_memory_budget(served, serve_config):
    limits = GatewayConfig()
    config = copy.deepcopy(serve_config)
    application(config, "gateway")["args"].update(max_body_bytes=limits.max_body_bytes,
                                                  max_embedding_inputs=limits.max_embedding_inputs,
                                                  max_rerank_documents=limits.max_rerank_documents)
    for source, name in ((EMBEDDER, "limits-embedder"), (RERANKER, "limits-reranker")):
        app = copy.deepcopy(application(config, source))
        app["name"] = app["args"]["name"] = name
        app["args"].update(aliases=[], max_length=MAX_LENGTH, device="cpu")
        app["args"]["deployment"] = {"num_cpus": 0.1, "memory_gib": MODEL_BUDGET_GIB}
        config["applications"].append(app)
    served.deploy(config)
    try:
        embed_body = at_the_body_limit(lambda texts: {"model": "limits-embedder", "input": texts},
                                       limits.max_embedding_inputs, limits.max_body_bytes)
        rerank_body = at_the_body_limit(
            lambda texts: {"model": "limits-reranker", "query": "pandas", "documents": texts},
            limits.max_rerank_documents, limits.max_body_bytes)
        models = ("limits-embedder", "limits-reranker")
        before = {app: [peak_rss_mib(pid) for pid in replica_pids(app)] for app in models}
        headers = {**served.headers, "Content-Type": "application/json"}
        with httpx.Client(base_url=served.url, headers=headers, timeout=600) as client:
            embedded = client.post("/v1/embeddings", content=embed_body)
            assert embedded.status_code == 200, embedded.text[:500]
            data = embedded.json()["data"]
            assert len(data) == limits.max_embedding_inputs
            assert embedded.json()["usage"]["prompt_tokens"] == limits.max_embedding_inputs * MAX_LENGTH
            reranked = client.post("/v1/rerank", content=rerank_body)
            assert reranked.status_code == 200, reranked.text[:500]
            assert len(reranked.json()["results"]) == limits.max_rerank_documents
            assert reranked.json()["usage"]["total_tokens"] == limits.max_rerank_documents * MAX_LENGTH
            # One more byte or one more item is refused before any model sees it.
            too_many = {"model": "limits-embedder", "input": ["a"] * (limits.max_embedding_inputs + 1)}
            assert client.post("/v1/embeddings", json=too_many).status_code == 413
            assert client.post("/v1/embeddings", content=embed_body + b" " * (limits.max_body_bytes -
                                                                            len(embed_body) + 1)).status_code == 413
        peaks = {app: [peak_rss_mib(pid) for pid in replica_pids(app)]
                 for app in ("limits-embedder", "limits-reranker", "gateway")}
        print(f"peak RSS (MiB) before {before}, after requests at every limit {peaks}; "
              f"model budget {MODEL_BUDGET_GIB * 1024:.0f}")
        for app in models:
            assert max(peaks[app]) <= MODEL_BUDGET_GIB * 1024, (app, peaks[app])
    finally:
        served.deploy(serve_config)
