"""Replay one mixed trace through both autoscaling policies: Serve's request count and ours on queued work.

A discrete-event simulation of one model deployment as this project runs it, with the real decision code:

  trace      one-text queries, 8-document reranks and 1,000-document reranks arriving as Poisson streams whose rates
             rise and fall (low, rising, peak, falling, low), and a bulk Batch API job of 8-document lines in the
             background, sent as the batch runner sends them (`--batch-in-flight` lines in flight, the next when one
             ends). Every policy replays the same traces (one per seed).
  routing    Serve's power of two choices on requests in flight per replica (background lines count, as they do in
             Serve), or the project's queued-work router (serve_app/replica/routing.py: the replica holding the
             fewest tokens, each caller counting what it sent itself, and every replica's report, every
             `--routing-stats-s`, for the rest; the online caller and the batch runner are two callers; the
             simulation counts each job's true tokens where the router estimates them from the text), up to
             max_ongoing_requests per replica; past that a request waits at the caller.
  replica    the ModelServer engine loop: whenever the engine is free it takes one bounded run of the online jobs
             queued (serve_app/replica/passes.py, the replica's code: about `--max-pass-s` of its measured
             throughput, a larger job in parts with newcomers in between; the simulation cuts at any token, the
             replica at a document), or, when no online job is inside and none has been for background_grace_ms,
             of the background jobs queued. A run takes the engine's fixed cost per pass plus its tokens / the replica's
             tokens per second (the engine's measured figures, below). New replicas serve after `--startup-s`; a
             stopped replica takes no new requests and finishes what it holds.
  signals    every replica keeps serve_app.replica.autoscaling.WorkSignal (the code the replicas run) and its
             requests in flight, sampled every min(0.2 x look_back_period_s, metrics_interval_s) and pushed every
             metrics_interval_s; the controller averages each over the look-back window with Serve's own
             time_weighted_average.
  decisions  every `--tick-s` (Serve: 0.1 s), Serve's AutoscalingContext goes to the policy (Serve's
             replica_queue_length_autoscaling_policy, or QueuedWorkPolicy), then Serve's own scaling factors and
             delay logic (ray.serve.autoscaling_policy) and the min/max bounds, as Serve's controller applies them.

Reported per policy: replica-seconds (start-up included, until a stopped replica has drained), p50/p99 queue wait
(arrival at the deployment to the start of the engine run that computes it) per request kind, and when the
background batch finished. The request-count policy is swept over `--request-targets`; "tuned" is the cheapest
setting whose small-request (queries and 8-document reranks) p99 is at most the queued-work policy's.

Engines (`--engine`, ENGINES below: measured figures from BENCHMARKS.md): a run of T tokens takes pass_s + T /
tokens_per_s. `cpu-0.6b` (the default): the shape-true 0.6B reranker on the 2-core CPU, 188 tokens/s, cost per token
flat from one-document requests to 32-document batches. `h200-0.6b` / `h200-8b`: the engines on an H200 in bf16, a
fixed cost per pass (what one small request alone took) plus the rate of a full batch. The trace's request sizes
stay; its arrival rates and background lines are scaled by `--rate-scale` (default: the engine's tokens/s over the
CPU engine's, so a replica is as loaded as a CPU replica is by the CPU trace).

    python bench/autoscaling_sim.py                       # CPU engine, 3 traces x 2 h x 18 policies: about a minute
    python bench/autoscaling_sim.py --engine h200-8b --hours 0.5 --seeds 27 28 --request-targets 2 4 8 16 32 64
    python bench/autoscaling_sim.py --hours 0.5 --seeds 1 --target-queue-s 1 --request-targets 2 8
"""

from __future__ import annotations

import argparse
import heapq
import logging
import math
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ray.serve import autoscaling_policy as serve_policies  # noqa: E402
from ray.serve._private.autoscaling_state import _resolve_policy_callable  # noqa: E402
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue  # noqa: E402
from ray.serve._private.metrics_utils import time_weighted_average  # noqa: E402
from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig  # noqa: E402
from ray.serve.config import AutoscalingContext  # noqa: E402
import torch  # noqa: E402

