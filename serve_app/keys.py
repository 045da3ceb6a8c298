"""Manage API keys: `python -m serve_app.keys create|list|revoke` (also installed as `qwen3-serve-keys`).

The database is $QWEN3_SERVE_DB if set, else --db, else the gateway's `database_url` in --config, else
sqlite:///var/qwen3-serve.db under the project root (what configs/local.yaml uses).

    python -m serve_app.keys create --name acme-prod --rpm 600 --tpm 2000000
    python -m serve_app.keys create --name ops --admin
    python -m serve_app.keys list
    python -m serve_app.keys revoke 3f2a9c1e

An admin key can do the same over HTTP at /v1/admin/keys (serve_app/admin.py).

The secret is printed once, at creation; only its SHA-256 is stored, so a lost key cannot be recovered: revoke
it and create another. Gateways pick up new and revoked keys within `auth.key_refresh_s` (default 2 s).
"""

from __future__ import annotations

import argparse
import json
import sys

from serve_app.protocol import ApiKeyObject
from serve_app.store import KeyStore, open_database


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
    listing = commands.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    listing.add_argument("--active", action="store_true", help="only keys that are not revoked")
    revoke = commands.add_parser("revoke", help="revoke a key by id; gateways refuse it within seconds")
    revoke.add_argument("key_id")
    args = parser.parse_args(argv)
    store = KeyStore(open_database(args.db, args.config))

    if args.command == "create":
        try:
            key, secret = store.create(args.name, admin=args.admin, requests_per_minute=args.rpm,
                                       tokens_per_minute=args.tpm)
        except ValueError as exc:
            print(f"not created: {exc}", file=sys.stderr)
            return 2
        print(f"created key {key.id} ({key.name}{', admin' if key.admin else ''}). Secret, shown only now:")
        print(secret)
        return 0
    if args.command == "list":
        keys = store.list(include_revoked=not args.active)
        if args.json:
            for key in keys:
                print(json.dumps(ApiKeyObject.of(key).model_dump()))  # what GET /v1/admin/keys shows
            return 0
        print(f"{'id':<10} {'name':<24} {'admin':<6} {'rpm':>8} {'tpm':>10} {'created':<20} revoked")
        for key in keys:
            print(f"{key.id:<10} {key.name[:24]:<24} {'yes' if key.admin else 'no':<6} "
                  f"{key.requests_per_minute or '-':>8} {key.tokens_per_minute or '-':>10} "
                  f"{key.created_at:%Y-%m-%d %H:%M:%S}  {key.revoked_at or '-'}")
        return 0
    if store.revoke(args.key_id):
        print(f"revoked {args.key_id}")
        return 0
    print(f"no active key with id {args.key_id}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
