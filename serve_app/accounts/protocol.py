"""The JSON shapes of API keys and credit entries: the admin routes' bodies and answers (serve_app/gateway/admin.py)
and what the keys CLI prints (keys_cli.py), so both show a key the same way."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from serve_app.accounts.credit.amounts import decimal_text


def unix_seconds(moment: datetime) -> int:
    # SQLite hands back naive datetimes; the store writes them in UTC.
    return int((moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp())


# ---- API keys (admin routes, /v1/admin/keys) ---------------------------------------------------------------------

# Credit amounts are decimal strings ("25", "2.50") or JSON numbers, which the admin routes read as exact decimals.
# Their type is checked with their value by the credit book (serve_app/accounts/credit/amounts.py parse_amount), so the CLI
# and the routes refuse the same amounts with the same words.
AMOUNT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "number"}]}


class ApiKeyCreateRequest(BaseModel):
    """Types only: the allowed names and limits are the store's (serve_app/accounts/store.py KeyStore.create), so the CLI and
    this route refuse the same keys with the same words."""

    # Unlike the inference bodies, unknown fields are refused: a misspelt limit ("request_per_minute") must not
    # quietly create a key without one.
    model_config = ConfigDict(extra="forbid")

    name: StrictStr  # who or what the key is for
    admin: StrictBool = False
    requests_per_minute: StrictInt | None = None  # None: unlimited
    tokens_per_minute: StrictInt | None = None  # input tokens; None: unlimited
    credit: Any = Field(default=None, json_schema_extra=AMOUNT_SCHEMA)  # starting credit (0 allowed); None: unlimited


class ApiKeyObject(BaseModel):
    """A key as the admin routes show it: never its secret or hash. Times are Unix seconds, as in OpenAI objects."""

    object: Literal["api_key"] = "api_key"
    id: str
    name: str
    admin: bool
    requests_per_minute: int | None
    tokens_per_minute: int | None
    created_at: int
    revoked_at: int | None
    balance: str | None = None  # prepaid credit left (exact decimal text); None: no balance, unlimited

    @classmethod
    def of(cls, key, balance: str | None = None) -> "ApiKeyObject":
        """From a serve_app.accounts.store.ApiKey (and its balance as decimal text, for a prepaid key)."""
        return cls(id=key.id, name=key.name, admin=key.admin, requests_per_minute=key.requests_per_minute,
                   tokens_per_minute=key.tokens_per_minute, created_at=unix_seconds(key.created_at),
                   revoked_at=unix_seconds(key.revoked_at) if key.revoked_at else None, balance=balance)


class CreatedApiKey(ApiKeyObject):
    secret: str  # `Authorization: Bearer <secret>`; shown in this response only, never stored


class ApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApiKeyObject]


# ---- prepaid credit (admin routes, /v1/admin/keys/{id}/credit) ---------------------------------------------------

class CreditEntryRequest(BaseModel):
    """A top-up (amount > 0) or, with `adjustment`, a correction either way. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    amount: Any = Field(json_schema_extra=AMOUNT_SCHEMA)
    note: StrictStr  # why: an invoice or ticket number, say
    adjustment: StrictBool = False


class CreditEntryObject(BaseModel):
    """One row of a key's credit journal."""

    object: Literal["credit_entry"] = "credit_entry"
    id: int
    key_id: str
    kind: Literal["initial", "top_up", "adjustment"]
    amount: str  # exact decimal text
    balance: str  # the balance this entry left
    note: str
    actor: str  # who: "key:<admin key id>" or "cli:<OS user>"
    created_at: int

    @classmethod
    def of(cls, entry) -> "CreditEntryObject":
        """From a serve_app.accounts.credit.book.JournalEntry."""
        return cls(id=entry.seq, key_id=entry.key_id, kind=entry.kind, amount=decimal_text(entry.amount),
                   balance=decimal_text(entry.balance_after), note=entry.note, actor=entry.actor,
                   created_at=unix_seconds(entry.created_at))


class CreditJournal(BaseModel):
    object: Literal["list"] = "list"
    data: list[CreditEntryObject]
