"""API keys on the live gateway: every route but /health needs one; revocation takes effect within seconds; admin
keys manage keys over HTTP and no other key can."""

import json
import re
import time

import httpx
import pytest
from ray.serve._private.http_util import _walk_fastapi_routes

from serve_app.accounts.auth import OPEN_PATHS
from serve_app.gateway.ingress import api
from serve_app.gateway.tei import is_tei_path
from tests.serving import RERANKER


def every_route():
    """(method, path) of every route the gateway serves, from its own route table (the class routes that
    @serve.ingress moved into an included router, and FastAPI's docs routes): a new route is covered the day it is
    added. Path parameters get a sample value."""
    found = [(route, prefix) for route, _, prefix in _walk_fastapi_routes(api)]
    found += [(route, "") for route in api.routes if getattr(route, "methods", None)]
    routes = set()
    for route, prefix in found:
        path = re.sub(r"\{[^}]+\}", RERANKER, prefix + route.path)
        routes.update((method, path) for method in route.methods if method != "HEAD")
    return sorted(routes)


def test_the_route_table_is_walked():
    paths = {path for _, path in every_route()}
    assert {"/v1/embeddings", "/embeddings", "/v1/rerank", "/v2/rerank", "/rerank", "/v1/models",
            f"/v1/models/{RERANKER}", "/v1/usage", "/v1/admin/keys", f"/v1/admin/keys/{RERANKER}", "/health", "/ready",
            "/docs", "/openapi.json"} <= paths


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer q3s_nope_nope", "Basic dXNlcjpwYXNz", "q3s_raw"])
def test_every_route_but_health_needs_a_valid_key(served, header):
    headers = {"Authorization": header} if header else {}
    for method, path in every_route():
        response = httpx.request(method, served.url + path, headers=headers, json={}, timeout=30)
        if path in OPEN_PATHS:
            assert response.status_code == 200, (method, path)
            continue
        assert response.status_code == 401, (method, path, response.status_code)
        if is_tei_path(path):  # TEI's own routes answer in TEI's error shape, which its clients read
            assert set(response.json()) == {"error", "error_type"}, (method, path, response.text)
            continue
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and set(error) == {"message", "type", "param", "code"}
        assert response.headers["www-authenticate"] == "Bearer"


def test_unknown_routes_need_a_key_too(served):
    assert httpx.get(f"{served.url}/v1/secret").status_code == 401


def test_a_valid_key_passes_on_every_route(served):
    for method, path in every_route():
        response = httpx.request(method, served.url + path, headers=served.headers, json={}, timeout=30)
        assert response.status_code != 401, (method, path)


def test_new_key_works_at_once_and_a_revoked_key_stops_within_seconds(served, key_store):
    key, secret = key_store.create("short-lived")
    headers = {"Authorization": f"Bearer {secret}"}
    # An unknown key waits for a key reload that started after it arrived: a key works the moment it exists,
    # on whichever gateway replica gets the request.
    for _ in range(4):
        assert httpx.get(f"{served.url}/v1/models", headers=headers).status_code == 200
    assert key_store.revoke(key.id)
    deadline = time.monotonic() + 5
    while httpx.get(f"{served.url}/v1/models", headers=headers).status_code != 401:
        assert time.monotonic() < deadline, "revoked key still accepted after 5 s"
        time.sleep(0.2)


# ---- key management over HTTP (serve_app/gateway/admin.py) --------------------------------------------------------------

ADMIN_ROUTES = [("GET", "/v1/admin/keys"), ("POST", "/v1/admin/keys"), ("DELETE", "/v1/admin/keys/abc123")]


@pytest.mark.parametrize("method, path", ADMIN_ROUTES)
def test_admin_routes_refuse_a_key_that_is_not_an_admin_key(served, method, path):
    """403 before the body is even read: a valid body and a broken one get the same answer."""
    for body in ({"name": "x"}, {"nonsense": True}):
        response = httpx.request(method, served.url + path, headers=served.headers, json=body, timeout=30)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"] == {**response.json()["error"], "type": "permission_error",
                                            "code": "admin_key_required"}


