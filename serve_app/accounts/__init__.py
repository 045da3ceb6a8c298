"""Accounts and money: API keys, who may call, what each call used, and what it cost.

    store.py         the database: tables and connection (SQLite or PostgreSQL, SQLAlchemy Core)
    keys.py          API keys: create, list, revoke, the constant-time check of a presented key
    auth.py          KeyGuard: the gateway's cached view of the keys and the per-request check
    ratelimit.py     per-key requests and tokens per minute (a shared Ray actor)
    ledger.py        the usage ledger: one row per served request, group commit, exactly once
    credit/          prepaid credit: exact amounts, the journal and debits, the gateway's balance guard
    protocol.py      the JSON shapes of keys and credit entries (admin routes and CLI alike)
    keys_cli.py      `python -m serve_app.keys`
    usage_report.py  `python -m serve_app.usage`

May import: the top-level modules (config, errors, periodic). Never the gateway, the replica or the cluster tools:
the gateway calls into accounts, not the other way round.
"""
