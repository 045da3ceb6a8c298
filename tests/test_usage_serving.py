"""The usage ledger behind the real gateway: every served request once, GET /v1/usage, and a gateway replica
SIGKILLed under load with the ledger still equal to what clients received."""

import asyncio
import os
import signal
import threading
import time
import uuid

import httpx
import pytest
from sqlalchemy import select

from serve_app.accounts.keys import KeyStore
from serve_app.accounts.store import connect, usage_records
from tests.serving import EMBEDDER, RERANKER
from tests.texts import DOCUMENTS, NONEMPTY_QUERIES


@pytest.fixture(scope="module")
def ledger_engine(key_database):
    return connect(key_database)


def new_key(key_store, name: str, admin: bool = False) -> tuple[str, dict[str, str]]:
    key, secret = key_store.create(name, admin=admin)
    return key.id, {"Authorization": f"Bearer {secret}"}


def ledger_rows(engine, key_id: str) -> dict[str, dict]:
    with engine.connect() as connection:
        rows = connection.execute(select(usage_records).where(usage_records.c.key_id == key_id))
        return {row.request_id: dict(row._mapping) for row in rows}


def request_for(n: int) -> tuple[str, dict]:
    """The n-th request of a mixed workload: Cohere rerank, OpenAI embeddings, TEI rerank."""
    documents = DOCUMENTS[n % 5:n % 5 + 1 + n % 3]
    kind = n % 3
    if kind == 0:
        query = NONEMPTY_QUERIES[n % len(NONEMPTY_QUERIES)]
        return "/v1/rerank", {"model": RERANKER, "query": query, "documents": documents}
    if kind == 1:
        return "/v1/embeddings", {"model": EMBEDDER, "input": documents}
    return "/rerank", {"query": NONEMPTY_QUERIES[n % len(NONEMPTY_QUERIES)], "texts": documents, "model": RERANKER}


def usage_of(path: str, body: dict, response: httpx.Response) -> tuple[int, int]:
    """(input tokens, documents) that a client can read from a response. TEI's body has no usage: its tokens
    are taken from nothing here, so TEI requests are checked by request id and documents only."""
    if path == "/v1/embeddings":
        return response.json()["usage"]["total_tokens"], 0
    if path == "/v1/rerank":
        return response.json()["usage"]["total_tokens"], len(body["documents"])
    return -1, len(body["texts"])


def test_every_served_request_is_recorded_once_and_failures_are_not(served, key_store, ledger_engine):
    key_id, headers = new_key(key_store, "ledger-concurrent")
    workload = [request_for(n) for n in range(45)]

    async def send_all():
        async with httpx.AsyncClient(base_url=served.url, headers=headers, timeout=120) as client:
            served_ = await asyncio.gather(*(client.post(path, json=body) for path, body in workload))
            failed = await asyncio.gather(
                client.post("/v1/rerank", json={"model": "no-such-model", "query": "q", "documents": ["d"]}),
                client.post("/v1/embeddings", json={"model": EMBEDDER, "input": [], "dimensions": 7}),
                client.post("/v1/rerank", json={"model": EMBEDDER, "query": "q", "documents": ["d"]}))
            return served_, failed

    responses, failures = asyncio.run(send_all())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert [r.status_code for r in failures] == [404, 400, 400]
    rows = ledger_rows(ledger_engine, key_id)
    assert set(rows) == {r.headers["X-Usage-Id"] for r in responses}, "a request missing or billed twice"
    for (path, body), response in zip(workload, responses):
        row = rows[response.headers["X-Usage-Id"]]
        tokens, documents = usage_of(path, body, response)
        assert row["route"] == path and row["documents"] == documents
        if tokens >= 0:
            assert row["input_tokens"] == tokens
        if path == "/v1/embeddings":
            assert row["embeddings"] == len(body["input"]) and row["dimensions"] == len(
                response.json()["data"][0]["embedding"])
        else:
            assert row["search_units"] == 1 and row["embeddings"] == 0
        assert row["latency_ms"] > 0
    cohere_ids = [r.json()["id"] for (path, _), r in zip(workload, responses) if path == "/v1/rerank"]
    assert all(i in rows for i in cohere_ids)  # Cohere's response id is the ledger id


def test_a_repeated_idempotency_key_is_billed_once(served, key_store, ledger_engine):
    key_id, headers = new_key(key_store, "ledger-idempotent")
    body = {"model": RERANKER, "query": "q", "documents": ["a", "b"]}
    first = httpx.post(f"{served.url}/v1/rerank", json=body, headers={**headers, "Idempotency-Key": "order-1"})
    again = httpx.post(f"{served.url}/v1/rerank", json=body, headers={**headers, "Idempotency-Key": "order-1"})
    other = httpx.post(f"{served.url}/v1/rerank", json=body, headers={**headers, "Idempotency-Key": "order-2"})
    assert first.status_code == again.status_code == other.status_code == 200
    assert first.headers["X-Usage-Id"] == again.headers["X-Usage-Id"] != other.headers["X-Usage-Id"]
    assert len(ledger_rows(ledger_engine, key_id)) == 2
    reused = httpx.post(f"{served.url}/v1/rerank", json={**body, "query": "another query"},
                        headers={**headers, "Idempotency-Key": "order-1"})
    assert reused.status_code == 409 and reused.json()["error"]["code"] == "idempotency_key_reused"
    assert len(ledger_rows(ledger_engine, key_id)) == 2  # a reused key buys no unbilled answer
    too_long = httpx.post(f"{served.url}/v1/rerank", json=body, headers={**headers, "Idempotency-Key": "x" * 256})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "Idempotency-Key"


