"""The usage ledger: one durable row per served request, written with group commit before the response leaves.

Write path (per gateway replica): a served request hands its `UsageRecord` to `Ledger.record` and waits; one
writer thread takes everything queued, inserts it in a single transaction (off the event loop) and wakes the
waiters. While one commit runs the next batch gathers, so a busy gateway commits hundreds of rows at once and the
ledger does not cap throughput, while an idle one commits each row at once (no added delay). The gateway sends
the response only after its row is committed, so every response a client receives is in the ledger.

Exactly once. The one window left is a gateway replica killed after the commit and before the proxy got the
response: the client sees an error and retries. A retry that repeats the request's `Idempotency-Key` header maps
to the same `request_id` (unique column, insert-or-ignore), so it is served again but billed once; clients that
send no key get a fresh id per attempt, and such a retry is billed twice. A key reused for a different request
(another route or body: the row's fingerprint differs) is refused with 409, so reusing one key cannot buy
unbilled answers. The ledger test kills a replica under load with retrying clients and checks that totals equal
the usage the clients received.

Prepaid credit (serve_app/accounts/credit) debits a request in the transaction that writes its row (the writer's
`with_rows` hook), so a balance and the ledger can never disagree, whatever fails and whenever.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import queue
import threading
from dataclasses import dataclass, field, fields
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Callable

from sqlalchemy import case, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from serve_app.accounts.store import now, usage_records
from serve_app.errors import IdempotencyConflict

logger = logging.getLogger("ray.serve")

MAX_ROWS_PER_COMMIT = 1000
MAX_IDEMPOTENCY_KEY_CHARS = 255


def request_id(key_id: str | None, idempotency_key: str | None, fresh: str) -> str:
    """The ledger id of a request: derived from the caller's key and Idempotency-Key when one was sent (scoped per
    API key, so two customers' keys never collide), else `fresh`."""
    if idempotency_key is None:
        return fresh
    digest = hashlib.sha256(f"{key_id or '-'}\0{idempotency_key}".encode("utf-8")).hexdigest()
    return f"req_{digest[:32]}"


def fingerprint(route: str, body: bytes) -> str:
    return hashlib.sha256(route.encode("utf-8") + b"\0" + body).hexdigest()


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    fingerprint: str
    key_id: str | None
    model: str
    route: str
    input_tokens: int
    documents: int = 0
    search_units: int = 0
    embeddings: int = 0
    dimensions: int | None = None
    trace_id: str | None = None
    latency_ms: float = 0.0
    created_at: datetime = field(default_factory=now)
    batch_id: str | None = None  # a Batch API line's batch: batch usage

    def row(self) -> dict[str, Any]:
        """The ledger row's columns. Every field is immutable, so a flat copy does what dataclasses.asdict does
        without its deep copy of each value (1% of the gateway's CPU under load; BENCHMARKS.md)."""
        return {name: getattr(self, name) for name in _USAGE_COLUMNS}


_USAGE_COLUMNS = tuple(column.name for column in fields(UsageRecord))


def _insert_ignoring_duplicates(engine: Engine):
    dialects = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
    if engine.dialect.name not in dialects:
        raise ValueError(f"the usage ledger supports SQLite and PostgreSQL, not {engine.dialect.name}")
    return dialects[engine.dialect.name](usage_records).on_conflict_do_nothing(index_elements=["request_id"])


def insert_usage(connection, records: list[UsageRecord]) -> list[dict[str, Any]]:
    """Bill records inside the caller's transaction: the batch runner commits a checkpoint of a batch and the usage
    of its lines together, so a line is billed exactly when its answer is durably in the output. Ids already in
    the ledger are left as they are. Returns the rows as written (what a `CommitHook` takes)."""
    rows = [record.row() for record in records]
    if rows:
        connection.execute(_insert_ignoring_duplicates(connection.engine), rows)
    return rows


