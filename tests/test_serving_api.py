"""The HTTP API on a real Ray Serve instance (tiny models): real clients, exact numbers, every error shape."""

import base64

import cohere
import httpx
import numpy as np
import openai
import pytest

from models import Qwen3Embedder, Qwen3Reranker
from tests.reference import ModelCardReranker
from tests.serving import EMBEDDER, NARROW_RERANKER, RERANKER, TEST_MAX_BODY_BYTES
from tests.texts import DOCUMENTS, QUERIES

TOLERANCE = 1e-5
# Server and test process may use different thread counts (float summation order): equal up to this.
SAME_ENGINE = 1e-6
INSTRUCTION = "Given a question, find the passage that answers it"


@pytest.fixture(scope="module")
def reference(tiny_reranker_path):
    return ModelCardReranker(str(tiny_reranker_path))


@pytest.fixture(scope="module")
def reranker(tiny_reranker_path):
    return Qwen3Reranker.from_pretrained(str(tiny_reranker_path), device="cpu")


@pytest.fixture(scope="module")
def embedder(tiny_embedder_path):
    return Qwen3Embedder.from_pretrained(str(tiny_embedder_path), device="cpu")


@pytest.fixture(scope="module")
def openai_client(served, api_key):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=api_key, max_retries=0)


def assert_error(response, status, *, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# ---- models and health ----------------------------------------------------------------------------------

def test_models_lists_every_model_as_openai_objects(http, tiny_reranker_path, tiny_embedder_path):
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert set(cards) == {RERANKER, EMBEDDER, NARROW_RERANKER}
    for card in cards.values():
        assert card["object"] == "model" and isinstance(card["created"], int) and card["owned_by"]
        assert card["max_model_len"] == 8192
    assert cards[RERANKER]["root"] == str(tiny_reranker_path) and cards[RERANKER]["task"] == "rerank"
    assert cards[EMBEDDER]["root"] == str(tiny_embedder_path) and cards[EMBEDDER]["dimensions"] == 64
    assert cards[RERANKER]["dimensions"] is None


def test_model_by_id_and_by_alias_with_a_slash(http):
    assert http.get(f"/v1/models/{RERANKER}").json()["id"] == RERANKER
    assert http.get("/v1/models/Qwen/Qwen3-Embedding-0.6B").json()["id"] == EMBEDDER
    error = assert_error(http.get("/v1/models/nope"), 404, code="model_not_found")
    assert RERANKER in error["message"]


def test_openai_sdk_lists_models(openai_client):
    assert {model.id for model in openai_client.models.list()} == {RERANKER, EMBEDDER, NARROW_RERANKER}


def test_health_and_ready_need_nothing(served):
    assert httpx.get(f"{served.url}/health", timeout=30).json() == {"status": "ok"}
    response = httpx.get(f"{served.url}/ready", timeout=30)  # no key
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ready", "models": sorted([EMBEDDER, NARROW_RERANKER, RERANKER])}


def test_a_gpu_fraction_without_cuda_runs_on_cpu(served):
    facts = served.model_handle(EMBEDDER).describe.remote().result(timeout_s=30)
    assert facts["device"] == "cpu"


# ---- embeddings -----------------------------------------------------------------------------------------

def test_openai_sdk_default_base64_equals_the_engine(openai_client, embedder):
    texts = DOCUMENTS[:6]
    response = openai_client.embeddings.create(model=EMBEDDER, input=texts)  # the SDK asks for base64
    got = np.array([item.embedding for item in response.data], dtype=np.float32)
    expected = embedder.embed(texts)
    np.testing.assert_allclose(got, expected.embeddings, rtol=0, atol=SAME_ENGINE)
    assert [item.index for item in response.data] == list(range(len(texts)))
    assert response.model == EMBEDDER
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(expected.token_counts)


def test_openai_sdk_float_dimensions_and_instruction(openai_client, embedder):
    response = openai_client.embeddings.create(model="Qwen/Qwen3-Embedding-0.6B", input=QUERIES[0],
                                               encoding_format="float", dimensions=32,
                                               extra_body={"instruction": INSTRUCTION})
    expected = embedder.embed([QUERIES[0]], instruction=INSTRUCTION, dimensions=32).embeddings[0]
    assert len(response.data[0].embedding) == 32
    assert np.abs(np.array(response.data[0].embedding) - expected).max() <= SAME_ENGINE


@pytest.mark.parametrize("dimensions", [32, 64])  # 64 = native: must be accepted (vLLM rejects it)
def test_base64_is_little_endian_float32(http, embedder, dimensions):
    body = {"model": EMBEDDER, "input": ["a", "b"], "encoding_format": "base64", "dimensions": dimensions}
    data = http.post("/v1/embeddings", json=body).json()["data"]
    decoded = np.stack([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in data])
    assert decoded.dtype == np.float32 and decoded.shape == (2, dimensions)
    np.testing.assert_allclose(decoded, embedder.embed(["a", "b"], dimensions=dimensions).embeddings, rtol=0,
                               atol=SAME_ENGINE)


@pytest.mark.parametrize("form", ["ids", "list_of_ids"])
def test_token_id_inputs(http, embedder, form):
    ids = embedder.tokenizer("pandas eat bamboo")["input_ids"]
    body = {"model": EMBEDDER, "input": ids if form == "ids" else [ids, ids[:2]], "encoding_format": "float"}
    response = http.post("/embeddings", json=body).json()
    expected = embedder.embed([ids] if form == "ids" else [ids, ids[:2]]).embeddings
    assert np.abs(np.array([item["embedding"] for item in response["data"]]) - expected).max() <= SAME_ENGINE


# ---- rerank ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
@pytest.mark.parametrize("query", QUERIES[:3])
def test_rerank_routes_match_the_model_card(http, reference, path, query):
    documents = [doc if i % 2 else {"text": doc} for i, doc in enumerate(DOCUMENTS)]  # strings and objects
    response = http.post(path, json={"model": RERANKER, "query": query, "documents": documents})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference.scores(query, DOCUMENTS)
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    assert [r["relevance_score"] for r in results] == sorted((r["relevance_score"] for r in results), reverse=True)
    for result in results:
        assert abs(result["relevance_score"] - expected[result["index"]]) <= TOLERANCE
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
    assert body["id"] == response.headers["X-Usage-Id"] and body["model"] == RERANKER  # the ledger id
    assert body["usage"]["total_tokens"] == sum(reference.token_counts(query, DOCUMENTS))
    assert body["meta"]["billed_units"]["search_units"] == 1


def test_rerank_options(http, reranker):
    body = {"model": "Qwen/Qwen3-Reranker-0.6B", "query": QUERIES[1], "documents": DOCUMENTS, "top_n": 3,
            "return_documents": False, "instruction": INSTRUCTION, "max_tokens_per_doc": 5}
    results = http.post("/v1/rerank", json=body).json()["results"]
    expected = reranker.rerank(QUERIES[1], DOCUMENTS, instruction=INSTRUCTION, max_tokens_per_doc=5).scores
    best = sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])[:3]
    assert [r["index"] for r in results] == best
    assert all("document" not in r for r in results)
    assert max(abs(r["relevance_score"] - expected[r["index"]]) for r in results) <= SAME_ENGINE


