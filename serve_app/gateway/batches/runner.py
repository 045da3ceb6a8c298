"""The batch runner: a Serve deployment of the gateway application, off the gateway's request path.

Each replica polls the database (and is woken by the gateway on create and cancel), leases batches that no live
runner holds, and works on up to `max_running_batches` at once:

1. validating: the input file is read once, as a stream; any bad line (not JSON, another endpoint's url, a
   duplicate custom_id, ...) fails the batch with OpenAI's `errors` naming the line.
2. in_progress: lines are read from the last checkpoint on and sent through the gateway's own handling
   (serve_app/gateway/handling.py ENDPOINTS), with `background=True` so model replicas run them only while no online
   request waits, and at most `max_in_flight_per_model` lines in flight per model. A line's answer (200) goes to the
   output file; a line the gateway would answer with an error goes to the error file with that status and body;
   503/504 answers (a model restarting or busy) are retried for `line_retry_s` first.
3. Every `checkpoint_lines` lines or `checkpoint_s` seconds the chunk's output and error lines are written as one
   new part of each file, then one transaction saves the position, the counts and the lines' usage rows
   (store.py says why that is exactly once).
4. cancelling / past expires_at: lines already sent finish, lines not sent yet and the rest of the file go to the
   error file as `batch_cancelled` / `batch_expired`, so every input line is in exactly one of the two files; the
   output so far is kept. Then cancelled / expired; a batch whose lines are all done: finalizing -> completed.

A runner replica killed at any point (SIGKILL included) is restarted by Serve; the batches it held are taken up
again once their lease runs out (lease_s), by whichever runner replica polls first, from their last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from ray import serve

from serve_app.accounts.credit.book import CreditBook
from serve_app.accounts.credit.guard import CreditGuard
from serve_app.accounts.ledger import UsageRecord
from serve_app.accounts.store import connect, database_url
from serve_app.config import GatewayConfig
from serve_app.errors import InternalError, PayloadTooLarge, ServingError
from serve_app.gateway.batches.lines import LineReader, line_request_id, response_line, unrun_line, validate_input
from serve_app.gateway.batches.storage import FileStorage
from serve_app.gateway.batches.store import BatchStore, LeaseLost, new_id, unix_now
from serve_app.gateway.bodies import validation_error
from serve_app.gateway.directory import ModelDirectory
from serve_app.gateway.endpoints import ENDPOINTS
from serve_app.gateway.handling import Endpoint, ModelCalls, RequestContext

logger = logging.getLogger("ray.serve")

BATCH_RUNNER_DEPLOYMENT_NAME = "BatchRunner"
READ_BLOCK_LINES = 64
READ_BLOCK_BYTES = 4 << 20
# A chunk is also checkpointed once its output reaches this, whatever checkpoint_lines says (memory bound).
CHECKPOINT_MAX_BYTES = 64 << 20
# Answers larger than this many floats are JSON-encoded off the event loop.
INLINE_ENCODE_MAX_FLOATS = 65536
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 10.0
UNRUN = {"cancelled": ("batch_cancelled", "the batch was cancelled before this request was sent"),
         "expired": ("batch_expired", "this request could not be executed before the completion window expired")}


class LineNotRun(Exception):
    """The batch stopped (cancel, expiry) before this line was sent to its model."""


@dataclass
class Run:
    """A batch this replica works on."""

    batch_id: str
    stop: str | None = None  # "cancelled" or "expired": send no more lines
    lost: bool = False  # the lease went to another replica: write nothing more
    task: asyncio.Task | None = None

    @property
    def stopping(self) -> bool:
        return self.stop is not None or self.lost


CURRENT_RUN: contextvars.ContextVar[Run] = contextvars.ContextVar("batch_run")


@dataclass
class LineResult:
    output: bytes | None = None  # the output file's line (answered with 200)
    error: bytes | None = None  # the error file's line
    usage: UsageRecord | None = None


@dataclass
class Chunk:
    """Lines done since the last checkpoint, in input order."""

    from_line: int
    to_line: int
    to_offset: int
    started: float = field(default_factory=time.monotonic)
    output: list[bytes] = field(default_factory=list)
    errors: list[bytes] = field(default_factory=list)
    usage: list[UsageRecord] = field(default_factory=list)
    size: int = 0

    def add(self, result: LineResult, end_offset: int) -> None:
        if result.output is not None:
            self.output.append(result.output)
            self.size += len(result.output)
        if result.error is not None:
            self.errors.append(result.error)
            self.size += len(result.error)
        if result.usage is not None:
            self.usage.append(result.usage)
        self.to_line += 1
        self.to_offset = end_offset

    @property
    def lines(self) -> int:
        return self.to_line - self.from_line


@serve.deployment(name=BATCH_RUNNER_DEPLOYMENT_NAME)
class BatchRunner:
    """The Serve deployment; the work is BatchWorker's (a plain class: Serve pickles this one by value)."""

    def __init__(self, config: dict[str, Any] | None = None):
        self.worker = BatchWorker(config)

    async def wake(self) -> None:
        await self.worker.wake()

    async def check_health(self) -> None:
        await self.worker.check_health()

    async def status(self) -> dict[str, Any]:
        return await self.worker.status()