class _DriverInsert:
    """The ledger's insert-or-ignore, compiled once for the engine's dialect and run as driver SQL with the columns'
    own bind processing. Executing the SQLAlchemy statement costs about 0.35 ms per commit in cache lookup and
    parameter handling; this way a one-row SQLite commit takes about 0.09 ms (BENCHMARKS.md, serving path), and a
    served request waits on that commit."""

    def __init__(self, engine: Engine):
        columns = list(_USAGE_COLUMNS)
        compiled = _insert_ignoring_duplicates(engine).compile(dialect=engine.dialect, column_keys=columns)
        self.sql = str(compiled)
        self.order = list(compiled.positiontup) if compiled.positional else None
        self.processors = {name: usage_records.c[name].type.dialect_impl(engine.dialect).bind_processor(engine.dialect)
                           for name in columns}

    def parameters(self, rows: list[dict[str, Any]]) -> list:
        processed = [{name: value if (process := self.processors[name]) is None else process(value)
                      for name, value in row.items()} for row in rows]
        if self.order is None:
            return processed
        return [tuple(row[name] for name in self.order) for row in processed]

    def execute(self, connection, rows: list[dict[str, Any]]) -> None:
        connection.exec_driver_sql(self.sql, self.parameters(rows))


# In-transaction hook of the writer: given the connection and the rows this transaction records (those refused as
# Idempotency-Key conflicts left out), it writes what must commit with them (serve_app/accounts/credit: the debits of
# prepaid keys) and returns what to run once the transaction has committed, or None.
CommitHook = Callable[[Connection, list[dict[str, Any]]], Callable[[], None] | None]


