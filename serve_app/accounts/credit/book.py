"""The credit book in the store's database: journal entries, debits, running sums, balances, period summaries.

Running sums (credit_totals) change only by increments in SQL (`used = used + ...`), inside the transaction that
writes the rows they sum, so concurrent writers (gateway replicas, CLIs) never lose an update; rows are written
in key and request order in every transaction, so concurrent writers on PostgreSQL never deadlock on them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, Callable

from sqlalchemy import bindparam, func, literal_column, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from serve_app.accounts.credit.amounts import (SQLITE_MAX_TOTAL, CreditAmount, InvalidAmount, decimal_text, from_units,
                                               parse_amount)
from serve_app.accounts.ledger import day_start
from serve_app.accounts.store import (MAX_CREDIT_NOTE_CHARS, InvalidField, api_keys, credit_journal, credit_totals, now,
                                      usage_debits)

ZERO = Decimal(0)


class UnknownKey(LookupError):
    def __init__(self, key_id: str):
        super().__init__(f"no API key with id {key_id!r}")
        self.key_id = key_id


class InvalidCreditEntry(InvalidField):
    """A credit entry that cannot be recorded as asked."""


@dataclass(frozen=True)
class Balance:
    key_id: str
    credited: Decimal  # the journal's sum
    used: Decimal  # the debits' sum
    version: int  # +1 per change of either

    @property
    def balance(self) -> Decimal:
        return self.credited - self.used


@dataclass(frozen=True)
class JournalEntry:
    seq: int
    key_id: str
    kind: str
    amount: Decimal
    balance_after: Decimal
    note: str
    actor: str
    created_at: datetime


def _insert(connection: Connection, table):
    return (postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert)(table)


def record_entry(connection: Connection, key_id: str, amount: Decimal, *, kind: str, note: str,
                 actor: str) -> JournalEntry:
    """In the caller's transaction: a journal entry and the key's running sum, with the balance the entry left.
    The key's first entry makes it a prepaid key."""
    at = now()
    proposed = _insert(connection, credit_totals).values(key_id=key_id, credited=amount, used=ZERO, version=1,
                                                         updated_at=at)
    upsert = proposed.on_conflict_do_update(
        index_elements=["key_id"],
        set_={"credited": credit_totals.c.credited + proposed.excluded.credited,
              "version": credit_totals.c.version + 1, "updated_at": proposed.excluded.updated_at},
    ).returning(credit_totals.c.credited, credit_totals.c.used)
    credited, used = connection.execute(upsert).one()
    if connection.dialect.name == "sqlite" and abs(credited) > SQLITE_MAX_TOTAL:
        raise InvalidCreditEntry("amount", f"on SQLite a key's credit totals stay within {SQLITE_MAX_TOTAL} "
                                           "(64-bit sums); use PostgreSQL for more")
    row = {"key_id": key_id, "kind": kind, "amount": amount, "balance_after": credited - used, "note": note,
           "actor": actor, "created_at": at}
    seq = connection.execute(credit_journal.insert().values(**row).returning(credit_journal.c.seq)).scalar_one()
    return JournalEntry(seq=seq, **row)


class _DriverStatement:
    """A statement compiled once per dialect and run as driver SQL with its parameters' own bind processing, as the
    ledger runs its insert (serve_app/accounts/ledger.py _DriverInsert): SQLAlchemy's per-execution work costs more than
    the debit itself, and a served request waits on the commit that holds it."""

    def __init__(self, dialect, statement, types: dict[str, Any]):
        compiled = statement.compile(dialect=dialect, column_keys=list(types))
        self.sql = str(compiled)
        self.order = list(compiled.positiontup) if compiled.positional else None
        self.processors = {name: type_.dialect_impl(dialect).bind_processor(dialect) for name, type_ in types.items()}

    def parameters(self, values: dict[str, Any]):
        processed = {name: value if (process := self.processors[name]) is None else process(value)
                     for name, value in values.items()}
        return processed if self.order is None else tuple(processed[name] for name in self.order)

    def execute(self, connection: Connection, values: dict[str, Any] | list[dict[str, Any]]):
        if isinstance(values, list):
            return connection.exec_driver_sql(self.sql, [self.parameters(row) for row in values])
        return connection.exec_driver_sql(self.sql, self.parameters(values))


