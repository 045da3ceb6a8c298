"""POST /v2/embed on the live Serve instance, called by the cohere SDK as its users call it; and long documents
reranked by chunks, and Voyage's top_k, on /v1/rerank."""

import base64

import cohere
import httpx
import numpy as np
import pytest
from sqlalchemy import select

from models import Qwen3Embedder, Qwen3Reranker
from serve_app.accounts.store import connect, usage_records
from serve_app.replica import quantization
from serve_app.replica.instructions import INPUT_TYPE_INSTRUCTIONS
from serve_app.replica.quantization.calibration import Calibration
from tests.reference import ModelCardEmbedder
from tests.serving import EMBEDDER, NARROW_RERANKER, RERANKER
from tests.texts import DOCUMENTS, QUERIES

TOLERANCE = 1e-5  # against the model card's code
SAME_ENGINE = 1e-6  # against our engine in this process (thread counts differ)
MODEL_CARD_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
LONG = "The giant panda lives in the mountains of central China and eats bamboo almost exclusively. " * 8


@pytest.fixture(scope="module")
def co(served, api_key):
    return cohere.ClientV2(api_key=api_key, base_url=served.url, max_retries=0)


@pytest.fixture(scope="module")
def embedder(tiny_embedder_path):
    return Qwen3Embedder.from_pretrained(str(tiny_embedder_path), device="cpu")


@pytest.fixture(scope="module")
def ranges(tiny_calibration_path):
    return Calibration.load(tiny_calibration_path).ranges


def close(got, expected, tolerance):
    return np.abs(np.asarray(got, dtype=np.float64) - np.asarray(expected, dtype=np.float64)).max() <= tolerance


# ---- embedding types ----------------------------------------------------------------------------------------

def test_every_embedding_type_at_once_by_its_definition(co, embedder, ranges):
    response = co.embed(model=EMBEDDER, texts=DOCUMENTS, input_type="search_document",
                        embedding_types=["float", "int8", "uint8", "binary", "ubinary", "base64"])
    assert response.response_type == "embeddings_by_type" and response.texts == DOCUMENTS
    vectors = np.array(response.embeddings.float_, dtype=np.float32)
    expected = embedder.embed(DOCUMENTS)
    assert vectors.shape == (len(DOCUMENTS), 64) and close(vectors, expected.embeddings, SAME_ENGINE)
    lo, hi = ranges(64)
    assert response.embeddings.int8 == quantization.int8(vectors, lo, hi).tolist()
    assert response.embeddings.uint8 == quantization.uint8(vectors, lo, hi).tolist()
    assert response.embeddings.ubinary == np.packbits(vectors > 0, axis=1).tolist()
    assert response.embeddings.binary == (np.packbits(vectors > 0, axis=1).astype(int) - 128).tolist()
    decoded = np.stack([np.frombuffer(base64.b64decode(item), dtype="<f4") for item in response.embeddings.base64])
    assert np.array_equal(decoded, vectors)
    assert response.meta.billed_units.input_tokens == sum(expected.token_counts)
    assert response.meta.api_version.version == "2"
    assert len(set(map(tuple, response.embeddings.int8))) > 1  # the tiny model's vectors differ after quantization


def test_float_is_the_default_type_and_equals_the_model_card(co, tiny_embedder_path):
    reference = ModelCardEmbedder(str(tiny_embedder_path))
    documents = co.embed(model="Qwen/Qwen3-Embedding-0.6B", texts=DOCUMENTS[:4], input_type="search_document")
    assert documents.embeddings.float_ is not None and documents.embeddings.int8 is None
    assert close(documents.embeddings.float_, reference.embeddings(DOCUMENTS[:4]), TOLERANCE)
    queries = co.embed(model=EMBEDDER, texts=QUERIES[:3], input_type="search_query", embedding_types=["float"])
    card_queries = [reference.get_detailed_instruct(MODEL_CARD_QUERY_INSTRUCTION, q) for q in QUERIES[:3]]
    assert close(queries.embeddings.float_, reference.embeddings(card_queries), TOLERANCE)


@pytest.mark.parametrize("input_type", ["classification", "clustering"])
def test_input_types_use_the_documented_instructions(co, embedder, input_type):
    response = co.embed(model=EMBEDDER, texts=QUERIES[:2], input_type=input_type, embedding_types=["float"])
    instruction = INPUT_TYPE_INSTRUCTIONS[input_type]
    assert instruction and close(response.embeddings.float_,
                                 embedder.embed(QUERIES[:2], instruction=instruction).embeddings, SAME_ENGINE)


def test_an_instruction_overrides_the_input_type(http, embedder):
    body = {"model": EMBEDDER, "texts": ["pandas"], "input_type": "search_document", "instruction": "Find recipes"}
    got = http.post("/v2/embed", json=body).json()["embeddings"]["float"]
    assert close(got, embedder.embed(["pandas"], instruction="Find recipes").embeddings, SAME_ENGINE)