def test_search_units_count_per_hundred_documents(http):
    body = {"model": RERANKER, "query": "q", "documents": ["d"] * 101}
    assert http.post("/v2/rerank", json=body).json()["meta"]["billed_units"]["search_units"] == 2


def test_tei_body_gets_tei_shape(http, reference):
    body = {"query": QUERIES[0], "texts": DOCUMENTS[:4], "return_text": True, "model": RERANKER}
    ranks = http.post("/rerank", json=body).json()
    expected = reference.scores(QUERIES[0], DOCUMENTS[:4])
    assert isinstance(ranks, list) and [r["score"] for r in ranks] == sorted((r["score"] for r in ranks),
                                                                              reverse=True)
    for rank in ranks:
        assert set(rank) == {"index", "score", "text"} and rank["text"] == DOCUMENTS[rank["index"]]
        assert abs(rank["score"] - expected[rank["index"]]) <= TOLERANCE
    raw = http.post("/rerank", json={**body, "raw_scores": True, "return_text": False}).json()
    for rank in raw:
        assert set(rank) == {"index", "score"}
        p = expected[rank["index"]]
        assert abs(rank["score"] - float(np.log(p / (1 - p)))) <= 1e-4


def test_tei_truncate_false_refuses_a_long_text(http):
    body = {"model": RERANKER, "query": "q", "texts": ["short", "word " * 9000]}
    assert_error(http.post("/rerank", json=body), 400, param="texts")
    truncated = http.post("/rerank", json={**body, "truncate": True})
    assert truncated.status_code == 200 and len(truncated.json()) == 2


def test_tei_without_model_is_served_by_the_default_reranker(http):
    # Two rerankers are served here; TEI's model-less body goes to the config's default_models.rerank (tiny.yaml's).
    body = {"query": "q", "texts": ["a", "b"]}
    assert http.post("/rerank", json=body).json() == http.post("/rerank", json={**body, "model": RERANKER}).json()
    assert_error(http.post("/rerank", json={**body, "model": NARROW_RERANKER + "-x"}), 404, param="model")


