"""The durable store behind API keys, the usage ledger and prepaid credit: SQLAlchemy Core over SQLite or PostgreSQL.

SQLite (`sqlite:///var/qwen3-serve.db`) is the embedded default for one machine; PostgreSQL
(`postgresql+psycopg://user@host/db`) for a cluster, where every gateway replica on every node reads and writes
the same tables. SQLAlchemy gives us both dialects, pooling and schema creation without hand-written SQL.

The tables and the connection live here; what reads and writes them lives beside it: keys.py (API keys),
ledger.py (usage rows), credit/book.py (balances).
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (BigInteger, Boolean, Column, DateTime, Float, Index, Integer, MetaData, String, Table,
                        create_engine, event, inspect, text)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from serve_app import PROJECT_ROOT
from serve_app.accounts.credit.amounts import CreditAmount
from serve_app.config import load_config_file

MAX_KEY_NAME_CHARS = 200
MAX_CREDIT_NOTE_CHARS = 500
metadata = MetaData()

api_keys = Table(
    "api_keys", metadata,
    Column("id", String(16), primary_key=True),
    Column("name", String(MAX_KEY_NAME_CHARS), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("admin", Boolean, nullable=False, default=False),
    Column("requests_per_minute", Integer, nullable=True),
    Column("tokens_per_minute", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

# One row per served request (serve_app/accounts/ledger.py writes them). request_id is unique: a retry that repeats a
# request's Idempotency-Key maps to the same id and is recorded once; fingerprint (SHA-256 of route and body,
# empty for requests without that header) tells a true retry from a different request reusing the key.
usage_records = Table(
    "usage_records", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, unique=True),
    Column("fingerprint", String(64), nullable=False),
    Column("trace_id", String(128), nullable=True),  # Ray Serve's X-Request-ID: joins the ledger to Serve's logs
    Column("key_id", String(16), nullable=True),  # None when auth is off
    Column("model", String(200), nullable=False),
    Column("route", String(64), nullable=False),
    Column("input_tokens", Integer, nullable=False),
    Column("documents", Integer, nullable=False),  # rerank documents (0 for embeddings)
    Column("search_units", Integer, nullable=False),  # Cohere's unit: one query with up to 100 documents
    Column("embeddings", Integer, nullable=False),  # vectors returned (0 for rerank)
    Column("dimensions", Integer, nullable=True),  # of those vectors
    Column("latency_ms", Float, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Set for the lines of a Batch API job (serve_app/gateway/batches/): batch usage, which a model's price may discount.
    Column("batch_id", String(40), nullable=True),
    Index("ix_usage_records_key_time", "key_id", "created_at"),
    Index("ix_usage_records_time", "created_at"),
)

# Prepaid credit (serve_app/accounts/credit). A key has a balance once it has a journal entry; keys without one are unlimited.
# The journal holds every credit change (initial credit, top-up, adjustment: who, when, amount, note, the balance
# it left); usage_debits one row per billed request of a prepaid key, written in the ledger's own transaction (the
# request_id is its usage row's). credit_totals keeps, per prepaid key, the running sums of both, updated in the
# same transactions as the rows they sum, so a gateway reads one row per key instead of summing history: the
# balance is always credited - used, that is the journal's sum minus the debits (CreditBook.audit recomputes it).
credit_journal = Table(
    "credit_journal", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("key_id", String(16), nullable=False),
    Column("kind", String(16), nullable=False),  # initial | top_up | adjustment
    Column("amount", CreditAmount, nullable=False),
    Column("balance_after", CreditAmount, nullable=False),
    Column("note", String(MAX_CREDIT_NOTE_CHARS), nullable=False),
    Column("actor", String(200), nullable=False),  # "key:<admin key id>" or "cli:<OS user>"
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_credit_journal_key_time", "key_id", "created_at"),
)

usage_debits = Table(
    "usage_debits", metadata,
    Column("request_id", String(64), primary_key=True),  # = usage_records.request_id: one debit per request
    Column("key_id", String(16), nullable=False),
    Column("amount", CreditAmount, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),  # the usage row's
    Index("ix_usage_debits_key_time", "key_id", "created_at"),
)

credit_totals = Table(
    "credit_totals", metadata,
    Column("key_id", String(16), primary_key=True),
    Column("credited", CreditAmount, nullable=False),  # sum of the key's journal amounts
    Column("used", CreditAmount, nullable=False),  # sum of the key's debits
    Column("version", BigInteger, nullable=False),  # +1 per change: gateways keep the newest view of a key
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


def now() -> datetime:
    return datetime.now(timezone.utc)


DEFAULT_DATABASE_URL = "sqlite:///var/qwen3-serve.db"
DATABASE_URL_ENV = "QWEN3_SERVE_DB"


def database_url(configured: str | None = None) -> str:
    """$QWEN3_SERVE_DB, else the configured URL, else the SQLite default. A relative SQLite path is taken from the
    project root, so the CLI and every gateway replica on this machine open the same file whatever their cwd."""
    url = os.environ.get(DATABASE_URL_ENV) or configured or DEFAULT_DATABASE_URL
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        url = f"sqlite:///{PROJECT_ROOT / url.removeprefix('sqlite:///')}"
    return url


def open_database(db: str | None = None, config_path: str | None = None) -> Engine:
    """The database a CLI works on: $QWEN3_SERVE_DB, else `db`, else the gateway's database_url in the config file
    at `config_path`, else the SQLite default."""
    if db is None and config_path:
        db = load_config_file(config_path).gateway_config().database_url
    return connect(database_url(db))


def connect(url: str) -> Engine:
    """An engine for the URL, with the schema created. SQLite gets WAL (readers never block the writer) and a busy
    timeout, since several processes (gateway replicas, the CLI) share the file."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _):
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    metadata.create_all(engine)
    add_missing_columns(engine)
    return engine


def add_missing_columns(engine: Engine) -> None:
    """create_all creates missing tables but never missing columns: add the nullable columns this version defines to
    tables an older version created (e.g. usage_records.batch_id), so an existing database keeps working. Both
    SQLite and PostgreSQL add a nullable column in place. Several replicas may race here: a column another one added
    first is fine."""
    inspector = inspect(engine)
    for table in metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present or not column.nullable:
                continue
            kind = column.type.compile(engine.dialect)
            try:
                with engine.begin() as connection:
                    connection.execute(text(f'ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}'))
                logging.getLogger("ray.serve").info("store: added column %s.%s", table.name, column.name)
            except DBAPIError:
                if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                    raise


class InvalidField(ValueError):
    """A value refused as asked; `field` names it as the admin routes' bodies spell it (their 400's `param`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