class BatchWorker:
    def __init__(self, config: dict[str, Any] | None = None):
        self.config = GatewayConfig.model_validate(config or {})
        self.settings = self.config.batches
        self.owner = new_id("runner_")
        engine = connect(database_url(self.config.database_url))
        self.store = BatchStore(engine)
        self.storage = FileStorage(self.settings.storage)
        self.models = ModelDirectory(self.config.model_refresh_s)
        self._in_flight: dict[str, asyncio.Semaphore] = {}
        # Prepaid keys: a line of a key whose credit is spent gets the online 429 in the error file, and the lines
        # served are debited (at the price times its batch_factor) in the checkpoint that bills them.
        self.credit = CreditGuard(CreditBook(engine))
        self.calls = ModelCalls(self.models, self.config, call_options={"background": True}, admit=self._admit,
                                credit=self.credit)
        self._runs: dict[str, Run] = {}
        self._supervisor: asyncio.Task | None = None
        self._wakeup = asyncio.Event()
        self.stats = {"batches_taken": 0, "batches_resumed": 0, "lines_sent": 0, "checkpoints": 0}
        with contextlib.suppress(RuntimeError):  # no running loop here: the first health check starts it
            asyncio.get_running_loop()
            self._ensure_started()

    # ---- calls from the gateway, Serve and tests --------------------------------------------------------------

    async def wake(self) -> None:
        self._ensure_started()
        self._wakeup.set()

    async def check_health(self) -> None:
        self._ensure_started()

    async def status(self) -> dict[str, Any]:
        return {"owner": self.owner, "pid": os.getpid(), "running": sorted(self._runs), **self.stats}

    # ---- supervision: leases, heartbeats, cancels -----------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._supervisor is not None and not self._supervisor.done():
            return
        if self._supervisor is not None and not self._supervisor.cancelled():
            logger.error("batch runner: the supervisor ended: %r; starting it again", self._supervisor.exception())
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:  # noqa: BLE001 - the database may be down for a while: try again next poll
                logger.exception("batch runner: poll failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.settings.poll_s)
            self._wakeup.clear()

    async def _tick(self) -> None:
        now = time.time()
        held = await asyncio.to_thread(self.store.heartbeat, self.owner, list(self._runs), now, self.settings.lease_s)
        for batch_id, run in self._runs.items():
            status = held.get(batch_id)
            if status is None:
                run.lost = True
            elif status == "cancelling" and run.stop is None:
                run.stop = "cancelled"
        if len(self._runs) >= self.settings.max_running_batches:
            return
        for batch_id in await asyncio.to_thread(self.store.claimable, now):
            if len(self._runs) >= self.settings.max_running_batches:
                break
            if batch_id in self._runs:
                continue
            if await asyncio.to_thread(self.store.claim, batch_id, self.owner, now, self.settings.lease_s):
                run = Run(batch_id)
                self._runs[batch_id] = run
                run.task = asyncio.get_running_loop().create_task(self._run(run))

    @contextlib.asynccontextmanager
    async def _admit(self, model: str):
        """At most max_in_flight_per_model lines of this replica wait on one model; a line that gets its turn after
        its batch stopped is not sent."""
        semaphore = self._in_flight.get(model)
        if semaphore is None:
            semaphore = self._in_flight[model] = asyncio.Semaphore(self.settings.max_in_flight_per_model)
        async with semaphore:
            run = CURRENT_RUN.get(None)
            if run is not None and run.stopping:
                raise LineNotRun()
            self.stats["lines_sent"] += 1
            yield

    # ---- one batch ------------------------------------------------------------------------------------------

    async def _run(self, run: Run) -> None:
        CURRENT_RUN.set(run)
        try:
            batch = await asyncio.to_thread(self.store.get_batch, run.batch_id)
            self.stats["batches_taken"] += 1
            if batch["status"] != "validating" or batch["next_line"]:
                self.stats["batches_resumed"] += 1
                logger.info("batch runner: resuming %s (%s) at line %d", batch["id"], batch["status"],
                            batch["next_line"])
            if batch["key_id"] is not None:
                await asyncio.to_thread(self.credit.load, [batch["key_id"]])
            if batch["status"] == "cancelling" and batch["in_progress_at"] is None:
                await self._finish(batch, "cancelled")  # cancelled before its file was validated: no lines known
                return
            if batch["status"] == "validating":
                batch = await self._validate(batch)
            if batch is not None and batch["status"] in ("in_progress", "cancelling"):
                batch = await self._process(batch, run)
            if batch is not None and batch["status"] == "finalizing":
                await self._finish(batch, "completed")
        except LeaseLost:
            logger.warning("batch runner: lost the lease of %s to another runner; stopped", run.batch_id)
        except Exception:  # noqa: BLE001 - leave the batch to be taken up again when the lease runs out
            logger.exception("batch runner: %s failed; it is taken up again once its lease runs out", run.batch_id)
        finally:
            self._runs.pop(run.batch_id, None)

    async def _reload(self, batch_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.store.get_batch, batch_id)

    async def _validate(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        now = unix_now()
        if now >= batch["expires_at"]:
            await self._finish(batch, "expired")
            return None
        source = await asyncio.to_thread(self.store.get_file, batch["input_file_id"])
        if source is None:
            errors = [{"code": "file_not_found", "line": None, "param": "input_file_id",
                       "message": f"the input file {batch['input_file_id']!r} was deleted"}]
            total = 0
        else:
            total, errors = await asyncio.to_thread(self._validate_file, source, batch["endpoint"])
        if errors:
            await asyncio.to_thread(self.store.update_held, batch["id"], self.owner, where_status=("validating",),
                                    status="failed", failed_at=unix_now(), errors=errors, lease_owner=None)
            logger.info("batch runner: %s failed validation (%d problems, first: %s)", batch["id"], len(errors),
                        errors[0]["message"])
            return None
        await asyncio.to_thread(self.store.update_held, batch["id"], self.owner, total=total,
                                in_progress_at=unix_now())
        await asyncio.to_thread(self.store.update_held, batch["id"], self.owner, where_status=("validating",),
                                status="in_progress")
        return await self._reload(batch["id"])

    def _validate_file(self, source: dict[str, Any], endpoint: str) -> tuple[int, list[dict]]:
        with self.storage.open_part(source["id"], 0) as stream:
            return validate_input(LineReader(stream, 0), endpoint, self.settings.max_file_lines,
                                  self.settings.max_embedding_inputs)

    async def _process(self, batch: dict[str, Any], run: Run) -> dict[str, Any] | None:
        """Lines from the last checkpoint to the end of the file, or until the batch stops."""
        if batch["status"] == "cancelling":
            run.stop = "cancelled"
        elif unix_now() >= batch["expires_at"]:
            run.stop = "expired"
        endpoint = ENDPOINTS[batch["endpoint"]]
        stream = await asyncio.to_thread(self.storage.open_part, batch["input_file_id"], 0)
        try:
            reader = await asyncio.to_thread(LineReader, stream, batch["next_offset"])
            await self._serve_lines(batch, run, endpoint, reader)
            if run.lost:
                raise LeaseLost(batch["id"])
            if run.stop is not None:
                await self._close_unrun(batch, run.stop, reader)
                return None
        finally:
            await asyncio.to_thread(stream.close)
        if not await asyncio.to_thread(self.store.update_held, batch["id"], self.owner, where_status=("in_progress",),
                                       status="finalizing", finalizing_at=unix_now()):
            batch = await self._reload(batch["id"])
            if batch["status"] == "cancelling":  # a cancel that came after the last line: nothing left to cancel
                await self._finish(batch, "cancelled")
                return None
        return await self._reload(batch["id"])

    async def _serve_lines(self, batch: dict[str, Any], run: Run, endpoint: Endpoint, reader: LineReader) -> None:
        """Read and dispatch lines (a bounded queue of started lines ahead of the checkpoints), and checkpoint them in
        input order. Returns when the file is done or the batch stopped and its lines in flight are checkpointed."""
        started: asyncio.Queue = asyncio.Queue(maxsize=2 * self.settings.checkpoint_lines)
        position = batch["next_line"]

        async def dispatch() -> None:
            nonlocal position
            try:
                while not run.stopping:
                    block = await asyncio.to_thread(reader.block, READ_BLOCK_LINES, READ_BLOCK_BYTES)
                    if not block:
                        break
                    for raw, end in block:
                        if run.stopping:
                            return  # lines read but not started: _close_unrun reads on from the last checkpoint
                        task = asyncio.get_running_loop().create_task(self._serve_line(batch, endpoint, position, raw))
                        position += 1
                        await started.put((end, task))
            finally:
                await started.put(None)

        dispatcher = asyncio.get_running_loop().create_task(dispatch())
        progress = dict(batch)
        chunk = Chunk(progress["next_line"], progress["next_line"], progress["next_offset"])
        try:
            while True:
                timeout = None if not chunk.lines else max(0.0, chunk.started + self.settings.checkpoint_s
                                                           - time.monotonic())
                try:
                    item = await asyncio.wait_for(started.get(), timeout)
                except asyncio.TimeoutError:
                    chunk = await self._checkpoint(progress, chunk, run)
                    continue
                if item is None:
                    break
                end, task = item
                chunk.add(await task, end)
                if (chunk.lines >= self.settings.checkpoint_lines or chunk.size >= CHECKPOINT_MAX_BYTES
                        or time.monotonic() - chunk.started >= self.settings.checkpoint_s):
                    chunk = await self._checkpoint(progress, chunk, run)
            await dispatcher  # a failed read fails the run here (it is taken up again), rather than ending it early
            if chunk.lines:
                await self._checkpoint(progress, chunk, run)
            batch.update(progress)
        finally:
            if not dispatcher.done():
                dispatcher.cancel()
            await asyncio.gather(dispatcher, return_exceptions=True)

    async def _checkpoint(self, progress: dict[str, Any], chunk: Chunk, run: Run) -> Chunk:
        """Write the chunk's parts, then commit its position, counts and usage; the next chunk starts after it."""
        if chunk.lines:
            if run.lost:
                raise LeaseLost(progress["id"])
            output_bytes = error_bytes = None
            if chunk.output:
                output_bytes = await asyncio.to_thread(self.storage.write_part, progress["output_file_id"],
                                                       progress["output_parts"], b"".join(chunk.output))
            if chunk.errors:
                error_bytes = await asyncio.to_thread(self.storage.write_part, progress["error_file_id"],
                                                      progress["error_parts"], b"".join(chunk.errors))
            status, progress["expires_at"] = await asyncio.to_thread(
                self.store.checkpoint, progress["id"], self.owner, from_line=chunk.from_line, to_line=chunk.to_line,
                to_offset=chunk.to_offset, completed=len(chunk.output), failed=len(chunk.errors),
                input_tokens=sum(record.input_tokens for record in chunk.usage), output_part_bytes=output_bytes,
                error_part_bytes=error_bytes, usage=chunk.usage, lease_s=self.settings.lease_s,
                with_rows=self.credit.with_rows)
            self.stats["checkpoints"] += 1
            key_id = progress["key_id"]
            if key_id is not None and (view := self.credit.balance(key_id)) is not None and view.balance <= 0:
                await asyncio.to_thread(self.credit.load, [key_id])  # a top-up lets the lines after it run
            progress.update(next_line=chunk.to_line, next_offset=chunk.to_offset,
                            output_parts=progress["output_parts"] + (output_bytes is not None),
                            error_parts=progress["error_parts"] + (error_bytes is not None))
            if status == "cancelling" and run.stop is None:
                run.stop = "cancelled"
        if run.stop is None and unix_now() >= progress["expires_at"]:
            run.stop = "expired"
        return Chunk(progress["next_line"], progress["next_line"], progress["next_offset"])

    async def _serve_line(self, batch: dict[str, Any], endpoint: Endpoint, position: int, raw: bytes) -> LineResult:
        """One line through the gateway's handling. Never raises: every outcome is a line of one of the two files."""
        request_id = line_request_id(batch["id"], position)
        custom_id = json.loads(raw)["custom_id"]  # the line was validated
        started = time.monotonic()
        try:
            if len(raw) > self.config.max_body_bytes:
                raise PayloadTooLarge(f"request body is {len(raw)} bytes; the limit is {self.config.max_body_bytes}")
            try:
                body = endpoint.schema.model_validate(json.loads(raw)["body"])
            except ValidationError as exc:
                raise validation_error(exc) from None
            served = await self._serve_with_retries(endpoint, body, request_id, batch["key_id"])
        except LineNotRun:
            code, message = UNRUN[CURRENT_RUN.get().stop or "cancelled"]
            return LineResult(error=unrun_line(request_id, custom_id, code, message))
        except ServingError as error:
            return LineResult(error=response_line(request_id, custom_id, error.status, error.body()))
        except Exception:  # noqa: BLE001 - the line fails as the gateway would answer it: 500
            logger.exception("batch runner: line %d of %s failed", position + 1, batch["id"])
            error = InternalError("internal error; the request was not completed")
            return LineResult(error=response_line(request_id, custom_id, error.status, error.body()))
        usage = served.usage
        record = UsageRecord(request_id=request_id, fingerprint="", key_id=batch["key_id"], model=usage.model,
                             route=batch["endpoint"], input_tokens=usage.input_tokens, documents=usage.documents,
                             search_units=usage.search_units, embeddings=usage.embeddings,
                             dimensions=usage.dimensions, latency_ms=(time.monotonic() - started) * 1000,
                             batch_id=batch["id"])
        if usage.embeddings * (usage.dimensions or 0) > INLINE_ENCODE_MAX_FLOATS:
            line = await asyncio.to_thread(response_line, request_id, custom_id, 200, served.body)
        else:
            line = response_line(request_id, custom_id, 200, served.body)
        return LineResult(output=line, usage=record)

    async def _serve_with_retries(self, endpoint: Endpoint, body, request_id: str, key_id: str | None):
        """503 and 504 mean "not now" (a model restarting, or busy with online traffic): retried with backoff for
        line_retry_s, as an online client would; any other answer is the line's."""
        deadline = time.monotonic() + self.settings.line_retry_s
        delay = RETRY_FIRST_DELAY_S
        while True:
            try:
                return await endpoint.serve(body, RequestContext(self.calls, request_id, key_id))
            except ServingError as error:
                run = CURRENT_RUN.get()
                if error.status not in (503, 504) or time.monotonic() + delay > deadline or run.stopping:
                    raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_DELAY_S)

    async def _close_unrun(self, batch: dict[str, Any], stop: str, reader: LineReader) -> None:
        """Every line not done yet goes to the error file as not run (checkpointed like served lines), then the batch
        ends `cancelled` or `expired` with the output it has."""
        code, message = UNRUN[stop]
        progress = await self._reload(batch["id"])
        await asyncio.to_thread(reader.source.seek, progress["next_offset"])
        reader.offset = progress["next_offset"]
        run = CURRENT_RUN.get()
        chunk = Chunk(progress["next_line"], progress["next_line"], progress["next_offset"])
        while block := await asyncio.to_thread(reader.block, self.settings.checkpoint_lines, CHECKPOINT_MAX_BYTES):
            for raw, end in block:
                request_id = line_request_id(batch["id"], chunk.to_line)
                chunk.add(LineResult(error=unrun_line(request_id, json.loads(raw)["custom_id"], code, message)), end)
            chunk = await self._checkpoint(progress, chunk, run)
        await self._finish(await self._reload(batch["id"]), stop)

    async def _finish(self, batch: dict[str, Any], status: str) -> None:
        now = unix_now()
        files = []
        for kind, lines, purpose_name in (("output", batch["completed"], "output"), ("error", batch["failed"], "error")):
            if lines:
                files.append({"id": batch[f"{kind}_file_id"], "key_id": batch["key_id"], "purpose": "batch_output",
                              "filename": f"{batch['id']}_{purpose_name}.jsonl", "bytes": batch[f"{kind}_bytes"],
                              "parts": batch[f"{kind}_parts"], "lines": lines, "embedding_inputs": 0,
                              "created_at": now})
        times = {"completed": {"completed_at": now}, "cancelled": {"cancelled_at": now},
                 "expired": {"expired_at": now}}[status]
        if await asyncio.to_thread(self.store.finish, batch["id"], self.owner, status, files, **times):
            logger.info("batch runner: %s %s (%d completed, %d failed of %d)", batch["id"], status,
                        batch["completed"], batch["failed"], batch["total"])
