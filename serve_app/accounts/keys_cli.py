"""Manage API keys: `python -m serve_app.keys create|list|revoke|credit|journal` (also `qwen3-serve-keys`).

The database is $QWEN3_SERVE_DB if set, else --db, else the gateway's `database_url` in --config, else
sqlite:///var/qwen3-serve.db under the project root (what configs/local.yaml uses).

    python -m serve_app.keys create --name acme-prod --rpm 600 --tpm 2000000
    python -m serve_app.keys create --name ops --admin
    python -m serve_app.keys list
    python -m serve_app.keys revoke 3f2a9c1e
    python -m serve_app.keys create --name trial --credit 25              # a prepaid key with 25 of credit
    python -m serve_app.keys credit 3f2a9c1e --amount 100 --note "invoice 2026-118"   # top up
    python -m serve_app.keys credit 3f2a9c1e --amount -5 --adjust --note "refund, ticket 77"
    python -m serve_app.keys journal 3f2a9c1e                             # every credit change

An admin key can do the same over HTTP at /v1/admin/keys (serve_app/gateway/admin.py).

The secret is printed once, at creation; only its SHA-256 is stored, so a lost key cannot be recovered: revoke
it and create another. Gateways pick up new and revoked keys, and new balances, within `auth.key_refresh_s`
(default 2 s). Credit is in the currency of the models' prices; a key with no credit entry has no balance and
is never refused for credit. Amounts are exact decimals (at most 12 places).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from serve_app.accounts.credit.amounts import decimal_text, parse_amount
from serve_app.accounts.credit.book import CreditBook, InvalidCreditEntry, UnknownKey
from serve_app.accounts.keys import KeyStore
from serve_app.accounts.protocol import ApiKeyObject, CreditEntryObject
from serve_app.accounts.store import open_database


def cli_actor() -> str:
    """Who made a credit entry from the command line, for the journal."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no login name (a bare container): still say it came from the CLI
        return "cli"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", help="database URL, e.g. postgresql+psycopg://user@host/db")
    parser.add_argument("--config", help="a configs/*.yaml file: use its gateway's database_url")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print its secret (shown only this once)")
    create.add_argument("--name", required=True, help="who or what the key is for (shown in listings and reports)")
    create.add_argument("--admin", action="store_true",
                        help="may read every key's usage at GET /v1/usage and manage keys at /v1/admin/keys")
    create.add_argument("--rpm", type=int, help="requests per minute allowed (default: unlimited)")
    create.add_argument("--tpm", type=int, help="input tokens per minute allowed (default: unlimited)")
    create.add_argument("--credit", help="prepaid credit to start with, e.g. 25 or 2.50 (0 allowed; default: no "
                                         "balance, unlimited)")
    listing = commands.add_parser("list", help="list keys (never their secrets) with their balances")
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    listing.add_argument("--active", action="store_true", help="only keys that are not revoked")
    revoke = commands.add_parser("revoke", help="revoke a key by id; gateways refuse it within seconds")
    revoke.add_argument("key_id")
    credit = commands.add_parser("credit", help="top up a key's prepaid credit (or adjust it); gateways admit by "
                                                "the new balance within seconds")
    credit.add_argument("key_id")
    credit.add_argument("--amount", required=True, help="the credit to add, e.g. 25 or 2.50")
    credit.add_argument("--note", required=True, help="why: an invoice or ticket number, say (kept in the journal)")
    credit.add_argument("--adjust", action="store_true",
                        help="a correction rather than a top-up: the amount may be negative")
    journal = commands.add_parser("journal", help="a key's credit journal: every change with who, when, amount, "
                                                  "note and the balance it left")
    journal.add_argument("key_id")
    journal.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    args = parser.parse_args(argv)
    store = KeyStore(open_database(args.db, args.config))
    book = CreditBook(store.engine)

    if args.command == "create":
        try:
            key, secret = store.create(args.name, admin=args.admin, requests_per_minute=args.rpm,
                                       tokens_per_minute=args.tpm, credit=args.credit, actor=cli_actor())
        except ValueError as exc:
            print(f"not created: {exc}", file=sys.stderr)
            return 2
        credit_text = f", credit {decimal_text(parse_amount(args.credit, allow_zero=True))}" if args.credit else ""
        print(f"created key {key.id} ({key.name}{', admin' if key.admin else ''}{credit_text}). Secret, shown "
              "only now:")
        print(secret)
        return 0
    if args.command == "list":
        keys = store.list(include_revoked=not args.active)
        balances = book.balances()
        shown = [ApiKeyObject.of(key, decimal_text(balances[key.id].balance) if key.id in balances else None)
                 for key in keys]
        if args.json:
            for item in shown:
                print(json.dumps(item.model_dump()))  # what GET /v1/admin/keys shows
            return 0
        print(f"{'id':<10} {'name':<24} {'admin':<6} {'rpm':>8} {'tpm':>10} {'balance':>16} {'created':<20} revoked")
        for key, item in zip(keys, shown):
            print(f"{key.id:<10} {key.name[:24]:<24} {'yes' if key.admin else 'no':<6} "
                  f"{key.requests_per_minute or '-':>8} {key.tokens_per_minute or '-':>10} "
                  f"{item.balance or '-':>16} {key.created_at:%Y-%m-%d %H:%M:%S}  {key.revoked_at or '-'}")
        return 0
    if args.command == "credit":
        try:
            entry = book.add(args.key_id, args.amount, args.note, actor=cli_actor(), adjustment=args.adjust)
        except (InvalidCreditEntry, UnknownKey) as exc:
            print(f"not recorded: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, InvalidCreditEntry) else 1
        print(f"key {entry.key_id}: {entry.kind} of {decimal_text(entry.amount)}, balance now "
              f"{decimal_text(entry.balance_after)} (journal entry {entry.seq})")
        return 0
    if args.command == "journal":
        if store.get(args.key_id) is None:
            print(f"no API key with id {args.key_id}", file=sys.stderr)
            return 1
        raw = book.journal(args.key_id)
        entries = [CreditEntryObject.of(entry) for entry in raw]
        if args.json:
            for item in entries:
                print(json.dumps(item.model_dump()))  # what GET /v1/admin/keys/{id}/credit shows
            return 0
        if not entries:
            print(f"key {args.key_id} has no credit journal: it has no balance (unlimited)")
            return 0
        print(f"{'id':>6} {'when (UTC)':<20} {'kind':<11} {'amount':>16} {'balance':>16} {'who':<16} note")
        for item, entry in zip(entries, raw):
            print(f"{item.id:>6} {entry.created_at:%Y-%m-%d %H:%M:%S}  {item.kind:<11} {item.amount:>16} "
                  f"{item.balance:>16} {item.actor[:16]:<16} {item.note}")
        return 0
    if store.revoke(args.key_id):
        print(f"revoked {args.key_id}")
        return 0
    print(f"no active key with id {args.key_id}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
