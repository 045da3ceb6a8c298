"""A coroutine run every few seconds in the replica's event loop, started by the first request that needs it.

The gateway keeps two tables fresh this way (API keys, models). It starts lazily because a replica's constructor
may not run on the loop that serves requests; a failed run is logged and the last good table kept.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

logger = logging.getLogger("ray.serve")


class Periodic:
    def __init__(self, run: Callable[[], Awaitable[None]], period_s: float, what: str):
        self.run = run
        self.period_s = period_s
        self.what = what
        self._task: asyncio.Task | None = None

    def ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._forever())

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.run()
            except Exception:  # noqa: BLE001 - keep the last good table; the source may be back next time
                logger.exception("gateway: refreshing %s failed; keeping the previous one", self.what)