def test_output_dimension_cuts_every_type(co, embedder, ranges):
    response = co.embed(model=EMBEDDER, texts=DOCUMENTS[:3], input_type="search_document", output_dimension=40,
                        embedding_types=["float", "int8", "ubinary"])
    vectors = np.array(response.embeddings.float_, dtype=np.float32)
    assert close(vectors, embedder.embed(DOCUMENTS[:3], dimensions=40).embeddings, SAME_ENGINE)
    assert len(response.embeddings.ubinary[0]) == 5  # ceil(40 / 8)
    assert response.embeddings.int8 == quantization.int8(vectors, *ranges(40)).tolist()


def test_inputs_with_text_content_equal_texts(http):
    texts = http.post("/v2/embed", json={"model": EMBEDDER, "texts": DOCUMENTS[:2], "input_type": "search_document"})
    inputs = http.post("/v2/embed", json={"model": EMBEDDER, "input_type": "search_document", "inputs": [
        {"content": [{"type": "text", "text": text}]} for text in DOCUMENTS[:2]]})
    assert inputs.status_code == 200 and inputs.json()["embeddings"] == texts.json()["embeddings"]
    assert inputs.json()["texts"] == DOCUMENTS[:2]


# ---- truncation -----------------------------------------------------------------------------------------------