_debit_statements: dict[tuple[str, str], tuple[_DriverStatement, _DriverStatement]] = {}


def _debit_sql(dialect) -> tuple[_DriverStatement, _DriverStatement]:
    """(insert a debit, add to a key's used sum returning its totals) for this dialect, compiled once."""
    known = _debit_statements.get((dialect.name, dialect.driver))
    if known is None:
        columns = usage_debits.c
        insert_debit = _DriverStatement(dialect, usage_debits.insert(), {
            "request_id": columns.request_id.type, "key_id": columns.key_id.type, "amount": columns.amount.type,
            "created_at": columns.created_at.type})
        add_used = _DriverStatement(dialect, (
            update(credit_totals).where(credit_totals.c.key_id == bindparam("debit_key"))
            .values(used=credit_totals.c.used + bindparam("debit_amount", type_=CreditAmount()),
                    version=credit_totals.c.version + literal_column("1"), updated_at=bindparam("debit_at"))
            .returning(credit_totals.c.credited, credit_totals.c.used, credit_totals.c.version)), {
            "debit_key": credit_totals.c.key_id.type, "debit_amount": CreditAmount(),
            "debit_at": credit_totals.c.updated_at.type})
        known = _debit_statements[(dialect.name, dialect.driver)] = (insert_debit, add_used)
    return known


def debit_rows(connection: Connection, rows: list[dict[str, Any]], cost: Callable[[dict[str, Any]], Decimal],
               prepaid: Callable[[str], bool]) -> dict[str, Balance]:
    """In the ledger's transaction: one debit per usage row of a prepaid key that costs something, and those keys'
    running sums; returns their balances as this transaction left them. `prepaid` says which keys are (the
    gateway's views: a key, once prepaid, stays so), so a commit of unlimited keys' rows costs nothing more.

    A row without a fingerprint has a fresh random id, so it is debited for the first time. A row with one (an
    Idempotency-Key) may be a retry of a request debited before: its debit is an insert-or-ignore on the unique
    request_id, decided in the database, so two replicas committing the same retry at once debit it once."""
    priced: dict[str, dict[str, Any]] = {}
    repeatable: set[str] = set()
    for row in rows:
        if row["key_id"] is None or not prepaid(row["key_id"]) or row["request_id"] in priced:
            continue
        amount = cost(row)
        if amount > 0:
            priced[row["request_id"]] = {"request_id": row["request_id"], "key_id": row["key_id"], "amount": amount,
                                         "created_at": row["created_at"]}
            if row["fingerprint"]:
                repeatable.add(row["request_id"])
    if not priced:
        return {}
    insert_debit, add_used = _debit_sql(connection.dialect)
    # In request_id order, as the ledger inserts its rows: no deadlock between writers.
    debits = sorted(priced.values(), key=lambda debit: debit["request_id"])
    fresh = [debit for debit in debits if debit["request_id"] not in repeatable]
    per_key: dict[str, Decimal] = defaultdict(Decimal)
    if fresh:
        insert_debit.execute(connection, fresh)
        for debit in fresh:
            per_key[debit["key_id"]] += debit["amount"]
    retried = [debit for debit in debits if debit["request_id"] in repeatable]
    if retried:
        inserted = connection.execute(
            _insert(connection, usage_debits).on_conflict_do_nothing(index_elements=["request_id"])
            .returning(usage_debits.c.key_id, usage_debits.c.amount), retried).all()
        for key_id, amount in inserted:
            per_key[key_id] += amount
    balances = {}
    at = now()
    for key_id in sorted(per_key):  # one lock order for every writer
        credited, used, version = add_used.execute(
            connection, {"debit_key": key_id, "debit_amount": per_key[key_id], "debit_at": at}).one()
        balances[key_id] = Balance(key_id, from_units(credited), from_units(used), version)
    return balances