def test_cohere_sdk_rerank(served, reference, api_key):
    client = cohere.ClientV2(api_key=api_key, base_url=served.url)
    response = client.rerank(model=RERANKER, query=QUERIES[0], documents=DOCUMENTS, top_n=2)
    expected = reference.scores(QUERIES[0], DOCUMENTS)
    assert [r.index for r in response.results] == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])[:2]
    assert all(abs(r.relevance_score - expected[r.index]) <= TOLERANCE for r in response.results)
    assert response.meta.billed_units.search_units == 1


# ---- errors ---------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (path, body, status, param, code)
    ("/v1/embeddings", {"input": "x"}, 400, "model", None),
    ("/v1/embeddings", {"model": EMBEDDER}, 400, "input", None),
    ("/v1/embeddings", {"model": EMBEDDER, "input": []}, 400, "input", None),
    ("/v1/embeddings", {"model": EMBEDDER, "input": [1, "a"]}, 400, "input", None),
    ("/v1/embeddings", {"model": EMBEDDER, "input": [-1]}, 400, "input", None),
    ("/v1/embeddings", {"model": EMBEDDER, "input": [10**9]}, 400, "input", None),
    ("/v1/embeddings", {"model": EMBEDDER, "input": "x", "dimensions": 31}, 400, "dimensions", None),
    ("/v1/embeddings", {"model": EMBEDDER, "input": "x", "dimensions": 65}, 400, "dimensions", None),
    ("/v1/embeddings", {"model": EMBEDDER, "input": "x", "encoding_format": "int8"}, 400, "encoding_format", None),
    ("/v1/embeddings", {"model": EMBEDDER, "input": [[1, 2]], "instruction": "x"}, 400, "instruction", None),
    ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "model", "model_not_found"),
    ("/v1/embeddings", {"model": RERANKER, "input": "x"}, 400, "model", "wrong_model_task"),
    ("/v1/rerank", {"model": RERANKER, "query": "q", "documents": []}, 400, "documents", None),
    ("/v1/rerank", {"model": RERANKER, "query": "q", "documents": [{"txt": "a"}]}, 400, None, None),
    ("/v1/rerank", {"model": RERANKER, "query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n", None),
    ("/v1/rerank", {"model": RERANKER, "documents": ["a"]}, 400, "query", None),
    ("/v1/rerank", {"model": RERANKER, "query": "q " * 9000, "documents": ["a"]}, 400, "query", None),
    ("/v1/rerank", {"model": RERANKER, "query": "q", "documents": ["a"], "max_tokens_per_doc": 0}, 400,
     "max_tokens_per_doc", None),
    ("/v2/rerank", {"model": EMBEDDER, "query": "q", "documents": ["a"]}, 400, "model", "wrong_model_task"),
    ("/rerank", {"model": "nope", "query": "q", "documents": ["a"]}, 404, "model", "model_not_found"),
    ("/rerank", [1, 2], 400, None, None),
    ("/v1/embeddings", {"input": "x"}, 400, "model", None),
    ("/v1/embeddings", {"model": EMBEDDER, "input": "x", "dimensions": -5}, 400, "dimensions", None),
    ("/v1/embeddings", {"model": EMBEDDER, "input": "x", "dimensions": 10**6}, 400, "dimensions", None),
    ("/v1/rerank", {"model": RERANKER, "query": 123, "documents": ["a"]}, 400, "query", None),
    ("/v1/rerank", {"model": RERANKER, "query": "q", "documents": "a"}, 400, "documents", None),
    ("/v1/rerank", {"model": RERANKER, "query": "q", "documents": ["a"], "top_n": -1}, 400, "top_n", None),
    ("/v1/rerank", {"model": RERANKER, "query": "q", "documents": ["d"] * 10_000}, 413, "documents", None),
    ("/v1/embeddings", {"model": EMBEDDER, "input": "x" * (5 << 20)}, 413, None, None),
    ("/v1/rerank", {"model": RERANKER, "query": "", "documents": ["a"]}, 400, "query", None),
    ("/v2/rerank", {"model": RERANKER, "query": " \n\t", "documents": ["a"]}, 400, "query", None),
    ("/rerank", {"model": RERANKER, "query": "", "texts": ["a"]}, 400, "query", None),
    ("/v1/embeddings", {"model": EMBEDDER, "input": [151669]}, 400, "input", None),  # one past the vocabulary
    ("/v1/embeddings", {"model": EMBEDDER, "input": [[5], [-3]]}, 400, "input", None),
    ("/v1/embeddings", {"model": EMBEDDER, "input": "x", "encoding_format": "BASE64"}, 400, "encoding_format", None),
    ("/v1/embeddings", {"model": EMBEDDER, "input": "x", "encoding_format": 64}, 400, "encoding_format", None),
    ("/v1/embeddings", {"model": EMBEDDER, "input": "x", "dimensions": "32"}, 400, "dimensions", None),
    ("/v1/rerank", {"model": RERANKER, "query": "q", "documents": [None]}, 400, "documents.0", None),
    ("/v1/rerank", {"model": RERANKER, "query": "q", "documents": ["a"], "top_n": 1.5}, 400, "top_n", None),
    ("/v1/rerank", {"model": RERANKER, "query": "q", "documents": ["a"], "return_documents": "maybe"}, 400,
     "return_documents", None),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(http, path, body, status, param, code):
    assert_error(http.post(path, json=body), status, param=param, code=code)


def test_unknown_fields_are_ignored_and_named_in_a_header(http):
    """SDKs add fields over time, so an unknown field is not an error (as in vLLM and TEI); but a misspelt option
    must not pass unseen, so the answer names what it ignored. Names that a header cannot carry are only counted."""
    plain = http.post("/v1/embeddings", json={"model": EMBEDDER, "input": "x"})
    extra = http.post("/v1/embeddings", json={"model": EMBEDDER, "input": "x", "dimension": 32, "foo": {"a": 1},
                                              "bad\nname": 1, "für": 2})
    assert plain.status_code == extra.status_code == 200 and "x-ignored-fields" not in plain.headers
    assert extra.json()["data"] == plain.json()["data"]  # 'dimension' (misspelt) changed nothing
    assert extra.headers["x-ignored-fields"] == "dimension, foo, (2 more)"
    rerank = http.post("/v1/rerank", json={"model": RERANKER, "query": "q", "documents": ["a", "b"],
                                           "rank_fields": ["text"]})
    assert rerank.status_code == 200 and rerank.headers["x-ignored-fields"] == "rank_fields"


def test_top_n_past_the_documents_returns_them_all(http):
    response = http.post("/v1/rerank", json={"model": RERANKER, "query": "q", "documents": ["a", "b", "c"],
                                             "top_n": 10**6})
    assert response.status_code == 200 and sorted(r["index"] for r in response.json()["results"]) == [0, 1, 2]


def test_empty_query_says_what_to_send(http):
    error = assert_error(http.post("/v1/rerank", json={"model": RERANKER, "query": "", "documents": ["a"]}), 400,
                         param="query")
    assert "query must not be empty" in error["message"]


def test_unknown_model_lists_the_served_names(http):
    error = assert_error(http.post("/v1/embeddings", json={"model": "gpt-4", "input": "x"}), 404)
    assert EMBEDDER in error["message"] and "Qwen/Qwen3-Embedding-0.6B" in error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe"])
def test_malformed_json_is_400(http, raw):
    assert_error(http.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"}), 400)


def test_content_type_is_not_required_but_the_body_must_be_json(http):
    """curl -d sends form encoding: a JSON body is read whatever the Content-Type says; a form body is a 400."""
    body = b'{"model": "%s", "input": "x"}' % EMBEDDER.encode()
    assert http.post("/v1/embeddings", content=body, headers={"content-type": "text/plain"}).status_code == 200
    assert_error(http.post("/v1/embeddings", data={"model": EMBEDDER, "input": "x"}), 400)


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.post("/v1/chat/completions", json={}), 404)
    assert_error(http.get("/v1/embeddings"), 405)


def test_too_many_inputs_is_413(http):
    assert_error(http.post("/v1/embeddings", json={"model": EMBEDDER, "input": ["x"] * 2049}), 413, param="input")
    ok = http.post("/v1/embeddings", json={"model": EMBEDDER, "input": ["x"] * 2048})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2048


def test_too_many_documents_is_413(http):
    body = {"model": RERANKER, "query": "q", "documents": ["d"] * 1001}
    assert_error(http.post("/v1/rerank", json=body), 413, param="documents")


def test_too_large_a_body_is_413(http):
    body = {"model": EMBEDDER, "input": "x" * (TEST_MAX_BODY_BYTES + 10)}
    assert_error(http.post("/v1/embeddings", json=body), 413)


def test_overload_is_503_with_retry_after(served):
    """The narrow reranker runs one request and queues one; the rest are turned away, not left to hang."""
    import asyncio

    async def flood():
        async with httpx.AsyncClient(base_url=served.url, headers=served.headers, timeout=120) as client:
            body = {"model": NARROW_RERANKER, "query": "q", "documents": DOCUMENTS * 40}
            return await asyncio.gather(*(client.post("/v1/rerank", json=body) for _ in range(24)))

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    for response in responses:
        if response.status_code == 503:
            assert_error(response, 503, code="overloaded")
            assert response.headers["retry-after"] == "1"
