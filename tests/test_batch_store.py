"""Batch state on SQLite and PostgreSQL: leases, checkpoints that bill and advance exactly once, the usage column
added to an older ledger table, batch usage priced with the batch factor; and the line format helpers."""

import io
import json
import time
from decimal import Decimal

import pytest
from pydantic import ValidationError
from sqlalchemy import inspect, select, text

from serve_app.accounts import usage_report as usage
from serve_app.accounts.ledger import UsageRecord, usage_totals
from serve_app.accounts.store import connect, usage_records
from serve_app.config import Price
from serve_app.errors import PayloadTooLarge
from serve_app.gateway.batches.lines import copy_upload, line_request_id, validate_input
from serve_app.gateway.batches.store import BatchStore, LeaseLost, batch_files, batches


@pytest.fixture
def store(database_url):
    engine = connect(database_url)
    with engine.begin() as connection:  # the PostgreSQL server is shared by the session
        for table in (usage_records, batches, batch_files):
            connection.execute(table.delete())
    return BatchStore(engine)


def new_batch(store: BatchStore, batch_id: str = "batch_1") -> None:
    store.insert_batch({"id": batch_id, "key_id": "k1", "endpoint": "/v1/embeddings", "input_file_id": "file-in",
                        "completion_window": "24h", "status": "in_progress", "metadata": {"a": "b"}, "errors": None,
                        "created_at": 1, "expires_at": 2**40, "output_file_id": "file-out", "error_file_id": "file-err",
                        "total": 10, "completed": 0, "failed": 0, "input_tokens": 0, "next_line": 0, "next_offset": 0,
                        "output_parts": 0, "error_parts": 0, "output_bytes": 0, "error_bytes": 0})


def line_usage(batch_id: str, position: int) -> UsageRecord:
    return UsageRecord(request_id=line_request_id(batch_id, position), fingerprint="", key_id="k1",
                       model="qwen3-embedding-0.6b", route="/v1/embeddings", input_tokens=10, embeddings=1,
                       dimensions=1024, batch_id=batch_id)


def checkpoint(store, owner, from_line, to_line, lease_s=30.0):
    return store.checkpoint("batch_1", owner, from_line=from_line, to_line=to_line, to_offset=to_line * 100,
                            completed=to_line - from_line, failed=0, input_tokens=10 * (to_line - from_line),
                            output_part_bytes=100, error_part_bytes=None,
                            usage=[line_usage("batch_1", n) for n in range(from_line, to_line)], lease_s=lease_s)


def test_a_chunk_is_checkpointed_and_billed_once_by_the_lease_holder(store):
    new_batch(store)
    now = time.time()
    assert store.claimable(now) == ["batch_1"]
    assert store.claim("batch_1", "runner_a", now, 30) and not store.claim("batch_1", "runner_b", now, 30)
    assert store.claimable(now) == []
    assert checkpoint(store, "runner_a", 0, 4) == ("in_progress", 2**40)
    with pytest.raises(LeaseLost):  # the same chunk again (a stale runner): refused, nothing billed twice
        checkpoint(store, "runner_a", 0, 4)
    with pytest.raises(LeaseLost):  # a runner that does not hold the lease
        checkpoint(store, "runner_b", 4, 6)
    # runner_a stalls past its lease: runner_b takes the batch over and goes on from the saved position.
    assert store.claimable(now + 31) == ["batch_1"] and store.claim("batch_1", "runner_b", now + 31, 30)
    with pytest.raises(LeaseLost):
        checkpoint(store, "runner_a", 4, 6)
    assert checkpoint(store, "runner_b", 4, 10) == ("in_progress", 2**40)
    row = store.get_batch("batch_1")
    assert (row["next_line"], row["next_offset"], row["completed"], row["input_tokens"], row["output_parts"],
            row["output_bytes"]) == (10, 1000, 10, 100, 2, 200)
    with store.engine.connect() as connection:
        billed = connection.execute(select(usage_records.c.request_id, usage_records.c.batch_id)).all()
    assert sorted(billed) == sorted((line_request_id("batch_1", n), "batch_1") for n in range(10))


