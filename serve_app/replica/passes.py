"""What one engine run (a forward "pass" of the replica's engine loop) takes from a queue: bounded passes.

A run computes everything it took before anything else starts, so a request that arrives during a run waits for
all of it. Unbounded, a 1,000-document rerank is one run of 50,000 tokens: 1.2 s on an H200 for the 8B, 266 s on
the 2-core CPU, which every small request routed to that replica waits out (BENCHMARKS.md, "Autoscaling"). So each
run is bounded to about `max_pass_seconds` of the replica's measured throughput, but never below the engine's
micro-batch budget, where parts would leave forward passes part-empty (`pass_bound`: on the 2-core CPU, runs of
about 400 tokens made a long rerank 2.4x slower, runs of the 1,024-token budget 1.13x and 1.17x in two runs;
bench/pass_bench.py). A request larger than that runs in parts, whole units at a time (a rerank's documents, an
embedding's inputs: models' `job.part`), with the requests that arrived meanwhile taken in between. Sizes are the
engine's work (job_work, `job.unit_work`): a rerank's query head counts once, though every part computes it again:

    a run = whole requests, oldest first, up to half the bound while a request runs in parts (at least one)
          + the next part of one request running in parts, filling the bound (at least half of it); the requests
            in parts take turns, so a short one among them is not stuck behind a 1,000-document one

So a request waits about one bound's run behind work already inside the replica (more only behind other requests
in parts), requests in parts keep at least half of every run, and requests that fit take no more runs than
before. Pure bookkeeping, in tokens, used by the replica (serve_app/replica/deployment.py) and by the autoscaling
simulation (bench/autoscaling_sim.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable


def pass_bound(tokens_per_s: float, max_pass_seconds: float | None, max_batch_tokens: int,
               min_tokens: int) -> int | None:
    """Tokens one engine run may take: max_pass_seconds of the replica's throughput, at least `min_tokens` (the
    engine's micro-batch budget: a smaller run leaves its forward passes part-empty) and at most max_batch_tokens.
    None when max_pass_seconds is None: no request runs in parts (runs still gather at most max_batch_tokens of
    whole requests)."""
    if max_pass_seconds is None:
        return None
    return max(min(min_tokens, max_batch_tokens), min(max_batch_tokens, int(tokens_per_s * max_pass_seconds)))


@dataclass(eq=False)
class Pending:
    """A request in the engine queue: `left` tokens not yet taken by a run. `done` units (documents, inputs) of it
    have been taken by earlier runs; `parts` holds their results until the last."""

    item: Any
    left: int
    done: int = 0
    upto: int = 0  # the units the run taking a part now covers end here (set by the caller's `cut`)
    parts: list = field(default_factory=list)


class PassPlanner:
    """One kind's engine queue (the replica keeps one for online work, one for background work)."""

    def __init__(self):
        self.whole: deque[Pending] = deque()  # fit in a bound: taken whole, oldest first
        self.in_parts: deque[Pending] = deque()  # larger than the bound when they came: taken in parts

    def __bool__(self) -> bool:
        return bool(self.whole or self.in_parts)

    def __len__(self) -> int:
        return len(self.whole) + len(self.in_parts)

    def add(self, pending: Pending, bound: int | None) -> None:
        (self.in_parts if bound is not None and pending.left > bound else self.whole).append(pending)

    def drop(self, gone: Callable[[Pending], bool]) -> None:
        """Forget the requests `gone` says no one waits for any more (their clients left)."""
        self.whole = deque(p for p in self.whole if not gone(p))
        self.in_parts = deque(p for p in self.in_parts if not gone(p))

    def next_run(self, bound: int | None, cut: Callable[[Pending, int], int],
                 max_tokens: int) -> list[tuple[Pending, int]]:
        """Take one run's work, at most `bound` (None: unbounded) and `max_tokens` tokens but at least one request
        or part: [(pending, tokens taken from it)]. `cut(pending, room)` takes the next units of a request running
        in parts that fit in `room` tokens (at least one unit) and returns their tokens; a request taken whole has
        all its `left`. Updates `left` (a request with nothing left is out of the planner)."""
        taken: list[tuple[Pending, int]] = []
        tokens = 0
        bound = max_tokens if bound is None else min(bound, max_tokens)
        room = bound // 2 if self.in_parts else bound
        while self.whole and (not taken or tokens + self.whole[0].left <= room):
            pending = self.whole.popleft()
            taken.append((pending, pending.left))
            tokens += pending.left
            pending.left = 0
        if self.in_parts:
            pending = self.in_parts.popleft()
            share = min(pending.left, cut(pending, max(bound - tokens, bound // 2)))
            taken.append((pending, share))
            pending.left -= share
            if pending.left > 0:
                self.in_parts.append(pending)  # in turn with the others in parts: a short one is not stuck behind
        return taken