def test_usage_route_shows_a_key_its_own_totals_and_an_admin_every_key(served, key_store):
    alice_id, alice = new_key(key_store, "usage-alice")
    bob_id, bob = new_key(key_store, "usage-bob")
    _, admin = new_key(key_store, "usage-admin", admin=True)
    for headers, count in ((alice, 2), (bob, 1)):
        for _ in range(count):
            response = httpx.post(f"{served.url}/v1/embeddings", json={"model": EMBEDDER, "input": ["a", "b c"]},
                                  headers=headers)
            assert response.status_code == 200
    mine = httpx.get(f"{served.url}/v1/usage", headers=alice).json()
    assert {row["key_id"] for row in mine["data"]} == {alice_id}
    assert mine["totals"]["requests"] == 2 and mine["totals"]["embeddings"] == 4
    everyone = httpx.get(f"{served.url}/v1/usage", headers=admin).json()
    assert {alice_id, bob_id} <= {row["key_id"] for row in everyone["data"]}
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert httpx.get(f"{served.url}/v1/usage", params={"start": "2000-01-01", "end": "2000-01-02"},
                     headers=alice).json()["totals"]["requests"] == 0
    assert httpx.get(f"{served.url}/v1/usage", params={"start": today}, headers=bob).json()["totals"][
        "requests"] == 1
    for params, param in (({"start": "yesterday"}, "start"), ({"start": today, "end": "2000-01-01"}, "end")):
        response = httpx.get(f"{served.url}/v1/usage", params=params, headers=alice)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert httpx.get(f"{served.url}/v1/usage").status_code == 401


@pytest.fixture(params=["sqlite", "postgresql"])
def gateway_database(request, served, serve_config, key_database):
    """The served gateway's database: the session's SQLite file, or a PostgreSQL server that the gateway is
    redeployed onto for the test (the keys copied over, so the session's key keeps working) and then taken off."""
    yield from served.gateway_database(request, serve_config, key_database)


def gateway_replicas() -> list[dict]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    replicas = details["applications"]["gateway"]["deployments"]["Gateway"]["replicas"]
    return [replica for replica in replicas if replica["state"] == "RUNNING"]


def test_ledger_equals_what_clients_received_when_a_gateway_replica_is_sigkilled(served, gateway_database):
    """Retrying clients (same Idempotency-Key per logical request, as the ledger's design asks) against two
    gateway replicas; one is SIGKILLed mid-load. Afterwards the ledger holds exactly the requests clients got
    answers for, with exactly the tokens and documents those answers reported."""
    ledger_engine = connect(gateway_database)
    key_id, headers = new_key(KeyStore(ledger_engine), "ledger-sigkill")
    victim = gateway_replicas()[0]
    received: list[tuple[str, dict, httpx.Response]] = []
    attempts = {"total": 0, "failed": 0}
    lock = threading.Lock()
    started = threading.Event()

    def client(worker: int) -> None:
        with httpx.Client(base_url=served.url, timeout=60) as http:
            for n in range(worker, 120, 4):
                path, body = request_for(n)
                idempotency = {**headers, "Idempotency-Key": f"kill-test-{uuid.uuid4().hex}"}
                for _ in range(100):
                    started.set()
                    try:
                        response = http.post(path, json=body, headers=idempotency)
                    except httpx.TransportError:
                        response = None
                    with lock:
                        attempts["total"] += 1
                    if response is not None and response.status_code == 200:
                        with lock:
                            received.append((path, body, response))
                        break
                    assert response is None or response.status_code >= 500, response.text
                    with lock:
                        attempts["failed"] += 1
                    time.sleep(0.2)
                else:
                    raise AssertionError(f"request {n} never succeeded")

    workers = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    started.wait(30)
    time.sleep(1.5)  # well into the load
    os.kill(victim["pid"], signal.SIGKILL)
    for worker in workers:
        worker.join(240)
    assert not any(worker.is_alive() for worker in workers)
    assert len(received) == 30 * 4

    rows = ledger_rows(ledger_engine, key_id)
    assert set(rows) == {response.headers["X-Usage-Id"] for _, _, response in received}
    client_tokens = client_documents = 0
    ledger_tokens = ledger_documents = 0
    for path, body, response in received:
        tokens, documents = usage_of(path, body, response)
        row = rows[response.headers["X-Usage-Id"]]
        client_documents += documents
        ledger_documents += row["documents"]
        if tokens >= 0:
            client_tokens += tokens
            ledger_tokens += row["input_tokens"]
    assert (ledger_tokens, ledger_documents) == (client_tokens, client_documents)

    # The killed replica was replaced; later tests get two healthy gateway replicas again.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        replicas = gateway_replicas()
        if len(replicas) == 2 and victim["replica_id"] not in {r["replica_id"] for r in replicas}:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"gateway replica not replaced: {gateway_replicas()}")
    print(f"sigkill test: {attempts['total']} attempts, {attempts['failed']} failed and retried")