def test_a_checkpoint_debits_a_prepaid_keys_lines_in_its_transaction_and_a_refused_one_nothing(store):
    """The runner passes the credit hook to each checkpoint: the lines' debits (at the batch price) commit with their
    usage rows, and a checkpoint refused for a lost lease debits nothing."""
    from types import SimpleNamespace

    from serve_app.accounts.credit.book import CreditBook
    from serve_app.accounts.credit.guard import CreditGuard
    from serve_app.accounts.keys import KeyStore
    from serve_app.accounts.store import usage_debits

    with store.engine.begin() as connection:
        connection.execute(usage_debits.delete())
    key, _ = KeyStore(store.engine).create("batch-prepaid", credit="1")
    guard = CreditGuard(CreditBook(store.engine))
    guard.load([key.id])
    guard.pricing.note(SimpleNamespace(name="qwen3-embedding-0.6b", deployed_at=1.0,
                                       facts={"price": {"per_1m_tokens": "0.02", "batch_factor": "0.5"}}))
    new_batch(store)
    store.claim("batch_1", "runner_a", time.time(), 30)

    def paid_checkpoint(owner, from_line, to_line):
        usage = [UsageRecord(**{**vars(line_usage("batch_1", n)), "key_id": key.id}) for n in range(from_line, to_line)]
        return store.checkpoint("batch_1", owner, from_line=from_line, to_line=to_line, to_offset=to_line * 100,
                                completed=to_line - from_line, failed=0, input_tokens=10 * (to_line - from_line),
                                output_part_bytes=100, error_part_bytes=None, usage=usage, lease_s=30,
                                with_rows=guard.with_rows)

    paid_checkpoint("runner_a", 0, 3)
    with pytest.raises(LeaseLost):
        paid_checkpoint("runner_a", 0, 3)  # the same chunk again
    with store.engine.connect() as connection:
        debits = dict(connection.execute(select(usage_debits.c.request_id, usage_debits.c.amount)).all())
    # 10 tokens a line at half of 0.02 per 1M tokens.
    assert debits == {line_request_id("batch_1", n): Decimal("0.0000001") for n in range(3)}
    assert guard.balance(key.id).balance == Decimal("0.9999997")  # the hook's view, taken once it committed
    assert CreditBook(store.engine).balances([key.id])[key.id].balance == Decimal("0.9999997")


def test_a_cancel_reaches_the_runner_through_its_heartbeat_and_checkpoint(store):
    new_batch(store)
    store.claim("batch_1", "runner_a", time.time(), 30)
    assert store.request_cancel("batch_1") and not store.request_cancel("batch_1")
    assert store.heartbeat("runner_a", ["batch_1"], time.time(), 30) == {"batch_1": "cancelling"}
    assert store.heartbeat("runner_b", ["batch_1"], time.time(), 30) == {}
    assert checkpoint(store, "runner_a", 0, 2)[0] == "cancelling"
    files = [{"id": "file-out", "key_id": "k1", "purpose": "batch_output", "filename": "out.jsonl", "bytes": 100,
              "parts": 1, "lines": 2, "embedding_inputs": 0, "created_at": 5}]
    assert store.finish("batch_1", "runner_a", "cancelled", files, cancelled_at=5)
    assert not store.finish("batch_1", "runner_a", "cancelled", files, cancelled_at=5)  # ended: once
    assert store.get_batch("batch_1")["status"] == "cancelled" and store.get_file("file-out")["parts"] == 1


def test_lists_are_pages_newest_first_per_key(store):
    for n in range(5):
        new_batch(store, f"batch_{n}")
    page, more = store.list_batches("k1", False, limit=2, after=None)
    assert [row["id"] for row in page] == ["batch_4", "batch_3"] and more
    page, more = store.list_batches("k1", False, limit=10, after="batch_3")
    assert [row["id"] for row in page] == ["batch_2", "batch_1", "batch_0"] and not more
    assert store.list_batches("k2", False, limit=10, after=None) == ([], False)
    assert len(store.list_batches("k2", True, limit=10, after=None)[0]) == 5  # an admin sees every key's


def test_an_older_usage_table_gets_the_batch_column(database_url):
    engine = connect(database_url)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE usage_records DROP COLUMN batch_id"))
    assert "batch_id" not in {c["name"] for c in inspect(engine).get_columns("usage_records")}
    engine = connect(database_url)  # a gateway of this version starting on that database
    assert "batch_id" in {c["name"] for c in inspect(engine).get_columns("usage_records")}


