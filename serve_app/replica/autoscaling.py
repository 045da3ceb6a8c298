"""Autoscaling on the work queued in a model's replicas, in tokens, instead of on the number of requests.

Serve's default policy scales on ongoing requests per replica. For these models a request is not a unit of work:
one rerank of a query against 1,000 documents costs as much as thousands of one-document reranks. Both halves of
the replacement run on Serve's own autoscaler (Ray Serve 2.60: custom replica metrics and a custom policy):

The signal (`WorkSignal`, returned by `ModelServer.record_autoscaling_stats`). Serve asks each replica for it every
min(0.2 x look_back_period_s, metrics_interval_s) seconds, keeps the points of the last look_back_period_s and
pushes them to the controller every metrics_interval_s; the policy sees each one per replica, averaged over the
look-back window by the deployment's aggregation function (time-weighted mean), in `ctx.aggregated_metrics`:

    online_tokens      tokens of online requests the replica holds: waiting (Serve's batch queue, the engine queue)
                       plus what remains of the running pass, read from the engine's own counter of computed tokens
                       (a request still being tokenized: estimated from its characters, `estimated_work`);
                       while online requests wait behind a background pass, that pass's rest counts here too (it is
                       ahead of them), not in background_tokens
    online_requests    online requests inside the replica
    background_tokens  the same as online_tokens for background work (Batch API lines), counted apart
    tokens_per_s       tokens the engine computed per second it was busy, over the look-back window (the replica's
                       whole life when it was idle for all of it); the per-device estimate until it has run for
                       MIN_MEASURED_S
    online_tokens_per_s  online tokens the engine computed per second of the look-back window: the online work
                       arriving at this replica, which it must keep up with while it drains what it holds (computed,
                       not arrived: while a replica drains a backlog it counts the backlog too, so a drain gets
                       more replicas, not fewer)
    measured           1 when tokens_per_s is measured, 0 while it is the estimate

A token here is a token the engine computes: a rerank request's query head once plus every document window, an
embedding request's inputs. So held tokens and tokens per second are in the same unit.

The policy (`QueuedWorkPolicy`, selected by a model's `autoscaling.queued_work`): the replicas needed so that the
online tokens held (plus the requests waiting at callers, at the mean tokens of a held request) drain within
`target_queue_seconds` at the mean replica's tokens_per_s, while the online work that keeps arriving is computed
too:

    wanted = (online_tokens_per_s + online_tokens / target_queue_seconds) / tokens_per_s
             [+ background_tokens / (tokens_per_s x background_queue_seconds), only when that is configured]

Without the arrivals term (the first version) the replicas only matched the queue: at equilibrium they ran nearly
always busy, and a queue that long made small requests wait several times the target on a GPU-rate trace
(bench/autoscaling_sim.py --engine h200-8b; BENCHMARKS.md, "Autoscaling").

A request longer than the target counts in full: one 266 s rerank against a 5 s target asks for the maximum. Serve
never moves a request once a replica has it, so this does not speed that request up; what the replicas buy is
room for the requests that come next, which Serve's router (power of two choices on requests in flight) would
otherwise send to the replica busy with it, since one request in flight looks light. Counting each request at most
as one target's worth was tried and measured worse (bench/autoscaling_sim.py; BENCHMARKS.md, "Autoscaling").

The result is bounded by min/max replicas. Serve wraps every custom policy (ray/serve/autoscaling_policy.py
`_apply_autoscaling_config`) with its upscaling/downscaling factors and its upscale/downscale delays, and bounds
the result by min/max replicas again: the same smoothing and delays as for its own policy, not re-implemented here.
Background work alone never adds replicas unless `background_queue_seconds` is set; it only runs on what online
traffic leaves.

Imports: only the standard library and serve_app.metrics, because Serve imports this module by name
(QUEUED_WORK_POLICY in config.py) and pickles the policy by value into its controller, which never loads torch.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

logger = logging.getLogger("ray.serve")

# The custom metrics a replica reports (Serve's names for them in ctx.aggregated_metrics).
ONLINE_TOKENS = "online_tokens"
ONLINE_REQUESTS = "online_requests"
BACKGROUND_TOKENS = "background_tokens"
TOKENS_PER_S = "tokens_per_s"
ONLINE_TOKENS_PER_S = "online_tokens_per_s"
MEASURED = "measured"

# Engine-busy seconds a replica needs before its throughput counts as measured: less is mostly start-up cost.
MIN_MEASURED_S = 0.1

# The per-device estimate of a replica that has not measured its throughput yet: useful FLOP/s of the device over
# 2 x the model's non-embedding parameters (the FLOPs of one token through the layers; the embedding table is a
# lookup). Override it per model with `autoscaling.queued_work.estimated_tokens_per_s`.
# CPU, per torch thread: BENCHMARKS.md ("Engines vs the model cards' code"): the shape-true 0.6B reranker computed
# 14,873 tokens in 79.1 s on 2 threads, 188 tokens/s; at 2 x 0.44 B non-embedding parameters per token that is
# 165 GFLOP/s, 83 per thread. 80 is used.
CPU_FLOPS_PER_THREAD = 80e9
# CUDA: 200 TFLOP/s. Measured on an H200 in bf16 (BENCHMARKS.md "GPU", engine.run at the 32k-slot budget): 71 to 111
# useful TFLOP/s for the 0.6B, 184 to 272 for the 4B, 235 to 338 for the 8B; so the estimate is about 2x
# optimistic for the 0.6B, a little pessimistic for the 8B. A fractional replica shares its GPU's compute with its
# neighbours; the estimate ignores them, and the replica's own measurement replaces it after its first
# MIN_MEASURED_S of work.
CUDA_FLOPS = 200e12


def estimated_tokens_per_s(device: str, parameters: int, embedding_parameters: int, cpu_threads: int) -> float:
    """Tokens per second a replica of this model is assumed to compute on `device` before it has measured it."""
    flops = CUDA_FLOPS if device.startswith("cuda") else CPU_FLOPS_PER_THREAD * max(1, cpu_threads)
    return flops / (2 * max(1, parameters - embedding_parameters))


# For a request not tokenized yet: characters per token of text (Qwen3's tokenizer on English prose, about 4) and
# the reranker prompt's own tokens, once per request (prefix and instruction) and per document (its markers and the
# suffix): "what do pandas eat?" against "Pandas eat bamboo." is a 65-token head and a 16-token tail, 5 + 5 of them
# the texts'.
CHARS_PER_TOKEN = 4
RERANK_HEAD_TOKENS = 60
RERANK_DOCUMENT_TOKENS = 11


def rerank_size(query: str, documents: list[str]) -> int:
    """A rerank call's characters of text: what its estimate and its tokenizing place are decided on."""
    return len(query) + sum(map(len, documents))


