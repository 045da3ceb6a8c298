"""The usage ledger on SQLite and PostgreSQL: group commit, exactly-once ids, totals per day, the report CLI."""

import asyncio
import csv
import io
import json
import threading
import time
from datetime import date, datetime, timezone
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from serve_app.accounts import usage_report as usage
from serve_app.accounts.keys import KeyStore
from serve_app.accounts.ledger import Ledger, UsageRecord, request_id, sum_totals, usage_totals
from serve_app.accounts.store import api_keys, connect, usage_records
from serve_app.errors import IdempotencyConflict


@pytest.fixture
def engine(database_url):
    engine = connect(database_url)
    with engine.begin() as connection:  # the PostgreSQL server is shared by the session
        connection.execute(usage_records.delete())
        connection.execute(api_keys.delete())
    return engine


def record(n: int, **fields) -> UsageRecord:
    values = dict(request_id=f"req_{n}", fingerprint=f"body-{n}", key_id="k1", model="qwen3-reranker-0.6b", route="/v1/rerank",
                  input_tokens=100 + n, documents=3, search_units=1)
    values.update(fields)
    return UsageRecord(**values)


def test_concurrent_records_are_group_committed_once_each(engine):
    ledger = Ledger(engine)
    records = [record(n) for n in range(300)]
    retried = [record(n) for n in range(0, 300, 3)]  # the same request ids again: a retry is billed once

    async def write_all():
        await asyncio.gather(*(ledger.record(r) for r in records + retried))

    asyncio.run(write_all())
    with engine.connect() as connection:
        count, tokens = connection.execute(select(func.count(), func.sum(usage_records.c.input_tokens))).one()
    assert count == 300
    assert tokens == sum(r.input_tokens for r in records)
    assert ledger.records == 400 and ledger.commits < 400 / 4, f"{ledger.commits} commits: no group commit"


def test_an_idempotency_key_reused_for_a_different_request_is_refused(engine):
    ledger = Ledger(engine)

    async def scenario():
        await ledger.record(record(1))
        await ledger.record(record(1))  # a retry of the same request: fine, still one row
        with pytest.raises(IdempotencyConflict):
            await ledger.record(record(1, fingerprint="another body", input_tokens=999))
        # Within one group commit too: the first of two different requests with one id wins.
        results = await asyncio.gather(ledger.record(record(2)), ledger.record(record(2, fingerprint="other")),
                                       return_exceptions=True)
        assert results[0] is None and isinstance(results[1], IdempotencyConflict)

    asyncio.run(scenario())
    assert sum_totals(usage_totals(engine)) == {"requests": 2, "input_tokens": 101 + 102, "documents": 6,
                                                "search_units": 2, "embeddings": 0}


def test_a_failed_commit_fails_every_waiting_request(engine):
    ledger = Ledger(engine)
    engine.dispose()

    async def write_with_the_table_gone():
        with engine.begin() as connection:
            usage_records.drop(connection)
        try:
            results = await asyncio.gather(*(ledger.record(record(n)) for n in range(5)), return_exceptions=True)
        finally:
            with engine.begin() as connection:
                usage_records.create(connection)
        return results

    results = asyncio.run(write_with_the_table_gone())
    assert all(isinstance(result, Exception) for result in results)

    asyncio.run(ledger.record(record(99)))  # the writer survives a failed commit
    assert usage_totals(engine)[0]["requests"] == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the writer is ended on purpose
