"""JSON request bodies: read within the size limit, validate against a wire schema, and say what to fix.

Every route that takes a body (inference and admin alike) parses it here, so every one answers the same 413 for
a body over `max_body_bytes` and the same 400 naming the field for a schema violation. Routes parse their own
bodies rather than let FastAPI do it because the body is read whatever the Content-Type says (curl -d sends form
encoding) and because /rerank tells two schemas apart by the body.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from serve_app.config import GatewayConfig
from serve_app.errors import InvalidRequest, PayloadTooLarge

# pydantic's union-member tags in an error location ("str", "list[int]", ...): dropped so that `param` names the
# field the client sent.
_UNION_TAGS = ("str", "int", "DocumentObject", "constrained-str")

# X-Ignored-Fields names at most this many fields, and only names that are safe in a header verbatim; the rest
# are counted. A client controls these names, so they must never break the header or make it unbounded.
MAX_NAMED_IGNORED_FIELDS = 16
_HEADER_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def validation_error(exc: ValidationError | RequestValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    location = [str(part) for part in first.get("loc", ())]
    if isinstance(exc, RequestValidationError) and location:
        location = location[1:]  # FastAPI's "body" / "query": where it looked, not a name the client sent
    location = [part for part in location if not any(ch in part for ch in "[]") and part not in _UNION_TAGS]
    param = ".".join(location) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if len(exc.errors()) > 1:
        message += f" (and {len(exc.errors()) - 1} more problems)"
    return InvalidRequest(message, param=param)


DEFAULT_MAX_BODY_BYTES = GatewayConfig.model_fields["max_body_bytes"].default


def body_limit(request: Request) -> int:
    """max_body_bytes, unless the route has its own limit (the batch file upload: serve_app/gateway/batches/routes.py).
    Runs in admission and again in read_json, so it reads the raw path from the scope (`request.url` parses the
    whole URL) and never builds a config: with a GatewayConfig() as getattr's default it took 4% of the gateway's
    GIL time under load, most of it building that config (BENCHMARKS.md, serving path)."""
    state = request.app.state
    own = getattr(state, "body_limits", None)
    return (own and own.get(request.scope["path"])) or getattr(state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)


def json_body(*schemas: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI description of a JSON body that a route parses itself (see parse_body)."""
    described = [schema.model_json_schema(ref_template="#/components/schemas/{model}") for schema in schemas]
    body = described[0] if len(described) == 1 else {"oneOf": described}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": body}}}}


async def read_json(request: Request, exact_numbers: bool = False) -> Any:
    """The body as JSON whatever the Content-Type says (curl -d sends form encoding; clients vary). With
    `exact_numbers`, JSON numbers with a fraction are read as Decimal (amounts of money), not float."""
    raw = await request.body()
    limit = body_limit(request)
    if len(raw) > limit:
        raise PayloadTooLarge(f"request body is {len(raw)} bytes; the limit is {limit}")
    try:
        return json.loads(raw, parse_float=Decimal) if exact_numbers else json.loads(raw)
    except ValueError:
        raise InvalidRequest("request body is not valid JSON") from None


def validate(request: Request, raw: Any, schema: type[BaseModel]) -> Any:
    """`raw` as `schema`, else a 400 naming the first bad field. Top-level fields the schema does not know are
    ignored when it allows that (SDKs add fields over time), but named in the response's X-Ignored-Fields header,
    so a misspelt option ("dimension") is visible to the caller instead of silently doing nothing."""
    try:
        parsed = schema.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if isinstance(raw, dict):
        request.state.ignored_fields = sorted(str(name) for name in raw if name not in schema.model_fields)
    return parsed


def ignored_fields_header(names: list[str]) -> str:
    """The X-Ignored-Fields value: the ignored names a header can carry as they are, then how many others."""
    shown = [name for name in names if _HEADER_SAFE_NAME.fullmatch(name)][:MAX_NAMED_IGNORED_FIELDS]
    others = len(names) - len(shown)
    return ", ".join(shown + ([f"({others} more)"] if others else []))


async def parse_body(request: Request, schema: type[BaseModel], exact_numbers: bool = False) -> Any:
    return validate(request, await read_json(request, exact_numbers), schema)
