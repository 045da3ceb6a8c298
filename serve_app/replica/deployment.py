"""The per-model Serve deployment: tokenize -> token-budget queue (@serve.batch) -> engine forward -> results.

One replica holds one engine. A request's path through it:

1. `rerank()` / `embed()` tokenize first, so bad input fails here, before any batching, and the batch queue knows
   each request's token count. Small inputs are tokenized on the event loop (less than a hand-off to a thread
   costs), larger ones on a dedicated thread (the Rust tokenizer is used by one thread at a time).
2. Batching waits only when it pays. A request that finds the engine idle (nothing running, nothing queued) goes
   straight to the engine queue and runs at once: waiting for company would only add latency. One that arrives
   while the engine is busy would wait anyway, so it enters `@serve.batch` (budget in tokens, `batch_size_fn`;
   requests arriving within max_wait_ms form one batch). A job larger than the whole budget skips it.
3. Whenever the engine is free it takes what is in the engine queue, up to one bounded run (about
   `max_pass_seconds` of its measured throughput, at most max_batch_tokens; passes.py), so batches that piled up
   while it was busy share one forward run, and a request larger than a run goes in parts (whole documents or
   inputs) with the requests that arrive meanwhile in between, instead of holding them all until it ends.
4. The engine runs on one engine thread (off the event loop, one run at a time), cutting the work into
   micro-batches by its own padded-token budget; results come back per job, in order.

Background calls (`background=True`: the batch runner's lines, serve_app/gateway/batches/) wait in a queue of their own that
the engine takes only when no online request is inside the replica and none has been for `background_grace_ms`, and
they never count against max_waiting_requests: bulk work fills idle capacity, and an online request waits at most for
the one background run in progress (only the first one after a quiet spell can meet one; the batch runner bounds how
much one run holds by its lines in flight per model).

Several gateway requests can reach the replica in one handle call (`serve_group`, sent by
serve_app/gateway/hop_sharing.py): each of them takes the path above exactly as if it had come alone.

Autoscaling: every replica keeps the tokens it holds (online and background apart) and the tokens per second its
engine computes, and reports them to Serve's controller (`record_autoscaling_stats`), where the queued-work policy
scales on them (serve_app/replica/autoscaling.py); the tokens it holds also go to the queued-work router
(`record_routing_stats`, serve_app/replica/routing.py).

Only text and numbers cross the handle hop: scores, token counts and float32 vectors.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve

from models.errors import EngineInputError
from serve_app.config import MODEL_DEPLOYMENT_NAME, BatchingConfig, ModelConfig
from serve_app.errors import InternalError, InvalidRequest, Overloaded, ServingError
from serve_app.metrics import ModelMetrics
from serve_app.replica.autoscaling import (BACKGROUND_TOKENS, ONLINE_TOKENS, WorkSignal, embed_size,
                                           estimated_tokens_per_s, estimated_work, job_work, rerank_size)
from serve_app.replica.loading import load_calibration, load_engine
from serve_app.replica.passes import PassPlanner, Pending, pass_bound

logger = logging.getLogger("ray.serve")
MAX_BATCHES_IN_FLIGHT = 64
# Requests of at most this many characters (query and documents, or inputs) are tokenized on the event loop. The
# tokenizer takes about 1 us a character here (0.33 ms for a one-document rerank, 1 ms at 1000 characters) and a
# hand-off to the tokenizer thread and back about 0.13 ms, so small requests skip the hand-off while a large one
# never holds the event loop for more than about a millisecond.
INLINE_TOKENIZE_MAX_CHARS = 1024
# The methods a gateway may send several requests of in one call (serve_group).
GROUPABLE_METHODS = ("rerank", "embed")


class _TokenBudgetWarningFilter(logging.Filter):
    """Serve warns when max_batch_size x max_concurrent_batches exceeds max_ongoing_requests, assuming batch size
    counts requests. Ours counts tokens (batch_size_fn), so the warning is always wrong here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is larger than `max_ongoing_requests`" not in record.getMessage()