from models.base import Runtime  # noqa: E402
from serve_app.config import AutoscalingConfig, BatchingConfig  # noqa: E402
from serve_app.replica.autoscaling import (BACKGROUND_TOKENS, ONLINE_REQUESTS, ONLINE_TOKENS,  # noqa: E402
                                           ONLINE_TOKENS_PER_S, TOKENS_PER_S, WorkSignal, estimated_tokens_per_s)
from serve_app.replica.passes import Pending, PassPlanner, pass_bound  # noqa: E402


@dataclass(frozen=True)
class Engine:
    """One replica's engine: a pass of T tokens takes pass_s + T / tokens_per_s. What the replica reports before it
    has measured itself, and its micro-batch budget (the least a bounded run takes), are the project's own for
    `device` and the model's parameters."""
    tokens_per_s: float
    pass_s: float
    device: str
    parameters: int
    embedding_parameters: int
    threads: int
    note: str

    @property
    def estimate(self) -> float:
        return estimated_tokens_per_s(self.device, self.parameters, self.embedding_parameters, self.threads)

    @property
    def token_budget(self) -> int:
        return Runtime(torch.device(self.device), torch.float32, "sdpa", False).default_token_budget


# Measured engine figures (BENCHMARKS.md). CPU: "Engines vs the model cards' code", the shape-true 0.6B reranker on
# the 2-core CPU computed 14,873 tokens in 79.12 s (rerank 1 x 32, fp32, 2 threads), flat per token from one-document
# requests to 32-document batches, so no fixed cost per pass. H200 ("GPU", bf16, engine.run): one small request
# alone is the fixed cost of a pass (one-document rerank: 19.4 ms for the 0.6B, 39.1 ms for the 8B), and the rate is
# what is left of rerank 64 x 8 (93,968 tokens in 7 passes: 0.4814 s and 2.4330 s) once 7 fixed costs are taken out.
# Qwen3-0.6B: 596,049,920 parameters, 151,669 x 1,024 in the embedding; Qwen3-8B: 8.2B, 6.95B of them outside the
# embedding (the model card).
ENGINES = {
    "cpu-0.6b": Engine(14873 / 79.12, 0.0, "cpu", 596_049_920, 151_669 * 1024, 2,
                       "shape-true 0.6B reranker, 2-core CPU, fp32"),
    "h200-0.6b": Engine(93968 / (0.4814 - 7 * 0.0194), 0.0194, "cuda", 596_049_920, 151_669 * 1024, 1,
                        "Qwen3-0.6B shape, H200, bf16"),
    "h200-8b": Engine(93968 / (2.4330 - 7 * 0.0391), 0.0391, "cuda", 8_200_000_000, 1_250_000_000, 1,
                      "Qwen3-8B shape, H200, bf16"),
}
CPU_ENGINE = ENGINES["cpu-0.6b"]
HEAD, DOC = 60, 50  # tokens of a rerank's head (prefix, instruction, query) and of one short passage
KINDS = {"query": 30, "rerank-8": HEAD + 8 * DOC, "rerank-1000": HEAD + 1000 * DOC, "batch-line": HEAD + 8 * DOC}
SMALL = ("query", "rerank-8")
# Peak arrivals per second; the trace multiplies them by its phase's level.
PEAK_RATES = {"query": 3.0, "rerank-8": 0.5, "rerank-1000": 1 / 300}
# (minutes, level at the start, level at the end) for each phase of a `--hours` trace, scaled to its length.
PHASES = [(20, 0.2, 0.2), (20, 0.2, 1.0), (40, 1.0, 1.0), (20, 1.0, 0.2), (20, 0.2, 0.2)]
DEPLOYMENT = DeploymentID(name="ModelServer", app_name="sim")
RECORD_FACTOR = 0.2  # Serve: record every min(look_back x 0.2, metrics_interval_s)


@dataclass
class Job:
    kind: str
    tokens: int
    arrived: float
    background: bool = False
    started: float | None = None
    behind: str = ""  # what its replica was running when it got there (for the breakdown of long waits)
    replica: int = -1  # where the queued-work router sent it (its caller's count of unanswered tokens)


