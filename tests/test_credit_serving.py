"""Prepaid credit on the live gateway (two replicas), on SQLite and on PostgreSQL: credit spent mid-load (no refusal
while the balance is positive, a bounded overshoot, then no model call), the balance equal to the ledger exactly,
top-ups restoring service within the key refresh interval, and bad admin input answered with a clear 4xx."""

import asyncio
import time
from decimal import Decimal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from serve_app.accounts import keys_cli as keys
from serve_app.accounts.credit.amounts import decimal_text
from serve_app.accounts.credit.book import CreditBook
from serve_app.accounts.keys import KeyStore
from serve_app.accounts.store import connect, usage_records
from serve_app.config import Price
from tests.serving import RERANKER, TEST_PRICES

RERANK_BODY = {"model": RERANKER, "query": "what do pandas eat?", "documents": ["bamboo", "Paris"]}
RERANKER_PRICE = Price.model_validate(TEST_PRICES[RERANKER])
RERANK_COST = RERANKER_PRICE.cost({"documents": 2, "input_tokens": 0})  # documents only: 0.0001
GATEWAY_REPLICAS = 2  # tests/serving.py tiny_test_config


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def credit_database(request, served, serve_config, key_database):
    """The served gateway's database for this module: the session's SQLite file, then PostgreSQL (one redeploy of
    the gateway for all the tests here)."""
    yield from served.gateway_database(request, serve_config, key_database)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def refused_for_credit(response: httpx.Response) -> bool:
    if response.status_code != 429:
        return False
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota"), response.text
    assert "spent" in error["message"] and "/credit" in error["message"]
    assert response.headers["x-should-retry"] == "false"
    return True


def credit_refusals(served) -> float:
    text = httpx.get(served.metrics_url, timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "ray_qwen3_credit_refusals" for sample in family.samples
               if sample.name.endswith("_total"))


def reranker_jobs(served) -> int:
    return served.model_handle(RERANKER).stats.remote().result(timeout_s=30)["jobs"]


def test_credit_spent_mid_load_across_two_gateway_replicas(served, credit_database):
    engine = connect(credit_database)
    allowance = 20  # requests the credit pays for
    credit = RERANK_COST * allowance
    key, secret = KeyStore(engine).create("credit-mid-load", credit=credit)
    clients = 6
    refusals_before = credit_refusals(served)

    async def client(http: httpx.AsyncClient) -> tuple[list[str], int]:
        served_ids = []
        for _ in range(100):
            response = await http.post("/v1/rerank", json=RERANK_BODY)
            if response.status_code == 200:
                served_ids.append(response.headers["X-Usage-Id"])
                continue
            assert refused_for_credit(response), response.text
            return served_ids, 1
        return served_ids, 0

    async def load():
        async with httpx.AsyncClient(base_url=served.url, headers=bearer(secret), timeout=60) as http:
            return await asyncio.gather(*(client(http) for _ in range(clients)))

    results = asyncio.run(load())
    served_ids = [usage_id for ids, _ in results for usage_id in ids]
    assert all(refused for _, refused in results), "a client was never refused"
    # Views lag the store but never run ahead of it, so no request was refused while the balance was positive;
    # past zero, each client had one request in flight and could get one more admitted by the replica that had
    # not yet heard (every replica hears at its own next commit for the key).
    assert allowance <= len(served_ids) <= allowance + clients * GATEWAY_REPLICAS, len(served_ids)
    print(f"credit for {allowance} requests: {len(served_ids)} served, {clients} clients, "
          f"{GATEWAY_REPLICAS} gateway replicas")

    # Once a replica has seen the balance at zero it serves nothing more: a replica that had not seen it yet serves
    # at most one more request (whose commit shows it the balance), then every request is refused.
    after_load, refused_in_a_row, refusals = [], 0, sum(refused for _, refused in results)
    with httpx.Client(base_url=served.url, headers=bearer(secret), timeout=60) as http:
        for _ in range(60):
            response = http.post("/v1/rerank", json=RERANK_BODY)
            if response.status_code == 200:
                after_load.append(response.headers["X-Usage-Id"])
                refused_in_a_row = 0
                continue
            assert refused_for_credit(response), response.text
            refusals += 1
            refused_in_a_row += 1
            if refused_in_a_row == 8:
                break
        assert refused_in_a_row == 8 and len(after_load) <= GATEWAY_REPLICAS, after_load
        # Refused before any model call: the reranker runs no job for them.
        jobs = reranker_jobs(served)
        for _ in range(10):
            assert refused_for_credit(http.post("/v1/rerank", json=RERANK_BODY))
            assert refused_for_credit(http.post("/rerank", json={"query": "q", "texts": ["a"], "model": RERANKER}))
        refusals += 20
        assert reranker_jobs(served) == jobs
        # A spent key still reads its usage and balance.
        report = http.get("/v1/usage")
    served_ids += after_load

    # The balance is the credit minus the ledger's rows at the model's price, exactly, and each served request is
    # in the ledger once.
    with engine.connect() as connection:
        rows = [dict(row._mapping) for row in connection.execute(
            select(usage_records).where(usage_records.c.key_id == key.id))]
    assert sorted(row["request_id"] for row in rows) == sorted(served_ids)
    used = sum((RERANKER_PRICE.cost(row) for row in rows), Decimal(0))
    assert used == RERANK_COST * len(served_ids)
    book = CreditBook(engine)
    balance = book.balances()[key.id].balance
    assert balance == credit - used and balance <= 0
    assert book.audit()[key.id] == {"journal": credit, "debits": used, "credited": credit, "used": used}
    assert report.status_code == 200, report.text
    assert report.json()["credit"] == [{"key_id": key.id, "balance": decimal_text(balance),
                                        "credit_added": decimal_text(credit), "used": decimal_text(used)}]
    assert report.json()["totals"]["requests"] == len(served_ids)

    # Every refusal is counted, without a per-key label.
    deadline = time.monotonic() + 30
    while credit_refusals(served) - refusals_before < refusals and time.monotonic() < deadline:
        time.sleep(1)
    assert credit_refusals(served) - refusals_before == refusals