def embed_size(inputs: list[str] | list[list[int]]) -> tuple[int, bool]:
    """An embed call's size and whether it is text: characters of its texts, or its count of token ids."""
    return sum(map(len, inputs)), not inputs or isinstance(inputs[0], str)


def estimated_work(size: int, documents: int, texts: bool) -> int:
    """The tokens a request will hold once tokenized, guessed before it is: `size` is its characters of text, or
    its count of token ids when not `texts`; `documents` a rerank's (0 for embeddings)."""
    tokens = size // CHARS_PER_TOKEN if texts else size
    if documents:
        tokens += RERANK_HEAD_TOKENS + RERANK_DOCUMENT_TOKENS * documents
    return max(1, tokens)


def job_work(job: Any) -> int:
    """Tokens the engine computes for a tokenized job: a rerank job's query head once plus every document window,
    an embedding job's inputs. Never raises (it runs around every request); anything odd counts as one token."""
    try:
        head = getattr(job, "head_ids", None)
        if head is not None:
            return len(head) + sum(len(tail) for tail in job.tail_ids)
        return max(1, int(job.num_tokens))
    except Exception:  # noqa: BLE001 - see docstring
        return 1


class WorkSignal:
    """One replica's autoscaling signal. Called on the replica's event loop only; the engine thread's progress is
    read through the counter passed in (the engine's cumulative real tokens), so nothing here is shared with it.

    Jobs are held by a key (the replica uses id(job)) from when they are tokenized until their result is back, for
    the work they have left: when a run starts, the caller holds each of its jobs for what the run leaves of it (0
    for a job run whole, the rest for a job run in parts) and announces the run with the work it computes."""

    def __init__(self, window_s: float, estimated_tokens_per_s: float):
        self.window_s = window_s
        self.estimate = estimated_tokens_per_s
        self.held: dict[Any, tuple[int, bool]] = {}  # key -> (work, background)
        self.total_tokens = 0  # computed by every run that ended, and the engine-busy seconds they took
        self.total_seconds = 0.0
        # (ended at, tokens, seconds, background) of the runs that ended within the window
        self._runs: deque[tuple[float, int, float, bool]] = deque()
        # The running pass: started at, the engine counter then, its work, background or not.
        self._run: tuple[float, int, int, bool] | None = None

    def tokens_per_s(self) -> float:
        """Tokens per busy second over the replica's life (the estimate until it has measured MIN_MEASURED_S)."""
        if self.total_seconds >= MIN_MEASURED_S:
            return self.total_tokens / self.total_seconds
        return self.estimate

    def hold(self, key: Any, work: int, background: bool) -> None:
        self.held[key] = (work, background)

    def release(self, key: Any) -> None:
        self.held.pop(key, None)

    def run_started(self, now: float, counter: int, work: int, background: bool) -> None:
        """A run that computes `work` tokens starts (what its jobs have left after it, the caller holds)."""
        self._run = (now, counter, work, background)

    def run_ended(self, now: float, tokens: int, seconds: float) -> None:
        background = self._run is not None and self._run[3]
        self._run = None
        self.total_tokens += tokens
        self.total_seconds += seconds
        self._runs.append((now, tokens, seconds, background))

    def report(self, now: float, counter: int, online_requests: int) -> dict[str, float]:
        """The metrics Serve records for this replica now (the names at the top of this module)."""
        while self._runs and self._runs[0][0] < now - self.window_s:
            self._runs.popleft()
        tokens = sum(run[1] for run in self._runs)
        seconds = sum(run[2] for run in self._runs)
        online_computed = sum(run[1] for run in self._runs if not run[3])
        remaining, run_background = 0, False
        if self._run is not None:  # the running pass: what it still has to compute
            started, at_start, work, run_background = self._run
            done = max(0, counter - at_start)
            remaining = max(0, work - done)
            tokens += done
            seconds += max(0.0, now - started)
            if not run_background:
                online_computed += done
        if seconds >= MIN_MEASURED_S:
            rate, measured = tokens / seconds, 1
        else:  # the replica's whole life, or the estimate
            rate, measured = self.tokens_per_s(), int(self.total_seconds >= MIN_MEASURED_S)
        online = sum(work for work, background in self.held.values() if not background)
        background = sum(work for work, bg in self.held.values() if bg)
        if run_background and not online:
            background += remaining
        else:  # an online pass, or a background pass online work waits behind: it is ahead of that work
            online += remaining
        return {ONLINE_TOKENS: float(online), ONLINE_REQUESTS: float(online_requests),
                BACKGROUND_TOKENS: float(background), TOKENS_PER_S: float(rate), MEASURED: float(measured),
                ONLINE_TOKENS_PER_S: online_computed / self.window_s}


