"""Prepaid credit on SQLite and PostgreSQL: exact amounts and prices, the journal, debits written with the ledger's
rows (balance = journal - priced usage, exactly, under two concurrent writers), the gateway's balance views, the
CLIs. The live gateway's side is tests/test_credit_serving.py."""

import asyncio
import json
import random
import threading
from decimal import Decimal

import pytest
import yaml
from sqlalchemy import select

from serve_app.accounts import keys_cli as keys
from serve_app.accounts import usage_report as usage
from serve_app.accounts.credit.amounts import InvalidAmount, decimal_text, from_units, parse_amount, to_units
from serve_app.accounts.credit.book import CreditBook, InvalidCreditEntry, UnknownKey
from serve_app.accounts.credit.guard import CreditGuard
from serve_app.accounts.keys import KeyStore
from serve_app.accounts.ledger import Ledger, UsageRecord
from serve_app.accounts.store import api_keys, connect, credit_journal, credit_totals, usage_debits, usage_records
from serve_app.config import ModelConfig, Price
from serve_app.errors import IdempotencyConflict, InsufficientQuota
from serve_app.gateway.directory import ModelEntry

RERANKER_PRICE = {"per_1k_documents": "0.05"}
EMBEDDER_PRICE = {"per_1m_tokens": "0.02"}


@pytest.fixture
def engine(database_url):
    engine = connect(database_url)
    with engine.begin() as connection:  # the PostgreSQL server is shared by the session
        for table in (usage_records, usage_debits, credit_journal, credit_totals, api_keys):
            connection.execute(table.delete())
    return engine


# ---- amounts and prices -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, expected", [
    ("25", "25"), ("2.50", "2.5"), (" 7 ", "7"), (3, "3"), (Decimal("0.000000000001"), "0.000000000001"),
    ("1000000", "1000000"), ("1.000000000000000", "1"),
])
def test_amounts_are_read_exactly(given, expected):
    assert decimal_text(parse_amount(given)) == expected


@pytest.mark.parametrize("given, words", [
    ("abc", "decimal number"), ("", "decimal number"), (True, "decimal number"), (0.1, "decimal number"),
    (None, "decimal number"), ("NaN", "finite"), ("Infinity", "finite"), ("-5", "negative"), ("0", "zero"),
    ("0.0000000000001", "12 decimal places"), ("1000000.01", "at most 1000000"), ("1e400", "at most"),
])
def test_bad_amounts_are_refused_with_a_reason(given, words):
    with pytest.raises(InvalidAmount) as refused:
        parse_amount(given)
    assert words in str(refused.value)


def test_signs_and_zero_need_asking_for():
    assert parse_amount("-5", allow_negative=True) == Decimal(-5)
    assert parse_amount("0", allow_zero=True) == 0 and not parse_amount("-0", allow_zero=True).is_signed()
    assert to_units(Decimal("1.5")) == 1_500_000_000_000 and from_units(1) == Decimal("1E-12")
    assert decimal_text(Decimal("-0.00000002")) == "-0.00000002" and decimal_text(Decimal("1E+2")) == "100"


def test_prices_are_exact_decimals_and_a_cost_takes_the_usage_row():
    # YAML numbers arrive as floats; the price must still be the decimal that was written.
    config = yaml.safe_load("price: {per_1k_documents: 0.05}\n")
    price = Price.model_validate(config["price"])
    assert price.per_1k_documents == Decimal("0.05")
    assert price.cost({"documents": 3, "input_tokens": 999}) == Decimal("0.00015")
    embedder = Price.model_validate(yaml.safe_load("{per_1m_tokens: 0.13}"))
    assert embedder.cost({"documents": 0, "input_tokens": 7}) == Decimal("0.00000091")
    # Summing row costs equals costing the summed row: no rounding anywhere.
    rows = [{"documents": n % 7, "input_tokens": 31 * n} for n in range(1000)]
    both = Price(per_1k_documents=Decimal("0.123456789"), per_1m_tokens=Decimal("0.654321"))
    assert sum(both.cost(row) for row in rows) == both.cost(
        {"documents": sum(r["documents"] for r in rows), "input_tokens": sum(r["input_tokens"] for r in rows)})
    for row in rows[:50]:  # and every row's cost is a whole number of the store's units
        to_units(both.cost(row))


@pytest.mark.parametrize("price, field", [
    ({"per_1m_tokens": "0.0000001"}, "per_1m_tokens"), ({"per_1k_documents": "0.0000000001"}, "per_1k_documents"),
    ({"per_1m_tokens": -1}, "per_1m_tokens"), ({}, "price"),
])
def test_a_price_finer_than_the_store_keeps_is_a_config_error(price, field):
    args = {"name": "m", "task": "embed", "source": "/m", "price": price}
    with pytest.raises(ValueError) as refused:
        ModelConfig.model_validate(args)
    assert field in str(refused.value)