def served_everywhere(served, headers: dict[str, str], deadline_s: float = 5.0) -> tuple[float, int]:
    """Seconds until 6 requests in a row are served (so both gateway replicas serve the key), and how many were."""
    started = time.monotonic()
    in_a_row = served_count = 0
    while in_a_row < 6:
        response = httpx.post(f"{served.url}/v1/rerank", json=RERANK_BODY, headers=headers, timeout=60)
        if response.status_code == 200:
            in_a_row += 1
            served_count += 1
            continue
        assert refused_for_credit(response), response.text
        in_a_row = 0
        assert time.monotonic() - started < deadline_s, f"still refused {deadline_s} s after the top-up"
        time.sleep(0.05)
    return time.monotonic() - started, served_count


def test_a_top_up_restores_service_within_the_key_refresh_interval(served, serve_config, credit_database):
    refresh_s = serve_config["applications"][0]["args"]["auth"]["key_refresh_s"]
    engine = connect(credit_database)
    store = KeyStore(engine)
    admin_key, admin_secret = store.create("credit-admin", admin=True)
    admin = httpx.Client(base_url=served.url, headers=bearer(admin_secret), timeout=30)
    unlimited, _ = store.create("credit-unlimited")

    # A key created with no credit is refused from its first request, on every replica: its balance is loaded
    # with it. A top-up over the admin API is seen at once by the replica that took it, by the other within its
    # next key reload.
    created = admin.post("/v1/admin/keys", json={"name": "credit-top-up-api", "credit": 0})
    assert created.status_code == 201 and created.json()["balance"] == "0"
    spent = bearer(created.json()["secret"])
    key_id = created.json()["id"]
    for _ in range(6):
        assert refused_for_credit(httpx.post(f"{served.url}/v1/rerank", json=RERANK_BODY, headers=spent))
    top_up = admin.post(f"/v1/admin/keys/{key_id}/credit", json={"amount": "0.01", "note": "invoice 1"})
    assert top_up.status_code == 201, top_up.text
    entry = top_up.json()
    assert {k: entry[k] for k in ("object", "key_id", "kind", "amount", "balance", "note", "actor")} == {
        "object": "credit_entry", "key_id": key_id, "kind": "top_up", "amount": "0.01", "balance": "0.01",
        "note": "invoice 1", "actor": f"key:{admin_key.id}"}
    via_api, served_count = served_everywhere(served, spent)

    # A top-up from the CLI tells no gateway: both replicas see it at their next reload.
    key, secret = store.create("credit-top-up-cli", credit="0")
    for _ in range(6):
        assert refused_for_credit(httpx.post(f"{served.url}/v1/rerank", json=RERANK_BODY, headers=bearer(secret)))
    assert keys.main(["--db", credit_database, "credit", key.id, "--amount", "0.01", "--note", "cli top-up"]) == 0
    via_cli, _ = served_everywhere(served, bearer(secret))
    print(f"top-up to service on both replicas: {via_api:.2f} s (admin API), {via_cli:.2f} s (CLI); "
          f"key_refresh_s {refresh_s}")

    journal = admin.get(f"/v1/admin/keys/{key_id}/credit").json()["data"]
    assert [(e["kind"], e["amount"], e["balance"]) for e in journal] == [("initial", "0", "0"),
                                                                        ("top_up", "0.01", "0.01")]
    listed = {item["id"]: item["balance"] for item in admin.get("/v1/admin/keys").json()["data"]}
    assert listed[key_id] == decimal_text(Decimal("0.01") - served_count * RERANK_COST)
    assert listed[unlimited.id] is None
    # Revoked keys keep their 401, balance or not.
    assert admin.delete(f"/v1/admin/keys/{key_id}").status_code == 200
    deadline = time.monotonic() + 5
    while httpx.post(f"{served.url}/v1/rerank", json=RERANK_BODY, headers=spent).status_code != 401:
        assert time.monotonic() < deadline, "revoked prepaid key still accepted after 5 s"
        time.sleep(0.2)