logging.getLogger("ray.serve").addFilter(_TokenBudgetWarningFilter())


def _cut_units(pending: Pending, room: int) -> int:
    """PassPlanner's cut for a job running in parts: its next whole units (a rerank's documents, an embedding's
    inputs) whose work (`job.unit_work`) fits in `room` tokens beside the work every part repeats (`shared_work`:
    a rerank's query head), at least one; records where they end. Returns the work taken from the job's `left`
    (job_work: the shared work counts once, with the first part), so the last part leaves exactly nothing."""
    job = pending.item[0]
    units, shared = job.unit_work, job.shared_work
    end, tokens = pending.done + 1, units[pending.done]
    while end < len(units) and shared + tokens + units[end] <= room:
        tokens += units[end]
        end += 1
    pending.upto = end
    return tokens + (shared if pending.done == 0 else 0)


def job_tokens(jobs: list) -> int:
    """batch_size_fn: total tokens of the queued jobs. Must never raise: an exception here would hang the batch
    queue for every later caller (Ray issue 66140), so anything odd counts as one token."""
    total = 0
    for job in jobs:
        try:
            total += max(1, int(job.num_tokens))
        except Exception:  # noqa: BLE001 - see docstring
            total += 1
    return total


@serve.deployment(name=MODEL_DEPLOYMENT_NAME)
class ModelServer:
    def __init__(self, config: dict[str, Any]):
        self.config = ModelConfig.model_validate(config)
        self.engine, self.facts = load_engine(self.config)
        # An embedder's fixed int8/uint8 ranges (None: not calibrated, those types are refused).
        self.calibration = load_calibration(self.config, self.engine) if self.config.task == "embed" else None
        # One thread runs the model (forward passes never overlap, so they never fight over cores or GPU
        # memory); another tokenizes while the model runs.
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self._tokenizing = 0  # calls on the tokenizer thread: while any runs, the event loop does not tokenize
        self._batching = BatchingConfig()
        self._busy = 0
        self._held = 0  # online requests inside this replica (tokenizing, queued or running)
        self._running = 0  # of those, the ones in the forward pass now running
        # Jobs waiting for the engine thread, drained by _engine_loop in bounded runs (passes.py); each entry's item
        # is (job, future, enqueued_at).
        self._engine_queue = PassPlanner()
        self._background_queue = PassPlanner()  # background jobs: run only while _engine_queue is empty
        self._online_seen_at = 0.0  # monotonic time an online request last entered or left this replica
        self._engine_wakeup = asyncio.Event()
        self._engine_task: asyncio.Task | None = None
        # jobs (and their tokens): jobs the engine ran (a request cancelled while queued is not one). Requests
        # arrive three ways: immediate_jobs found the engine idle and skipped Serve's batch queue, solo_jobs were
        # larger than a whole batch, the rest came in `batches`. engine_runs: forward runs, each over everything
        # queued at its start (largest_run_jobs the most jobs in one). forward_tokens / padded_slots: real tokens and
        # the token slots the forward micro-batches computed (the padding efficiency; a shared query head counts once).
        # groups / grouped_requests: serve_group calls and the requests they carried; group_requests_sent_back: those
        # refused because the replica already held max_ongoing_requests (the gateway sends them alone instead).
        self._stats = {"jobs": 0, "tokens": 0, "immediate_jobs": 0, "solo_jobs": 0, "batches": 0, "engine_runs": 0,
                       "largest_run_jobs": 0, "engine_seconds": 0.0, "background_jobs": 0, "forward_tokens": 0,
                       "padded_slots": 0, "micro_batches": 0, "groups": 0, "grouped_requests": 0,
                       "group_requests_sent_back": 0}
        self._probe_job = self._tokenize_probe()
        self.metrics = ModelMetrics(self.config.name)
        self.work = WorkSignal(self._look_back_s(), self._estimated_tokens_per_s())

    # ---- configuration ------------------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batching settings from `user_config`: applied to the running replica, no restart."""
        batching = BatchingConfig.model_validate(user_config or {})
        self.engine.token_budget = batching.token_budget or self.engine.runtime.default_token_budget
        self.engine.max_batch_items = batching.max_items or self.engine.runtime.default_max_batch_items
        self._run_batch.set_max_batch_size(batching.max_batch_tokens)
        self._run_batch.set_batch_wait_timeout_s(batching.max_wait_ms / 1000)
        self._batching = batching
        logger.info("%s batching: token_budget=%d max_items=%d max_batch_tokens=%d max_wait_ms=%g",
                    self.config.name, self.engine.token_budget, self.engine.max_batch_items, batching.max_batch_tokens,
                    batching.max_wait_ms)

    # ---- requests -----------------------------------------------------------------------------------------

    async def describe(self) -> dict[str, Any]:
        # The price as decimal text: only text and numbers cross the hop, and the gateway debits by it exactly.
        price = self.config.price.model_dump(mode="json", exclude_none=True) if self.config.price else None
        # `serves_groups`: the methods whose requests the gateway may send this model several at a time, in one call
        # (serve_group); a gateway newer than the model's replicas finds no such list and sends them nothing they
        # cannot answer. None for a model on Serve's request-count policy: it scales on ongoing handle calls
        # (target_ongoing_requests), where a group of 30 requests would count as one. The queued-work policy counts
        # the tokens each request holds, so grouping does not hide load from it.
        autoscaling = self.config.deployment.autoscaling
        return {**self.facts, "name": self.config.name, "aliases": list(self.config.aliases),
                "token_budget": self.engine.token_budget, "max_batch_tokens": self._batching.max_batch_tokens,
                "max_ongoing_requests": self.config.deployment.max_ongoing_requests, "price": price,
                "serves_groups": list(GROUPABLE_METHODS) if autoscaling is None or autoscaling.queued_work is not None
                else []}

    async def rerank(self, query: str, documents: list[str], instruction: str | None = None,
                     max_tokens_per_doc: int | None = None, truncate: bool = True,
                     max_chunks_per_doc: int | None = None, *, background: bool = False) -> dict[str, Any]:
        """`max_chunks_per_doc` None: the model's default (config), else one window (truncation). `background`:
        a Batch API line, which yields to online requests (see `_admitted` and `_submit`)."""
        self._require_task("rerank")
        chunks = max_chunks_per_doc or self.config.max_chunks_per_doc or 1
        with self._admitted(background):
            size = rerank_size(query, documents)
            job = await self._tokenize(size, self.engine.tokenize, query, documents, instruction, max_tokens_per_doc,
                                       truncate, chunks, estimate=estimated_work(size, len(documents), texts=True),
                                       background=background)
            result = await self._submit(job, background)
        return {"scores": result.scores, "logits": result.logits, "token_counts": result.token_counts,
                "windows": result.windows}

    async def embed(self, inputs: list[str] | list[list[int]], instruction: str | None = None,
                    dimensions: int | None = None, truncate: bool = True, truncate_side: str = "end",
                    max_tokens: int | None = None, with_ranges: bool = False, normalize: bool = True, *,
                    background: bool = False) -> dict[str, Any]:
        """`with_ranges`: also return the fixed int8/uint8 ranges (lo, hi) of the request's dimension setting.
        `normalize` False: vectors as pooled, not L2-normalised (TEI's normalize: false)."""
        self._require_task("embed")
        if with_ranges and self.calibration is None:
            raise InvalidRequest(f"int8 and uint8 embeddings need fixed quantization ranges, and model "
                                 f"{self.config.name!r} has no calibration file (config `calibration`, made with "
                                 "`python -m serve_app.replica.quantization.calibration`); float, base64, binary and "
                                 "ubinary need none", param="embedding_types", code="not_calibrated")
        with self._admitted(background):
            size, texts = embed_size(inputs)  # not texts: token ids, and size is their count
            job = await self._tokenize(size, self.engine.tokenize, inputs, instruction, dimensions, truncate,
                                       truncate_side, max_tokens, normalize, estimate=estimated_work(size, 0, texts),
                                       background=background)
            result = await self._submit(job, background)
        answer = {"embeddings": result.embeddings, "token_counts": result.token_counts}
        if with_ranges:
            answer["ranges"] = self.calibration.ranges(job.dimensions)
        return answer

    async def tokenize(self, texts: list[str], add_special_tokens: bool = True, instruction: str | None = None,
                       query: str | None = None) -> dict[str, Any]:
        """Each text's tokens as `embed` / `rerank` compute them, never cut (TEI's and vLLM's /tokenize): with
        `add_special_tokens`, the instruction and the prompt template are included, so a text's count is what a
        request is billed for it; `query` (rerankers) is the query the template holds. No forward pass."""
        if query is not None and self.config.task != "rerank":
            raise InvalidRequest(f"model {self.config.name!r} is an embed model: query applies to rerankers",
                                 param="query")
        options = {"query": query} if self.config.task == "rerank" else {}
        # No forward pass follows, so the autoscaling signal holds nothing for it (no estimate).
        tokens = await self._tokenize(sum(map(len, texts)), functools.partial(
            self.engine.text_tokens, texts, instruction=instruction, add_special_tokens=add_special_tokens,
            **options))
        return {"max_length": self.engine.max_length,
                "texts": [{"text": t.text, "ids": t.ids, "pieces": t.pieces, "offsets": t.offsets,
                           "special": t.special} for t in tokens]}

    async def detokenize(self, sequences: list[list[int]], skip_special_tokens: bool = True) -> dict[str, Any]:
        """Token ids back to text, one string per sequence (TEI's /decode, vLLM's /detokenize)."""
        texts = await self._tokenize(sum(map(len, sequences)), self.engine.decode, sequences, skip_special_tokens)
        return {"texts": texts}

    async def serve_group(self, method: str, calls: list[list], *, background: bool = False) -> list:
        """Several requests' calls of `method` in one handle call, sent by a gateway replica whose requests for this
        model arrived while its previous call was in flight (serve_app/gateway/hop_sharing.py). Each call runs
        concurrently through `method` itself, exactly as if it had come alone (tokenization, batching, the engine
        queue, background priority, max_waiting_requests), so its result is the one a single call would get.

        Returns one outcome per call, in order: its answer; the ServingError it alone raised (any other exception
        becomes an InternalError, as the engine's per-job failures do), which the gateway raises as that request's
        own error; or None for a call this replica did not take because it already held max_ongoing_requests
        requests. Serve counts a group as one request against max_ongoing_requests, so without that bound a group
        would slip past the replica's limit; the gateway sends a call that came back None alone, through Serve's
        queue and its 503s, where it would have gone without sharing. Background calls are bounded by their
        sender, as in `_admitted`."""
        if method not in GROUPABLE_METHODS:
            raise InvalidRequest(f"serve_group runs {', '.join(GROUPABLE_METHODS)}, not {method!r}")
        serve_one = getattr(self, method)
        self._stats["groups"] += 1
        self._stats["grouped_requests"] += len(calls)

        async def outcome(args: list):
            if not background and self._held >= self.config.deployment.max_ongoing_requests:
                self._stats["group_requests_sent_back"] += 1
                return None
            try:
                return await serve_one(*args, background=background)
            except ServingError as error:
                return error
            except Exception as exc:  # noqa: BLE001 - one call's failure is that call's answer, not the group's
                logger.exception("%s: a grouped %s call failed", self.config.name, method)
                return InternalError(f"model {self.config.name!r} failed on this request: {exc!r}")

        # Each call is a task of its own, started in order: a call's admission (`_held`) is counted before the next
        # one is looked at, and a cancelled group (every request of it gone) cancels them all.
        return list(await asyncio.gather(*(outcome(args) for args in calls)))

    async def stats(self) -> dict[str, Any]:
        """Batching counters (how many jobs shared forward passes), the requests inside this replica now, and where
        it runs: its node and the GPU ids Ray gave it (a fractional replica shares its GPU id with its neighbours)."""
        context = ray.get_runtime_context()
        placement = {"node_id": context.get_node_id(),
                     "gpu_ids": [str(gpu) for gpu in context.get_accelerator_ids().get("GPU", [])]}
        return {**self._stats, "requests_inside": self._held, "batching": self._batching.model_dump(),
                "placement": placement}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The autoscaling signal (serve_app/replica/autoscaling.py), which Serve asks for every record interval
        of a deployment with `autoscaling` and hands to the policy; the same numbers go to Prometheus."""
        report = self.work.report(time.monotonic(), self.engine.work.real_tokens, self._held)
        self.metrics.work(report["online_tokens"], report["background_tokens"], report["tokens_per_s"])
        return report

    async def record_routing_stats(self) -> dict[str, float]:
        """The tokens this replica holds now, online and background, for the queued-work router
        (serve_app/replica/routing.py), which Serve asks every `routing_stats_period_s`."""
        report = self.work.report(time.monotonic(), self.engine.work.real_tokens, self._held)
        return {ONLINE_TOKENS: report[ONLINE_TOKENS], BACKGROUND_TOKENS: report[BACKGROUND_TOKENS]}

    async def check_health(self) -> None:
        """Fails when the engine cannot run a forward pass. While requests are running the engine is proven to
        work; when idle, a one-sequence probe runs (milliseconds)."""
        if self._busy:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._engine_thread, self.engine.run, [self._probe_job])

    # ---- internals ----------------------------------------------------------------------------------------

    def _require_task(self, task: str) -> None:
        if self.config.task != task:
            raise InvalidRequest(f"model {self.config.name!r} is a {self.config.task} model, not {task}",
                                 param="model", code="wrong_model_task")

    @contextlib.contextmanager
    def _admitted(self, background: bool = False):
        """Hold a request in this replica, or refuse it at once when max_waiting_requests would be exceeded.
        Background requests are bounded by their sender (per model in flight) and are not counted here, so bulk
        work never makes an online request refused."""
        if background:
            yield
            return
        limit = self._batching.max_waiting_requests
        if limit is not None and self._busy and self._held - self._running >= limit:
            retry_after = self.config.deployment.backpressure_retry_after_s
            headers = {} if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
            raise Overloaded(f"model {self.config.name!r} is busy ({self._held - self._running} requests waiting, "
                             f"max_waiting_requests {limit}); retry shortly", headers=headers)
        self._held += 1
        self._online_seen_at = time.monotonic()
        try:
            yield
        finally:
            self._held -= 1
            self._online_seen_at = time.monotonic()

    async def _tokenize(self, size: int, tokenize, *args, estimate: int = 0, background: bool = False):
        """`size` (characters, or token ids) decides where: see INLINE_TOKENIZE_MAX_CHARS. Until the job exists, the
        autoscaling signal holds `estimate` tokens for it (a large request can take seconds to tokenize); 0 for a
        call that makes no engine work (the tokenize and detokenize endpoints)."""
        key = object()
        if estimate:
            self.work.hold(key, estimate, background)
        try:
            if size <= INLINE_TOKENIZE_MAX_CHARS and not self._tokenizing:
                return tokenize(*args)
            self._tokenizing += 1
            try:
                return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, tokenize, *args)
            finally:
                self._tokenizing -= 1
        except EngineInputError as exc:
            raise InvalidRequest(str(exc), param=exc.param) from None
        finally:
            self.work.release(key)

    def _engine_idle(self) -> bool:
        return not self._busy and not self._engine_queue

    async def _submit(self, job, background: bool = False):
        self.work.hold(id(job), job_work(job), background)
        try:
            return await self._submit_held(job, background)
        finally:
            self.work.release(id(job))

    async def _submit_held(self, job, background: bool):
        if background:
            self._stats["background_jobs"] += 1
            result = (await self._forward([job], background=True))[0]
        elif self._engine_idle():
            self._stats["immediate_jobs"] += 1
            result = (await self._forward([job]))[0]
        elif job_tokens([job]) > self._batching.max_batch_tokens or self._runs_in_parts(job):
            # Larger than a whole gathered batch: run alone rather than refuse (the queue would reject it). Larger
            # than a run: alone too, or the requests gathered with it would get their answers only with its last
            # part (a gathered batch answers all at once).
            self._stats["solo_jobs"] += 1
            result = (await self._forward([job]))[0]
        else:
            result = await self._run_batch(job)
        if isinstance(result, Exception):
            raise result
        return result

    # Batches pass straight on to the engine queue, so several may be in flight: the queue serialises them.
    @serve.batch(max_batch_size=BatchingConfig().max_batch_tokens,
                 batch_wait_timeout_s=BatchingConfig().max_wait_ms / 1000, batch_size_fn=job_tokens,
                 max_concurrent_batches=MAX_BATCHES_IN_FLIGHT)
    async def _run_batch(self, jobs: list) -> list:
        self._stats["batches"] += 1
        return await self._forward(jobs)

    async def _forward(self, jobs: list, background: bool = False) -> list:
        """Queue jobs for the engine and wait for their results (one result or exception per job, so one bad job
        fails only its own request; an exception out of a @serve.batch function would fail the whole batch)."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        enqueued_at = time.monotonic()
        queue = self._background_queue if background else self._engine_queue
        bound = self._pass_bound()
        for job, future in zip(jobs, futures):
            # Sized in the engine's own work (job_work: a rerank's query head once), as the runs are bounded.
            queue.add(Pending((job, future, enqueued_at), job_work(job)), bound)
        self._engine_wakeup.set()
        if self._engine_task is None or self._engine_task.done():
            self._engine_task = loop.create_task(self._engine_loop())
        return list(await asyncio.gather(*futures))

    async def _engine_loop(self) -> None:
        """Whenever the engine is free, run what queued up meanwhile, up to one bounded run (passes.py: about
        max_pass_seconds of this replica's throughput, at most max_batch_tokens; a larger request runs in parts,
        with the requests that arrive meanwhile in between).

        Serve forms its batches as requests arrive, not when the engine frees up (ray/serve/batching.py), so
        under load it hands over many small batches; merging them here keeps forward passes full (measured:
        embedding saturation 11.0 -> 14.6 docs/s with max_wait_ms 0; BENCHMARKS.md). Online jobs first: the
        background queue is taken only when no online job waits, and never in the same run as online jobs."""
        while True:
            await self._engine_wakeup.wait()
            self._engine_wakeup.clear()
            while self._engine_queue or self._background_queue:
                if not self._engine_queue:
                    pause = self._background_pause()
                    if pause > 0:  # online work is about: look again when it may be over (or new work comes)
                        self._engine_wakeup.clear()
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._engine_wakeup.wait(), pause)
                        continue
                queue = self._engine_queue or self._background_queue
                background = queue is self._background_queue
                queue.drop(lambda pending: pending.item[1].done())  # a client gone costs no (further) forward pass
                taken = queue.next_run(self._pass_bound(), _cut_units, self._batching.max_batch_tokens)
                if not taken:
                    continue
                try:
                    await self._run(taken, background)
                except asyncio.CancelledError:  # the loop itself is stopped (its event loop closing): end with it
                    for pending, _ in taken:
                        self._finish_part(pending, InternalError("the model replica is stopping"))
                    raise
                except BaseException as exc:  # noqa: BLE001 - never leave a caller waiting
                    logger.exception("%s: engine run failed", self.config.name)
                    for pending, _ in taken:
                        self._finish_part(pending, InternalError(f"engine loop failed: {exc!r}"))

    async def _run(self, taken: list[tuple[Pending, int]], background: bool) -> None:
        """One engine run of what PassPlanner took: each job whole, or the part `_cut_units` chose of it."""
        now = time.monotonic()
        jobs = [pending.item[0].part(pending.done, pending.upto) if pending.upto else pending.item[0]
                for pending, _ in taken]
        waits = [now - pending.item[2] for pending, _ in taken if not pending.done]  # first runs only
        work = sum(share for _, share in taken)
        # The signal: each job stays held for what this run leaves of it (its own kind); the run's work is what it
        # computes, so only a running part, never a whole job's rest, counts as ahead of other work.
        for pending, _ in taken:
            self.work.hold(id(pending.item[0]), pending.left, background)
        self._busy += 1
        self._running = len(taken)
        counter_before = self.engine.work.real_tokens  # the engine thread is idle here
        self.work.run_started(now, counter_before, work, background)
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._engine_thread, self._run_measured, jobs,
                                                                       waits)
        finally:
            self._busy -= 1
            self._running = 0
            self.work.run_ended(time.monotonic(), self.engine.work.real_tokens - counter_before,
                                time.monotonic() - now)
        self._stats["engine_runs"] += 1
        self._stats["tokens"] += work
        self._stats["largest_run_jobs"] = max(self._stats["largest_run_jobs"], len(taken))
        for (pending, _), result in zip(taken, results):
            self._finish_part(pending, result)

    def _runs_in_parts(self, job) -> bool:
        bound = self._pass_bound()
        return bound is not None and job_work(job) > bound

    def _pass_bound(self) -> int | None:
        return pass_bound(self.work.tokens_per_s(), self._batching.max_pass_seconds, self._batching.max_batch_tokens,
                          self.engine.token_budget)

    def _finish_part(self, pending: Pending, result) -> None:
        """A run's result for one queued job: its answer, or one part of it (the job goes on, its rest still held
        and queued), or a failure (the job fails; its other parts are dropped with it at the next run)."""
        future = pending.item[1]
        if future.done():
            return
        if pending.upto and not isinstance(result, Exception):  # a part
            pending.parts.append(result)
            pending.done = pending.upto
            if pending.left:
                return
            result = type(result).joined(pending.parts)
        self._stats["jobs"] += 1
        future.set_result(result)

    def _background_pause(self) -> float:
        """Seconds background work must still wait: while online requests are inside this replica, and for
        background_grace_ms after the last one left."""
        grace = self._batching.background_grace_ms / 1000
        if self._held:
            return max(grace, 0.001)
        return self._online_seen_at + grace - time.monotonic()

    def _run_measured(self, jobs: list, waits: list[float]) -> list:
        """_run_isolated plus its metrics, on the engine thread (so nothing else runs between the readings)."""
        before, started = self.engine.work.snapshot(), time.perf_counter()
        results = self._run_isolated(jobs)
        seconds = time.perf_counter() - started
        done = self.engine.work.since(before)
        self._stats["engine_seconds"] += seconds
        self._stats["forward_tokens"] += done.real_tokens
        self._stats["padded_slots"] += done.computed_slots
        self._stats["micro_batches"] += done.micro_batches
        self.metrics.engine_run(len(jobs), done.real_tokens, done.computed_slots, done.micro_batches, seconds, waits)
        return results

    def _run_isolated(self, jobs: list) -> list:
        try:
            return self.engine.run(jobs)
        except Exception as exc:  # noqa: BLE001 - find the job at fault below
            if len(jobs) == 1:
                logger.exception("%s: forward pass failed", self.config.name)
                return [InternalError(f"model {self.config.name!r} failed on this request: {exc}")]
        results = []
        for job in jobs:
            results.extend(self._run_isolated([job]))
        return results

    def _look_back_s(self) -> float:
        autoscaling = self.config.deployment.autoscaling
        return autoscaling.look_back_s if autoscaling is not None else 30.0

    def _estimated_tokens_per_s(self) -> float:
        autoscaling = self.config.deployment.autoscaling
        if autoscaling is not None and autoscaling.queued_work is not None \
                and autoscaling.queued_work.estimated_tokens_per_s is not None:
            return autoscaling.queued_work.estimated_tokens_per_s
        return estimated_tokens_per_s(self.facts["device"], self.facts["parameters"],
                                      self.engine.vocab_size * self.engine.hidden_size, self.facts["cpu_threads"])

    def _tokenize_probe(self):
        if self.config.task == "rerank":
            return self.engine.tokenize("health", ["probe"])
        return self.engine.tokenize(["health probe"])