# ---- the journal ---------------------------------------------------------------------------------------------------

def test_journal_entries_and_balances(engine):
    store, book = KeyStore(engine), CreditBook(engine)
    prepaid, _ = store.create("prepaid", credit="10", actor="cli:ops")
    unlimited, _ = store.create("unlimited")
    top_up = book.add(prepaid.id, "2.50", "invoice 7", actor="key:admin1")
    correction = book.add(prepaid.id, Decimal("-0.5"), "refund, ticket 3", actor="key:admin1", adjustment=True)
    assert (top_up.kind, top_up.balance_after, correction.kind, correction.balance_after) == (
        "top_up", Decimal("12.5"), "adjustment", Decimal("12"))
    journal = book.journal(prepaid.id)
    assert [(e.kind, e.amount, e.balance_after, e.actor, e.note) for e in journal] == [
        ("initial", Decimal(10), Decimal(10), "cli:ops", "initial credit"),
        ("top_up", Decimal("2.5"), Decimal("12.5"), "key:admin1", "invoice 7"),
        ("adjustment", Decimal("-0.5"), Decimal(12), "key:admin1", "refund, ticket 3")]
    balances = book.balances()
    assert set(balances) == {prepaid.id} and balances[prepaid.id].balance == Decimal(12)
    assert balances[prepaid.id].version == 3
    # The first entry makes an unlimited key a prepaid one.
    book.add(unlimited.id, "1", "trial", actor="cli:ops")
    assert book.balances()[unlimited.id].balance == Decimal(1)
    zero, _ = store.create("zero", credit=0)
    assert book.balances()[zero.id].balance == 0


@pytest.mark.parametrize("call, field", [
    (dict(amount="-5", note="x"), "amount"), (dict(amount="abc", note="x"), "amount"),
    (dict(amount="0", note="x"), "amount"), (dict(amount=True, note="x"), "amount"),
    (dict(amount="5", note=""), "note"), (dict(amount="5", note="  "), "note"), (dict(amount="5", note=None), "note"),
    (dict(amount="5", note="x" * 501), "note"), (dict(amount="0", note="x", adjustment=True), "amount"),
])
def test_bad_credit_entries_are_refused_and_record_nothing(engine, call, field):
    key, _ = KeyStore(engine).create("acme", credit="1")
    book = CreditBook(engine)
    with pytest.raises(InvalidCreditEntry) as refused:
        book.add(key.id, call["amount"], call["note"], actor="t", adjustment=call.get("adjustment", False))
    assert refused.value.field == field
    assert len(book.journal(key.id)) == 1 and book.balances()[key.id].balance == 1


def test_an_unknown_key_gets_no_entry(engine):
    book = CreditBook(engine)
    with pytest.raises(UnknownKey):
        book.add("nope", "5", "x", actor="t")
    assert book.journal() == [] and book.balances() == {}


def test_a_key_with_a_bad_starting_credit_is_not_created(engine):
    store = KeyStore(engine)
    for credit in ("-1", "abc", "0.0000000000001"):
        with pytest.raises(ValueError) as refused:
            store.create("acme", credit=credit)
        assert refused.value.field == "credit"
    assert store.list() == [] and CreditBook(engine).journal() == []


# ---- debits with the ledger's rows ---------------------------------------------------------------------------------

def priced_entry(name: str, price: dict | None) -> ModelEntry:
    return ModelEntry(app_name=name, deployed_at=1.0, facts={"name": name, "task": "rerank", "price": price},
                      handle=None)


def replica(database_url: str) -> tuple[Ledger, CreditGuard]:
    """What one gateway replica has: its own engine, balance views (loaded, as with the keys on a gateway's first
    request), prices and ledger writer."""
    engine = connect(database_url)
    guard = CreditGuard(CreditBook(engine))
    guard.load()
    for name, price in (("reranker", RERANKER_PRICE), ("embedder", EMBEDDER_PRICE), ("free", None)):
        guard.pricing.note(priced_entry(name, price))
    return Ledger(engine, with_rows=guard.with_rows), guard


def usage_row(n: int, key_id: str, *, request_id: str | None = None, fingerprint: str = "") -> UsageRecord:
    model = ("reranker", "embedder", "free")[n % 3]
    return UsageRecord(request_id=request_id or f"req_{n}", fingerprint=fingerprint, key_id=key_id, model=model,
                       route="/v1/rerank", input_tokens=17 + n * 13 % 401, documents=(n % 9) if model != "embedder"
                       else 0, embeddings=n % 4 if model == "embedder" else 0)


