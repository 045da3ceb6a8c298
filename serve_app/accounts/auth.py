"""API-key authentication for the gateway: every route but the probes (/health, /ready) needs
`Authorization: Bearer <key>`.

Each gateway replica keeps the active keys' hashes in memory and reloads them every `key_refresh_s`, so a request
costs one SHA-256 and a dict lookup, never a database round trip, and a revoked key stops working on every
replica within seconds. An unknown key waits for a reload that started after it arrived (shared, at most 4 a
second), so a key created a moment ago works at once. Prepaid balances (serve_app/accounts/credit) are reloaded with the
keys.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from serve_app.accounts.keys import ApiKey, KeyStore, verify
from serve_app.errors import StoreUnavailable, Unauthorized
from serve_app.periodic import Periodic

logger = logging.getLogger("ray.serve")

OPEN_PATHS = frozenset({"/health", "/ready"})  # probes (serve_app/gateway/probes.py)
MISS_RELOAD_MIN_INTERVAL_S = 0.25


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class KeyGuard:
    def __init__(self, store: KeyStore, refresh_s: float, also_load: Callable[[], None] | None = None):
        """`also_load` is read with the keys, in the same worker thread and right after them (the prepaid
        balances: a key that is known is known with its balance)."""
        self.store = store
        self.also_load = also_load
        self._known: dict[str, ApiKey] = {}
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()
        self._refresher = Periodic(self.reload, refresh_s, "API keys")

    async def authenticate(self, authorization: str | None) -> ApiKey:
        self._refresher.ensure_started()
        token = bearer_token(authorization)
        if token is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
        if not self._loaded_at:
            try:
                await self.reload()
            except Exception as exc:  # noqa: BLE001 - the store is down and no keys were ever loaded
                logger.exception("gateway: cannot load API keys")
                raise StoreUnavailable("the API key store is unavailable; retry shortly",
                                       headers={"Retry-After": "5"}) from exc
        key = verify(token, self._known)
        if key is None:
            # Maybe created a moment ago: make sure the keys were read after this request arrived. Reloads are
            # shared (one per MISS_RELOAD_MIN_INTERVAL_S at most), so a flood of bad keys cannot flood the store.
            missed_at = time.monotonic()
            await asyncio.sleep(max(0.0, self._loaded_at + MISS_RELOAD_MIN_INTERVAL_S - missed_at))
            await self.reload(unless_loaded_since=missed_at)
            key = verify(token, self._known)
        if key is None:
            raise Unauthorized("invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        return key

    async def reload(self, unless_loaded_since: float | None = None) -> None:
        async with self._lock:
            if unless_loaded_since is not None and self._loaded_at >= unless_loaded_since:
                return  # another request's reload already read the store after ours arrived
            started = time.monotonic()
            self._known = await asyncio.to_thread(self._load)
            self._loaded_at = started

    def _load(self) -> dict[str, ApiKey]:
        known = self.store.active_by_hash()
        if self.also_load is not None:
            self.also_load()
        return known
