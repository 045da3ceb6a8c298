"""Per-key rate limits across two gateway replicas: 429 with Retry-After in the OpenAI error shape."""

import asyncio

import httpx

from serve_app.accounts.ratelimit import Bucket
from tests.serving import EMBEDDER, RERANKER


def burst(served, secret: str, count: int, path: str, body: dict) -> list[httpx.Response]:
    async def send():
        async with httpx.AsyncClient(base_url=served.url, timeout=60,
                                     headers={"Authorization": f"Bearer {secret}"}) as client:
            return await asyncio.gather(*(client.post(path, json=body) for _ in range(count)))
    return asyncio.run(send())


def test_requests_per_minute_hold_across_gateway_replicas(served, key_store):
    _, secret = key_store.create("rpm-limited", requests_per_minute=30)
    responses = burst(served, secret, 60, "/v1/embeddings", {"model": EMBEDDER, "input": "x"})
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}
    # 30 allowed at once; the bucket refills 0.5/s while the burst runs, so a few more may pass: within 10%.
    assert 30 <= statuses.count(200) <= 33, statuses.count(200)
    refused = next(r for r in responses if r.status_code == 429)
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and "requests per minute" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1


def test_tokens_per_minute(served, key_store):
    _, secret = key_store.create("tpm-limited", tokens_per_minute=400)
    body = {"model": RERANKER, "query": "what do pandas eat?", "documents": ["bamboo shoots and leaves"]}
    served_tokens, refused = 0, 0
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {secret}"}, timeout=60) as client:
        for _ in range(12):
            response = client.post("/v1/rerank", json=body)
            if response.status_code == 200:
                served_tokens += response.json()["usage"]["total_tokens"]
            else:
                assert response.status_code == 429 and "tokens per minute" in response.json()["error"]["message"]
                refused += 1
    # Sequential requests: admitted while the bucket is not empty, so at most one request's tokens over 400.
    per_request = served_tokens // (12 - refused)
    assert refused > 0 and 400 <= served_tokens <= 400 + per_request + 10


def test_unlimited_keys_are_not_limited(served):
    responses = burst(served, served.headers["Authorization"].split()[1], 40, "/v1/embeddings",
                      {"model": EMBEDDER, "input": "x"})
    assert all(r.status_code == 200 for r in responses)


def test_bucket_refills_at_the_per_minute_rate():
    bucket = Bucket(capacity=60, level=0, updated=0.0)
    bucket.refill(1.0)
    assert bucket.level == 1.0 and bucket.seconds_until(2) == 1.0
    bucket.refill(1000.0)
    assert bucket.level == 60