def test_balance_equals_journal_minus_priced_ledger_under_two_concurrent_writers(engine, database_url):
    """Two gateway replicas (own engines, own writers, threads) record usage of the same prepaid keys while an
    admin tops them up; some requests are retried on both replicas with one Idempotency-Key and some reuse a key
    for another body (refused). Afterwards every key's balance is its journal's sum minus the exact price of its
    ledger rows, every priced row has exactly one debit, and the running sums equal the rows they sum."""
    store, book = KeyStore(engine), CreditBook(engine)
    prepaid = [store.create(f"prepaid-{n}", credit="0.5")[0].id for n in range(3)]
    unlimited = store.create("unlimited")[0].id
    owners = prepaid + [unlimited]
    rng = random.Random(18)
    workloads: list[list[UsageRecord]] = [[], []]
    for n in range(400):  # each replica serves every key
        workloads[n % 2].append(usage_row(n, owners[n // 2 % 4]))
    for n in range(400, 460):  # retried on both replicas, same Idempotency-Key and body
        row = usage_row(n, owners[n % 4], request_id=f"idem_{n}", fingerprint=f"body-{n}")
        workloads[0].append(row)
        workloads[1].append(row)
    for n in range(400, 460, 5):  # the same keys reused for a different body: refused, never debited
        workloads[rng.randrange(2)].append(usage_row(n + 1000, owners[n % 4], request_id=f"idem_{n}",
                                                     fingerprint="another body"))
    for workload in workloads:
        rng.shuffle(workload)
    replicas = [replica(database_url) for _ in workloads]
    outcomes: list[list] = [[], []]

    def serve(index: int) -> None:
        ledger = replicas[index][0]

        async def record_all():
            return await asyncio.gather(*(ledger.record(row) for row in workloads[index]), return_exceptions=True)

        outcomes[index] = asyncio.run(record_all())

    def top_up() -> None:
        for n in range(12):
            book.add(prepaid[n % 3], f"0.0{n + 1}", f"top-up {n}", actor="key:admin")

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)] + [threading.Thread(target=top_up)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    failures = [o for results in outcomes for o in results if o is not None]
    assert failures and all(isinstance(o, IdempotencyConflict) for o in failures)

    prices = {"reranker": Price.model_validate(RERANKER_PRICE), "embedder": Price.model_validate(EMBEDDER_PRICE)}
    with engine.connect() as connection:
        ledger_rows = [dict(row._mapping) for row in connection.execute(select(usage_records))]
        debits = {row.request_id: row for row in connection.execute(select(usage_debits))}
    assert len(ledger_rows) == 460
    balances = book.balances()
    for key_id in prepaid:
        credited = sum((entry.amount for entry in book.journal(key_id)), Decimal(0))
        rows = [row for row in ledger_rows if row["key_id"] == key_id]
        priced_usage = sum((prices[row["model"]].cost(row) for row in rows if row["model"] in prices), Decimal(0))
        assert priced_usage > 0
        assert balances[key_id].balance == credited - priced_usage  # exactly: Decimals, no tolerance
        assert {request for request, debit in debits.items() if debit.key_id == key_id} == {
            row["request_id"] for row in rows if row["model"] in prices and prices[row["model"]].cost(row) > 0}
    assert all(debit.key_id in prepaid for debit in debits.values())  # the unlimited key is never debited
    for key_id, sums in book.audit().items():
        assert sums["journal"] == sums["credited"] and sums["debits"] == sums["used"], (key_id, sums)
    # Each replica's views are real states of the keys (never ahead of the store), and a reload brings them level.
    for _, guard in replicas:
        for key_id in prepaid:
            view = guard.balance(key_id)
            assert view is not None and view.version <= balances[key_id].version
        guard.load()
        assert {key_id: guard.balance(key_id) for key_id in prepaid} == {key_id: balances[key_id] for key_id in prepaid}


def test_a_failed_commit_debits_nothing(engine, database_url):
    key, _ = KeyStore(engine).create("acme", credit="1")
    ledger, guard = replica(database_url)

    def failing_cost(row):
        raise RuntimeError("no price")  # fails inside the transaction, after the usage rows were inserted

    guard.pricing.cost = failing_cost
    with pytest.raises(RuntimeError):
        asyncio.run(ledger.record(usage_row(3, key.id)))
    with engine.connect() as connection:
        assert connection.execute(select(usage_records)).all() == []
        assert connection.execute(select(usage_debits)).all() == []
    assert CreditBook(engine).balances()[key.id].balance == 1


# ---- the gateway's views -------------------------------------------------------------------------------------------

def test_the_guard_refuses_at_zero_and_keeps_the_newest_view(engine):
    store, book = KeyStore(engine), CreditBook(engine)
    prepaid, _ = store.create("prepaid", credit="0.0001")
    unlimited, _ = store.create("unlimited")
    refusals = []
    guard = CreditGuard(book, on_refusal=lambda: refusals.append(1))
    guard.load()
    guard.admit(prepaid.id)
    guard.admit(unlimited.id)
    newer = book.add(prepaid.id, "-0.0001", "spent by hand", actor="t", adjustment=True)
    assert newer.balance_after == 0
    older = guard.balance(prepaid.id)
    guard.load()
    with pytest.raises(InsufficientQuota) as refused:
        guard.admit(prepaid.id)
    error = refused.value
    assert (error.status, error.type, error.code) == (429, "insufficient_quota", "insufficient_quota")
    assert f"/v1/admin/keys/{prepaid.id}/credit" in error.message and "spent" in error.message
    assert error.headers == {"x-should-retry": "false"} and refusals == [1]
    guard._merge([older])  # an older state arriving late (a commit's view after a reload) changes nothing
    with pytest.raises(InsufficientQuota):
        guard.admit(prepaid.id)
    guard.admit(unlimited.id)  # never refused for credit
    book.add(prepaid.id, "5", "top-up", actor="t")
    guard.load()
    guard.admit(prepaid.id)
    assert refusals == [1, 1]


# ---- CLIs ----------------------------------------------------------------------------------------------------------

def test_key_cli_credit_top_up_journal_and_list(engine, database_url, capsys):
    assert keys.main(["--db", database_url, "create", "--name", "trial", "--credit", "25"]) == 0
    created = capsys.readouterr().out.splitlines()
    key_id = created[0].split()[2]
    assert "credit 25" in created[0]
    assert keys.main(["--db", database_url, "credit", key_id, "--amount", "2.50", "--note", "invoice 9"]) == 0
    assert "balance now 27.5" in capsys.readouterr().out
    assert keys.main(["--db", database_url, "credit", key_id, "--amount", "-5", "--note", "oops"]) == 2
    assert "negative" in capsys.readouterr().err
    assert keys.main(["--db", database_url, "credit", key_id, "--amount", "-5", "--adjust", "--note", "refund"]) == 0
    assert keys.main(["--db", database_url, "credit", "nope", "--amount", "5", "--note", "x"]) == 1
    assert "no API key" in capsys.readouterr().err
    assert keys.main(["--db", database_url, "journal", key_id, "--json"]) == 0
    journal = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["kind"], e["amount"], e["balance"], e["note"]) for e in journal] == [
        ("initial", "25", "25", "initial credit"), ("top_up", "2.5", "27.5", "invoice 9"),
        ("adjustment", "-5", "22.5", "refund")]
    assert all(e["actor"].startswith("cli") for e in journal)
    assert keys.main(["--db", database_url, "journal", key_id]) == 0
    assert "refund" in capsys.readouterr().out
    assert keys.main(["--db", database_url, "create", "--name", "open"]) == 0
    assert keys.main(["--db", database_url, "create", "--name", "bad", "--credit", "x"]) == 2
    assert "credit" in capsys.readouterr().err
    assert keys.main(["--db", database_url, "list", "--json"]) == 0
    listed = {item["name"]: item["balance"] for item in map(json.loads, capsys.readouterr().out.splitlines())}
    assert listed == {"trial": "22.5", "open": None}
    assert keys.main(["--db", database_url, "list"]) == 0
    assert "22.5" in capsys.readouterr().out