def test_an_admin_key_creates_lists_and_revokes_keys(served, admin_headers):
    admin = httpx.Client(base_url=served.url, headers=admin_headers, timeout=30)
    created = admin.post("/v1/admin/keys", json={"name": "acme-prod", "requests_per_minute": 600,
                                                 "tokens_per_minute": 2_000_000})
    assert created.status_code == 201, created.text
    key = created.json()
    assert key["object"] == "api_key" and key["name"] == "acme-prod" and not key["admin"]
    assert (key["requests_per_minute"], key["tokens_per_minute"], key["revoked_at"]) == (600, 2_000_000, None)
    assert key["secret"].startswith(f"q3s_{key['id']}_") and "X-Usage-Id" not in created.headers  # not billed
    assert abs(key["created_at"] - time.time()) < 60

    # The new key works at once, on whichever gateway replica answers.
    as_new_key = {"Authorization": f"Bearer {key['secret']}"}
    for _ in range(4):
        assert httpx.get(f"{served.url}/v1/models", headers=as_new_key).status_code == 200

    listed = admin.get("/v1/admin/keys").json()["data"]
    mine = [item for item in listed if item["id"] == key["id"]]
    assert mine == [{name: value for name, value in key.items() if name != "secret"}]
    assert key["secret"] not in json.dumps(listed) and "key_hash" not in listed[0]

    revoked = admin.delete(f"/v1/admin/keys/{key['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert admin.delete(f"/v1/admin/keys/{key['id']}").json() == revoked.json()  # a retried revoke changes nothing
    active = {item["id"] for item in admin.get("/v1/admin/keys", params={"include_revoked": "false"}).json()["data"]}
    assert key["id"] not in active
    deadline = time.monotonic() + 5
    while httpx.get(f"{served.url}/v1/models", headers=as_new_key).status_code != 401:
        assert time.monotonic() < deadline, "key revoked over HTTP still accepted after 5 s"
        time.sleep(0.2)


def test_an_admin_key_can_create_another_admin_key(served, admin_headers):
    created = httpx.post(f"{served.url}/v1/admin/keys", headers=admin_headers, json={"name": "ops-2", "admin": True})
    assert created.status_code == 201 and created.json()["admin"]
    second_admin = {"Authorization": f"Bearer {created.json()['secret']}"}
    assert httpx.get(f"{served.url}/v1/admin/keys", headers=second_admin).status_code == 200
    httpx.delete(f"{served.url}/v1/admin/keys/{created.json()['id']}", headers=admin_headers)


@pytest.mark.parametrize("body, param", [
    ({}, "name"),
    ({"name": ""}, "name"),
    ({"name": "  "}, "name"),
    ({"name": "x" * 201}, "name"),
    ({"name": "a\u0000b"}, "name"),
    ({"name": 5}, "name"),
    ({"name": "x", "admin": "yes"}, "admin"),
    ({"name": "x", "requests_per_minute": 0}, "requests_per_minute"),
    ({"name": "x", "tokens_per_minute": -5}, "tokens_per_minute"),
    ({"name": "x", "requests_per_minute": 2**63}, "requests_per_minute"),  # found by fuzzing: past INTEGER
    ({"name": "x", "request_per_minute": 10}, "request_per_minute"),  # misspelt: refused, not ignored
    (["x"], None),
])
def test_a_bad_key_request_is_400_naming_the_field(served, admin_headers, body, param):
    response = httpx.post(f"{served.url}/v1/admin/keys", headers=admin_headers, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_revoking_an_unknown_key_is_404(served, admin_headers):
    response = httpx.delete(f"{served.url}/v1/admin/keys/nope", headers=admin_headers)
    assert response.status_code == 404 and response.json()["error"]["param"] == "key_id"


def test_admin_routes_are_off_while_auth_is_off():
    """No key can be trusted with auth off, so key management stays with the CLI."""
    from types import SimpleNamespace

    from serve_app.errors import Forbidden
    from serve_app.gateway.admin import admin_guard

    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(key_guard=None)), state=SimpleNamespace())
    with pytest.raises(Forbidden) as refused:
        admin_guard(request)
    assert refused.value.code == "auth_disabled" and "python -m serve_app.keys" in refused.value.message