def wanted_replicas(online_tokens: float, background_tokens: float, tokens_per_s: float,
                    target_queue_seconds: float, background_queue_seconds: float | None = None,
                    online_arriving: float = 0.0) -> float:
    """Replicas that drain the online tokens within target_queue_seconds while computing the `online_arriving`
    tokens per second that keep coming (and the background tokens within background_queue_seconds, when set) at
    tokens_per_s each. Unbounded; a fraction means part of a replica."""
    wanted = (online_arriving + online_tokens / target_queue_seconds) / tokens_per_s
    if background_queue_seconds is not None:
        wanted += background_tokens / (tokens_per_s * background_queue_seconds)
    return wanted


class QueuedWorkPolicy:
    """Serve's `policy_function` for a model with `autoscaling.queued_work` (the kwargs come from there). Serve makes
    one instance per deployment in its controller and calls it every control-loop tick with the deployment's
    AutoscalingContext; it returns the replicas wanted, within min/max, and a (here empty) policy state."""

    def __init__(self, target_queue_seconds: float = 1.0, background_queue_seconds: float | None = None):
        if target_queue_seconds <= 0 or (background_queue_seconds is not None and background_queue_seconds <= 0):
            raise ValueError("queue targets must be positive")
        self.target_queue_seconds = target_queue_seconds
        self.background_queue_seconds = background_queue_seconds
        self._metrics = None

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        online_by = metrics.get(ONLINE_TOKENS, {})
        reporting = [replica for replica in ctx.running_replicas if replica in online_by]
        rates = [rate for replica in reporting if (rate := metrics.get(TOKENS_PER_S, {}).get(replica, 0.0)) > 0]
        if not rates:  # no replica has reported yet (starting up): keep what Serve is steering to
            return ctx.target_num_replicas, {}
        online = sum(online_by[replica] for replica in reporting)
        background = sum(metrics.get(BACKGROUND_TOKENS, {}).get(replica, 0.0) for replica in reporting)
        requests = sum(metrics.get(ONLINE_REQUESTS, {}).get(replica, 0.0) for replica in reporting)
        arriving = sum(metrics.get(ONLINE_TOKENS_PER_S, {}).get(replica, 0.0) for replica in reporting)
        waiting_at_callers = ctx.total_queued_requests or 0.0  # past max_ongoing_requests, not in any replica
        if waiting_at_callers > 0 and requests > 0:
            online += waiting_at_callers * online / requests
        rate = sum(rates) / len(rates)
        wanted = wanted_replicas(online, background, rate, self.target_queue_seconds, self.background_queue_seconds,
                                 arriving)
        decision = min(max(wanted, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)
        self._publish(ctx, wanted, online, background, arriving)
        return decision, {}

    def _publish(self, ctx, wanted: float, online: float, background: float, arriving: float) -> None:
        try:
            if self._metrics is None:
                from serve_app.metrics import AutoscalingMetrics

                self._metrics = AutoscalingMetrics()
            self._metrics.decided(ctx.app_name or ctx.deployment_name, ctx.current_num_replicas, wanted, online,
                                  background, arriving)
        except Exception:  # noqa: BLE001 - metrics must never stop a scaling decision
            logger.exception("queued-work policy: publishing metrics failed")
