"""The usage ledger: one durable row per served request, written with group commit before the response leaves.

Write path (per gateway replica): a served request hands its `UsageRecord` to `Ledger.record` and waits; one
writer task takes everything queued, inserts it in a single transaction (off the event loop) and wakes the
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

Prepaid credit (serve_app/credit) debits a request in the transaction that writes its row (the writer's
`with_rows` hook), so a balance and the ledger can never disagree, whatever fails and whenever.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Callable

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from serve_app.errors import IdempotencyConflict
from serve_app.store import now, usage_records

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


def _insert_ignoring_duplicates(engine: Engine):
    dialects = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
    if engine.dialect.name not in dialects:
        raise ValueError(f"the usage ledger supports SQLite and PostgreSQL, not {engine.dialect.name}")
    return dialects[engine.dialect.name](usage_records).on_conflict_do_nothing(index_elements=["request_id"])


# In-transaction hook of the writer: given the connection and the rows this transaction records (those refused as
# Idempotency-Key conflicts left out), it writes what must commit with them (serve_app/credit: the debits of
# prepaid keys) and returns what to run once the transaction has committed, or None.
CommitHook = Callable[[Connection, list[dict[str, Any]]], Callable[[], None] | None]


class Ledger:
    def __init__(self, engine: Engine, with_rows: CommitHook | None = None):
        self.engine = engine
        self.with_rows = with_rows
        self._insert = _insert_ignoring_duplicates(engine)
        self._queue: asyncio.Queue | None = None
        self._writer: asyncio.Task | None = None
        self.commits = 0  # transactions written: fewer than records under load (group commit)
        self.records = 0

    async def record(self, usage: UsageRecord) -> None:
        """Returns once the row is committed (or was already, for a retry); raises IdempotencyConflict for a key
        reused by a different request, or the database's error if the row could not be written. Either way the
        caller must not send its answer."""
        loop = asyncio.get_running_loop()
        if self._writer is None or self._writer.done() or self._writer.get_loop() is not loop:
            self._start_writer(loop)
        committed = loop.create_future()
        self._queue.put_nowait((asdict(usage), committed))
        # Shielded: a client that disconnects stops waiting, but its row is still written or failed as a whole.
        await asyncio.shield(committed)

    def _start_writer(self, loop: asyncio.AbstractEventLoop) -> None:
        """A writer and its queue, on this event loop. Started on first use (inside the replica's event loop) and
        again if the writer ever ended or its loop is not this one. An asyncio.Queue binds to the loop that first
        waits on it, so the new writer gets a new queue, holding what the old one left whose callers can still be
        answered; rows whose caller's loop is closed were never answered, so they are not billed."""
        queue: asyncio.Queue = asyncio.Queue()
        while self._queue is not None and not self._queue.empty():
            row, committed = self._queue.get_nowait()
            if committed.get_loop().is_closed():
                logger.warning("usage ledger: dropped request %s: its caller's event loop closed before the "
                               "commit, so it was never answered", row["request_id"])
            else:
                queue.put_nowait((row, committed))
        self._queue = queue
        self._writer = loop.create_task(self._write_forever(queue))

    async def _write_forever(self, queue: asyncio.Queue) -> None:
        while True:
            batch = [await queue.get()]
            while not queue.empty() and len(batch) < MAX_ROWS_PER_COMMIT:
                batch.append(queue.get_nowait())
            try:
                conflicts = await asyncio.to_thread(self._commit, [row for row, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every waiter gets the failure; the writer keeps going
                logger.error("usage ledger: commit of %d rows failed: %r", len(batch), exc)
                for _, committed in batch:
                    if not committed.done():
                        committed.set_exception(exc)
                continue
            for index, (row, committed) in enumerate(batch):
                if committed.done():
                    continue
                if index in conflicts:
                    committed.set_exception(IdempotencyConflict(
                        "this Idempotency-Key was already used for a different request; use a new key for a new "
                        "request and the same key only to retry the same request", param="Idempotency-Key"))
                else:
                    committed.set_result(None)

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
            connection.execute(self._insert, sorted(rows, key=lambda row: row["request_id"]))
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
            after_commit()
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
    """Rows of {key_id, model, day, requests, input_tokens, documents, search_units, embeddings}, ordered by day,
    key and model. `key_id` limits to one key; since/until are inclusive UTC days."""
    day = _utc_day(engine).label("day")
    columns = usage_records.c
    query = (select(columns.key_id, columns.model, day, func.count().label("requests"),
                    func.sum(columns.input_tokens).label("input_tokens"),
                    func.sum(columns.documents).label("documents"),
                    func.sum(columns.search_units).label("search_units"),
                    func.sum(columns.embeddings).label("embeddings"))
             .group_by(columns.key_id, columns.model, day)
             .order_by(day, columns.key_id, columns.model))
    if key_id is not None:
        query = query.where(columns.key_id == key_id)
    if since is not None:
        query = query.where(columns.created_at >= day_start(since))
    if until is not None:
        query = query.where(columns.created_at < day_start(until + timedelta(days=1)))
    with engine.connect() as connection:
        return [{name: (int(value) if name not in ("key_id", "model", "day") else value)
                 for name, value in row._mapping.items()} for row in connection.execute(query)]


def sum_totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    counted = ("requests", "input_tokens", "documents", "search_units", "embeddings")
    return {name: sum(row[name] for row in rows) for name in counted}
