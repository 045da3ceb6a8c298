"""Property-based fuzzing of every route from the app's own OpenAPI schema (schemathesis): valid and invalid
requests alike must never get a 5xx, and every error must be in the OpenAI shape with a message (TEI's own paths:
in TEI's shape, {"error": message, "error_type"}).

Derandomized (the same requests on every run, so CI cannot turn red by luck); at least 1000 requests in all.
"""

import re

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

EXAMPLES_PER_OPERATION = 400
MIN_REQUESTS = 1000
sent: list[tuple[str, int]] = []


@pytest.fixture(scope="module")
def api_schema(served):
    return schemathesis.openapi.from_url(f"{served.url}/openapi.json", headers=served.headers)  # needs a key too


schema = schemathesis.pytest.from_fixture("api_schema")
FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
# Key management is fuzzed as an admin, so bodies are validated rather than refused with 403 up front; its
# bodies are small flat objects, so fewer examples cover them.
ADMIN_PATHS = r"^/v1/admin/"
ADMIN_EXAMPLES_PER_OPERATION = 100
# The Batch API's routes take ids, small bodies and an upload; fewer examples each keep the suite's time in bounds.
BATCH_PATHS = r"^/v1/(files|batches)"
BATCH_EXAMPLES_PER_OPERATION = 40
# TEI's routes and vLLM's helpers (serve_app/gateway/tei.py, vllm.py): many operations over the same few handlers,
# so fewer examples each. TEI's own paths answer errors in TEI's shape.
TEI_VLLM_PATHS = r"^/(tei/|embed$|decode$|info$|tokenize$|detokenize$|score$|v1/score$)"
TEI_SHAPED_PATHS = r"^/(tei/|embed$|decode$|info$)"
TEI_VLLM_EXAMPLES_PER_OPERATION = 40


def check(case, served, headers: dict[str, str]) -> None:
    response = case.call(base_url=served.url, headers=headers, timeout=60)
    sent.append((f"{case.method} {case.path}", response.status_code))
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        if re.match(TEI_SHAPED_PATHS, case.path):
            body = response.json()
            assert set(body) == {"error", "error_type"} and body["error"], response.text
            return
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text


@schema.exclude(path_regex=f"{ADMIN_PATHS}|{BATCH_PATHS}|{TEI_VLLM_PATHS}").parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, **FUZZ_SETTINGS)
def test_no_request_gets_a_5xx_and_every_error_is_openai_shaped(case, served):
    check(case, served, served.headers)


@schema.include(path_regex=BATCH_PATHS).parametrize()
@settings(max_examples=BATCH_EXAMPLES_PER_OPERATION, **FUZZ_SETTINGS)
def test_no_batch_api_request_gets_a_5xx_and_every_error_is_openai_shaped(case, served):
    check(case, served, served.headers)


@schema.include(path_regex=TEI_VLLM_PATHS).parametrize()
@settings(max_examples=TEI_VLLM_EXAMPLES_PER_OPERATION, **FUZZ_SETTINGS)
def test_no_tei_or_vllm_request_gets_a_5xx_and_every_error_has_its_apis_shape(case, served):
    check(case, served, served.headers)


@schema.include(path_regex=ADMIN_PATHS).parametrize()
@settings(max_examples=ADMIN_EXAMPLES_PER_OPERATION, **FUZZ_SETTINGS)
def test_no_admin_request_gets_a_5xx_and_every_error_is_openai_shaped(case, served, admin_headers):
    check(case, served, admin_headers)


def test_fuzzing_sent_enough_requests_to_every_operation():
    operations = {operation for operation, _ in sent}
    statuses = sorted({status for _, status in sent})
    print(f"fuzzing: {len(sent)} requests over {len(operations)} operations, statuses {statuses}")
    assert len(sent) >= MIN_REQUESTS, f"only {len(sent)} fuzzed requests"
    assert {"POST /v1/embeddings", "POST /v1/rerank", "POST /rerank", "GET /v1/usage", "POST /v1/admin/keys",
            "DELETE /v1/admin/keys/{key_id}", "POST /v1/files", "POST /v1/batches",
            "POST /v1/batches/{batch_id}/cancel", "POST /tei/{model}/embed", "POST /score",
            "POST /tokenize"} <= operations, operations
