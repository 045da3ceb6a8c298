"""Key management over HTTP, for admin keys only: create, list and revoke API keys without a shell on the database.

    GET    /v1/admin/keys              every key (never a secret or hash) with its balance; ?include_revoked=false
                                       for active ones
    POST   /v1/admin/keys              {"name", "admin"?, "requests_per_minute"?, "tokens_per_minute"?, "credit"?}
                                       -> 201 with the secret, shown in this response only
    DELETE /v1/admin/keys/{key_id}     revoke; every gateway refuses the key within auth.key_refresh_s
    POST   /v1/admin/keys/{key_id}/credit   {"amount", "note", "adjustment"?} -> 201 with the journal entry; every
                                       gateway admits by the new balance within auth.key_refresh_s
    GET    /v1/admin/keys/{key_id}/credit   the key's credit journal

The gateway's middleware has already authenticated the caller (401 without a valid key); these routes then need
that key to be an admin key (403 otherwise). With auth off there is no caller to trust, so they answer 403 and keys
are managed with `python -m serve_app.keys`, as they are for the first admin key. Nothing here is billed, and the
refusal of spent credit is for inference routes only: an admin key's own balance never locks anyone out of these.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serve_app.accounts.auth import KeyGuard
from serve_app.accounts.credit.amounts import decimal_text
from serve_app.accounts.credit.book import CreditBook, InvalidCreditEntry, UnknownKey
from serve_app.accounts.keys import InvalidKeySettings
from serve_app.accounts.protocol import (ApiKeyCreateRequest, ApiKeyList, ApiKeyObject, CreatedApiKey,
                                         CreditEntryObject, CreditEntryRequest, CreditJournal)
from serve_app.errors import Forbidden, InvalidRequest, NotFound
from serve_app.gateway.bodies import json_body, parse_body

logger = logging.getLogger("ray.serve")

router = APIRouter(prefix="/v1/admin")


def admin_guard(request: Request) -> KeyGuard:
    """The key guard, once the caller is known to hold an admin key; 403 otherwise."""
    guard: KeyGuard | None = getattr(request.app.state, "key_guard", None)
    if guard is None:
        raise Forbidden("admin routes are off while auth is off (auth.enabled: false); manage keys with "
                        "`python -m serve_app.keys`", code="auth_disabled")
    key = request.state.api_key
    if not key.admin:
        raise Forbidden(f"this route needs an admin key; key {key.id} is not one (create one with "
                        "`python -m serve_app.keys create --name ops --admin`)", code="admin_key_required")
    return guard


def credit_book(guard: KeyGuard) -> CreditBook:
    return CreditBook(guard.store.engine)


def balance_text(balances: dict, key_id: str) -> str | None:
    return decimal_text(balances[key_id].balance) if key_id in balances else None


@router.get("/keys", response_model=ApiKeyList)
async def list_keys(request: Request, include_revoked: bool = True) -> ApiKeyList:
    guard = admin_guard(request)
    keys = await asyncio.to_thread(guard.store.list, include_revoked)
    balances = await asyncio.to_thread(credit_book(guard).balances)
    return ApiKeyList(data=[ApiKeyObject.of(key, balance_text(balances, key.id)) for key in keys])


@router.post("/keys", status_code=201, responses={201: {"model": CreatedApiKey}},
             openapi_extra=json_body(ApiKeyCreateRequest))
async def create_key(request: Request) -> JSONResponse:
    guard = admin_guard(request)  # before the body is read: a non-admin learns nothing about what is valid
    body: ApiKeyCreateRequest = await parse_body(request, ApiKeyCreateRequest, exact_numbers=True)
    try:
        key, secret = await asyncio.to_thread(guard.store.create, body.name, admin=body.admin,
                                              requests_per_minute=body.requests_per_minute,
                                              tokens_per_minute=body.tokens_per_minute, credit=body.credit,
                                              actor=f"key:{request.state.api_key.id}")
    except InvalidKeySettings as exc:
        raise InvalidRequest(str(exc), param=exc.field) from None
    # Ids only: names and limits are in the table, secrets are never written anywhere.
    logger.info("gateway: admin key %s created key %s%s", request.state.api_key.id, key.id,
                " (admin)" if key.admin else "")
    balance = None
    if body.credit is not None:
        balance = balance_text(await asyncio.to_thread(credit_book(guard).balances, [key.id]), key.id)
    created = CreatedApiKey(**ApiKeyObject.of(key, balance).model_dump(exclude={"object"}),
                                     secret=secret)
    return JSONResponse(created.model_dump(), status_code=201)


@router.delete("/keys/{key_id}", response_model=ApiKeyObject)
async def revoke_key(request: Request, key_id: str) -> ApiKeyObject:
    """Revoke a key. Revoking a revoked key changes nothing and answers the same, so a retried call is safe."""
    guard = admin_guard(request)
    revoked_now = await asyncio.to_thread(guard.store.revoke, key_id)
    key = await asyncio.to_thread(guard.store.get, key_id)
    if key is None:
        raise NotFound(f"no API key with id {key_id!r}", param="key_id")
    if revoked_now:
        logger.info("gateway: admin key %s revoked key %s", request.state.api_key.id, key.id)
        await guard.reload()  # this replica refuses it at once; the others at their next refresh
    return ApiKeyObject.of(key)


@router.post("/keys/{key_id}/credit", status_code=201, responses={201: {"model": CreditEntryObject}},
             openapi_extra=json_body(CreditEntryRequest))
async def add_credit(request: Request, key_id: str) -> JSONResponse:
    """Top up a key (or adjust its credit): one journal entry. Not idempotent: a retried top-up adds again, so
    read the journal before retrying one whose answer was lost."""
    guard = admin_guard(request)
    body: CreditEntryRequest = await parse_body(request, CreditEntryRequest, exact_numbers=True)
    try:
        entry = await asyncio.to_thread(credit_book(guard).add, key_id, body.amount, body.note,
                                        actor=f"key:{request.state.api_key.id}", adjustment=body.adjustment)
    except InvalidCreditEntry as exc:
        raise InvalidRequest(str(exc), param=exc.field) from None
    except UnknownKey as exc:
        raise NotFound(str(exc), param="key_id") from None
    logger.info("gateway: admin key %s added a %s of %s to key %s", request.state.api_key.id, entry.kind,
                decimal_text(entry.amount), key_id)
    await guard.reload()  # this replica admits by the new balance at once; the others at their next refresh
    return JSONResponse(CreditEntryObject.of(entry).model_dump(), status_code=201)


@router.get("/keys/{key_id}/credit", response_model=CreditJournal)
async def credit_journal(request: Request, key_id: str) -> CreditJournal:
    guard = admin_guard(request)
    if await asyncio.to_thread(guard.store.get, key_id) is None:
        raise NotFound(f"no API key with id {key_id!r}", param="key_id")
    entries = await asyncio.to_thread(credit_book(guard).journal, key_id)
    return CreditJournal(data=[CreditEntryObject.of(entry) for entry in entries])
