"""Batch files line by line: counting an upload as it streams, validating an input file, reading it from a checkpoint,
and writing OpenAI's output and error lines.

A line is what ends with a newline (or ends the file); a final newline does not start another line. Line numbers in
errors are 1-based, as OpenAI's `errors.data[].line`; positions inside the runner are 0-based.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from serve_app.errors import PayloadTooLarge

UPLOAD_CHUNK_BYTES = 1 << 20
MAX_CUSTOM_ID_CHARS = 512
# A failed validation reports this many problems at most (OpenAI's `errors.data`), the first ones in the file.
MAX_REPORTED_ERRORS = 100
# The embeddings endpoints, whose batches are limited in inputs (max_embedding_inputs), not only in lines.
EMBEDDING_ENDPOINTS = ("/v1/embeddings", "/v2/embed", "/embed")


def line_request_id(batch_id: str, position: int) -> str:
    """A line's id (`id` and `response.request_id` of its output line, `request_id` of its ledger row): derived from
    the batch and the line, so a line redone after a crash keeps its id and its ledger row is written once."""
    digest = hashlib.sha256(f"{batch_id}\0{position}".encode()).hexdigest()
    return f"batch_req_{digest[:32]}"


def embedding_inputs(body: Any) -> int:
    """How many inputs an embeddings body holds, OpenAI's (`input`), Cohere's (`texts` or `inputs`) or TEI's
    (`inputs`: a text, token ids, or a list of either), as the per-batch limit counts them (0 for what is not one)."""
    if not isinstance(body, dict):
        return 0
    if isinstance(body.get("texts"), list):
        return len(body["texts"])
    for name in ("input", "inputs"):
        value = body.get(name)
        if isinstance(value, str):
            return 1
        if isinstance(value, list) and value:
            return 1 if all(isinstance(item, int) for item in value) else len(value)
    return 0


# ---- upload --------------------------------------------------------------------------------------------------

@dataclass
class UploadStats:
    bytes: int = 0
    lines: int = 0
    embedding_inputs: int = 0
    _partial: bytes = field(default=b"", repr=False)

    def count(self, raw: bytes) -> None:
        self.lines += 1
        if b'"/v1/embeddings"' in raw or b'"/v2/embed"' in raw or b'"/embed"' in raw:  # rerank lines are not parsed
            try:
                line = json.loads(raw)
            except ValueError:
                return  # the batch's validation names the line
            if isinstance(line, dict) and line.get("url") in EMBEDDING_ENDPOINTS:
                self.embedding_inputs += embedding_inputs(line.get("body"))


def copy_upload(source: IO[bytes], sink: IO[bytes], max_bytes: int, max_lines: int) -> UploadStats:
    """Stream an uploaded file to storage, counting bytes, lines and embedding inputs on the way; 413 as soon as a
    limit is passed (the caller removes what was written)."""
    stats = UploadStats()
    while chunk := source.read(UPLOAD_CHUNK_BYTES):
        stats.bytes += len(chunk)
        if stats.bytes > max_bytes:
            raise PayloadTooLarge(f"the file is over {max_bytes} bytes, the most a batch file may hold",
                                  param="file", code="file_too_large")
        sink.write(chunk)
        pieces = (stats._partial + chunk).split(b"\n")
        stats._partial = pieces.pop()
        for raw in pieces:
            stats.count(raw)
        if stats.lines > max_lines:
            raise PayloadTooLarge(f"the file has more than {max_lines} lines, the most a batch file may hold",
                                  param="file", code="too_many_lines")
    if stats._partial:
        stats.count(stats._partial)
        if stats.lines > max_lines:
            raise PayloadTooLarge(f"the file has more than {max_lines} lines, the most a batch file may hold",
                                  param="file", code="too_many_lines")
    return stats


# ---- validation (the batch's `validating` step) -----------------------------------------------------------------

@dataclass(frozen=True)
class InputLine:
    custom_id: str
    body: dict[str, Any]
    size: int  # bytes of the line as uploaded


def batch_error(code: str, message: str, line: int | None = None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "line": line, "message": message, "param": param}


def parse_line(raw: bytes, number: int, endpoint: str) -> InputLine | dict[str, Any]:
    """The line, or the batch error that names what is wrong with it."""
    try:
        line = json.loads(raw)
    except ValueError:
        return batch_error("invalid_json_line", f"line {number} is not valid JSON", number)
    if not isinstance(line, dict):
        return batch_error("invalid_json_line", f"line {number} is not a JSON object", number)
    for name in ("custom_id", "method", "url", "body"):
        if name not in line:
            return batch_error("missing_required_parameter", f"line {number} has no {name!r}", number, name)
    custom_id = line["custom_id"]
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID_CHARS:
        return batch_error("invalid_custom_id", f"line {number}: custom_id must be a string of 1 to "
                                                f"{MAX_CUSTOM_ID_CHARS} characters", number, "custom_id")
    if line["method"] != "POST":
        return batch_error("invalid_method", f"line {number}: method must be 'POST', not {line['method']!r}",
                           number, "method")
    if line["url"] != endpoint:
        return batch_error("invalid_url", f"line {number}: url {line['url']!r} is not the batch's endpoint "
                                          f"{endpoint!r}", number, "url")
    if not isinstance(line["body"], dict):
        return batch_error("invalid_request", f"line {number}: body must be a JSON object", number, "body")
    return InputLine(custom_id, line["body"], len(raw))


def validate_input(lines, endpoint: str, max_lines: int, max_embedding_inputs: int) -> tuple[int, list[dict]]:
    """(number of lines, errors) of an input file given as an iterator of raw lines. Any error fails the batch."""
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    total = inputs = 0
    for total, raw in enumerate(lines, start=1):
        parsed = parse_line(raw, total, endpoint)
        if isinstance(parsed, dict):
            errors.append(parsed)
        elif parsed.custom_id in seen:
            errors.append(batch_error("duplicate_custom_id", f"line {total}: custom_id {parsed.custom_id!r} is "
                                                             "already used by an earlier line", total, "custom_id"))
        else:
            seen.add(parsed.custom_id)
            if endpoint in EMBEDDING_ENDPOINTS:
                inputs += embedding_inputs(parsed.body)
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
    if not total:
        errors.append(batch_error("empty_file", "the input file has no lines"))
    elif total > max_lines:
        errors.append(batch_error("too_many_requests", f"the input file has {total} lines; at most {max_lines}"))
    if inputs > max_embedding_inputs:
        errors.append(batch_error("too_many_embedding_inputs", f"the input file holds {inputs} embedding inputs; "
                                                               f"an embeddings batch takes at most "
                                                               f"{max_embedding_inputs}"))
    return total, errors


# ---- reading from a checkpoint ------------------------------------------------------------------------------------

class LineReader:
    """Lines of a file from a byte offset on, in blocks (each block is one hop off the event loop)."""

    def __init__(self, source: IO[bytes], offset: int):
        self.source = source
        self.offset = offset
        source.seek(offset)

    def block(self, max_lines: int, max_bytes: int) -> list[tuple[bytes, int]]:
        """Up to max_lines lines (fewer once max_bytes are read): (line, offset just past it). Empty at the end."""
        taken: list[tuple[bytes, int]] = []
        size = 0
        while len(taken) < max_lines and size < max_bytes:
            raw = self.source.readline()
            if not raw:
                break
            self.offset += len(raw)
            size += len(raw)
            taken.append((raw, self.offset))
        return taken

    def __iter__(self):
        while raw := self.source.readline():
            yield raw


# ---- output and error lines -------------------------------------------------------------------------------------

def _encode(line: dict[str, Any]) -> bytes:
    # Rendered as the gateway renders its responses (serve_app/gateway/responses.py: orjson, compact, UTF-8).
    return orjson.dumps(line) + b"\n"


def response_line(request_id: str, custom_id: str, status: int, body: Any) -> bytes:
    """A line that was answered: 200 (output file) or 4xx/5xx with the error body (error file)."""
    return _encode({"id": request_id, "custom_id": custom_id,
                    "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None})


def unrun_line(request_id: str, custom_id: str, code: str, message: str) -> bytes:
    """A line that was never sent to a model (the batch was cancelled or expired first): error file."""
    return _encode({"id": request_id, "custom_id": custom_id, "response": None,
                    "error": {"code": code, "message": message}})
