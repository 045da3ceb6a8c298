"""Routing a model's requests to the replica with the least work queued, in tokens, instead of Serve's power of two
choices on requests in flight.

Serve's default router picks two replicas at random and sends the request to the one with fewer requests in flight.
For these models a request is not a unit of work (serve_app/replica/autoscaling.py says why): a replica running one
1,000-document rerank holds one request and looks lighter than a replica serving three one-text queries, so Serve
sends the next small request to it, where it waits for the whole rerank. The queued-work policy then adds replicas,
but the router does not use them for the requests that need them. bench/autoscaling_sim.py measured it: with Serve's
router, small requests' p99 queue wait stayed far above the policy's target whatever it was (BENCHMARKS.md,
"Autoscaling").

`QueuedWorkRouter` ranks the replicas by the tokens each holds, least first, from two sources:
- what this router itself sent and is not yet answered (`on_request_routed` / `on_request_completed`), each request's
  tokens estimated from its arguments as the replica estimates them before tokenizing (`estimated_work` of
  `rerank_size` / `embed_size`): immediate for this caller's own traffic, estimated rather than counted;
- what the replica reported last (`ModelServer.record_routing_stats`: its online and background tokens, from the
  same WorkSignal as the autoscaling metrics), which covers every caller (other gateway replicas, the batch runner),
  every `routing_stats_period_s`.
A replica's load is the larger of the two: the report includes this router's requests once they arrived, and what
this router sent since is not in it yet. Ties (idle replicas) are broken at random, so equal replicas share the load.
Serve then sends the request to the first replica in that order that accepts it (max_ongoing_requests), probing as
it does for its own router.

Selected per model by `deployment.request_router: queued_work` (serve_app/config.py). Imports: the standard library,
Serve's public router API and autoscaling.py (no torch): Serve imports this class by name in every process that
holds a handle to the model (the gateway replicas, the batch runner).
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from serve_app.replica.autoscaling import BACKGROUND_TOKENS, ONLINE_TOKENS, embed_size, estimated_work, rerank_size


def request_work(method: str, args: list | tuple) -> int:
    """Tokens a handle call of `method` will make its replica compute, estimated from its arguments: a rerank's
    (query, documents, ...), an embed's (inputs, ...), a serve_group's (method, [args of each call]). 0 for calls
    that make no engine work (describe, stats, tokenize)."""
    try:
        if method == "serve_group":
            inner, calls = args[0], args[1]
            return sum(request_work(inner, call) for call in calls)
        if method == "rerank":
            query, documents = args[0], args[1]
            return estimated_work(rerank_size(query, documents), len(documents), texts=True)
        if method == "embed":
            size, texts = embed_size(args[0])
            return estimated_work(size, 0, texts)
    except (IndexError, TypeError):  # not the shape of our calls: no estimate, never a routing failure
        return 0
    return 0


class QueuedWorkRouter(FIFOMixin, RequestRouter):
    """Least queued tokens first (see the module docstring). FIFO: requests are routed in the order they came."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._sent: dict[ReplicaID, int] = {}  # tokens this router sent to each replica, not yet answered
        self._requests: dict[str, tuple[ReplicaID, int]] = {}  # internal request id -> (replica, tokens)

    def replica_tokens(self, replica: RunningReplica) -> float:
        """The tokens `replica` holds as far as this router knows: max(its own unanswered sends, the last report)."""
        stats = replica.routing_stats or {}
        reported = float(stats.get(ONLINE_TOKENS, 0.0)) + float(stats.get(BACKGROUND_TOKENS, 0.0))
        return max(float(self._sent.get(replica.replica_id, 0)), reported)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        ranked = sorted(candidate_replicas, key=lambda replica: (self.replica_tokens(replica), random.random()))
        return [[replica] for replica in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        tokens = request_work(pending_request.metadata.call_method, pending_request.args)
        if tokens:
            self._requests[pending_request.metadata.internal_request_id] = (replica_id, tokens)
            self._sent[replica_id] = self._sent.get(replica_id, 0) + tokens

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        routed = self._requests.pop(internal_request_id, None)  # also called for requests a replica refused
        if routed is None:
            return
        replica, tokens = routed
        left = self._sent.get(replica, 0) - tokens
        if left > 0:
            self._sent[replica] = left
        else:
            self._sent.pop(replica, None)
