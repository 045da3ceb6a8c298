"""The Batch API's HTTP routes, as the openai SDK calls them (`client.files.*`, `client.batches.*`):

    POST   /v1/files                    multipart: file (JSONL) and purpose "batch" -> 200 with the file object
    GET    /v1/files                    ?purpose, limit (1-10000), after, order (asc|desc): a cursor page
    GET    /v1/files/{file_id}          the file object
    GET    /v1/files/{file_id}/content  the bytes (inputs, and the output / error files of batches)
    DELETE /v1/files/{file_id}          {"id", "object": "file", "deleted": true}
    POST   /v1/batches                  {"input_file_id", "endpoint", "completion_window": "24h", "metadata"?}
    GET    /v1/batches                  ?limit (1-100), after: newest first
    GET    /v1/batches/{batch_id}       the batch object
    POST   /v1/batches/{batch_id}/cancel

The gateway's middleware has authenticated the caller already; service.py decides what the key may see. Creating and
reading are not billed; the lines a batch serves are (runner.py).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from serve_app.errors import InvalidRequest, PayloadTooLarge
from serve_app.gateway.batches.protocol import (BatchCreateRequest, BatchList, BatchObject, FileDeleted, FileList,
                                                FileObject)
from serve_app.gateway.batches.service import BatchService
from serve_app.gateway.bodies import json_body, parse_body

router = APIRouter(prefix="/v1")

UPLOAD_PATH = "/v1/files"


def service(request: Request) -> BatchService:
    return request.app.state.batches


def caller(request: Request):
    return getattr(request.state, "api_key", None)


def bounded(request: Request, limit: int) -> Request:
    """The request with its body cut off at `limit` bytes: a chunked upload (no Content-Length for the middleware to
    check) gets 413 as soon as it passes the limit, not after it filled the disk."""
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise PayloadTooLarge(f"request body is over {limit} bytes, the limit of an upload")
        return message

    return Request(request.scope, receive)


# ---- files ---------------------------------------------------------------------------------------------------

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["batch"]}},
}}}}}


@router.post("/files", response_model=FileObject, openapi_extra=UPLOAD_BODY)
async def upload_file(request: Request) -> FileObject:
    batches = service(request)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest("upload a file as multipart/form-data with fields 'file' and 'purpose'", param="file")
    try:
        form = await bounded(request, batches.upload_body_limit()).form(max_files=1, max_fields=8)
    except (PayloadTooLarge, ClientDisconnect):
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed multipart body is the client's
        raise InvalidRequest(f"the multipart body could not be read: {exc}", param="file") from None
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("the form has no file in field 'file'", param="file")
        if not isinstance(purpose, str):
            raise InvalidRequest("the form has no 'purpose' (use 'batch')", param="purpose")
        row = await batches.upload(caller(request), upload.filename or "", purpose, upload.file)
    finally:
        await form.close()
    return FileObject.of(row)


def page(rows: list[dict], more: bool) -> dict:
    """OpenAI's list paging fields: whether more follow, and the ids to page from."""
    return {"has_more": more, "first_id": rows[0]["id"] if rows else None, "last_id": rows[-1]["id"] if rows else None}


@router.get("/files", response_model=FileList)
async def list_files(request: Request, purpose: str | None = None, limit: int = Query(10_000, ge=1, le=10_000),
                     after: str | None = None, order: Literal["asc", "desc"] = "desc") -> FileList:
    rows, more = await service(request).files(caller(request), purpose=purpose, limit=limit, after=after,
                                              ascending=order == "asc")
    return FileList(data=[FileObject.of(row) for row in rows], **page(rows, more))


@router.get("/files/{file_id}", response_model=FileObject)
async def get_file(request: Request, file_id: str) -> FileObject:
    return FileObject.of(await service(request).file(caller(request), file_id))


@router.get("/files/{file_id}/content", response_class=StreamingResponse)
async def file_content(request: Request, file_id: str) -> StreamingResponse:
    chunks = await service(request).content(caller(request), file_id)
    return StreamingResponse(chunks, media_type="application/octet-stream")


@router.delete("/files/{file_id}", response_model=FileDeleted)
async def delete_file(request: Request, file_id: str) -> FileDeleted:
    await service(request).delete_file(caller(request), file_id)
    return FileDeleted(id=file_id)


# ---- batches -------------------------------------------------------------------------------------------------

@router.post("/batches", response_model=BatchObject, openapi_extra=json_body(BatchCreateRequest))
async def create_batch(request: Request) -> JSONResponse:
    body: BatchCreateRequest = await parse_body(request, BatchCreateRequest)
    row = await service(request).create(caller(request), body)
    return JSONResponse(BatchObject.of(row).model_dump())


@router.get("/batches", response_model=BatchList)
async def list_batches(request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = None) -> BatchList:
    rows, more = await service(request).batches(caller(request), limit=limit, after=after)
    return BatchList(data=[BatchObject.of(row) for row in rows], **page(rows, more))


@router.get("/batches/{batch_id}", response_model=BatchObject)
async def get_batch(request: Request, batch_id: str) -> BatchObject:
    return BatchObject.of(await service(request).batch(caller(request), batch_id))


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject)
async def cancel_batch(request: Request, batch_id: str) -> BatchObject:
    return BatchObject.of(await service(request).cancel(caller(request), batch_id))