def test_truncate_modes_and_max_tokens(co, http, embedder):
    for mode, side in (("END", "end"), ("START", "start")):
        response = co.embed(model=EMBEDDER, texts=[LONG, "short"], input_type="search_document", max_tokens=16,
                            truncate=mode, embedding_types=["float"])
        expected = embedder.embed([LONG, "short"], max_tokens=16, truncate_side=side)
        assert close(response.embeddings.float_, expected.embeddings, SAME_ENGINE)
        assert expected.token_counts[0] == 16 and response.meta.billed_units.input_tokens == sum(expected.token_counts)
    refused = http.post("/v2/embed", json={"model": EMBEDDER, "texts": ["short", LONG], "input_type":
                                           "search_document", "max_tokens": 16, "truncate": "NONE"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "texts"
    assert "input[1]" in refused.json()["error"]["message"]


def test_the_sdk_raises_on_a_refused_request(co):
    with pytest.raises(cohere.BadRequestError):
        co.embed(model=EMBEDDER, texts=[LONG], input_type="search_document", max_tokens=4, truncate="NONE")
    with pytest.raises(cohere.BadRequestError):
        co.embed(model=EMBEDDER, texts=["x"], input_type="image")


# ---- errors, auth, ledger -------------------------------------------------------------------------------------

BAD = [
    ({"texts": ["x"], "input_type": "search_document"}, 400, "model"),
    ({"model": EMBEDDER, "texts": ["x"]}, 400, "input_type"),
    ({"model": EMBEDDER, "texts": ["x"], "input_type": "image"}, 400, "input_type"),
    ({"model": EMBEDDER, "texts": ["x"], "input_type": "search_query!"}, 400, "input_type"),
    ({"model": EMBEDDER, "input_type": "search_document"}, 400, "texts"),
    ({"model": EMBEDDER, "texts": [], "input_type": "search_document"}, 400, "texts"),
    ({"model": EMBEDDER, "texts": ["x"], "inputs": [{"content": [{"type": "text", "text": "x"}]}],
      "input_type": "search_document"}, 400, "inputs"),
    ({"model": EMBEDDER, "images": ["data:image/png;base64,AA=="], "input_type": "search_document"}, 400, "images"),
    ({"model": EMBEDDER, "inputs": [{"content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
      "input_type": "search_document"}, 400, "inputs"),
    ({"model": EMBEDDER, "inputs": [{"content": [{"type": "text"}]}], "input_type": "search_document"}, 400,
     "inputs"),
    ({"model": EMBEDDER, "texts": ["x"], "input_type": "search_document", "embedding_types": ["int4"]}, 400,
     "embedding_types.0"),
    ({"model": EMBEDDER, "texts": ["x"], "input_type": "search_document", "embedding_types": []}, 400,
     "embedding_types"),
    ({"model": EMBEDDER, "texts": ["x"], "input_type": "search_document", "output_dimension": 31}, 400,
     "output_dimension"),
    ({"model": EMBEDDER, "texts": ["x"], "input_type": "search_document", "output_dimension": 65}, 400,
     "output_dimension"),
    ({"model": EMBEDDER, "texts": ["x"], "input_type": "search_document", "truncate": "end"}, 400, "truncate"),
    ({"model": EMBEDDER, "texts": ["x"], "input_type": "search_document", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": EMBEDDER, "texts": ["x"] * 2049, "input_type": "search_document"}, 413, "texts"),
    ({"model": "nope", "texts": ["x"], "input_type": "search_document"}, 404, "model"),
    ({"model": RERANKER, "texts": ["x"], "input_type": "search_document"}, 400, "model"),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_requests_get_the_openai_error_shape(http, body, status, param):
    response = http.post("/v2/embed", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error


def test_a_key_is_required_and_the_request_is_billed_once_in_the_ledger(served, key_store, key_database):
    body = {"model": EMBEDDER, "texts": DOCUMENTS[:3], "input_type": "search_document", "output_dimension": 32,
            "embedding_types": ["int8", "binary"]}
    assert httpx.post(f"{served.url}/v2/embed", json=body, timeout=30).status_code == 401
    key, secret = key_store.create("cohere-embed-ledger")
    response = httpx.post(f"{served.url}/v2/embed", json=body, headers={"Authorization": f"Bearer {secret}"},
                          timeout=30)
    assert response.status_code == 200 and response.json()["id"] == response.headers["x-usage-id"]
    with connect(key_database).connect() as connection:
        rows = connection.execute(select(usage_records).where(usage_records.c.key_id == key.id)).all()
    assert len(rows) == 1 and rows[0].request_id == response.json()["id"] and rows[0].route == "/v2/embed"
    assert (rows[0].input_tokens, rows[0].embeddings, rows[0].dimensions, rows[0].documents) == (
        response.json()["meta"]["billed_units"]["input_tokens"], 3, 32, 0)


def test_unknown_fields_are_named_as_on_every_route(http):
    response = http.post("/v2/embed", json={"model": EMBEDDER, "texts": ["x"], "input_type": "search_document",
                                            "priority": 1})
    assert response.status_code == 200 and response.headers["x-ignored-fields"] == "priority"


# ---- rerank: chunks and top_k ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reranker(tiny_reranker_path):
    return Qwen3Reranker.from_pretrained(str(tiny_reranker_path), device="cpu")


def test_chunked_rerank_over_http_scores_bills_and_returns_whole_documents(http, reranker, key_database):
    documents = [LONG] * 34 + ["bamboo"]  # 34 documents of 3 windows of 8 tokens, and one that fits
    body = {"model": RERANKER, "query": QUERIES[0], "documents": documents, "max_tokens_per_doc": 8,
            "max_chunks_per_doc": 3}
    answer = http.post("/v1/rerank", json=body)
    response = answer.json()
    expected = reranker.rerank(QUERIES[0], documents, max_tokens_per_doc=8, max_chunks_per_doc=3)
    assert expected.windows == [3] * 34 + [1]
    by_index = {result["index"]: result for result in response["results"]}
    assert max(abs(by_index[i]["relevance_score"] - expected.scores[i]) for i in by_index) <= SAME_ENGINE
    assert by_index[0]["document"] == {"text": LONG}  # the whole document, not a window
    assert response["usage"]["total_tokens"] == sum(expected.token_counts)
    assert response["meta"]["billed_units"]["search_units"] == 2  # 103 windows; 35 documents would be 1
    with connect(key_database).connect() as connection:
        row = connection.execute(select(usage_records).where(
            usage_records.c.request_id == answer.headers["x-usage-id"])).one()
    assert (row.documents, row.search_units, row.input_tokens) == (35, 2, sum(expected.token_counts))
    truncated = http.post("/v1/rerank", json={**body, "max_chunks_per_doc": 1}).json()
    assert truncated["meta"]["billed_units"]["search_units"] == 1


def test_a_models_default_chunks_apply_unless_the_request_says(http, reranker):
    body = {"model": NARROW_RERANKER, "query": QUERIES[0], "documents": [LONG], "max_tokens_per_doc": 8}
    default = http.post("/v1/rerank", json=body).json()
    assert default["results"][0]["relevance_score"] == pytest.approx(
        reranker.rerank(QUERIES[0], [LONG], max_tokens_per_doc=8, max_chunks_per_doc=2).scores[0], abs=SAME_ENGINE)
    one = http.post("/v1/rerank", json={**body, "max_chunks_per_doc": 1}).json()
    assert one["results"][0]["relevance_score"] == pytest.approx(
        reranker.rerank(QUERIES[0], [LONG], max_tokens_per_doc=8).scores[0], abs=SAME_ENGINE)
    assert default["usage"]["total_tokens"] > one["usage"]["total_tokens"]


def test_cohere_v1_sdk_sends_max_chunks_per_doc(served, api_key, reranker):
    client = cohere.Client(api_key=api_key, base_url=served.url, max_retries=0)
    response = client.rerank(model=RERANKER, query=QUERIES[0], documents=[LONG, "bamboo"], max_chunks_per_doc=2)
    expected = reranker.rerank(QUERIES[0], [LONG, "bamboo"], max_chunks_per_doc=2)
    assert all(abs(r.relevance_score - expected.scores[r.index]) <= SAME_ENGINE for r in response.results)


def test_voyage_top_k_is_top_n(http, reranker):
    body = {"model": RERANKER, "query": QUERIES[0], "documents": DOCUMENTS}
    expected = reranker.rerank(QUERIES[0], DOCUMENTS).scores
    best = sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])[:3]
    response = http.post("/v1/rerank", json={**body, "top_k": 3})
    assert [r["index"] for r in response.json()["results"]] == best
    assert "x-ignored-fields" not in response.headers
    assert len(http.post("/v1/rerank", json={**body, "top_k": 3, "top_n": 3}).json()["results"]) == 3
    conflict = http.post("/v1/rerank", json={**body, "top_k": 2, "top_n": 3})
    assert conflict.status_code == 400 and conflict.json()["error"]["param"] == "top_k"
    assert http.post("/v1/rerank", json={**body, "top_k": 0}).status_code == 400
