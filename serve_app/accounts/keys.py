"""API keys: create, list, revoke, and the constant-time check of a presented key.

Keys: `q3s_<id>_<secret>`. Only the SHA-256 of the whole key is stored (keys are 190+ bits of randomness, so a
fast hash is the right tool, as for GitHub or Stripe tokens; a password KDF would only slow every request).
A prepaid key's first credit entry is written by the credit book (serve_app/accounts/credit/book.py) in the
transaction that creates the key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from serve_app.accounts.credit.amounts import InvalidAmount, parse_amount
from serve_app.accounts.credit.book import record_entry
from serve_app.accounts.store import MAX_KEY_NAME_CHARS, InvalidField, api_keys, now

KEY_PREFIX = "q3s"
MAX_KEY_LIMIT = 2**31 - 1  # per-minute limits are INTEGER columns


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class InvalidKeySettings(InvalidField):
    """A key that cannot be created as asked."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    key_hash: str
    admin: bool
    requests_per_minute: int | None
    tokens_per_minute: int | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class KeyStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def create(self, name: str, *, admin: bool = False, requests_per_minute: int | None = None,
               tokens_per_minute: int | None = None, credit=None, actor: str = "cli") -> tuple[ApiKey, str]:
        """A new key; the secret is returned here and never again (only its hash is stored). Limits are None
        (unlimited) or 1 to MAX_KEY_LIMIT: a limit of 0 would read as "no limit" wherever a falsy check is made,
        and one past the INTEGER column would fail in the database. `credit` (a decimal, 0 allowed) makes it a
        prepaid key: its first journal entry is written in the same transaction as the key, so no gateway ever
        sees the key without its balance. `actor` is who asked, for that entry."""
        if not name.strip() or not name.isprintable() or len(name) > MAX_KEY_NAME_CHARS:
            raise InvalidKeySettings("name", f"a key's name must be 1 to {MAX_KEY_NAME_CHARS} printable characters, "
                                             "not only whitespace")
        for field, limit in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            if limit is not None and not 1 <= limit <= MAX_KEY_LIMIT:
                raise InvalidKeySettings(field, f"{field} must be at least 1 and at most {MAX_KEY_LIMIT} (leave it "
                                                f"out for no limit), not {limit}")
        if credit is not None:
            try:
                credit = parse_amount(credit, allow_zero=True)
            except InvalidAmount as exc:
                raise InvalidKeySettings("credit", f"credit: {exc} (leave it out for a key without a balance)"
                                         ) from None
        key_id = secrets.token_hex(4)
        secret = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(24)}"
        row = {"id": key_id, "name": name, "key_hash": hash_key(secret), "admin": admin,
               "requests_per_minute": requests_per_minute, "tokens_per_minute": tokens_per_minute,
               "created_at": now(), "revoked_at": None}
        with self.engine.begin() as connection:
            connection.execute(insert(api_keys).values(**row))
            if credit is not None:
                record_entry(connection, key_id, credit, kind="initial", note="initial credit", actor=actor)
        return ApiKey(**row), secret

    def revoke(self, key_id: str) -> bool:
        with self.engine.begin() as connection:
            result = connection.execute(update(api_keys).where(api_keys.c.id == key_id,
                                                               api_keys.c.revoked_at.is_(None))
                                        .values(revoked_at=now()))
        return result.rowcount == 1

    def get(self, key_id: str) -> ApiKey | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        return ApiKey(**row._mapping) if row is not None else None

    def list(self, include_revoked: bool = True) -> list[ApiKey]:
        query = select(api_keys).order_by(api_keys.c.created_at)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self.engine.connect() as connection:
            return [ApiKey(**row._mapping) for row in connection.execute(query)]

    def active_by_hash(self) -> dict[str, ApiKey]:
        return {key.key_hash: key for key in self.list(include_revoked=False)}


def verify(presented: str, known: dict[str, ApiKey]) -> ApiKey | None:
    """The active key matching `presented`, or None. The final comparison is constant-time."""
    digest = hash_key(presented)
    key = known.get(digest)
    if key is not None and hmac.compare_digest(key.key_hash, digest):
        return key
    return None