def test_batch_usage_is_reported_apart_and_priced_with_the_batch_factor(store):
    from serve_app.accounts.ledger import insert_usage

    online = UsageRecord(request_id="req_online", fingerprint="", key_id="k1", model="qwen3-embedding-0.6b",
                         route="/v1/embeddings", input_tokens=1_000_000, embeddings=1)
    with store.engine.begin() as connection:
        insert_usage(connection, [online, *(line_usage("batch_1", n) for n in range(3))])
        insert_usage(connection, [line_usage("batch_1", 0)])  # the same line again: ignored
    totals = usage_totals(store.engine)
    assert [(row["batch"], row["requests"], row["input_tokens"]) for row in totals] == [(False, 1, 1_000_000),
                                                                                        (True, 3, 30)]
    prices = {"qwen3-embedding-0.6b": Price(per_1m_tokens=0.02, batch_factor=0.5)}
    by_batch = usage.report_rows(totals, ("batch",), {}, prices)
    # Exact decimal text: 30 batch tokens at half of 0.02 per 1M.
    assert [(row["batch"], row["amount"]) for row in by_batch] == [(False, "0.02"), (True, "0.0000003")]
    whole = usage.report_rows(totals, ("model",), {}, prices)
    assert whole[0]["amount"] == "0.0200003" and whole[0]["requests"] == 4


def test_a_batch_factor_keeps_every_cost_a_whole_number_of_credit_units():
    half = Price(per_1m_tokens="0.02", batch_factor="0.5")
    assert half.cost({"documents": 0, "input_tokens": 3, "batch_id": "batch_1"}) == Decimal("0.00000003")
    assert half.cost({"documents": 0, "input_tokens": 3, "batch_id": None}) == Decimal("0.00000006")
    # 0.000001 per 1M tokens is 10^-12 per token; half of it cannot be held exactly: refused at config time.
    with pytest.raises(ValidationError, match="batch_factor"):
        Price(per_1m_tokens="0.000001", batch_factor="0.5")
    with pytest.raises(ValidationError, match="batch_factor"):
        Price(per_1k_documents="0.000000001", batch_factor="0.25")
    Price(per_1k_documents="0.000000002", batch_factor="0.5")


# ---- lines ---------------------------------------------------------------------------------------------------------

def test_an_upload_is_counted_as_it_streams():
    lines = [json.dumps({"custom_id": str(n), "method": "POST", "url": "/v1/embeddings",
                         "body": {"input": ["a", "b"] if n % 2 else "a"}}) for n in range(5)]
    data = ("\n".join(lines)).encode()  # no final newline: the last line still counts
    sink = io.BytesIO()
    stats = copy_upload(io.BytesIO(data), sink, max_bytes=len(data), max_lines=5)
    assert (stats.bytes, stats.lines, stats.embedding_inputs, sink.getvalue()) == (len(data), 5, 7, data)
    with pytest.raises(PayloadTooLarge):
        copy_upload(io.BytesIO(data), io.BytesIO(), max_bytes=len(data) - 1, max_lines=5)
    with pytest.raises(PayloadTooLarge):
        copy_upload(io.BytesIO(data + b"\n"), io.BytesIO(), max_bytes=10**6, max_lines=4)
    # Cohere's /v2/embed bodies count their texts (or inputs); rerank lines count nothing.
    cohere = [{"custom_id": "t", "method": "POST", "url": "/v2/embed", "body": {"texts": ["a", "b", "c"]}},
              {"custom_id": "i", "method": "POST", "url": "/v2/embed",
               "body": {"inputs": [{"content": [{"type": "text", "text": "a"}]}] * 2}},
              {"custom_id": "r", "method": "POST", "url": "/v1/rerank", "body": {"documents": ["a", "b"]}}]
    data = "".join(json.dumps(item) + "\n" for item in cohere).encode()
    assert copy_upload(io.BytesIO(data), io.BytesIO(), max_bytes=len(data), max_lines=3).embedding_inputs == 5
    total, errors = validate_input(iter(data.splitlines()[:2]), "/v2/embed", max_lines=3, max_embedding_inputs=4)
    assert total == 2 and [error["code"] for error in errors] == ["too_many_embedding_inputs"]


def test_validation_names_each_bad_line():
    good = {"custom_id": "a", "method": "POST", "url": "/v1/rerank", "body": {}}
    raw = [json.dumps(good), "[1, 2]", json.dumps({**good, "method": "GET", "custom_id": "b"}),
           json.dumps({**good, "custom_id": 7}), json.dumps({**good, "body": "text", "custom_id": "c"}),
           json.dumps(good), ""]
    total, errors = validate_input((line.encode() + b"\n" for line in raw), "/v1/rerank", 100, 100)
    assert total == 7
    assert [(error["line"], error["code"]) for error in errors] == [
        (2, "invalid_json_line"), (3, "invalid_method"), (4, "invalid_custom_id"), (5, "invalid_request"),
        (6, "duplicate_custom_id"), (7, "invalid_json_line")]
    assert validate_input(iter([]), "/v1/rerank", 100, 100)[1][0]["code"] == "empty_file"