@dataclass
class Replica:
    rid: int
    created: float
    ready_at: float
    signal: WorkSignal
    next_push: float  # when it next pushes its recorded points to the controller
    stopping: bool = False
    stopped: float | None = None
    online: PassPlanner = field(default_factory=PassPlanner)
    background: PassPlanner = field(default_factory=PassPlanner)
    running: list | None = None  # [(Pending of a Job, tokens this run computes of it)]
    run_background: bool = False
    run_started: float = 0.0
    run_ends: float = 0.0
    counter: float = 0.0  # the engine's cumulative tokens at the start of the running pass
    online_seen: float = -1e9
    ongoing: int = 0
    online_inside: int = 0
    samples: list = field(default_factory=list)  # (t, {metric: value}) recorded, pruned to the window at push
    reported: float = 0.0  # online + background tokens at its last routing-stats report
    pushed: list = field(default_factory=list)  # what the controller has

    def engine_counter(self, now: float, rate: float, pass_s: float) -> int:
        if self.running is None:
            return int(self.counter)
        progress = max(0.0, now - self.run_started - pass_s) * rate  # the pass's fixed cost comes first
        return int(self.counter + min(sum(share for _, share in self.running), progress))


def make_trace(hours: float, seed: int, batch_lines: int, batch_start_s: float,
               rate_scale: float = 1.0) -> tuple[list[Job], float, int]:
    rng = random.Random(seed)
    scale = hours * 60 / sum(p[0] for p in PHASES)
    jobs: list[Job] = []
    start = 0.0
    for minutes, level_from, level_to in PHASES:
        length = minutes * 60 * scale
        for kind, peak in PEAK_RATES.items():
            peak *= rate_scale
            # Thinning: candidates at the peak rate, kept with probability level(t).
            t = start
            while True:
                t += rng.expovariate(peak)
                if t >= start + length:
                    break
                level = level_from + (level_to - level_from) * (t - start) / length
                if rng.random() < level:
                    jobs.append(Job(kind, KINDS[kind], t))
        start += length
    jobs.sort(key=lambda job: job.arrived)
    return jobs, start, batch_lines


