"""The Batch API end to end, through the openai SDK against the session's real Serve instance: answers equal to the
same lines sent online, bad lines, bad files, limits, other keys, cancel, expiry, a SIGKILLed runner resuming, and
the S3 backend (a moto S3 server on 127.0.0.1)."""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import time

import httpx
import numpy as np
import pytest
from openai import APIStatusError, NotFoundError, OpenAI
from sqlalchemy import select, update

from serve_app.accounts.store import connect, usage_records
from serve_app.gateway.batches.store import batches as batches_table
from tests.serving import (EMBEDDER, RERANKER, TEST_MAX_BATCH_EMBEDDING_INPUTS, TEST_MAX_BATCH_FILE_BYTES,
                           TEST_MAX_BATCH_LINES, application, free_port)
from tests.texts import DOCUMENTS, NONEMPTY_QUERIES

TIMEOUT_S = 120
TOLERANCE = 1e-5  # the same lines share forward passes with other lines in a batch: float noise only


@pytest.fixture(scope="module")
def database(key_database):
    return connect(key_database)


@pytest.fixture(scope="module")
def alice(key_store, served):
    key, secret = key_store.create("batches-alice")
    return key.id, OpenAI(base_url=f"{served.url}/v1", api_key=secret, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def bob(key_store, served):
    key, secret = key_store.create("batches-bob")
    return key.id, OpenAI(base_url=f"{served.url}/v1", api_key=secret, max_retries=0, timeout=60)


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def line(custom_id: str, url: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def embedding_lines(count: int, prefix: str = "e") -> list[dict]:
    return [line(f"{prefix}-{n}", "/v1/embeddings", {"model": EMBEDDER, "input": f"{DOCUMENTS[n % len(DOCUMENTS)]} {n}"})
            for n in range(count)]


def error_of(refusal) -> dict:
    return refusal.value.response.json()["error"]


def submit(client: OpenAI, lines: list[dict] | bytes, endpoint: str = "/v1/embeddings", **options):
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    uploaded = client.files.create(file=("input.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h", **options)


def wait_for(client: OpenAI, batch_id: str, done, what: str, timeout_s: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} did not get {what}: {batch.status} {batch.request_counts}"
        time.sleep(0.2)


def ended(batch) -> bool:
    return batch.status in ("completed", "failed", "expired", "cancelled")


def wait_until_running(client: OpenAI, batch_id: str):
    """In progress with some lines checkpointed (and so, with the test sizes, many still to do)."""
    return wait_for(client, batch_id, lambda b: ended(b) or (b.status == "in_progress" and b.request_counts.completed),
                    "lines done")


def file_lines(client: OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(raw) for raw in client.files.content(file_id).content.decode().splitlines()]


def results(client: OpenAI, batch) -> tuple[dict[str, dict], dict[str, dict]]:
    """(output lines, error lines) by custom_id, checking that no input line is in them twice."""
    output, errors = file_lines(client, batch.output_file_id), file_lines(client, batch.error_file_id)
    by_id = {item["custom_id"]: item for item in output}
    failed = {item["custom_id"]: item for item in errors}
    assert len(by_id) == len(output) and len(failed) == len(errors), "a line is in a file twice"
    assert not set(by_id) & set(failed), "a line is in both files"
    return by_id, failed


def ledger_rows(database, batch_id: str) -> list[dict]:
    with database.connect() as connection:
        return [dict(row._mapping) for row in
                connection.execute(select(usage_records).where(usage_records.c.batch_id == batch_id))]


def assert_exactly_once(client: OpenAI, database, batch, lines: list[dict], key_id: str) -> dict[str, dict]:
    """Every input line once in the output or the error file, the counts agree, and each output line has exactly
    one ledger row (the line's id, its tokens, the batch's route, key and id)."""
    output, errors = results(client, batch)
    assert set(output) | set(errors) == {item["custom_id"] for item in lines}
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (len(lines), len(output), len(errors))
    rows = {row["request_id"]: row for row in ledger_rows(database, batch.id)}
    assert len(rows) == len(output) and set(rows) == {item["response"]["request_id"] for item in output.values()}
    for item in output.values():
        row = rows[item["id"]]
        assert item["response"]["status_code"] == 200 and item["error"] is None
        assert row["input_tokens"] == item["response"]["body"]["usage"]["total_tokens"]
        assert (row["key_id"], row["route"], row["batch_id"]) == (key_id, batch.endpoint, batch.id)
    assert batch.usage.input_tokens == sum(row["input_tokens"] for row in rows.values())
    return output


def vectors(body: dict) -> np.ndarray:
    return np.array([np.frombuffer(base64.b64decode(item["embedding"]), "<f4") if isinstance(item["embedding"], str)
                     else item["embedding"] for item in body["data"]], dtype=np.float64)


# ---- the SDK, end to end ---------------------------------------------------------------------------------------

def test_an_embeddings_batch_answers_each_line_as_online(alice, served, database):
    key_id, client = alice
    lines = [line("query", "/v1/embeddings", {"model": EMBEDDER, "input": NONEMPTY_QUERIES[0], "dimensions": 32,
                                              "instruction": "Given a web search query, retrieve relevant passages"}),
             line("documents", "/v1/embeddings", {"model": EMBEDDER, "input": DOCUMENTS[:4]}),
             line("base64", "/v1/embeddings", {"model": EMBEDDER, "input": DOCUMENTS[4:6], "encoding_format": "base64"}),
             line("token-ids", "/v1/embeddings", {"model": EMBEDDER, "input": [[101, 2023, 318], [7, 8]]}),
             line("alias", "/v1/embeddings", {"model": "Qwen/Qwen3-Embedding-0.6B", "input": "pandas"})]
    batch = submit(client, lines, metadata={"job": "index v2"})
    assert (batch.status, batch.endpoint, batch.completion_window, batch.metadata) == (
        "validating", "/v1/embeddings", "24h", {"job": "index v2"})
    assert batch.expires_at == batch.created_at + 24 * 3600
    batch = wait_for(client, batch.id, ended, "an end")
    assert batch.status == "completed" and batch.error_file_id is None, batch
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    output = assert_exactly_once(client, database, batch, lines, key_id)
    for item in lines:
        online = httpx.post(f"{served.url}/v1/embeddings", json=item["body"], headers={
            "Authorization": f"Bearer {client.api_key}"}, timeout=60).json()
        answered = output[item["custom_id"]]["response"]["body"]
        assert answered["model"] == online["model"] and answered["usage"] == online["usage"]
        if item["custom_id"] == "base64":
            assert all(isinstance(e["embedding"], str) for e in answered["data"])
        assert np.abs(vectors(answered) - vectors(online)).max() <= TOLERANCE
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_a_rerank_batch_answers_each_line_as_online(alice, served, database):
    key_id, client = alice
    lines = [line(f"r{n}", "/v1/rerank", {"model": RERANKER, "query": NONEMPTY_QUERIES[n % len(NONEMPTY_QUERIES)],
                                          "documents": DOCUMENTS[n % 3:n % 3 + 3], "return_documents": n % 2 == 0})
             for n in range(6)]
    batch = wait_for(client, submit(client, lines, endpoint="/v1/rerank").id, ended, "an end")
    assert batch.status == "completed", batch
    output = assert_exactly_once(client, database, batch, lines, key_id)
    for item in lines:
        online = httpx.post(f"{served.url}/v1/rerank", json=item["body"],
                            headers={"Authorization": f"Bearer {client.api_key}"}, timeout=60).json()
        answered = output[item["custom_id"]]["response"]["body"]
        assert answered["id"] == output[item["custom_id"]]["id"]  # the rerank id is the line's ledger id
        scores = {r["index"]: r["relevance_score"] for r in answered["results"]}
        expected = {r["index"]: r["relevance_score"] for r in online["results"]}
        assert scores.keys() == expected.keys()
        assert max(abs(scores[i] - expected[i]) for i in scores) <= TOLERANCE
        assert ({r["index"]: r.get("document") for r in answered["results"]}
                == {r["index"]: r.get("document") for r in online["results"]})
        assert answered["usage"] == online["usage"] and answered["meta"] == online["meta"]


def test_a_cohere_embed_batch_answers_each_line_as_online(alice, served, database):
    key_id, client = alice
    lines = [line("query", "/v2/embed", {"model": EMBEDDER, "input_type": "search_query",
                                         "texts": NONEMPTY_QUERIES[:2], "embedding_types": ["float", "int8", "ubinary"],
                                         "output_dimension": 32}),
             line("documents", "/v2/embed", {"model": EMBEDDER, "input_type": "search_document",
                                             "inputs": [{"content": [{"type": "text", "text": DOCUMENTS[0]}]}]}),
             line("image", "/v2/embed", {"model": EMBEDDER, "input_type": "image", "texts": ["x"]})]
    batch = wait_for(client, submit(client, lines, endpoint="/v2/embed").id, ended, "an end")
    assert batch.status == "completed" and batch.request_counts.failed == 1, batch
    output, errors = results(client, batch)
    assert errors["image"]["response"]["status_code"] == 400
    assert errors["image"]["response"]["body"]["error"]["param"] == "input_type"
    rows = {row["request_id"]: row for row in ledger_rows(database, batch.id)}
    assert set(rows) == {item["id"] for item in output.values()}
    for item in lines[:2]:
        online = httpx.post(f"{served.url}/v2/embed", json=item["body"],
                            headers={"Authorization": f"Bearer {client.api_key}"}, timeout=60).json()
        answered = output[item["custom_id"]]["response"]["body"]
        assert answered["id"] == output[item["custom_id"]]["id"]  # the response id is the line's ledger id
        assert answered["embeddings"].keys() == online["embeddings"].keys() and answered["texts"] == online["texts"]
        assert answered["meta"] == online["meta"]
        tokens = answered["meta"]["billed_units"]["input_tokens"]
        assert (rows[answered["id"]]["input_tokens"], rows[answered["id"]]["route"]) == (tokens, "/v2/embed")
        got, expected = np.array(answered["embeddings"]["float"]), np.array(online["embeddings"]["float"])
        assert got.shape == expected.shape and np.abs(got - expected).max() <= TOLERANCE
        for kind in answered["embeddings"].keys() - {"float"}:  # compressed: same shape, at most a bucket apart
            got, expected = np.array(answered["embeddings"][kind]), np.array(online["embeddings"][kind])
            assert got.shape == expected.shape


def test_a_prepaid_keys_lines_are_debited_at_the_batch_price_and_refused_once_spent(key_store, served, database):
    """The embedder's batch_factor is 0.5 (tests/serving.py): each line costs half its online price, debited in the
    checkpoint that bills it; once the credit is spent the later lines get the online 429, and a spent key cannot
    create a batch."""
    from decimal import Decimal

    from serve_app.accounts.credit.book import CreditBook
    from serve_app.accounts.store import usage_debits
    from tests.serving import TEST_PRICES

    credit = Decimal("0.0000002")  # a handful of lines at 0.01 per 1M tokens
    key, secret = key_store.create("batches-prepaid", credit=str(credit))
    client = OpenAI(base_url=f"{served.url}/v1", api_key=secret, max_retries=0, timeout=60)
    lines = embedding_lines(60, prefix="paid")
    batch = wait_for(client, submit(client, lines).id, ended, "an end")
    assert batch.status == "completed", batch
    output, errors = results(client, batch)
    assert set(output) | set(errors) == {item["custom_id"] for item in lines}
    assert output and errors, (len(output), len(errors))
    for item in errors.values():
        assert item["response"]["status_code"] == 429
        assert item["response"]["body"]["error"]["code"] == "insufficient_quota"
    rows = ledger_rows(database, batch.id)
    assert len(rows) == len(output)
    with database.connect() as connection:
        debits = {row.request_id: row.amount for row in
                  connection.execute(select(usage_debits).where(usage_debits.c.key_id == key.id))}
    half = Decimal(str(TEST_PRICES[EMBEDDER]["per_1m_tokens"])) * Decimal(str(TEST_PRICES[EMBEDDER]["batch_factor"]))
    assert debits == {row["request_id"]: Decimal(row["input_tokens"]) * half / 1_000_000 for row in rows}
    balance = CreditBook(database).balances([key.id])[key.id]
    assert balance.balance == credit - sum(debits.values()) and balance.balance <= 0
    deadline = time.monotonic() + 10  # the gateway replicas take the spent balance at their next key reload
    while True:
        try:
            submit(client, embedding_lines(1, prefix="after"))
        except APIStatusError as refused:
            assert refused.status_code == 429 and refused.response.json()["error"]["code"] == "insufficient_quota"
            break
        assert time.monotonic() < deadline, "a spent key could still create batches"
        time.sleep(0.5)


def test_bad_lines_get_their_error_in_the_error_file_and_the_rest_are_served(alice, database):
    key_id, client = alice
    lines = [*embedding_lines(2),
             line("unknown-model", "/v1/embeddings", {"model": "no-such-model", "input": "x"}),
             line("empty-input", "/v1/embeddings", {"model": EMBEDDER, "input": []}),
             line("wrong-type", "/v1/embeddings", {"model": EMBEDDER, "input": 42}),
             line("rerank-model", "/v1/embeddings", {"model": RERANKER, "input": "x"})]
    batch = wait_for(client, submit(client, lines).id, ended, "an end")
    assert batch.status == "completed" and batch.request_counts.failed == 4, batch
    assert_exactly_once(client, database, batch, lines, key_id)
    _, errors = results(client, batch)
    statuses = {custom_id: item["response"]["status_code"] for custom_id, item in errors.items()}
    assert statuses == {"unknown-model": 404, "empty-input": 400, "wrong-type": 400, "rerank-model": 400}
    for item in errors.values():
        error = item["response"]["body"]["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"] and item["error"] is None
    assert errors["unknown-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert errors["wrong-type"]["response"]["body"]["error"]["param"] == "input"


@pytest.mark.parametrize("content, code, line_number", [
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}\nnot json at all\n',
     "invalid_json_line", 2),
    (jsonl([*embedding_lines(2), line("other", "/v1/rerank", {"model": RERANKER})]), "invalid_url", 3),
    (jsonl([*embedding_lines(2), embedding_lines(1)[0]]), "duplicate_custom_id", 3),
    (jsonl([{"custom_id": "a", "url": "/v1/embeddings", "body": {}}]), "missing_required_parameter", 1),
], ids=["not-jsonl", "another-endpoint", "duplicate-custom-id", "no-method"])
def test_a_bad_file_fails_the_batch_at_validating_naming_the_line(alice, database, content, code, line_number):
    _, client = alice
    batch = wait_for(client, submit(client, content).id, ended, "an end")
    assert batch.status == "failed" and batch.failed_at and batch.in_progress_at is None, batch
    error = batch.errors.data[0]
    assert (error.code, error.line) == (code, line_number) and error.message
    assert batch.output_file_id is None and batch.error_file_id is None and not ledger_rows(database, batch.id)


def test_limits_refuse_at_upload_or_create(alice, served):
    _, client = alice
    with pytest.raises(APIStatusError) as too_many_lines:
        client.files.create(file=("big.jsonl", jsonl(embedding_lines(TEST_MAX_BATCH_LINES + 1))), purpose="batch")
    assert too_many_lines.value.status_code == 413 and error_of(too_many_lines)["code"] == "too_many_lines"
    with pytest.raises(APIStatusError) as too_large:
        client.files.create(file=("big.jsonl", b"x" * (TEST_MAX_BATCH_FILE_BYTES + 1)), purpose="batch")
    assert too_large.value.status_code == 413
    inputs = [line(f"i{n}", "/v1/embeddings", {"model": EMBEDDER, "input": ["a"] * 1000})
              for n in range(TEST_MAX_BATCH_EMBEDDING_INPUTS // 1000 + 1)]
    with pytest.raises(APIStatusError) as too_many_inputs:
        submit(client, inputs)
    assert too_many_inputs.value.status_code == 400 and error_of(too_many_inputs)["param"] == "input_file_id"
    uploaded = client.files.create(file=("ok.jsonl", jsonl(embedding_lines(1))), purpose="batch")
    for options, param in [({"endpoint": "/v1/chat/completions"}, "endpoint"), ({"completion_window": "1h"},
                                                                                 "completion_window")]:
        with pytest.raises(APIStatusError) as refused:
            client.batches.create(**{"input_file_id": uploaded.id, "endpoint": "/v1/embeddings",
                                     "completion_window": "24h", **options})
        assert refused.value.status_code == 400 and error_of(refused)["param"] == param
    with pytest.raises(APIStatusError) as wrong_purpose:
        client.files.create(file=("ok.jsonl", jsonl(embedding_lines(1))), purpose="fine-tune")
    assert wrong_purpose.value.status_code == 400


def test_files_and_batches_belong_to_their_key(alice, bob, served, admin_headers):
    _, mine = alice
    _, theirs = bob
    batch = wait_for(mine, submit(mine, embedding_lines(1)).id, ended, "an end")
    file_id = batch.input_file_id
    for call in (lambda: theirs.files.retrieve(file_id), lambda: theirs.files.content(file_id),
                 lambda: theirs.files.delete(file_id), lambda: theirs.batches.retrieve(batch.id),
                 lambda: theirs.batches.cancel(batch.id), lambda: theirs.files.retrieve(batch.output_file_id),
                 lambda: submit_from(theirs, file_id)):
        with pytest.raises(NotFoundError):
            call()
    assert file_id not in {f.id for f in theirs.files.list()} and batch.id not in {b.id for b in theirs.batches.list()}
    assert file_id in {f.id for f in mine.files.list()} and batch.id in {b.id for b in mine.batches.list()}
    admin = OpenAI(base_url=f"{served.url}/v1", api_key=admin_headers["Authorization"].split()[1], max_retries=0)
    assert admin.batches.retrieve(batch.id).id == batch.id and admin.files.content(batch.output_file_id).content
    assert batch.id in {b.id for b in admin.batches.list(limit=100)}
    assert mine.files.delete(file_id).deleted and file_id not in {f.id for f in mine.files.list()}


def submit_from(client: OpenAI, file_id: str):
    return client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")


def test_lists_page_with_after(alice):
    _, client = alice
    created = [submit(client, embedding_lines(1, prefix=f"page{n}")).id for n in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == created[::-1][:2] and first.has_more
    following = client.batches.list(limit=2, after=first.data[-1].id)
    assert following.data[0].id == created[0]
    every = [b.id for b in client.batches.list(limit=2)]  # iterating, the SDK follows `after` page by page
    assert every[:3] == created[::-1] and len(every) == len(set(every))
    for batch_id in created:
        wait_for(client, batch_id, ended, "an end")


# ---- stopping and crashing ------------------------------------------------------------------------------------

def test_cancel_while_running_keeps_the_output_and_accounts_for_every_line(alice, database):
    key_id, client = alice
    lines = embedding_lines(TEST_MAX_BATCH_LINES, prefix="cancel")
    batch = wait_until_running(client, submit(client, lines).id)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = wait_for(client, batch.id, ended, "an end")
    assert batch.status == "cancelled" and batch.cancelled_at, batch
    assert 0 < batch.request_counts.completed < len(lines), batch.request_counts
    assert_exactly_once(client, database, batch, lines, key_id)
    _, errors = results(client, batch)
    assert {item["error"]["code"] for item in errors.values()} == {"batch_cancelled"}
    assert all(item["response"] is None for item in errors.values())
    assert client.batches.cancel(batch.id).status == "cancelled"  # a repeated cancel answers the same
    with pytest.raises(APIStatusError) as completed:
        client.batches.cancel(wait_for(client, submit(client, embedding_lines(1, prefix="done")).id, ended,
                                       "an end").id)
    assert completed.value.status_code == 400 and error_of(completed)["code"] == "batch_not_cancellable"


def test_a_batch_past_its_window_expires_with_its_partial_output(alice, database):
    key_id, client = alice
    lines = embedding_lines(TEST_MAX_BATCH_LINES, prefix="expire")
    batch = wait_until_running(client, submit(client, lines).id)
    with database.begin() as connection:  # the 24 h window ran out (nothing else moves a batch's clock)
        connection.execute(update(batches_table).where(batches_table.c.id == batch.id)
                           .values(expires_at=int(time.time()) - 1))
    batch = wait_for(client, batch.id, ended, "an end")
    assert batch.status == "expired" and batch.expired_at, batch
    assert 0 < batch.request_counts.completed < len(lines)
    assert_exactly_once(client, database, batch, lines, key_id)
    _, errors = results(client, batch)
    assert {item["error"]["code"] for item in errors.values()} == {"batch_expired"}


def runner_status(runner) -> dict:
    """The runner replica's status; a handle may first try the replica that was killed."""
    for _ in range(20):
        try:
            return runner.status.remote().result(timeout_s=10)
        except Exception:  # noqa: BLE001 - the dead replica, until the handle learns of the new one
            time.sleep(0.5)
    return runner.status.remote().result(timeout_s=10)


def test_a_sigkilled_runner_resumes_with_no_line_lost_or_billed_twice(alice, database, served):
    from ray import serve

    key_id, client = alice
    runner = serve.get_deployment_handle("BatchRunner", app_name="gateway")
    before = runner_status(runner)
    lines = embedding_lines(TEST_MAX_BATCH_LINES // 2, prefix="kill")
    batch = wait_until_running(client, submit(client, lines).id)
    assert batch.request_counts.completed < len(lines), "the batch ended before the runner could be killed"
    os.kill(before["pid"], signal.SIGKILL)
    batch = wait_for(client, batch.id, ended, "an end", timeout_s=180)
    assert batch.status == "completed" and batch.request_counts.failed == 0, batch
    after = runner_status(runner)
    assert after["pid"] != before["pid"] and after["batches_resumed"] >= 1, after
    assert_exactly_once(client, database, batch, lines, key_id)


# ---- storage on S3 ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_server():
    """A real S3 API (moto in server mode) on 127.0.0.1, with one bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="qwen3-batches")
    try:
        yield endpoint, s3
    finally:
        server.stop()


def test_files_on_s3_storage(alice, served, serve_config, database, s3_server):
    endpoint, s3 = s3_server
    key_id, client = alice
    config = copy.deepcopy(serve_config)
    gateway = application(config, "gateway")
    # Credentials as on a cluster node: from the environment of the gateway and runner processes (tests/conftest.py
    # sets test ones before Ray starts), never from the config.
    gateway["args"]["batches"]["storage"] = {"kind": "s3", "url": "s3://qwen3-batches/serve", "endpoint_url": endpoint,
                                             "region": "us-east-1"}
    served.deploy(config)
    try:
        lines = embedding_lines(20, prefix="s3")
        batch = wait_for(client, submit(client, lines).id, ended, "an end")
        assert batch.status == "completed", batch
        output = assert_exactly_once(client, database, batch, lines, key_id)
        stored = {item["Key"] for item in s3.list_objects_v2(Bucket="qwen3-batches", Prefix="serve/")["Contents"]}
        assert f"serve/files/{batch.input_file_id}/part-00000" in stored
        parts = sorted(key for key in stored if key.startswith(f"serve/files/{batch.output_file_id}/"))
        assert len(parts) >= 2, parts  # 20 lines, checkpoints every 8: the output grew part by part
        joined = b"".join(s3.get_object(Bucket="qwen3-batches", Key=key)["Body"].read() for key in parts)
        assert joined == client.files.content(batch.output_file_id).content and len(output) == len(lines)
    finally:
        served.deploy(serve_config)
