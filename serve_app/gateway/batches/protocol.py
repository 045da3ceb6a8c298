"""Wire shapes of the Batch API, as the openai SDK reads them (openai.types: FileObject, FileDeleted, Batch,
BatchRequestCounts, BatchError, BatchUsage, and the cursor pages of lists). No serving logic here."""

from __future__ import annotations

from typing import Any

from pydantic import Field, StrictStr, field_validator

from serve_app.gateway.protocol import WireModel

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


class BatchCreateRequest(WireModel):
    input_file_id: StrictStr
    endpoint: StrictStr
    completion_window: StrictStr
    metadata: dict[StrictStr, StrictStr] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value):
        # OpenAI's limits on metadata: 16 pairs, keys up to 64 characters, values up to 512.
        if value is None:
            return value
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"metadata holds at most {MAX_METADATA_PAIRS} pairs")
        for key, item in value.items():
            if len(key) > MAX_METADATA_KEY_CHARS or len(item) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(f"metadata keys are at most {MAX_METADATA_KEY_CHARS} characters and values at most "
                                 f"{MAX_METADATA_VALUE_CHARS}")
        return value


class FileObject(WireModel):
    id: str
    object: str = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"  # deprecated by OpenAI, still required by the SDK's type
    expires_at: int | None = None
    status_details: str | None = None

    @classmethod
    def of(cls, row: dict[str, Any]) -> "FileObject":
        return cls(id=row["id"], bytes=row["bytes"], created_at=row["created_at"], filename=row["filename"],
                   purpose=row["purpose"])


class FileDeleted(WireModel):
    id: str
    object: str = "file"
    deleted: bool = True


class FileList(WireModel):
    object: str = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class RequestCounts(WireModel):
    total: int
    completed: int
    failed: int


class BatchErrorItem(WireModel):
    code: str | None = None
    line: int | None = None
    message: str | None = None
    param: str | None = None


class BatchErrors(WireModel):
    object: str = "list"
    data: list[BatchErrorItem]


class InputTokensDetails(WireModel):
    cached_tokens: int = 0


class OutputTokensDetails(WireModel):
    reasoning_tokens: int = 0


class BatchUsage(WireModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class BatchObject(WireModel):
    id: str
    object: str = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: BatchErrors | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    usage: BatchUsage
    metadata: dict[str, str] | None = None

    @classmethod
    def of(cls, row: dict[str, Any]) -> "BatchObject":
        """From a `batches` row. The output / error file ids appear once the batch has ended with lines in them."""
        ended = row["status"] in ("completed", "expired", "cancelled")
        times = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
                 "expired_at", "cancelling_at", "cancelled_at")
        return cls(id=row["id"], endpoint=row["endpoint"], input_file_id=row["input_file_id"],
                   completion_window=row["completion_window"], status=row["status"],
                   output_file_id=row["output_file_id"] if ended and row["completed"] else None,
                   error_file_id=row["error_file_id"] if ended and row["failed"] else None,
                   errors=BatchErrors(data=row["errors"]) if row["errors"] else None,
                   request_counts=RequestCounts(total=row["total"], completed=row["completed"], failed=row["failed"]),
                   usage=BatchUsage(input_tokens=row["input_tokens"], total_tokens=row["input_tokens"]),
                   metadata=row["metadata"], **{name: row[name] for name in times})


class BatchList(WireModel):
    object: str = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
