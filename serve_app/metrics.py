"""Prometheus metrics through `ray.serve.metrics`, which Ray exports per node on its metrics port and PromQL
sums across replicas (prometheus_client inside replicas would give per-process numbers; design.md section 6).

Labels stay bounded: model (served names only, "-" before a model is resolved), route (the route template, or
"unmatched"), status (HTTP code). No per-request or per-key labels. Ray adds application, deployment and
replica labels and the `ray_` prefix, so `qwen3_requests` is scraped as `ray_qwen3_requests_total`.
Metric objects are created in the replica that uses them (they must be made inside a Ray worker).
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
BATCH_JOB_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
BATCH_TOKEN_BUCKETS = [64, 256, 1024, 4096, 16384, 65536, 262144]
FORWARD_PASS_BUCKETS = [1, 2, 3, 4, 6, 8, 16, 32, 64, 128]
RATIO_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]


class GatewayMetrics:
    def __init__(self):
        self.requests = Counter("qwen3_requests", "HTTP requests answered by the gateway",
                                tag_keys=("model", "route", "status"))
        self.latency = Histogram("qwen3_request_latency_seconds", "Gateway time per request, body to response",
                                 boundaries=LATENCY_BUCKETS_S, tag_keys=("model", "route"))
        self.input_tokens = Counter("qwen3_input_tokens", "Input tokens of served requests (billed tokens)",
                                    tag_keys=("model", "route"))
        self.documents = Counter("qwen3_documents", "Documents (rerank) or inputs (embeddings) served",
                                 tag_keys=("model", "route"))
        # No labels at all: which keys ran out is in the credit tables, not in a time series per key.
        self.credit_refusals = Counter("qwen3_credit_refusals",
                                       "Requests refused because the key's prepaid credit is spent (429 "
                                       "insufficient_quota)")

    def request(self, model: str, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"model": model, "route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"model": model, "route": route})

    def credit_refused(self) -> None:
        self.credit_refusals.inc()

    def served(self, model: str, route: str, tokens: int, documents: int) -> None:
        self.input_tokens.inc(tokens, tags={"model": model, "route": route})
        self.documents.inc(documents, tags={"model": model, "route": route})


class ModelMetrics:
    def __init__(self, model: str):
        self.tags = {"model": model}
        self.queue_wait = Histogram("qwen3_queue_wait_seconds", "Time a job waited for the engine",
                                    boundaries=LATENCY_BUCKETS_S, tag_keys=("model",))
        self.batch_jobs = Histogram("qwen3_batch_jobs", "Requests merged into one engine run",
                                    boundaries=BATCH_JOB_BUCKETS, tag_keys=("model",))
        self.batch_tokens = Histogram("qwen3_batch_tokens", "Real tokens in one engine run",
                                      boundaries=BATCH_TOKEN_BUCKETS, tag_keys=("model",))
        self.padding_efficiency = Histogram("qwen3_padding_efficiency",
                                            "Real tokens / token slots computed, per engine run",
                                            boundaries=RATIO_BUCKETS, tag_keys=("model",))
        self.forward_passes = Histogram("qwen3_forward_passes", "Forward passes (micro-batches, query-head passes "
                                        "included) per engine run", boundaries=FORWARD_PASS_BUCKETS,
                                        tag_keys=("model",))
        self.tokens_per_pass = Histogram("qwen3_tokens_per_pass", "Real tokens per forward pass, per engine run "
                                         "(mean over the run's passes)", boundaries=BATCH_TOKEN_BUCKETS,
                                         tag_keys=("model",))
        self.engine_seconds = Counter("qwen3_engine_seconds", "Seconds the engine spent in forward runs",
                                      tag_keys=("model",))
        # The autoscaling signal (serve_app/replica/autoscaling.py), set each time Serve asks the replica for it.
        self.held_tokens = Gauge("qwen3_held_tokens", "Tokens this replica holds: queued plus the rest of the running "
                                 "pass; kind online or background (Batch API)", tag_keys=("model", "kind"))
        self.tokens_per_second = Gauge("qwen3_tokens_per_second", "Tokens per engine-busy second over the autoscaling "
                                       "look-back window (the per-device estimate until measured)",
                                       tag_keys=("model",))

    def engine_run(self, jobs: int, real_tokens: int, computed_slots: int, passes: int, seconds: float,
                   waits: list[float]) -> None:
        self.batch_jobs.observe(jobs, tags=self.tags)
        self.batch_tokens.observe(real_tokens, tags=self.tags)
        if passes:
            self.forward_passes.observe(passes, tags=self.tags)
            self.tokens_per_pass.observe(real_tokens / passes, tags=self.tags)
        if computed_slots:
            self.padding_efficiency.observe(real_tokens / computed_slots, tags=self.tags)
        self.engine_seconds.inc(seconds, tags=self.tags)
        for wait in waits:
            self.queue_wait.observe(wait, tags=self.tags)

    def work(self, online_tokens: float, background_tokens: float, tokens_per_s: float) -> None:
        self.held_tokens.set(online_tokens, tags={**self.tags, "kind": "online"})
        self.held_tokens.set(background_tokens, tags={**self.tags, "kind": "background"})
        self.tokens_per_second.set(tokens_per_s, tags=self.tags)


class AutoscalingMetrics:
    """Set by the queued-work policy in Serve's controller, per model (no replica context there, so only the model
    tag): what it saw and what it asked for. Serve's own ray_serve_autoscaling_target_replicas and
    ray_serve_deployment_replica_healthy carry the count for either policy."""

    def __init__(self):
        self.replicas = Gauge("qwen3_autoscaling_replicas", "Running replicas of the model, as the policy saw them",
                              tag_keys=("model",))
        self.wanted = Gauge("qwen3_autoscaling_wanted_replicas", "Replicas the queued work calls for, before Serve's "
                            "delays, smoothing and min/max bounds", tag_keys=("model",))
        self.queued_tokens = Gauge("qwen3_autoscaling_queued_tokens", "Tokens queued in the model's replicas over the "
                                   "look-back window (and at its callers), as the policy saw them; kind online or "
                                   "background", tag_keys=("model", "kind"))

        self.arriving = Gauge("qwen3_autoscaling_online_tokens_per_second", "Online tokens the model's replicas "
                              "computed per second over the look-back window (the work arriving), as the policy saw "
                              "them", tag_keys=("model",))

    def decided(self, model: str, replicas: int, wanted: float, online_tokens: float,
                background_tokens: float, online_tokens_per_s: float) -> None:
        tags = {"model": model}
        self.arriving.set(online_tokens_per_s, tags=tags)
        self.replicas.set(replicas, tags=tags)
        self.wanted.set(wanted, tags=tags)
        self.queued_tokens.set(online_tokens, tags={**tags, "kind": "online"})
        self.queued_tokens.set(background_tokens, tags={**tags, "kind": "background"})
