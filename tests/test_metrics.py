"""Prometheus metrics from the Ray metrics endpoint after a known workload (read with prometheus_client's parser)."""

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.serving import EMBEDDER, RERANKER


def scrape(served) -> dict[str, float]:
    """Samples summed over Ray's own labels (node, replica...), keyed by name and our labels."""
    text = httpx.get(served.metrics_url, timeout=10).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("ray_qwen3_"):
            continue
        for sample in family.samples:
            ours = {k: v for k, v in sample.labels.items() if k in ("model", "route", "status", "le")}
            key = sample.name + "".join(f"|{k}={ours[k]}" for k in sorted(ours))
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def settled(served) -> dict[str, float]:
    """A scrape that no longer changes (earlier tests' metrics have all arrived)."""
    previous = scrape(served)
    for _ in range(20):
        time.sleep(1.5)
        current = scrape(served)
        if current == previous:
            return current
        previous = current
    return previous


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_gateway_and_model_metrics_follow_a_known_workload(served):
    before = settled(served)
    with httpx.Client(base_url=served.url, headers=served.headers, timeout=60) as client:
        usage = 0
        for _ in range(3):
            body = {"model": RERANKER, "query": "what do pandas eat?", "documents": ["bamboo", "Paris", "rice"]}
            usage += client.post("/v1/rerank", json=body).json()["usage"]["total_tokens"]
        embedded = client.post("/v1/embeddings", json={"model": EMBEDDER, "input": ["a", "b"]}).json()
        cohere = client.post("/v2/embed", json={"model": EMBEDDER, "texts": ["a", "b", "c"],
                                                "input_type": "search_query", "embedding_types": ["int8"]}).json()
        assert client.post("/v1/embeddings", json={"model": EMBEDDER, "input": []}).status_code == 400
    rerank_requests = f"ray_qwen3_requests_total|model={RERANKER}|route=/v1/rerank|status=200"
    # Each gateway replica and model replica reports on its own clock: wait for the last of them.
    arriving = {rerank_requests: 3, "ray_qwen3_requests_total|model=-|route=/v1/embeddings|status=400": 1,
                f"ray_qwen3_requests_total|model={EMBEDDER}|route=/v1/embeddings|status=200": 1,
                f"ray_qwen3_requests_total|model={EMBEDDER}|route=/v2/embed|status=200": 1,
                f"ray_qwen3_batch_tokens_count|model={EMBEDDER}": 2}
    deadline = time.monotonic() + 60  # a bound for a loaded machine; it returns as soon as all have arrived
    while True:
        after = scrape(served)
        if all(delta(after, before, key) >= count for key, count in arriving.items()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert delta(after, before, rerank_requests) == 3
    assert delta(after, before, f"ray_qwen3_requests_total|model={EMBEDDER}|route=/v1/embeddings|status=200") == 1
    assert delta(after, before, "ray_qwen3_requests_total|model=-|route=/v1/embeddings|status=400") == 1
    assert delta(after, before, f"ray_qwen3_input_tokens_total|model={RERANKER}|route=/v1/rerank") == usage
    assert delta(after, before, f"ray_qwen3_documents_total|model={RERANKER}|route=/v1/rerank") == 9
    assert delta(after, before, f"ray_qwen3_input_tokens_total|model={EMBEDDER}|route=/v1/embeddings") \
        == embedded["usage"]["total_tokens"]
    assert delta(after, before, f"ray_qwen3_requests_total|model={EMBEDDER}|route=/v2/embed|status=200") == 1
    assert delta(after, before, f"ray_qwen3_input_tokens_total|model={EMBEDDER}|route=/v2/embed") \
        == cohere["meta"]["billed_units"]["input_tokens"]
    assert delta(after, before, f"ray_qwen3_documents_total|model={EMBEDDER}|route=/v2/embed") == 3
    assert delta(after, before, f"ray_qwen3_request_latency_seconds_count|model={RERANKER}|route=/v1/rerank") == 3
    # Model side (Ray reports a histogram's _sum from bucket midpoints, so only counts are exact): the three
    # sequential requests made three one-job engine runs; padding efficiency is a ratio in (0, 1].
    assert delta(after, before, f"ray_qwen3_batch_jobs_count|model={RERANKER}") == 3
    assert delta(after, before, f"ray_qwen3_batch_jobs_bucket|le=1.0|model={RERANKER}") == 3
    assert delta(after, before, f"ray_qwen3_queue_wait_seconds_count|model={RERANKER}") == 3
    runs = delta(after, before, f"ray_qwen3_padding_efficiency_count|model={RERANKER}")
    assert runs == 3 and delta(after, before, f"ray_qwen3_padding_efficiency_bucket|le=1.0|model={RERANKER}") == 3
    assert delta(after, before, f"ray_qwen3_batch_tokens_count|model={EMBEDDER}") == 2  # /v1/embeddings, /v2/embed
    # Each of the three 3-document rerank runs makes its query-head pass and then its documents' pass: 2 passes.
    assert delta(after, before, f"ray_qwen3_forward_passes_count|model={RERANKER}") == 3
    assert delta(after, before, f"ray_qwen3_forward_passes_bucket|le=1.0|model={RERANKER}") == 0
    assert delta(after, before, f"ray_qwen3_forward_passes_bucket|le=2.0|model={RERANKER}") == 3
    assert delta(after, before, f"ray_qwen3_tokens_per_pass_count|model={EMBEDDER}") == 2
    assert delta(after, before, f"ray_qwen3_engine_seconds_total|model={EMBEDDER}") > 0