BAD_CREDIT_BODIES = [
    ({"amount": "-5", "note": "x"}, "amount", "negative"),
    ({"amount": -5, "note": "x"}, "amount", "negative"),
    ({"amount": "abc", "note": "x"}, "amount", "decimal number"),
    ({"amount": "", "note": "x"}, "amount", "decimal number"),
    ({"amount": True, "note": "x"}, "amount", "decimal number"),
    ({"amount": None, "note": "x"}, "amount", "decimal number"),
    ({"amount": ["5"], "note": "x"}, "amount", "decimal number"),
    ({"amount": "NaN", "note": "x"}, "amount", "finite"),
    ({"amount": 0, "note": "x"}, "amount", "zero"),
    ({"amount": "0.0000000000001", "note": "x"}, "amount", "decimal places"),
    ({"amount": "1000000000", "note": "x"}, "amount", "at most"),
    ({"note": "x"}, "amount", "required"),
    ({"amount": "5"}, "note", "required"),
    ({"amount": "5", "note": ""}, "note", "note"),
    ({"amount": "5", "note": 7}, "note", "string"),
    ({"amount": "5", "note": "x", "adjustmnt": True}, "adjustmnt", "not permitted"),
    (["5"], None, "dictionary"),
]


def test_bad_admin_credit_input_is_a_clear_4xx(served, credit_database):
    store = KeyStore(connect(credit_database))
    _, admin_secret = store.create("credit-admin-input", admin=True)
    _, plain_secret = store.create("credit-plain")
    key, _ = store.create("credit-target", credit="1")
    admin = httpx.Client(base_url=served.url, headers=bearer(admin_secret), timeout=30)
    for body, param, words in BAD_CREDIT_BODIES:
        response = admin.post(f"/v1/admin/keys/{key.id}/credit", json=body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
        assert words in error["message"].lower(), (body, error)
    for raw in (b'{"amount": 1e400, "note": "x"}', b'{"amount": "5", "note": "x"', b"amount=5&note=x"):
        response = admin.post(f"/v1/admin/keys/{key.id}/credit", content=raw)
        assert response.status_code == 400, (raw, response.text)
    unknown = admin.post("/v1/admin/keys/nope/credit", json={"amount": "5", "note": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "key_id"
    assert admin.get("/v1/admin/keys/nope/credit").status_code == 404
    not_admin = httpx.post(f"{served.url}/v1/admin/keys/{key.id}/credit", json={"amount": "5", "note": "x"},
                           headers=bearer(plain_secret))
    assert not_admin.status_code == 403 and not_admin.json()["error"]["code"] == "admin_key_required"
    for credit in ("-1", "ten", True, "0.0000000000001"):
        response = admin.post("/v1/admin/keys", json={"name": "bad-credit", "credit": credit})
        assert response.status_code == 400 and response.json()["error"]["param"] == "credit", response.text
    # What is valid is read exactly: JSON numbers as decimals (a float would have lost digits), and a downward
    # correction only when asked for as an adjustment.
    exact = admin.post(f"/v1/admin/keys/{key.id}/credit", json={"amount": 0.1, "note": "number"})
    assert exact.status_code == 201 and exact.json()["amount"] == "0.1"
    digits = admin.post(f"/v1/admin/keys/{key.id}/credit", content=b'{"amount": 12345.123456789012, "note": "n"}')
    assert digits.status_code == 201 and digits.json()["amount"] == "12345.123456789012", digits.text
    correction = admin.post(f"/v1/admin/keys/{key.id}/credit",
                            json={"amount": "-0.1", "note": "refund", "adjustment": True})
    assert correction.status_code == 201 and correction.json()["kind"] == "adjustment"
    assert correction.json()["balance"] == "12346.123456789012"
    assert [entry.kind for entry in CreditBook(store.engine).journal(key.id)] == [
        "initial", "top_up", "top_up", "adjustment"]  # none of the refused bodies left an entry