def test_callers_on_any_event_loop_are_answered_and_a_dead_writer_is_replaced(engine):
    """The writer is a thread bound to no event loop: callers on successive loops and on two loops at once all get
    their answers. Whatever ends the writer fails only the batch it held; the rows still queued are written by its
    successor and their callers answered."""
    ledger = Ledger(engine)

    async def write(numbers):
        # Bounded: a caller nobody answers would otherwise wait forever.
        await asyncio.wait_for(asyncio.gather(*(ledger.record(record(n)) for n in numbers)), timeout=10)

    asyncio.run(write([1]))
    first_writer = ledger._writer
    asyncio.run(write([2, 3, 4]))  # a new loop, the same writer
    assert ledger._writer is first_writer and first_writer.is_alive()
    loops = [threading.Thread(target=asyncio.run, args=(write(range(start, start + 50)),)) for start in (10, 100)]
    for thread in loops:
        thread.start()
    for thread in loops:
        thread.join(timeout=20)
    assert sum_totals(usage_totals(engine))["requests"] == 104

    class WriterKilled(BaseException):
        pass

    commit, calls = ledger._commit, []

    def dies_once(rows):
        calls.append(len(rows))
        if len(calls) == 1:
            time.sleep(0.2)  # the rows below queue up behind this batch
            raise WriterKilled()
        return commit(rows)

    ledger._commit = dies_once

    async def killed_then_replaced():
        doomed = asyncio.ensure_future(ledger.record(record(500)))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(ledger.record(record(n))) for n in (501, 502)]
        with pytest.raises(WriterKilled):
            await asyncio.wait_for(doomed, timeout=10)
        await asyncio.wait_for(asyncio.gather(*queued), timeout=10)

    asyncio.run(killed_then_replaced())
    # The old thread ends right after handing over (its exception goes through threading.excepthook, which can
    # take longer than the new writer's commit): wait for it rather than race it.
    first_writer.join(timeout=10)
    assert ledger._writer is not first_writer and ledger._writer.is_alive() and not first_writer.is_alive()
    assert sum_totals(usage_totals(engine))["requests"] == 106


def test_request_ids_from_idempotency_keys_are_scoped_per_api_key():
    assert request_id("k1", "abc", fresh="x") == request_id("k1", "abc", fresh="y")
    assert request_id("k1", "abc", fresh="x") != request_id("k2", "abc", fresh="x")
    assert request_id("k1", None, fresh="req_fresh") == "req_fresh"


def test_totals_per_key_model_and_utc_day(engine):
    ledger = Ledger(engine)
    nov_1 = datetime(2026, 11, 1, 23, 59, 59, tzinfo=timezone.utc)
    nov_2 = datetime(2026, 11, 2, 0, 0, 1, tzinfo=timezone.utc)
    rows = [record(1, created_at=nov_1), record(2, created_at=nov_1, documents=250, search_units=3),
            record(3, created_at=nov_2),
            record(4, created_at=nov_2, key_id="k2", model="qwen3-embedding-0.6b", route="/v1/embeddings",
                   documents=0, search_units=0, embeddings=4, dimensions=1024)]

    async def write():
        await asyncio.gather(*(ledger.record(r) for r in rows))

    asyncio.run(write())
    totals = usage_totals(engine)
    assert [(t["key_id"], t["model"], t["day"], t["requests"]) for t in totals] == [
        ("k1", "qwen3-reranker-0.6b", "2026-11-01", 2),
        ("k1", "qwen3-reranker-0.6b", "2026-11-02", 1),
        ("k2", "qwen3-embedding-0.6b", "2026-11-02", 1)]
    assert totals[0]["input_tokens"] == 101 + 102 and totals[0]["documents"] == 253
    assert totals[0]["search_units"] == 4 and totals[2]["embeddings"] == 4
    assert sum_totals(usage_totals(engine, key_id="k1"))["requests"] == 3
    assert sum_totals(usage_totals(engine, since=date(2026, 11, 2)))["requests"] == 2
    assert sum_totals(usage_totals(engine, until=date(2026, 11, 1)))["requests"] == 2


