"""Per-key rate limits (requests per minute, input tokens per minute), shared by every gateway replica.

One named Ray actor holds a token bucket per key and limit: capacity = the per-minute limit, refilled at limit/60
per second, so a key may burst up to its minute's allowance and sustain exactly its rate. Every gateway replica
asks the same actor, so the limit holds for the key as a whole however many replicas serve it (a split of the limit
between replicas would drift with uneven routing and autoscaling). Only keys that have limits pay the call.

Requests are charged one unit before they run. Tokens are known only after tokenization, so a request is let in
while the key's token bucket is not empty and its real token count is charged afterwards: a key overshoots by at
most the requests it had in flight, and then waits in proportion.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import ray

LIMITER_NAME = "qwen3-rate-limiter"
LIMITER_NAMESPACE = "qwen3-serve"


@dataclass
class Bucket:
    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / 60.0)
        self.updated = now

    def seconds_until(self, amount: float) -> float:
        return max(0.0, (amount - self.level) * 60.0 / self.capacity)


class RateLimiter:
    """The shared buckets (a Ray actor; async so that calls never queue behind each other)."""

    def __init__(self):
        self.buckets: dict[tuple[str, str], Bucket] = {}

    def _bucket(self, key_id: str, kind: str, limit: int, now: float) -> Bucket:
        bucket = self.buckets.get((key_id, kind))
        if bucket is None or bucket.capacity != limit:  # new key, or its limit changed
            bucket = self.buckets[(key_id, kind)] = Bucket(float(limit), float(limit), now)
        bucket.refill(now)
        return bucket

    async def admit(self, key_id: str, requests_per_minute: int | None,
                    tokens_per_minute: int | None) -> tuple[bool, int, str]:
        """(admitted, retry_after_s, which limit refused)."""
        now = time.monotonic()
        requests = self._bucket(key_id, "requests", requests_per_minute, now) if requests_per_minute else None
        tokens = self._bucket(key_id, "tokens", tokens_per_minute, now) if tokens_per_minute else None
        if requests is not None and requests.level < 1:
            return False, max(1, math.ceil(requests.seconds_until(1))), "requests per minute"
        if tokens is not None and tokens.level <= 0:
            return False, max(1, math.ceil(tokens.seconds_until(1))), "tokens per minute"
        if requests is not None:
            requests.level -= 1
        return True, 0, ""

    async def charge_tokens(self, key_id: str, tokens_per_minute: int, tokens: int) -> None:
        bucket = self._bucket(key_id, "tokens", tokens_per_minute, time.monotonic())
        bucket.level -= tokens


def limiter_handle():
    """The cluster's one limiter actor, created by whichever gateway replica asks first."""
    return ray.remote(RateLimiter).options(name=LIMITER_NAME, namespace=LIMITER_NAMESPACE, get_if_exists=True,
                                           lifetime="detached", num_cpus=0, max_restarts=-1).remote()
