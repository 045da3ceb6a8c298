"""Durable Batch API state, in the same database as API keys and the usage ledger (serve_app/accounts/store.py).

Two tables. `batch_files`: one row per file (uploads and the output / error files of batches), whose bytes live on
the storage backend as numbered parts (storage.py). `batches`: one row per batch, holding OpenAI's fields and the
runner's progress: how many input lines are done (`next_line`) and where the next one starts (`next_offset`), the
output and error parts written so far, and the lease of the runner replica working on it.

Exactly once. A runner writes a chunk's output and error parts first, then commits in one transaction: the new
position, the counts, the part counts and the chunk's usage rows (serve_app/accounts/ledger.py `insert_usage`). The update
only applies while the runner still holds the lease and the position is the one it started the chunk from. A
runner killed before the commit leaves parts that no row counts; whoever resumes redoes the chunk from the saved
position and writes the same part names again, so no line is lost, none is in the output twice, none billed twice.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable

from sqlalchemy import JSON, BigInteger, Column, Float, Index, Integer, String, Table, and_, insert, or_, select, update
from sqlalchemy.engine import Engine

from serve_app.accounts.ledger import UsageRecord, insert_usage
from serve_app.accounts.store import metadata

ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL_STATUSES = ("failed", "completed", "expired", "cancelled")

batch_files = Table(
    "batch_files", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # creation order, for listing
    Column("id", String(40), nullable=False, unique=True),
    Column("key_id", String(16), nullable=True),  # the key that owns it; None while auth is off
    Column("purpose", String(32), nullable=False),  # batch (uploads) or batch_output
    Column("filename", String(255), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("parts", Integer, nullable=False),  # storage objects part-00000 ... in order
    Column("lines", Integer, nullable=False),
    Column("embedding_inputs", Integer, nullable=False),  # inputs of its /v1/embeddings lines (the 50,000 limit)
    Column("created_at", BigInteger, nullable=False),  # Unix seconds, as OpenAI's objects
    Index("ix_batch_files_key", "key_id", "seq"),
)

batches = Table(
    "batches", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("key_id", String(16), nullable=True),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(40), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("metadata", JSON, nullable=True),
    Column("errors", JSON, nullable=True),  # validation errors: [{code, line, message, param}]
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("in_progress_at", BigInteger, nullable=True),
    Column("finalizing_at", BigInteger, nullable=True),
    Column("completed_at", BigInteger, nullable=True),
    Column("failed_at", BigInteger, nullable=True),
    Column("expired_at", BigInteger, nullable=True),
    Column("cancelling_at", BigInteger, nullable=True),
    Column("cancelled_at", BigInteger, nullable=True),
    # Ids chosen at creation, so parts are written under the final file's name; the file rows appear (and the
    # batch object shows the ids) when the batch ends with at least one line in that file.
    Column("output_file_id", String(40), nullable=False),
    Column("error_file_id", String(40), nullable=False),
    Column("total", Integer, nullable=False, default=0),
    Column("completed", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("next_line", Integer, nullable=False, default=0),
    Column("next_offset", BigInteger, nullable=False, default=0),
    Column("output_parts", Integer, nullable=False, default=0),
    Column("error_parts", Integer, nullable=False, default=0),
    Column("output_bytes", BigInteger, nullable=False, default=0),
    Column("error_bytes", BigInteger, nullable=False, default=0),
    Column("lease_owner", String(40), nullable=True),
    Column("lease_until", Float, nullable=True),  # Unix seconds
    Index("ix_batches_key", "key_id", "seq"),
    Index("ix_batches_status", "status"),
)


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def unix_now() -> int:
    return int(time.time())


class LeaseLost(Exception):
    """Another runner replica holds the batch now (this one stalled past its lease): stop without writing."""


class BatchStore:
    def __init__(self, engine: Engine):
        self.engine = engine
        metadata.create_all(engine, tables=[batch_files, batches])

    # ---- files ----------------------------------------------------------------------------------------------

    def insert_file(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as connection:
            connection.execute(insert(batch_files).values(**row))

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(batch_files).where(batch_files.c.id == file_id)).first()
        return dict(row._mapping) if row is not None else None

    def list_files(self, key_id: str | None, every_key: bool, *, purpose: str | None, limit: int,
                   after: str | None, ascending: bool) -> tuple[list[dict[str, Any]], bool]:
        query = select(batch_files)
        if not every_key:
            query = query.where(batch_files.c.key_id == key_id)
        if purpose is not None:
            query = query.where(batch_files.c.purpose == purpose)
        return self._page(query, batch_files, limit, after, ascending)

    def delete_file(self, file_id: str) -> bool:
        with self.engine.begin() as connection:
            return connection.execute(batch_files.delete().where(batch_files.c.id == file_id)).rowcount == 1

    def batch_using(self, file_id: str) -> str | None:
        """A batch still working on this file as its input, if any."""
        with self.engine.connect() as connection:
            return connection.execute(select(batches.c.id).where(batches.c.input_file_id == file_id,
                                                                 batches.c.status.in_(ACTIVE_STATUSES))).scalar()

    # ---- batches: the gateway's side ------------------------------------------------------------------------

    def insert_batch(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as connection:
            connection.execute(insert(batches).values(**row))

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(batches).where(batches.c.id == batch_id)).first()
        return dict(row._mapping) if row is not None else None

    def list_batches(self, key_id: str | None, every_key: bool, *, limit: int,
                     after: str | None) -> tuple[list[dict[str, Any]], bool]:
        query = select(batches)
        if not every_key:
            query = query.where(batches.c.key_id == key_id)
        return self._page(query, batches, limit, after, ascending=False)

    def request_cancel(self, batch_id: str) -> bool:
        """validating / in_progress -> cancelling; the runner finishes the lines in flight, then ends it cancelled."""
        with self.engine.begin() as connection:
            result = connection.execute(update(batches).where(batches.c.id == batch_id,
                                                              batches.c.status.in_(("validating", "in_progress")))
                                        .values(status="cancelling", cancelling_at=unix_now()))
        return result.rowcount == 1

    def _page(self, query, table: Table, limit: int, after: str | None, ascending: bool):
        """A cursor page (OpenAI's `after`: the last id of the previous page), newest first unless ascending."""
        if after is not None:
            with self.engine.connect() as connection:
                cursor = connection.execute(select(table.c.seq).where(table.c.id == after)).scalar()
            if cursor is None:
                return [], False
            query = query.where(table.c.seq > cursor if ascending else table.c.seq < cursor)
        query = query.order_by(table.c.seq.asc() if ascending else table.c.seq.desc()).limit(limit + 1)
        with self.engine.connect() as connection:
            rows = [dict(row._mapping) for row in connection.execute(query)]
        return rows[:limit], len(rows) > limit

    # ---- batches: the runner's side -------------------------------------------------------------------------

    def claimable(self, now: float) -> list[str]:
        """Active batches no runner holds (never held, or its lease ran out), oldest first."""
        with self.engine.connect() as connection:
            return list(connection.execute(
                select(batches.c.id).where(batches.c.status.in_(ACTIVE_STATUSES),
                                           or_(batches.c.lease_owner.is_(None), batches.c.lease_until < now))
                .order_by(batches.c.seq)).scalars())

    def claim(self, batch_id: str, owner: str, now: float, lease_s: float) -> bool:
        with self.engine.begin() as connection:
            result = connection.execute(
                update(batches).where(batches.c.id == batch_id, batches.c.status.in_(ACTIVE_STATUSES),
                                      or_(batches.c.lease_owner.is_(None), batches.c.lease_until < now,
                                          batches.c.lease_owner == owner))
                .values(lease_owner=owner, lease_until=now + lease_s))
        return result.rowcount == 1

    def heartbeat(self, owner: str, batch_ids: list[str], now: float, lease_s: float) -> dict[str, str]:
        """Renew the leases this runner holds; {batch id: status} of those it still holds."""
        if not batch_ids:
            return {}
        with self.engine.begin() as connection:
            connection.execute(update(batches).where(batches.c.id.in_(batch_ids), batches.c.lease_owner == owner)
                               .values(lease_until=now + lease_s))
            return dict(connection.execute(select(batches.c.id, batches.c.status)
                                           .where(batches.c.id.in_(batch_ids), batches.c.lease_owner == owner)).all())

    def update_held(self, batch_id: str, owner: str, *, where_status: tuple[str, ...] | None = None,
                    **values) -> bool:
        """Update a batch this runner holds (optionally only in one of `where_status`)."""
        condition = and_(batches.c.id == batch_id, batches.c.lease_owner == owner)
        if where_status is not None:
            condition = and_(condition, batches.c.status.in_(where_status))
        with self.engine.begin() as connection:
            return connection.execute(update(batches).where(condition).values(**values)).rowcount == 1

    def checkpoint(self, batch_id: str, owner: str, *, from_line: int, to_line: int, to_offset: int,
                   completed: int, failed: int, input_tokens: int, output_part_bytes: int | None,
                   error_part_bytes: int | None, usage: list[UsageRecord], lease_s: float,
                   with_rows: Callable[[Any, list[dict[str, Any]]], Callable[[], None] | None] | None = None
                   ) -> tuple[str, int]:
        """Make a chunk durable: position, counts, parts and the usage of its lines, in one transaction. Returns the
        batch's status and expires_at after it (a cancel may have come in meanwhile); LeaseLost if this runner no
        longer holds it or another wrote this chunk already. `with_rows` is the ledger's hook (prepaid keys' debits,
        serve_app/accounts/credit/guard.py), run inside the transaction; what it returns runs once it has committed."""
        columns = batches.c
        values: dict[str, Any] = {
            "next_line": to_line, "next_offset": to_offset, "completed": columns.completed + completed,
            "failed": columns.failed + failed, "input_tokens": columns.input_tokens + input_tokens,
            "lease_until": time.time() + lease_s}
        if output_part_bytes is not None:
            values.update(output_parts=columns.output_parts + 1, output_bytes=columns.output_bytes + output_part_bytes)
        if error_part_bytes is not None:
            values.update(error_parts=columns.error_parts + 1, error_bytes=columns.error_bytes + error_part_bytes)
        with self.engine.begin() as connection:
            result = connection.execute(update(batches).where(columns.id == batch_id, columns.lease_owner == owner,
                                                              columns.next_line == from_line).values(**values))
            if result.rowcount != 1:
                raise LeaseLost(batch_id)
            rows = insert_usage(connection, usage)
            committed = with_rows(connection, rows) if with_rows and rows else None
            status = tuple(connection.execute(select(columns.status, columns.expires_at)
                                              .where(columns.id == batch_id)).one())
        if committed is not None:
            committed()
        return status

    def finish(self, batch_id: str, owner: str, status: str, files: list[dict[str, Any]], **times) -> bool:
        """End a batch: its output / error file rows and its final status, in one transaction."""
        with self.engine.begin() as connection:
            result = connection.execute(update(batches).where(batches.c.id == batch_id, batches.c.lease_owner == owner,
                                                              batches.c.status.in_(ACTIVE_STATUSES))
                                        .values(status=status, lease_owner=None, lease_until=None, **times))
            if result.rowcount != 1:
                return False
            for row in files:
                connection.execute(insert(batch_files).values(**row))
        return True