def valid_note(note: Any) -> str:
    if not isinstance(note, str) or not note.strip() or not note.isprintable() or len(note) > MAX_CREDIT_NOTE_CHARS:
        raise InvalidCreditEntry("note", f"a credit entry needs a note of 1 to {MAX_CREDIT_NOTE_CHARS} printable "
                                         "characters saying why (an invoice or ticket number, say)")
    return note


class CreditBook:
    def __init__(self, engine: Engine):
        self.engine = engine

    def add(self, key_id: str, amount: Any, note: Any, *, actor: str, adjustment: bool = False) -> JournalEntry:
        """Top up a key (amount > 0), or with `adjustment` correct its credit either way (amount != 0). A key
        without a balance becomes a prepaid key with this entry. UnknownKey for a key that does not exist."""
        try:
            amount = parse_amount(amount, allow_negative=adjustment)
        except InvalidAmount as exc:
            raise InvalidCreditEntry("amount", str(exc)) from None
        note = valid_note(note)
        with self.engine.begin() as connection:
            # Keys are never deleted (only revoked), so a key found here still exists when the entry is written.
            if connection.execute(select(api_keys.c.id).where(api_keys.c.id == key_id)).first() is None:
                raise UnknownKey(key_id)
            return record_entry(connection, key_id, amount, kind="adjustment" if adjustment else "top_up",
                                note=note, actor=actor)

    def balances(self, key_ids: list[str] | None = None) -> dict[str, Balance]:
        """The prepaid keys' balances (keys without one are unlimited and absent)."""
        query = select(credit_totals.c.key_id, credit_totals.c.credited, credit_totals.c.used,
                       credit_totals.c.version)
        if key_ids is not None:
            query = query.where(credit_totals.c.key_id.in_(key_ids))
        with self.engine.connect() as connection:
            return {row.key_id: Balance(*row) for row in connection.execute(query)}

    def journal(self, key_id: str | None = None) -> list[JournalEntry]:
        query = select(credit_journal).order_by(credit_journal.c.seq)
        if key_id is not None:
            query = query.where(credit_journal.c.key_id == key_id)
        with self.engine.connect() as connection:
            return [JournalEntry(**row._mapping) for row in connection.execute(query)]

    def summaries(self, key_id: str | None = None, since: date | None = None,
                  until: date | None = None) -> list[dict[str, Any]]:
        """Per prepaid key (or only `key_id`): its balance now, and the credit added and used within the inclusive
        UTC days since..until (all time without them). Amounts are exact decimal text."""
        def sums_in_period(table):
            query = select(table.c.key_id, func.sum(table.c.amount)).group_by(table.c.key_id)
            if key_id is not None:
                query = query.where(table.c.key_id == key_id)
            if since is not None:
                query = query.where(table.c.created_at >= day_start(since))
            if until is not None:
                query = query.where(table.c.created_at < day_start(until + timedelta(days=1)))
            return query

        balances = self.balances([key_id] if key_id is not None else None)
        with self.engine.connect() as connection:
            added = dict(connection.execute(sums_in_period(credit_journal)).all())
            used = dict(connection.execute(sums_in_period(usage_debits)).all())
        return [{"key_id": key, "balance": decimal_text(balances[key].balance),
                 "credit_added": decimal_text(added.get(key, ZERO)), "used": decimal_text(used.get(key, ZERO))}
                for key in sorted(balances)]

    def audit(self) -> dict[str, dict[str, Decimal]]:
        """Per prepaid key: the journal's sum and the debits' sum recomputed from the rows, next to the running sums
        the gateways read. They are equal unless the database was edited by hand."""
        with self.engine.connect() as connection:
            journal = dict(connection.execute(select(credit_journal.c.key_id, func.sum(credit_journal.c.amount))
                                              .group_by(credit_journal.c.key_id)).all())
            debits = dict(connection.execute(select(usage_debits.c.key_id, func.sum(usage_debits.c.amount))
                                             .group_by(usage_debits.c.key_id)).all())
        return {key: {"journal": journal.get(key, ZERO), "debits": debits.get(key, ZERO),
                      "credited": balance.credited, "used": balance.used}
                for key, balance in self.balances().items()}