class Simulation:
    def __init__(self, args, autoscaling: dict, trace: tuple[list[Job], float, int], seed: int,
                 router: str = "power_of_two"):
        self.args = args
        self.router = router
        # The queued-work router's own counts, per caller (online: the gateway; background: the batch runner):
        # tokens sent to each replica and not yet answered.
        self.sent: dict[bool, dict[int, int]] = {False: {}, True: {}}
        self.rate = args.tokens_per_s
        self.pass_s = args.pass_s
        options = AutoscalingConfig.model_validate(autoscaling).serve_options()
        self.config = ServeAutoscalingConfig.model_validate(options)
        self.policy = _resolve_policy_callable(self.config.policy)
        self.policy_state: dict = {}
        self.look_back = self.config.look_back_period_s
        self.interval = self.config.metrics_interval_s
        self.record_every = min(self.look_back * RECORD_FACTOR, self.interval)
        self.batching = BatchingConfig()
        self.rng = random.Random(seed)
        jobs, self.trace_end, self.batch_left = trace
        self.events: list = []
        self.seq = 0
        for job in jobs:
            self.push(job.arrived, "arrive", Job(job.kind, job.tokens, job.arrived))
        self.replicas: list[Replica] = []
        self.waiting: deque = deque()  # requests waiting at the caller (every replica full)
        self.waiting_samples: list = []  # (t, requests waiting at callers), as handles report them
        self.done: list[Job] = []
        self.batch_done_at: float | None = None
        self.batch_in_flight = 0
        self.target = self.config.min_replicas
        self.peak = self.target
        for _ in range(self.target):
            self.start_replica(0.0, ready=True)
        self.push(args.batch_start_s, "batch")
        self.push(0.0, "tick")
        self.push(0.0, "record")
        if router == "queued_work":
            self.push(0.0, "routing_stats")

    # ---- events -------------------------------------------------------------------------------------------

    def push(self, t: float, kind: str, payload=None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def run(self) -> dict:
        end = self.trace_end
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if kind in ("tick", "record") and t > self.trace_end and self.idle():
                continue  # the trace is over and everything drained: stop the clocks
            end = max(end, t)
            getattr(self, f"on_{kind}")(t, payload)
        for replica in self.replicas:
            if replica.stopped is None:
                replica.stopped = end
        return self.summary(end)

    def idle(self) -> bool:
        return (not self.waiting and self.batch_left == 0 and self.batch_in_flight == 0
                and all(r.ongoing == 0 for r in self.replicas))

    def on_arrive(self, t: float, job: Job) -> None:
        if not self.route(t, job):
            self.waiting.append(job)

    def on_batch(self, t: float, _=None) -> None:
        while self.batch_left > 0 and self.batch_in_flight < self.args.batch_in_flight:
            self.batch_left -= 1
            self.batch_in_flight += 1
            self.on_arrive(t, Job("batch-line", KINDS["batch-line"], t, background=True))

    def on_ready(self, t: float, replica: Replica) -> None:
        self.drain_waiting(t)

    def on_run_end(self, t: float, replica: Replica) -> None:
        run, background = replica.running, replica.run_background
        tokens = sum(share for _, share in run)
        replica.counter += tokens
        replica.signal.run_ended(t, tokens, t - replica.run_started)
        replica.running = None
        for pending, _ in run:
            job = pending.item
            if pending.left > 0:  # runs in parts: the rest is still held, and queued
                continue
            replica.signal.release(id(job))
            replica.ongoing -= 1
            if job.replica >= 0:
                sent = self.sent[job.background]
                sent[job.replica] -= job.tokens
            if job.background:
                self.batch_in_flight -= 1
            else:
                replica.online_inside -= 1
                replica.online_seen = t
            self.done.append(job)
        if background and self.batch_left == 0 and self.batch_in_flight == 0 and self.batch_done_at is None:
            self.batch_done_at = t
        if background:
            self.on_batch(t)
        self.start_run(t, replica)
        if replica.stopping and replica.ongoing == 0 and replica.stopped is None:
            replica.stopped = t
        self.drain_waiting(t)

    def on_wake(self, t: float, replica: Replica) -> None:
        self.start_run(t, replica)

    def on_record(self, t: float, _=None) -> None:
        for replica in self.live():
            report = replica.signal.report(t, replica.engine_counter(t, self.rate, self.pass_s), replica.online_inside)
            report["ongoing"] = replica.ongoing
            replica.samples.append((t, report))
            if t >= replica.next_push:
                replica.samples = [(s, r) for s, r in replica.samples if s >= t - self.look_back]
                replica.pushed = list(replica.samples)
                while replica.next_push <= t:
                    replica.next_push += self.interval
        self.waiting_samples.append((t, len(self.waiting)))
        self.waiting_samples = [(s, n) for s, n in self.waiting_samples if s >= t - self.look_back]
        self.push(t + self.record_every, "record")

    def on_routing_stats(self, t: float, _=None) -> None:
        """Serve asks each replica for its routing stats every request_routing_stats_period_s."""
        for replica in self.live():
            report = replica.signal.report(t, replica.engine_counter(t, self.rate, self.pass_s), replica.online_inside)
            replica.reported = report[ONLINE_TOKENS] + report[BACKGROUND_TOKENS]
        if not (t > self.trace_end and self.idle()):
            self.push(t + self.args.routing_stats_s, "routing_stats")

    def on_tick(self, t: float, _=None) -> None:
        running = [r for r in self.live() if r.ready_at <= t]
        ids = {r.rid: ReplicaID(unique_id=f"r{r.rid}", deployment_id=DEPLOYMENT) for r in running}
        aggregated: dict[str, dict] = {}
        total_requests = 0.0
        for replica in running:
            if not replica.pushed:
                continue
            for name in (ONLINE_TOKENS, ONLINE_REQUESTS, BACKGROUND_TOKENS, TOKENS_PER_S, ONLINE_TOKENS_PER_S,
                         "ongoing"):
                value = self.average([(s, r[name]) for s, r in replica.pushed], t)
                if name == "ongoing":
                    total_requests += value
                else:
                    aggregated.setdefault(name, {})[ids[replica.rid]] = value
        queued = self.average(self.waiting_samples, t)
        ctx = AutoscalingContext(
            deployment_id=DEPLOYMENT, deployment_name=DEPLOYMENT.name, app_name=DEPLOYMENT.app_name,
            current_num_replicas=len(running), target_num_replicas=self.target, running_replicas=list(ids.values()),
            total_num_requests=total_requests + queued, total_queued_requests=queued, aggregated_metrics=aggregated,
            raw_metrics={}, capacity_adjusted_min_replicas=self.config.min_replicas,
            capacity_adjusted_max_replicas=self.config.max_replicas, policy_state=dict(self.policy_state),
            last_scale_up_time=None, last_scale_down_time=None, current_time=t, config=self.config)
        # Serve's controller: the policy, then its factors and delays (ray.serve.autoscaling_policy
        # _apply_autoscaling_config, with this clock), then the bounds.
        desired, state = self.policy(ctx)
        desired = serve_policies._apply_scaling_factors(desired, ctx.current_num_replicas, self.config)
        internal = serve_policies._extract_internal_policy_state(self.policy_state)
        decision, internal = serve_policies._apply_delay_logic(max(0, desired), self.target, self.config, internal,
                                                               _now=t)
        self.policy_state = {**(state or {}), **internal}
        self.scale(t, max(self.config.min_replicas, min(self.config.max_replicas, math.ceil(decision))))
        self.push(t + self.args.tick_s, "tick")

    # ---- the deployment -----------------------------------------------------------------------------------

    @staticmethod
    def average(series: list, now: float) -> float:
        if not series:
            return 0.0
        points = [TimeStampedValue(s, float(v)) for s, v in series]
        value = time_weighted_average(points, last_window_s=max(1e-3, now - points[-1].timestamp))
        return value or 0.0

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if not r.stopping]

    def start_replica(self, t: float, ready: bool = False) -> None:
        ready_at = t if ready else t + self.args.startup_s
        replica = Replica(len(self.replicas), t, ready_at, WorkSignal(self.look_back, self.args.estimate),
                          next_push=ready_at + self.rng.uniform(0, self.interval))
        self.replicas.append(replica)
        if not ready:
            self.push(ready_at, "ready", replica)

    def scale(self, t: float, target: int) -> None:
        self.target = target
        self.peak = max(self.peak, target)
        live = self.live()
        for _ in range(target - len(live)):
            self.start_replica(t)
        if target < len(live):
            # Serve stops replicas still starting first, then running ones (here: those holding the least).
            order = sorted(live, key=lambda r: (r.ready_at <= t, r.ongoing))
            for replica in order[:len(live) - target]:
                replica.stopping = True
                if replica.ongoing == 0:
                    replica.stopped = t

    def route(self, t: float, job: Job) -> bool:
        """To a replica with room (power of two choices, or the fewest tokens known to the job's caller), or False
        when every replica is full."""
        open_ = [r for r in self.live() if r.ready_at <= t and r.ongoing < self.args.max_ongoing]
        if not open_:
            return False
        if self.router == "queued_work":
            sent = self.sent[job.background]
            replica = min(open_, key=lambda r: (max(sent.get(r.rid, 0), r.reported), self.rng.random()))
            sent[replica.rid] = sent.get(replica.rid, 0) + job.tokens
            job.replica = replica.rid
        else:
            pair = self.rng.sample(open_, min(2, len(open_)))
            replica = min(pair, key=lambda r: r.ongoing)
        replica.ongoing += 1
        if job.started is None and not job.behind:
            job.behind = ("idle" if replica.running is None else "background pass" if replica.run_background
                          else "1,000-document rerank" if any(p.item.kind == "rerank-1000" for p, _ in replica.running)
                          else "online pass") + (" (after waiting at the caller)" if t > job.arrived else "")
        replica.signal.hold(id(job), job.tokens, job.background)
        if job.background:
            replica.background.add(Pending(job, job.tokens), self.bound(replica))
        else:
            replica.online_inside += 1
            replica.online_seen = t
            replica.online.add(Pending(job, job.tokens), self.bound(replica))
        self.start_run(t, replica)
        return True

    def drain_waiting(self, t: float) -> None:
        while self.waiting and self.route(t, self.waiting[0]):
            self.waiting.popleft()

    def start_run(self, t: float, replica: Replica) -> None:
        if replica.running is not None:
            return
        if replica.online:
            queue, background = replica.online, False
        elif replica.background:
            grace = self.args.background_grace_ms / 1000
            if replica.online_inside or t < replica.online_seen + grace:
                self.push(max(t, replica.online_seen) + grace, "wake", replica)
                return
            queue, background = replica.background, True
        else:
            return
        # The sim cuts a request at any token (the replica: at its documents or inputs).
        taken = queue.next_run(self.bound(replica), lambda pending, room: room, self.batching.max_batch_tokens)
        for pending, _ in taken:
            if pending.item.started is None:
                pending.item.started = t
        tokens = sum(share for _, share in taken)
        replica.running, replica.run_background, replica.run_started = taken, background, t
        # As the replica does: each job's rest stays held, and the run's work is what it computes.
        for pending, _ in taken:
            replica.signal.hold(id(pending.item), pending.left, pending.item.background)
        replica.signal.run_started(t, int(replica.counter), tokens, background)
        self.push(t + self.pass_s + tokens / self.rate, "run_end", replica)

    def bound(self, replica: Replica) -> int | None:
        """Tokens one run may take (serve_app/replica/passes.py), at the throughput the replica has measured."""
        max_pass_s = self.args.max_pass_s if self.args.max_pass_s and self.args.max_pass_s > 0 else None
        return pass_bound(replica.signal.tokens_per_s(), max_pass_s, self.batching.max_batch_tokens,
                          self.args.token_budget)

    # ---- results ------------------------------------------------------------------------------------------

    def summary(self, end: float) -> dict:
        waits: dict[str, list[float]] = {}
        for job in self.done:
            waits.setdefault(job.kind, []).append(job.started - job.arrived)
        small = [w for kind in SMALL for w in waits.get(kind, [])]
        slow = {}
        for job in self.done:
            if job.kind in SMALL and job.started - job.arrived > self.args.slow_s:
                slow[job.behind] = slow.get(job.behind, 0) + 1
        return {"replica_s": sum(r.stopped - r.created for r in self.replicas), "waits": waits, "small": small,
                "slow": slow,
                "peak": self.peak, "batch_done_at": self.batch_done_at, "end": end}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def row(name: str, result: dict) -> str:
    cells = [f"{name:<26}", f"{result['replica_s']:>10.0f}", f"{result['peak']:>4}"]
    for kind in ("query", "rerank-8", "rerank-1000"):
        waits = result["waits"].get(kind, [])
        cells.append(f"{percentile(waits, 0.5):>7.2f} {percentile(waits, 0.99):>8.2f}")
    cells.append(f"{percentile(result['small'], 0.99):>8.2f}")
    done = result["batch_done_at"]
    cells.append(f"{done:>9.0f}" if done is not None else f"{'-':>9}")
    return " ".join(cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hours", type=float, default=2.0, help="trace length (its phases scale with it)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[27, 28, 29],
                        help="one trace per seed; each policy runs every trace and its results are pooled")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="cpu-0.6b",
                        help="a replica's measured engine figures (ENGINES); the trace is scaled to it")
    parser.add_argument("--tokens-per-s", type=float, help="engine throughput of one replica (default: the engine's)")
    parser.add_argument("--pass-s", type=float, help="fixed cost of one engine pass (default: the engine's)")
    parser.add_argument("--rate-scale", type=float,
                        help="arrival rates and background lines x this (default: the engine's tokens/s over the CPU "
                             "engine's, so the trace loads a replica as the CPU trace loads a CPU replica)")
    parser.add_argument("--startup-s", type=float, default=20.0, help="a new replica's time until it serves")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=8)
    parser.add_argument("--max-ongoing", type=int, default=64, help="max_ongoing_requests per replica")
    parser.add_argument("--upscale-delay-s", type=float, default=10.0)
    parser.add_argument("--downscale-delay-s", type=float, default=300.0)
    parser.add_argument("--look-back-s", type=float, default=30.0)
    parser.add_argument("--metrics-interval-s", type=float, default=10.0)
    parser.add_argument("--tick-s", type=float, default=1.0, help="decision period (Serve: 0.1 s)")
    parser.add_argument("--target-queue-s", type=float, nargs="+", default=[0.5, 1, 2, 5],
                        help="queued_work.target_queue_seconds to run")
    parser.add_argument("--request-targets", type=float, nargs="+", default=[0.25, 0.35, 0.5, 0.7, 1, 1.4, 2, 4, 8, 16],
                        help="target_ongoing_requests values to sweep")
    parser.add_argument("--batch-lines", type=int,
                        help="8-document lines of the background batch (default 1,500 x the rate scale)")
    parser.add_argument("--batch-start-s", type=float, default=600.0)
    parser.add_argument("--batch-in-flight", type=int, default=16, help="batches.max_in_flight_per_model")
    parser.add_argument("--background-grace-ms", type=float, default=100.0)
    parser.add_argument("--max-pass-s", type=float, default=BatchingConfig().max_pass_seconds,
                        help="batching.max_pass_seconds: runs bounded to this much engine time (<= 0: unbounded)")
    parser.add_argument("--slow-s", type=float, default=5.0, help="waits past this are broken down by cause")
    parser.add_argument("--routers", nargs="+", default=["power_of_two", "queued_work"],
                        choices=["power_of_two", "queued_work"], help="routers to run the queued-work policy with")
    parser.add_argument("--request-routers", nargs="+", default=["power_of_two"],
                        choices=["power_of_two", "queued_work"], help="routers to run the request-count sweep with")
    parser.add_argument("--routing-stats-s", type=float, default=1.0,
                        help="deployment.routing_stats_period_s: how often replicas report to the router")
    args = parser.parse_args(argv)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve logs every policy it instantiates

    engine = ENGINES[args.engine]
    args.tokens_per_s = args.tokens_per_s or engine.tokens_per_s
    args.pass_s = engine.pass_s if args.pass_s is None else args.pass_s
    args.estimate = engine.estimate
    args.token_budget = engine.token_budget
    args.rate_scale = args.rate_scale or round(engine.tokens_per_s / CPU_ENGINE.tokens_per_s)
    if args.batch_lines is None:
        args.batch_lines = round(1500 * args.rate_scale)
    traces = {seed: make_trace(args.hours, seed, args.batch_lines, args.batch_start_s, args.rate_scale)
              for seed in args.seeds}
    for seed, trace in traces.items():
        counts = {kind: sum(job.kind == kind for job in trace[0]) for kind in KINDS}
        offered = sum(job.tokens for job in trace[0]) + args.batch_lines * KINDS["batch-line"]
        print(f"# trace seed {seed}: {args.hours:g} h, " + ", ".join(f"{n} {k}" for k, n in counts.items() if n)
              + f", {args.batch_lines} background lines from {args.batch_start_s:g} s; offered work "
              f"{offered / args.tokens_per_s:.0f} replica-seconds")
    print("# tokens per request: " + ", ".join(f"{k} {v}" for k, v in KINDS.items()))
    print(f"# arrival rates x {args.rate_scale:g} (peak per second: "
          + ", ".join(f"{kind} {rate * args.rate_scale:g}" for kind, rate in PEAK_RATES.items()) + ")")
    print(f"# replica ({args.engine}: {engine.note}): {args.tokens_per_s:.1f} tokens/s + {args.pass_s * 1000:g} ms per "
          f"pass (estimate before measuring {args.estimate:.1f} tokens/s), start-up "
          f"{args.startup_s:g} s, max_ongoing_requests {args.max_ongoing}, background lines in flight "
          f"{args.batch_in_flight}")
    print(f"# autoscaling: replicas {args.min_replicas}-{args.max_replicas}, delays up {args.upscale_delay_s:g} s / "
          f"down {args.downscale_delay_s:g} s, look-back {args.look_back_s:g} s, metrics every "
          f"{args.metrics_interval_s:g} s, decisions every {args.tick_s:g} s")
    print(f"# results pooled over the {len(traces)} traces: replica-seconds summed, waits together, "
          "batch end the latest")
    print(f"{'policy':<26} {'replica-s':>10} {'peak':>4} {'query p50/p99 s':>16} {'rerank-8 p50/p99':>16} "
          f"{'rerank-1000 p50/p99':>16} {'small p99':>8} {'batch end':>9}")
    common = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
              "upscale_delay_s": args.upscale_delay_s, "downscale_delay_s": args.downscale_delay_s,
              "look_back_period_s": args.look_back_s, "metrics_interval_s": args.metrics_interval_s}
    def pooled(autoscaling: dict, router: str) -> dict:
        results = [Simulation(args, autoscaling, trace, seed, router).run() for seed, trace in traces.items()]
        waits: dict[str, list[float]] = {}
        for result in results:
            for kind, values in result["waits"].items():
                waits.setdefault(kind, []).extend(values)
        ends = [result["batch_done_at"] for result in results]
        slow: dict[str, int] = {}
        for result in results:
            for cause, count in result["slow"].items():
                slow[cause] = slow.get(cause, 0) + count
        return {"replica_s": sum(result["replica_s"] for result in results), "waits": waits, "slow": slow,
                "small": [w for result in results for w in result["small"]],
                "peak": max(result["peak"] for result in results),
                "batch_done_at": None if None in ends else max(ends)}

    started = time.perf_counter()
    short = {"power_of_two": "p2c", "queued_work": "qw router"}
    work_results = {}
    for router in args.routers:
        for target in args.target_queue_s:
            result = pooled({**common, "queued_work": {"target_queue_seconds": target}}, router)
            work_results[(router, target)] = result
            print(row(f"queued work {target:g} s, {short[router]}", result), flush=True)
    request_results = {}
    for router in args.request_routers:
        for target in args.request_targets:
            result = pooled({**common, "target_ongoing_requests": target}, router)
            request_results[(router, target)] = result
            print(row(f"request count {target:g}, {short[router]}", result), flush=True)
    print(f"# simulated in {time.perf_counter() - started:.1f} s")
    print(f"small requests that waited over {args.slow_s:g} s, by what their replica was running when they reached it:")
    for name, result in [*((f"queued work {t:g} s, {short[r]}", res) for (r, t), res in work_results.items()),
                         *((f"request count {t:g}, {short[r]}", res) for (r, t), res in request_results.items())]:
        causes = sorted(result["slow"].items(), key=lambda item: -item[1])
        print(f"  {name:<34} {sum(result['slow'].values()):>5} of {len(result['small'])}: "
              + ", ".join(f"{count} {cause}" for cause, count in causes))
    # The comparison the policy is judged by: against Serve's request count on Serve's router, tuned to the same p99.
    baseline = {t: r for (router, t), r in request_results.items() if router == "power_of_two"}
    for (router, target), work in work_results.items():
        p99 = percentile(work["small"], 0.99)
        matching = [(r["replica_s"], t) for t, r in baseline.items() if percentile(r["small"], 0.99) <= p99]
        verdict = "met" if p99 <= target else "NOT met"
        print(f"queued work {target:g} s, {short[router]}: small-request p99 {p99:.2f} s, target {target:g} s: "
              f"{verdict}; {work['replica_s']:.0f} replica-s")
        if matching:
            cost, best = min(matching)
            print(f"  request count (p2c) tuned to that p99 (cheapest with small p99 <= {p99:.2f} s): "
                  f"target_ongoing_requests {best:g}, {cost:.0f} replica-s -> queued work uses "
                  f"{work['replica_s'] / cost:.2f}x")
        elif baseline:
            print(f"  no request-count setting swept (p2c) reached a small-request p99 <= {p99:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
