"""The gateway's side of prepaid credit: prices of the models it serves, the balances it admits requests by, and
the ledger writer's hook that debits prepaid keys in the transaction that records their usage."""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any, Callable

from sqlalchemy.engine import Connection

from serve_app.accounts.credit.amounts import decimal_text
from serve_app.accounts.credit.book import Balance, CreditBook, debit_rows
from serve_app.config import Price
from serve_app.errors import InsufficientQuota

ZERO = Decimal(0)


class Pricing:
    """Each served model's price as its replicas describe it (describe() -> facts["price"]), kept per model name
    from the latest deploy the gateway has resolved a request to; a model without one costs nothing."""

    def __init__(self):
        self._prices: dict[str, tuple[float, Price | None]] = {}

    def note(self, entry) -> None:
        """Called with the ModelEntry each request resolves to (cheap unless the model was redeployed)."""
        known = self._prices.get(entry.name)
        if known is None or known[0] != entry.deployed_at:
            raw = entry.facts.get("price")
            self._prices[entry.name] = (entry.deployed_at, Price.model_validate(raw) if raw else None)

    def cost(self, row: dict[str, Any]) -> Decimal:
        known = self._prices.get(row["model"])
        return known[1].cost(row) if known is not None and known[1] is not None else ZERO


class CreditGuard:
    """Admission by balance, from views that are never older than the last key reload or own commit for a key.

    A view is a key's (credited, used, version) as some transaction left it. Views arrive from two sides: the
    reload (all prepaid keys, on the keys' schedule, in a worker thread) and this replica's own ledger commits
    (the keys they debited, as the update returned them, other replicas' debits included). Versions only grow, so
    the newest view wins whatever order they arrive in, and nothing is counted twice."""

    def __init__(self, book: CreditBook, on_refusal: Callable[[], None] | None = None):
        self.book = book
        self.pricing = Pricing()
        self.on_refusal = on_refusal
        self._views: dict[str, Balance] = {}
        self._lock = threading.Lock()  # views are merged from worker threads and read on the event loop

    def load(self, key_ids: list[str] | None = None) -> None:
        """Reload every prepaid key's balance, or these keys' (blocking: run it off the event loop, as
        KeyGuard.reload does)."""
        self._merge(self.book.balances(key_ids).values())

    def _merge(self, balances) -> None:
        with self._lock:
            for balance in balances:
                known = self._views.get(balance.key_id)
                if known is None or balance.version > known.version:
                    self._views[balance.key_id] = balance

    def balance(self, key_id: str) -> Balance | None:
        return self._views.get(key_id)

    def admit(self, key_id: str) -> None:
        """Raise InsufficientQuota for a prepaid key whose balance is at or below zero; anything else passes."""
        view = self._views.get(key_id)
        if view is None or view.balance > 0:
            return
        if self.on_refusal is not None:
            self.on_refusal()
        raise InsufficientQuota(
            f"the prepaid credit of API key {key_id} is spent (balance {decimal_text(view.balance)}): requests are "
            f"refused until it is topped up. An admin tops it up with POST /v1/admin/keys/{key_id}/credit "
            f'{{"amount": "25", "note": "..."}} or `python -m serve_app.keys credit {key_id} --amount 25 '
            '--note ...`; GET /v1/usage shows the balance.',
            headers={"x-should-retry": "false"})

    def with_rows(self, connection: Connection, rows: list[dict[str, Any]]) -> Callable[[], None] | None:
        """The ledger writer's hook (serve_app/accounts/ledger.py): debit the rows in their transaction; once it commits,
        take the balances it left as the newest views of those keys."""
        balances = debit_rows(connection, rows, self.pricing.cost, self._views.__contains__)
        if not balances:
            return None
        return lambda: self._merge(balances.values())