def test_usage_cli_reports_balance_credit_added_and_used(engine, database_url, capsys):
    key, _ = KeyStore(engine).create("acme", credit="1")
    ledger, _ = replica(database_url)
    rows = [usage_row(n, key.id) for n in range(30)]

    async def write():
        await asyncio.gather(*(ledger.record(row) for row in rows))

    asyncio.run(write())
    CreditBook(engine).add(key.id, "0.25", "top-up", actor="t")
    prices = {"reranker": Price.model_validate(RERANKER_PRICE), "embedder": Price.model_validate(EMBEDDER_PRICE)}
    used = sum((prices[r.model].cost(vars(r)) for r in rows if r.model in prices), Decimal(0))
    assert usage.main(["--db", database_url, "--credit", "--format", "json"]) == 0
    [report] = json.loads(capsys.readouterr().out)
    assert report == {"key": key.id, "key_name": "acme", "balance": decimal_text(Decimal("1.25") - used),
                      "credit_added": "1.25", "used": decimal_text(used)}
    assert usage.main(["--db", database_url, "--credit", "--since", "2000-01-01", "--until", "2000-01-02"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["key", "key_name", "balance", "credit_added", "used"]
    assert table[2].split()[3:] == ["0", "0"]  # nothing added or used in that period; the balance is today's