class Ledger:
    """One writer thread per gateway process takes every row queued while its previous commit ran, commits them in
    one transaction and wakes each caller on the caller's own event loop.

    A thread rather than an asyncio task: a served request waits on its row, and a task-based writer paid two extra
    turns of the event loop and a thread-pool hand-off per commit (about 0.3 ms of an idle commit here, more under
    load). A thread also binds to no event loop, so callers on any loop, one after another (tests) or at once, are
    all answered."""

    def __init__(self, engine: Engine, with_rows: CommitHook | None = None):
        self.engine = engine
        self.with_rows = with_rows
        self._insert = _DriverInsert(engine)
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self.commits = 0  # transactions written: fewer than records under load (group commit)
        self.records = 0

    async def record(self, usage: UsageRecord) -> None:
        """Returns once the row is committed (or was already, for a retry); raises IdempotencyConflict for a key
        reused by a different request, or the database's error if the row could not be written. Either way the
        caller must not send its answer."""
        self._ensure_writer()
        committed = asyncio.get_running_loop().create_future()
        self._pending.put((usage.row(), committed))
        # Shielded: a client that disconnects stops waiting, but its row is still written or failed as a whole.
        await asyncio.shield(committed)

    def _ensure_writer(self) -> None:
        if self._writer is not None and self._writer.is_alive():
            return
        with self._writer_lock:
            if self._writer is None or not self._writer.is_alive():
                self._start_writer()

    def _start_writer(self) -> None:
        self._writer = threading.Thread(target=self._write_forever, name="usage-ledger-writer", daemon=True)
        self._writer.start()

    def _write_forever(self) -> None:
        while True:
            batch = [self._pending.get()]
            while len(batch) < MAX_ROWS_PER_COMMIT:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            batch = [(row, committed) for row, committed in batch if self._answerable(row, committed)]
            if not batch:
                continue
            try:
                conflicts = self._commit([row for row, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every waiter gets the failure; the writer keeps going
                logger.error("usage ledger: commit of %d rows failed: %r", len(batch), exc)
                for _, committed in batch:
                    _settle(committed, exc)
                continue
            except BaseException as exc:
                # Whatever ends this thread must not leave a caller waiting forever: this batch gets the failure,
                # and a new writer takes over the rows still queued.
                logger.error("usage ledger: writer ended by %r; starting a new one", exc)
                for _, committed in batch:
                    _settle(committed, exc)
                with self._writer_lock:
                    self._start_writer()
                raise
            for index, (_, committed) in enumerate(batch):
                _settle(committed, IdempotencyConflict(
                    "this Idempotency-Key was already used for a different request; use a new key for a new "
                    "request and the same key only to retry the same request", param="Idempotency-Key")
                        if index in conflicts else None)

    @staticmethod
    def _answerable(row: dict[str, Any], committed: asyncio.Future) -> bool:
        """A row whose caller's event loop has closed was never answered, so it is not billed."""
        if committed.get_loop().is_closed():
            logger.warning("usage ledger: dropped request %s: its caller's event loop closed before the commit, so "
                           "it was never answered", row["request_id"])
            return False
        return True

    def _commit(self, rows: list[dict[str, Any]]) -> set[int]:
        """Insert the rows (ignoring ids already there) and return the positions of rows whose id is taken by a
        different request: fingerprints are compared in the same transaction. Only rows derived from an
        Idempotency-Key can meet their id again (the others have a fresh random id and no fingerprint), so only
        they are read back: a commit of fresh rows is the insert alone."""
        repeatable = [row["request_id"] for row in rows if row["fingerprint"]]
        after_commit = None
        with self.engine.begin() as connection:
            # In request_id order (stable: of two requests with one id, the first still wins): two replicas
            # committing the same retried ids in opposite orders would otherwise deadlock on PostgreSQL.
            self._insert.execute(connection, sorted(rows, key=lambda row: row["request_id"]))
            stored = dict(connection.execute(
                select(usage_records.c.request_id, usage_records.c.fingerprint)
                .where(usage_records.c.request_id.in_(repeatable))).all()) if repeatable else {}
            conflicts = {index for index, row in enumerate(rows)
                         if row["fingerprint"] and stored.get(row["request_id"]) != row["fingerprint"]}
            if self.with_rows is not None:
                after_commit = self.with_rows(connection, [row for index, row in enumerate(rows)
                                                           if index not in conflicts])
        self.commits += 1
        self.records += len(rows)
        if after_commit is not None:
            try:
                after_commit()
            except Exception:  # noqa: BLE001 - the rows are committed: their callers must still be answered
                logger.exception("usage ledger: the after-commit hook failed; the rows are committed")
        return conflicts


# ---- reading: totals per key, model and UTC day ----------------------------------------------------------------

def _utc_day(engine: Engine):
    column = usage_records.c.created_at
    if engine.dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", column)  # SQLite stores the UTC wall time


def day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=timezone.utc)


def usage_totals(engine: Engine, *, key_id: str | None = None, since: date | None = None,
                 until: date | None = None) -> list[dict[str, Any]]:
    """Rows of {key_id, model, day, batch, requests, input_tokens, documents, search_units, embeddings}, ordered by
    day, key and model; `batch` tells Batch API usage from online usage. `key_id` limits to one key; since/until are
    inclusive UTC days."""
    day = _utc_day(engine).label("day")
    columns = usage_records.c
    batch = case((columns.batch_id.is_(None), 0), else_=1).label("batch")
    query = (select(columns.key_id, columns.model, day, batch, func.count().label("requests"),
                    func.sum(columns.input_tokens).label("input_tokens"),
                    func.sum(columns.documents).label("documents"),
                    func.sum(columns.search_units).label("search_units"),
                    func.sum(columns.embeddings).label("embeddings"))
             .group_by(columns.key_id, columns.model, day, batch)
             .order_by(day, columns.key_id, columns.model, batch))
    if key_id is not None:
        query = query.where(columns.key_id == key_id)
    if since is not None:
        query = query.where(columns.created_at >= day_start(since))
    if until is not None:
        query = query.where(columns.created_at < day_start(until + timedelta(days=1)))
    with engine.connect() as connection:
        return [{name: (bool(value) if name == "batch" else
                        int(value) if name not in ("key_id", "model", "day") else value)
                 for name, value in row._mapping.items()} for row in connection.execute(query)]


def sum_totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    counted = ("requests", "input_tokens", "documents", "search_units", "embeddings")
    return {name: sum(row[name] for row in rows) for name in counted}


def _settle(committed: asyncio.Future, failure: BaseException | None) -> None:
    """Answer a caller from the writer thread, on the caller's own event loop."""
    def answer():
        if committed.done():  # its caller's task was cancelled (shield keeps the row; nobody waits any more)
            return
        if failure is None:
            committed.set_result(None)
        else:
            committed.set_exception(failure)

    try:
        committed.get_loop().call_soon_threadsafe(answer)
    except RuntimeError:  # the loop closed while the row was being written: nobody is left to answer
        pass
