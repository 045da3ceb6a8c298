"""What the Batch API routes do, on a gateway replica: uploads, file and batch objects, ownership, create and cancel.

Ownership: a file or batch belongs to the key that created it. Another key gets 404 for it (it cannot even learn that
it exists) and sees only its own in lists; an admin key sees and may fetch everything. With auth off there are no
keys, so everything is everyone's.

The work itself is the runner's (runner.py): the gateway writes a batch row in `validating` and wakes the runner,
which also polls the database, so a batch starts even if the wake-up is lost.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import IO, Any, Iterator

from sqlalchemy.engine import Engine

from serve_app.accounts.credit.guard import CreditGuard
from serve_app.config import GatewayConfig
from serve_app.errors import InvalidRequest, NotFound, PayloadTooLarge, StoreUnavailable
from serve_app.gateway.batches.lines import EMBEDDING_ENDPOINTS, copy_upload
from serve_app.gateway.batches.protocol import BatchCreateRequest
from serve_app.gateway.batches.storage import FileStorage
from serve_app.gateway.batches.store import BatchStore, new_id, unix_now
from serve_app.gateway.endpoints import ENDPOINTS

logger = logging.getLogger("ray.serve")

COMPLETION_WINDOWS = {"24h": 24 * 3600}  # OpenAI's only window
PURPOSES = ("batch", "batch_output")
# What ids look like (store.new_id); anything else cannot name a file or batch, and is never sent to the database
# (PostgreSQL refuses strings with NUL characters outright).
_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")
MAX_FILENAME_CHARS = 255
# Room for the multipart envelope around the file (boundaries, part headers, the purpose field).
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class BatchService:
    def __init__(self, config: GatewayConfig, engine: Engine, runner=None, credit: CreditGuard | None = None):
        self.config = config.batches
        self.store = BatchStore(engine)
        self.storage = FileStorage(self.config.storage)
        self.runner = runner  # DeploymentHandle of the BatchRunner; None where no runner is bound
        self.credit = credit  # the gateway's prepaid balances: a spent key cannot start a batch
        self._wakeups: set[asyncio.Task] = set()

    def upload_body_limit(self) -> int:
        return self.config.max_file_bytes + MULTIPART_OVERHEAD_BYTES

    # ---- ownership --------------------------------------------------------------------------------------------

    @staticmethod
    def sees_all(key) -> bool:
        return key is None or key.admin

    def _visible(self, row: dict[str, Any] | None, key, what: str, object_id: str) -> dict[str, Any]:
        if row is None or not (self.sees_all(key) or row["key_id"] == key.id):
            raise NotFound(f"no {what} with id {object_id!r}", param=f"{what}_id")
        return row

    async def _get(self, read, key, what: str, object_id: str) -> dict[str, Any]:
        row = await asyncio.to_thread(read, object_id) if _ID.fullmatch(object_id) else None
        return self._visible(row, key, what, object_id)

    # ---- files ------------------------------------------------------------------------------------------------

    async def upload(self, key, filename: str, purpose: str, source: IO[bytes]) -> dict[str, Any]:
        if purpose != "batch":
            raise InvalidRequest(f"purpose must be 'batch' (this server keeps files for the Batch API only), not "
                                 f"{purpose!r}", param="purpose")
        file_id = new_id("file-")
        try:
            stats = await asyncio.to_thread(self._store_upload, file_id, source)
        except PayloadTooLarge:
            await self._remove_quietly(file_id)
            raise
        except Exception as exc:  # noqa: BLE001 - the storage backend failed: the client may retry
            logger.exception("batches: storing upload %s failed", file_id)
            await self._remove_quietly(file_id)
            raise self.storage_unavailable() from exc
        filename = "".join(ch for ch in filename if ch.isprintable())[:MAX_FILENAME_CHARS] or "upload.jsonl"
        row = {"id": file_id, "key_id": key.id if key else None, "purpose": "batch", "filename": filename,
               "bytes": stats.bytes, "parts": 1,
               "lines": stats.lines, "embedding_inputs": stats.embedding_inputs, "created_at": unix_now()}
        await asyncio.to_thread(self.store.insert_file, row)
        return row

    def storage_unavailable(self) -> StoreUnavailable:
        return StoreUnavailable(f"the batch file storage ({self.storage.where}) is unavailable; retry shortly",
                                headers={"Retry-After": "5"})

    async def _remove_quietly(self, file_id: str) -> None:
        try:
            await asyncio.to_thread(self.storage.remove, file_id)
        except Exception:  # noqa: BLE001 - what is left is unreferenced; the original error is the client's answer
            logger.exception("batches: could not remove the parts of %s", file_id)

    def _store_upload(self, file_id: str, source: IO[bytes]):
        with self.storage.open_part_for_writing(file_id, 0) as sink:
            return copy_upload(source, sink, self.config.max_file_bytes, self.config.max_file_lines)

    async def file(self, key, file_id: str) -> dict[str, Any]:
        return await self._get(self.store.get_file, key, "file", file_id)

    async def files(self, key, *, purpose: str | None, limit: int, after: str | None, ascending: bool):
        if (purpose is not None and purpose not in PURPOSES) or (after is not None and not _ID.fullmatch(after)):
            return [], False
        return await asyncio.to_thread(self.store.list_files, key.id if key else None, self.sees_all(key),
                                       purpose=purpose, limit=limit, after=after, ascending=ascending)

    async def content(self, key, file_id: str) -> Iterator[bytes]:
        row = await self.file(key, file_id)
        return self.storage.read(row["id"], row["parts"])

    async def delete_file(self, key, file_id: str) -> None:
        row = await self.file(key, file_id)
        using = await asyncio.to_thread(self.store.batch_using, file_id)
        if using is not None:
            raise InvalidRequest(f"file {file_id!r} is the input of batch {using!r}, which is still running; cancel "
                                 "it first", param="file_id", code="file_in_use")
        if await asyncio.to_thread(self.store.delete_file, row["id"]):
            await self._remove_quietly(row["id"])  # the file is gone for every caller once its row is

    # ---- batches ----------------------------------------------------------------------------------------------

    async def create(self, key, body: BatchCreateRequest) -> dict[str, Any]:
        if self.credit is not None and key is not None:
            self.credit.admit(key.id)  # 429 insufficient_quota, as an online request would get
        if body.endpoint not in ENDPOINTS:
            raise InvalidRequest(f"endpoint {body.endpoint!r} is not served in batches; batch endpoints: "
                                 f"{', '.join(sorted(ENDPOINTS))}", param="endpoint", code="invalid_endpoint")
        if body.completion_window not in COMPLETION_WINDOWS:
            raise InvalidRequest(f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}, not "
                                 f"{body.completion_window!r}", param="completion_window")
        source = await self._get(self.store.get_file, key, "file", body.input_file_id)
        if source["purpose"] != "batch":
            raise InvalidRequest(f"file {source['id']!r} has purpose {source['purpose']!r}; a batch's input must be "
                                 "uploaded with purpose 'batch'", param="input_file_id")
        if body.endpoint in EMBEDDING_ENDPOINTS and source["embedding_inputs"] > self.config.max_embedding_inputs:
            raise InvalidRequest(f"file {source['id']!r} holds {source['embedding_inputs']} embedding inputs; an "
                                 f"embeddings batch takes at most {self.config.max_embedding_inputs}",
                                 param="input_file_id", code="too_many_embedding_inputs")
        now = unix_now()
        row = {"id": new_id("batch_"), "key_id": key.id if key else None, "endpoint": body.endpoint,
               "input_file_id": source["id"], "completion_window": body.completion_window, "status": "validating",
               "metadata": body.metadata, "errors": None, "created_at": now,
               "expires_at": now + COMPLETION_WINDOWS[body.completion_window],
               "output_file_id": new_id("file-"), "error_file_id": new_id("file-"), "total": 0, "completed": 0,
               "failed": 0, "input_tokens": 0, "next_line": 0, "next_offset": 0, "output_parts": 0,
               "error_parts": 0, "output_bytes": 0, "error_bytes": 0}
        await asyncio.to_thread(self.store.insert_batch, row)
        self.wake_runner()
        return await asyncio.to_thread(self.store.get_batch, row["id"])

    async def batch(self, key, batch_id: str) -> dict[str, Any]:
        return await self._get(self.store.get_batch, key, "batch", batch_id)

    async def batches(self, key, *, limit: int, after: str | None):
        if after is not None and not _ID.fullmatch(after):
            return [], False
        return await asyncio.to_thread(self.store.list_batches, key.id if key else None, self.sees_all(key),
                                       limit=limit, after=after)

    async def cancel(self, key, batch_id: str) -> dict[str, Any]:
        row = await self.batch(key, batch_id)
        if not await asyncio.to_thread(self.store.request_cancel, row["id"]):
            row = await self.batch(key, batch_id)
            if row["status"] not in ("cancelling", "cancelled"):
                raise InvalidRequest(f"batch {batch_id!r} is {row['status']}; only a validating or in_progress batch "
                                     "can be cancelled", param="batch_id", code="batch_not_cancellable")
            return row
        self.wake_runner()
        return await self.batch(key, batch_id)

    def wake_runner(self) -> None:
        """Tell the runner there is news (it polls anyway, so a lost wake-up only delays)."""
        if self.runner is None:
            return

        async def wake():
            try:
                await self.runner.wake.remote()
            except Exception as exc:  # noqa: BLE001 - the runner's poll picks the batch up
                logger.warning("batches: could not wake the runner (%r); it will find the batch when it polls", exc)

        task = asyncio.get_running_loop().create_task(wake())
        self._wakeups.add(task)
        task.add_done_callback(self._wakeups.discard)