def test_report_cli_groups_formats_and_prices(engine, database_url, tmp_path, capsys):
    keys = KeyStore(engine)
    acme, _ = keys.create("acme")
    ledger = Ledger(engine)
    day = datetime(2026, 11, 5, 12, tzinfo=timezone.utc)
    rows = [record(1, key_id=acme.id, documents=2000, created_at=day),
            record(2, key_id=acme.id, model="qwen3-embedding-0.6b", route="/v1/embeddings", documents=0,
                   search_units=0, input_tokens=3_000_000, embeddings=10, created_at=day)]

    async def write():
        await asyncio.gather(*(ledger.record(r) for r in rows))

    asyncio.run(write())
    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml").read_text())
    for app in config["applications"]:
        if app["import_path"] == "serve_app.app:gateway_app":
            app["args"]["database_url"] = database_url
        elif app["args"]["task"] == "rerank":
            app["args"]["name"] = app["name"] = "qwen3-reranker-0.6b"
            app["args"]["price"] = {"per_1k_documents": 0.05}
        else:
            app["args"]["name"] = app["name"] = "qwen3-embedding-0.6b"
            app["args"]["price"] = {"per_1m_tokens": 0.02}
    config_path = tmp_path / "priced.yaml"
    config_path.write_text(yaml.safe_dump(config))

    assert usage.main(["--config", str(config_path), "--by", "key", "--format", "json"]) == 0
    [by_key] = json.loads(capsys.readouterr().out)
    assert by_key["key"] == acme.id and by_key["key_name"] == "acme" and by_key["requests"] == 2
    assert by_key["amount"] == "0.16"  # 2000 documents at 0.05 per 1,000 + 3M tokens at 0.02 per 1M, exactly

    assert usage.main(["--db", database_url, "--by", "model,day", "--format", "csv"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {(r["model"], r["day"], r["input_tokens"]) for r in parsed} == {
        ("qwen3-reranker-0.6b", "2026-11-05", "101"), ("qwen3-embedding-0.6b", "2026-11-05", "3000000")}
    assert "amount" not in parsed[0]  # no prices without a config

    assert usage.main(["--db", database_url, "--since", "2026-11-06"]) == 0
    assert "no usage recorded" in capsys.readouterr().out
    assert usage.main(["--db", database_url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["key", "key_name", "model", "day", "requests", "input_tokens", "documents",
                                "search_units", "embeddings"]
    assert len(table) == 4


def test_report_cli_rejects_unknown_groupings(database_url):
    with pytest.raises(SystemExit):
        usage.main(["--db", database_url, "--by", "customer"])


def test_a_committed_row_reads_back_field_for_field(engine):
    """The insert runs as precompiled driver SQL: every field, None and the UTC timestamp included, must read back
    through SQLAlchemy exactly as it was written."""
    written = [record(1, trace_id=None, dimensions=None, latency_ms=1.25,
                      created_at=datetime(2026, 12, 2, 4, 5, 6, 789012, tzinfo=timezone.utc)),
               record(2, key_id=None, trace_id="serve-trace", documents=0, search_units=0, embeddings=4,
                      dimensions=256)]
    ledger = Ledger(engine)

    async def write():
        await asyncio.gather(*(ledger.record(row) for row in written))

    asyncio.run(write())
    with engine.connect() as connection:
        stored = connection.execute(select(usage_records).order_by(usage_records.c.seq)).mappings().all()
    for row, expected in zip(stored, written, strict=True):
        values = dict(row)
        values.pop("seq")
        created = values.pop("created_at")
        assert created.replace(tzinfo=created.tzinfo or timezone.utc) == expected.created_at
        assert values == {k: v for k, v in expected.__dict__.items() if k != "created_at"}
    # Stored exactly as SQLAlchemy's own insert stores it (SQLite keeps timestamps as text), so rows written
    # before and after this fast path read, sort and group alike.
    with engine.begin() as connection:
        connection.execute(usage_records.insert(), [{**written[0].__dict__, "request_id": "req_core"}])
        raw = connection.exec_driver_sql("SELECT request_id, created_at, dimensions, latency_ms FROM usage_records "
                                         "WHERE request_id IN ('req_1', 'req_core') ORDER BY request_id").all()
    assert raw[0][1:] == raw[1][1:]
