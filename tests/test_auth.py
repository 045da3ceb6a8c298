"""API keys on the live gateway: every route but /health needs one; revocation takes effect within seconds."""

import re
import time

import httpx
import pytest
from ray.serve._private.http_util import _walk_fastapi_routes

from serve_app.auth import OPEN_PATHS
from serve_app.ingress import api
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
            f"/v1/models/{RERANKER}", "/health", "/docs", "/openapi.json"} <= paths


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer q3s_nope_nope", "Basic dXNlcjpwYXNz", "q3s_raw"])
def test_every_route_but_health_needs_a_valid_key(served, header):
    headers = {"Authorization": header} if header else {}
    for method, path in every_route():
        response = httpx.request(method, served.url + path, headers=headers, json={}, timeout=30)
        if path in OPEN_PATHS:
            assert response.status_code == 200, (method, path)
            continue
        assert response.status_code == 401, (method, path, response.status_code)
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
