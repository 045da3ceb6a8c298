"""Text Embeddings Inference's API and vLLM's helpers on the session's live Serve instance (tiny models), driven by the
clients people point at a TEI server: LlamaIndex's TEI embedder and rerank postprocessor, Haystack's Hugging Face API
embedders and TEI ranker, huggingface_hub's InferenceClient. Vectors and scores equal the model cards' code (1e-5),
every billed request is one ledger row, and /tokenize counts exactly the tokens embed and rerank bill.

LangChain's HuggingFaceEndpointEmbeddings is not here: the release that can target a URL (langchain-huggingface 0.3.x)
needs langchain-core<1, which needs packaging<26 against the packaging>=26.3 of the virtualenv that ray[serve]
installs, and the current release (1.x) refuses URLs and needs huggingface-hub<2 against our pinned 2.4.0. The
request it sends is InferenceClient.feature_extraction's (tested below)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from models import Qwen3Embedder, Qwen3Reranker
from serve_app.accounts.store import connect, usage_records
from serve_app.replica.instructions import PROMPT_NAME_INSTRUCTIONS, WEB_SEARCH_QUERY
from tests.reference import ModelCardEmbedder, ModelCardReranker
from tests.serving import EMBEDDER, RERANKER
from tests.texts import DOCUMENTS, NONEMPTY_QUERIES

TOLERANCE = 1e-5  # against the model cards' code
SAME_ENGINE = 1e-6  # against our engine in this process
REPO = Path(__file__).resolve().parent.parent
LONG = "The giant panda lives in the mountains of central China and eats bamboo. " * 800  # > 8192 tokens


# ---- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def card_embedder(tiny_embedder_path):
    return ModelCardEmbedder(str(tiny_embedder_path))


@pytest.fixture(scope="module")
def card_reranker(tiny_reranker_path):
    return ModelCardReranker(str(tiny_reranker_path))


@pytest.fixture(scope="module")
def embedder(tiny_embedder_path):
    return Qwen3Embedder.from_pretrained(str(tiny_embedder_path), device="cpu")


@pytest.fixture(scope="module")
def reranker(tiny_reranker_path):
    return Qwen3Reranker.from_pretrained(str(tiny_reranker_path), device="cpu")


@pytest.fixture(scope="module")
def ledger(key_database):
    return connect(key_database)


class Key:
    """A fresh API key of the live server: its ledger rows are this test's alone."""

    def __init__(self, key_store, ledger, name: str, **settings):
        self.key, self.secret = key_store.create(name, **settings)
        self.ledger = ledger
        self.headers = {"Authorization": f"Bearer {self.secret}"}

    def rows(self) -> list:
        with self.ledger.connect() as connection:
            return connection.execute(select(usage_records).where(usage_records.c.key_id == self.key.id)
                                      .order_by(usage_records.c.created_at)).all()


@pytest.fixture
def new_key(key_store, ledger, served):
    def make(name: str, **settings) -> Key:
        return Key(key_store, ledger, name, **settings)
    return make


def close(got, expected, tolerance=TOLERANCE) -> bool:
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return got.shape == expected.shape and np.abs(got - expected).max() <= tolerance


def spans_cover(text: str, spans) -> bool:
    """Token spans that cover a text in order, without gaps (a character split into byte tokens gives two tokens the
    same span, as TEI's offsets do)."""
    spans = [span for span in spans if span is not None]
    if not text:
        return not spans
    starts_in_order = all(b[0] >= a[0] and b[0] <= a[1] for a, b in zip(spans, spans[1:]))
    return starts_in_order and spans[0][0] == 0 and max(stop for _, stop in spans) == len(text)


def tei_error(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    assert isinstance(body["error"], str) and body["error"]
    return body["error"]


def tei_url(served, model: str) -> str:
    return f"{served.url}/tei/{model}"


# ---- the engines' token counts (no server) -----------------------------------------------------------------------

@pytest.mark.parametrize("instruction", [None, WEB_SEARCH_QUERY])
def test_embedder_tokens_are_the_sequences_it_embeds(embedder, instruction):
    job = embedder.tokenize(DOCUMENTS, instruction=instruction)
    tokens = embedder.text_tokens(DOCUMENTS, instruction=instruction)
    assert [t.ids for t in tokens] == [list(ids) for ids in job.input_ids]
    for text, t in zip(DOCUMENTS, tokens):
        assert t.special[-1] and t.offsets[-1] is None and t.pieces[-1] == "<|endoftext|>"
        assert t.text.endswith(text) and spans_cover(t.text, t.offsets)
    bare = embedder.text_tokens(DOCUMENTS, add_special_tokens=False)
    assert [len(t.ids) for t in bare] == [len(ids) - 1 for ids in embedder.tokenize(DOCUMENTS).input_ids]


@pytest.mark.parametrize("query", [NONEMPTY_QUERIES[0], None])
def test_reranker_tokens_are_the_prompts_it_scores(reranker, query):
    job = reranker.tokenize(query or "", DOCUMENTS)
    tokens = reranker.text_tokens(DOCUMENTS, query=query)
    assert [len(t.ids) for t in tokens] == job.token_counts
    for position, t in enumerate(tokens):
        assert t.ids == list(job.head_ids) + list(job.tail_ids[position])
        assert spans_cover(t.text, t.offsets)
    assert [t.ids for t in reranker.text_tokens(["bamboo"], add_special_tokens=False)] == [
        reranker.tokenizer.encode("bamboo", add_special_tokens=False)]


def test_unnormalized_vectors_are_the_pooled_states(embedder, card_embedder):
    raw = embedder.embed(DOCUMENTS[:3], normalize=False, dimensions=40).embeddings
    assert close(raw, card_embedder.embeddings(DOCUMENTS[:3], dimensions=40, normalize=False))


def test_bare_paths_without_a_default_model_name_the_per_model_urls():
    """No default configured: 400 naming each model's /tei/<model> base URL (the live server has defaults)."""
    import asyncio

    from serve_app.config import GatewayConfig
    from serve_app.errors import InvalidRequest
    from serve_app.gateway.directory import ModelApp, ModelDirectory
    from serve_app.gateway.handling import ModelCalls, RequestContext

    facts = {"e": {"name": "emb", "task": "embed", "aliases": ["org/Emb"]}, "r": {"name": "rr", "task": "rerank"}}

    async def handle_of(app):
        return app

    async def describe(handle):
        return facts[handle]

    async def main():
        directory = ModelDirectory(60, list_apps=lambda: {app: ModelApp(1.0, True) for app in facts},
                                   get_handle=handle_of, describe=describe)
        context = RequestContext(ModelCalls(directory, GatewayConfig()), "req", base_url="http://example:8000/")
        errors = []
        for task in ("embed", "rerank", None):
            with pytest.raises(InvalidRequest) as refusal:
                await context.resolve(None, task)
            errors.append(refusal.value)
        configured = RequestContext(ModelCalls(directory, GatewayConfig(default_models={"rerank": "rr"})), "req")
        return errors, (await configured.resolve(None, None)).name

    errors, fallback = asyncio.run(main())
    assert all(e.status == 400 and e.param == "model" and e.code == "no_default_model" for e in errors)
    assert "http://example:8000/tei/emb" in errors[0].message and "/tei/rr" not in errors[0].message
    assert "http://example:8000/tei/rr" in errors[1].message and "/tei/emb" not in errors[1].message
    assert "/tei/emb" in errors[2].message and "/tei/rr" in errors[2].message
    assert fallback == "rr"  # task-less paths: the embed default, else the rerank default


# ---- TEI's routes over HTTP --------------------------------------------------------------------------------------

def test_embed_matches_the_model_card_and_bills_once(served, new_key, card_embedder):
    key = new_key("tei-embed")
    response = httpx.post(f"{tei_url(served, EMBEDDER)}/embed", json={"inputs": DOCUMENTS}, headers=key.headers,
                          timeout=60)
    assert response.status_code == 200, response.text
    vectors = response.json()
    assert isinstance(vectors, list) and close(vectors, card_embedder.embeddings(DOCUMENTS))
    counted = httpx.post(f"{tei_url(served, EMBEDDER)}/tokenize", json={"inputs": DOCUMENTS}, headers=key.headers,
                         timeout=60).json()
    rows = key.rows()  # tokenize is not billed: one row, the embed's
    assert len(rows) == 1 and rows[0].request_id == response.headers["x-usage-id"]
    assert (rows[0].route, rows[0].model, rows[0].embeddings, rows[0].dimensions) == (
        "/tei/{model:path}/embed", EMBEDDER, len(DOCUMENTS), 64)
    assert rows[0].input_tokens == sum(len(tokens) for tokens in counted)


def test_embed_options(served, card_embedder):
    url = f"{tei_url(served, 'Qwen/Qwen3-Embedding-0.6B')}/embed"  # an alias with a slash in the URL
    single = httpx.post(url, json={"inputs": DOCUMENTS[0]}, headers=served.headers, timeout=60).json()
    assert close(single, card_embedder.embeddings(DOCUMENTS[:1]))
    query = NONEMPTY_QUERIES[0]
    card_query = card_embedder.get_detailed_instruct(WEB_SEARCH_QUERY, query)
    prompted = httpx.post(url, json={"inputs": [query], "prompt_name": "query", "dimensions": 32},
                          headers=served.headers, timeout=60).json()
    assert close(prompted, card_embedder.embeddings([card_query], dimensions=32))
    raw = httpx.post(url, json={"inputs": [query], "normalize": False}, headers=served.headers, timeout=60).json()
    assert close(raw, card_embedder.embeddings([query], normalize=False))
    for name in ("classification", "document"):
        got = httpx.post(url, json={"inputs": [query], "prompt_name": name}, headers=served.headers, timeout=60)
        instruction = PROMPT_NAME_INSTRUCTIONS[name]
        text = card_embedder.get_detailed_instruct(instruction, query) if instruction else query
        assert close(got.json(), card_embedder.embeddings([text]))


def test_token_ids_and_truncation(served, embedder):
    url = f"{tei_url(served, EMBEDDER)}/embed"
    ids = embedder.tokenizer("pandas eat bamboo", add_special_tokens=False)["input_ids"]
    single = httpx.post(url, json={"inputs": ids}, headers=served.headers, timeout=60).json()
    batch = httpx.post(url, json={"inputs": [ids, ids[:2]]}, headers=served.headers, timeout=60).json()
    assert close(single, embedder.embed([ids]).embeddings, SAME_ENGINE)
    assert close(batch, embedder.embed([ids, ids[:2]]).embeddings, SAME_ENGINE)
    message = tei_error(httpx.post(url, json={"inputs": [LONG]}, headers=served.headers, timeout=60), 413,
                        "Validation")
    assert "8192" in message
    for direction, side in (("right", "end"), ("left", "start"), ("Left", "start")):
        cut = httpx.post(url, json={"inputs": [LONG], "truncate": True, "truncation_direction": direction},
                         headers=served.headers, timeout=120)
        assert close(cut.json(), embedder.embed([LONG], truncate_side=side).embeddings, SAME_ENGINE), direction


def test_rerank_and_root_match_the_model_card(served, new_key, card_reranker):
    key = new_key("tei-rerank")
    query = NONEMPTY_QUERIES[0]
    expected = card_reranker.scores(query, DOCUMENTS)
    for url in (f"{tei_url(served, RERANKER)}/rerank", tei_url(served, RERANKER)):
        ranks = httpx.post(url, json={"query": query, "texts": DOCUMENTS, "return_text": True}, headers=key.headers,
                           timeout=60).json()
        assert [r["index"] for r in ranks] == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
        assert all(set(r) == {"index", "score", "text"} and r["text"] == DOCUMENTS[r["index"]] for r in ranks)
        assert close([r["score"] for r in ranks], [expected[r["index"]] for r in ranks])
    raw = httpx.post(f"{tei_url(served, RERANKER)}/rerank", json={"query": query, "texts": DOCUMENTS,
                                                                  "raw_scores": True}, headers=key.headers,
                     timeout=60).json()
    logits = [float(np.log(p / (1 - p))) for p in expected]
    assert close([r["score"] for r in raw], [logits[r["index"]] for r in raw], 1e-4)
    counted = httpx.post(f"{tei_url(served, RERANKER)}/tokenize", json={"inputs": DOCUMENTS, "query": query},
                         headers=key.headers, timeout=60).json()
    rows = key.rows()
    assert len(rows) == 3 and {row.route for row in rows} == {"/tei/{model:path}/rerank", "/tei/{model:path}"}
    assert all(row.documents == len(DOCUMENTS) and row.input_tokens == sum(map(len, counted)) for row in rows)
    assert sum(card_reranker.token_counts(query, DOCUMENTS)) == sum(map(len, counted))


def test_the_root_of_an_embed_model_embeds(served, card_embedder):
    response = httpx.post(tei_url(served, EMBEDDER), json={"inputs": DOCUMENTS[:2]}, headers=served.headers,
                          timeout=60)
    assert close(response.json(), card_embedder.embeddings(DOCUMENTS[:2]))


def test_bare_paths_serve_the_default_models(served, http):
    embedded = http.post("/embed", json={"inputs": DOCUMENTS[:2]})
    assert embedded.json() == http.post(f"/tei/{EMBEDDER}/embed", json={"inputs": DOCUMENTS[:2]}).json()
    body = {"query": NONEMPTY_QUERIES[1], "texts": DOCUMENTS[:3]}
    assert http.post("/rerank", json=body).json() == http.post("/rerank", json={**body, "model": RERANKER}).json()
    assert http.get("/info").json() == http.get(f"/tei/{EMBEDDER}/info").json()
    tei_tokens = http.post("/tokenize", json={"inputs": "pandas"}).json()
    assert tei_tokens == http.post(f"/tei/{EMBEDDER}/tokenize", json={"inputs": "pandas"}).json()
    assert http.post("/decode", json={"ids": [t["id"] for t in tei_tokens[0]]}).json() == ["pandas"]


def test_tokenize_and_decode(served, http, embedder):
    text = "Mixed 中文 and emoji 😀 café"
    tokens = http.post(f"/tei/{EMBEDDER}/tokenize", json={"inputs": text}).json()[0]
    assert [t["id"] for t in tokens] == list(embedder.tokenize([text]).input_ids[0])
    assert tokens[-1] == {"id": embedder.eos_id, "text": "<|endoftext|>", "special": True, "start": None,
                          "stop": None}
    assert spans_cover(text, [(t["start"], t["stop"]) for t in tokens[:-1]])
    assert all(text[t["start"]:t["stop"]] == t["text"] for t in tokens[:-1])
    bare = http.post(f"/tei/{EMBEDDER}/tokenize", json={"inputs": [text], "add_special_tokens": False}).json()[0]
    assert bare == tokens[:-1]
    prompted = http.post(f"/tei/{EMBEDDER}/tokenize", json={"inputs": [text], "prompt_name": "query"}).json()[0]
    assert [t["id"] for t in prompted] == list(embedder.tokenize([text], instruction=WEB_SEARCH_QUERY).input_ids[0])
    ids = [t["id"] for t in tokens]
    decoded = http.post(f"/tei/{EMBEDDER}/decode", json={"ids": [ids, ids[:1]]}).json()
    assert decoded == [text, embedder.tokenizer.decode(ids[:1])]
    kept = http.post(f"/tei/{EMBEDDER}/decode", json={"ids": ids, "skip_special_tokens": False}).json()
    assert kept == [text + "<|endoftext|>"]


def test_info_has_the_models_real_limits(served, http, tiny_embedder_path, tiny_reranker_path):
    embed = http.get(f"/tei/{EMBEDDER}/info").json()
    rerank = http.get(f"/tei/{RERANKER}/info").json()
    assert embed["model_id"] == str(tiny_embedder_path) and rerank["model_id"] == str(tiny_reranker_path)
    assert embed["model_type"] == {"embedding": {"pooling": "last_token"}} and "reranker" in rerank["model_type"]
    assert embed["max_input_length"] == rerank["max_input_length"] == 8192
    assert embed["max_client_batch_size"] == 2048 and rerank["max_client_batch_size"] == 1000
    assert embed["auto_truncate"] is False and embed["model_dtype"] == "float32" and embed["model_name"] == EMBEDDER
    assert http.get(f"/tei/{EMBEDDER}/health").status_code == http.get(f"/tei/{RERANKER}").status_code == 200


TEI_ERRORS = [
    # (path under /tei/<model>, body, status, error_type)
    (EMBEDDER, "embed", {"inputs": []}, 400, "Empty"),
    (EMBEDDER, "embed", {"inputs": ["x"] * 2049}, 413, "Validation"),
    (EMBEDDER, "embed", {"inputs": 5}, 422, "Validation"),
    (EMBEDDER, "embed", {"text": "x"}, 422, "Validation"),
    (EMBEDDER, "embed", {"inputs": ["x", [1, 2]]}, 413, "Validation"),
    (EMBEDDER, "embed", {"inputs": "x", "prompt_name": "passage"}, 413, "Validation"),
    (EMBEDDER, "embed", {"inputs": "x", "dimensions": 31}, 413, "Validation"),
    (EMBEDDER, "embed", {"inputs": "x", "truncation_direction": "middle"}, 422, "Validation"),
    (EMBEDDER, "embed", {"inputs": [[1, 2]], "prompt_name": "query"}, 413, "Validation"),
    (EMBEDDER, "embed", {"inputs": "x", "model": RERANKER}, 400, "Validation"),
    (EMBEDDER, "rerank", {"query": "q", "texts": ["a"]}, 424, "Backend"),
    (RERANKER, "embed", {"inputs": "x"}, 424, "Backend"),
    (RERANKER, "rerank", {"query": "q", "texts": []}, 400, "Empty"),
    (RERANKER, "rerank", {"query": "", "texts": ["a"]}, 422, "Validation"),
    (RERANKER, "rerank", {"query": "q", "texts": ["a", LONG]}, 413, "Validation"),
    (RERANKER, "rerank", {"query": "q", "texts": ["a"], "truncate": True, "truncation_direction": "left"}, 413,
     "Validation"),
    (RERANKER, "rerank", {"query": "q", "texts": ["d"] * 1001}, 413, "Validation"),
    (RERANKER, "tokenize", {"inputs": "x", "prompt_name": "query"}, 413, "Validation"),
    (EMBEDDER, "tokenize", {"inputs": []}, 400, "Empty"),
    (EMBEDDER, "decode", {"ids": [10 ** 7]}, 413, "Validation"),
    (EMBEDDER, "decode", {"ids": []}, 400, "Empty"),
    ("nope", "embed", {"inputs": "x"}, 404, "Validation"),
]


@pytest.mark.parametrize("model, route, body, status, error_type", TEI_ERRORS)
def test_bad_requests_get_teis_errors(served, http, model, route, body, status, error_type):
    tei_error(http.post(f"/tei/{model}/{route}", json=body), status, error_type)


def test_bad_json_no_key_rate_limits_and_spent_credit_get_teis_errors(served, new_key):
    url = f"{tei_url(served, EMBEDDER)}/embed"
    tei_error(httpx.post(url, content=b"{not json", headers=served.headers, timeout=30), 400, "Validation")
    tei_error(httpx.post(url, json={"inputs": "x"}, timeout=30), 401, "Validation")
    assert httpx.post(f"{served.url}/embed", json={"inputs": "x"}, timeout=30).status_code == 401
    limited = new_key("tei-rate-limited", requests_per_minute=1)
    assert httpx.post(url, json={"inputs": "x"}, headers=limited.headers, timeout=30).status_code == 200
    refused = httpx.post(url, json={"inputs": "x"}, headers=limited.headers, timeout=30)
    tei_error(refused, 429, "Overloaded")
    assert refused.headers["retry-after"]
    spent = new_key("tei-spent", credit="0")
    assert "spent" in tei_error(httpx.post(url, json={"inputs": "x"}, headers=spent.headers, timeout=30), 429,
                                "Overloaded")
    # Counting tokens is not billed, so a key whose credit is spent may still do it.
    counted = httpx.post(f"{tei_url(served, EMBEDDER)}/tokenize", json={"inputs": "x"}, headers=spent.headers,
                         timeout=30)
    assert counted.status_code == 200 and spent.rows() == []


# ---- vLLM's helpers ----------------------------------------------------------------------------------------------

def test_vllm_tokenize_counts_what_embeddings_and_rerank_bill(served, http, embedder):
    for text in DOCUMENTS[:5]:
        counted = http.post("/tokenize", json={"model": EMBEDDER, "prompt": text}).json()
        billed = http.post("/v1/embeddings", json={"model": EMBEDDER, "input": [text]}).json()["usage"]
        assert counted["count"] == len(counted["tokens"]) == billed["prompt_tokens"]
        assert counted["max_model_len"] == 8192 and counted["token_strs"] is None
        instructed = http.post("/tokenize", json={"model": EMBEDDER, "prompt": text, "instruction": "Find it"}).json()
        assert instructed["count"] == http.post("/v1/embeddings", json={
            "model": EMBEDDER, "input": [text], "instruction": "Find it"}).json()["usage"]["prompt_tokens"]
        query = NONEMPTY_QUERIES[2]
        prompt = http.post("/tokenize", json={"model": RERANKER, "prompt": text, "query": query}).json()
        assert prompt["count"] == http.post("/v1/rerank", json={
            "model": RERANKER, "query": query, "documents": [text]}).json()["usage"]["total_tokens"]
    plain = http.post("/tokenize", json={"prompt": "pandas eat bamboo", "add_special_tokens": False,
                                         "return_token_strs": True}).json()  # the default model: the embedder
    assert plain["tokens"] == embedder.tokenizer.encode("pandas eat bamboo", add_special_tokens=False)
    assert plain["token_strs"] == embedder.tokenizer.convert_ids_to_tokens(plain["tokens"])
    assert http.post("/detokenize", json={"model": RERANKER, "tokens": plain["tokens"]}).json() == {
        "prompt": "pandas eat bamboo"}


def test_vllm_score_forms_equal_v1_rerank(served, new_key, http):
    key = new_key("vllm-score")
    queries = NONEMPTY_QUERIES[:2]
    one = httpx.post(f"{served.url}/score", json={"model": RERANKER, "text_1": queries[0], "text_2": DOCUMENTS},
                     headers=key.headers, timeout=60).json()
    reranked = httpx.post(f"{served.url}/v1/rerank", json={"model": RERANKER, "query": queries[0],
                                                           "documents": DOCUMENTS}, headers=key.headers,
                          timeout=60).json()
    by_index = {r["index"]: r["relevance_score"] for r in reranked["results"]}
    assert one["object"] == "list" and one["model"] == RERANKER and one["id"].startswith("req_")
    assert [d["index"] for d in one["data"]] == list(range(len(DOCUMENTS)))
    assert all(d["object"] == "score" for d in one["data"])
    assert close([d["score"] for d in one["data"]], [by_index[i] for i in range(len(DOCUMENTS))], SAME_ENGINE)
    assert one["usage"]["total_tokens"] == reranked["usage"]["total_tokens"]
    pairs = httpx.post(f"{served.url}/v1/score", json={"model": RERANKER, "queries": queries * 2,
                                                       "documents": DOCUMENTS[:4]}, headers=key.headers,
                       timeout=60).json()
    single = [httpx.post(f"{served.url}/v1/rerank", json={"model": RERANKER, "query": q, "documents": [d]},
                         headers=key.headers, timeout=60).json() for q, d in zip(queries * 2, DOCUMENTS[:4])]
    assert close([d["score"] for d in pairs["data"]], [s["results"][0]["relevance_score"] for s in single],
                 SAME_ENGINE)
    assert pairs["usage"]["prompt_tokens"] == sum(s["usage"]["total_tokens"] for s in single)
    logits = httpx.post(f"{served.url}/score", json={"text_1": queries[0], "text_2": DOCUMENTS[:2],
                                                     "use_activation": False},  # the default reranker
                        headers=key.headers, timeout=60).json()
    assert close(1 / (1 + np.exp(-np.array([d["score"] for d in logits["data"]]))),
                 [d["score"] for d in one["data"][:2]], SAME_ENGINE)
    rows = {row.request_id: row for row in key.rows()}
    assert len(rows) == 3 + 1 + 4  # each score request once, each rerank once
    assert (rows[one["id"]].documents, rows[one["id"]].input_tokens, rows[one["id"]].route) == (
        len(DOCUMENTS), one["usage"]["total_tokens"], "/score")
    assert (rows[pairs["id"]].documents, rows[pairs["id"]].route) == (4, "/v1/score")


VLLM_ERRORS = [
    ("/score", {"model": RERANKER, "text_1": ["a", "b"], "text_2": ["x", "y", "z"]}, 400, "text_2"),
    ("/score", {"model": RERANKER, "text_1": "a", "documents": ["x"]}, 400, "text_1"),
    ("/score", {"model": RERANKER, "text_1": "a"}, 400, "text_2"),
    ("/score", {"model": RERANKER, "queries": "a", "documents": []}, 400, "documents"),
    ("/score", {"model": RERANKER, "queries": " ", "documents": ["x"]}, 400, "queries"),
    ("/score", {"model": RERANKER, "queries": "q", "documents": ["d"] * 1001}, 413, "documents"),
    ("/score", {"model": EMBEDDER, "queries": "q", "documents": ["d"]}, 400, "model"),
    ("/score", {"model": RERANKER, "queries": 5, "documents": ["d"]}, 400, "queries"),
    ("/tokenize", {"model": EMBEDDER, "messages": [{"role": "user", "content": "hi"}]}, 400, "messages"),
    ("/tokenize", {"model": EMBEDDER}, 400, "prompt"),
    ("/tokenize", {"model": EMBEDDER, "prompt": "x", "query": "q"}, 400, "query"),
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/detokenize", {"model": EMBEDDER, "tokens": [10 ** 7]}, 400, "tokens"),
    ("/detokenize", {"model": EMBEDDER, "tokens": [-1]}, 400, "tokens.0"),
    # TEI's body on the bare paths it shares with Cohere and vLLM: the OpenAI error shape there.
    ("/rerank", {"query": "q", "texts": []}, 400, "texts"),
    ("/tokenize", {"inputs": [], "model": EMBEDDER}, 400, "inputs"),
]


@pytest.mark.parametrize("path, body, status, param", VLLM_ERRORS)
def test_vllm_and_shared_paths_get_openai_errors(http, path, body, status, param):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error


# ---- the Batch API -----------------------------------------------------------------------------------------------

def test_batches_of_tei_embed_rerank_and_vllm_score_lines(served, new_key, http):
    from openai import OpenAI

    key = new_key("tei-batches")
    client = OpenAI(base_url=f"{served.url}/v1", api_key=key.secret, max_retries=0, timeout=60)
    jobs = {
        "/embed": [{"inputs": DOCUMENTS[:3]}, {"inputs": "x", "model": EMBEDDER, "dimensions": 32},
                   {"inputs": []}],
        "/score": [{"text_1": "q", "text_2": DOCUMENTS[:3]}, {"model": RERANKER, "queries": ["a", "b"],
                                                              "documents": ["c", "d"]}, {"text_1": "q"}],
        "/rerank": [{"query": "q", "texts": DOCUMENTS[:3]}, {"model": RERANKER, "query": "q",
                                                             "documents": DOCUMENTS[:3]}, {"query": "q", "texts": []}],
    }
    batches = {}
    for endpoint, bodies in jobs.items():
        lines = "".join(json.dumps({"custom_id": f"line-{n}", "method": "POST", "url": endpoint, "body": body}) + "\n"
                        for n, body in enumerate(bodies)).encode()
        uploaded = client.files.create(file=("lines.jsonl", lines), purpose="batch")
        batches[endpoint] = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint,
                                                  completion_window="24h").id
    deadline = time.monotonic() + 120
    for endpoint, batch_id in batches.items():
        while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed"):
            assert time.monotonic() < deadline, batch
            time.sleep(0.3)
        assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
        output = [json.loads(raw) for raw in client.files.content(batch.output_file_id).text.splitlines()]
        errors = [json.loads(raw) for raw in client.files.content(batch.error_file_id).text.splitlines()]
        online = [http.post(endpoint, json=body) for body in jobs[endpoint]]
        for line in output:
            body = line["response"]["body"]
            expected = online[int(line["custom_id"].split("-")[1])].json()
            if endpoint == "/score":
                body, expected = [d["score"] for d in body["data"]], [d["score"] for d in expected["data"]]
            elif endpoint == "/rerank" and isinstance(body, dict):  # Cohere's body: its results
                assert [r["index"] for r in body["results"]] == [r["index"] for r in expected["results"]]
                body = [r["relevance_score"] for r in body["results"]]
                expected = [r["relevance_score"] for r in expected["results"]]
            elif endpoint == "/rerank":  # TEI's: a bare array, best first
                assert [r["index"] for r in body] == [r["index"] for r in expected]
                body, expected = [r["score"] for r in body], [r["score"] for r in expected]
            assert close(body, expected, TOLERANCE), endpoint
        assert errors[0]["custom_id"] == "line-2" and errors[0]["response"]["status_code"] == 400
    routes = sorted(row.route for row in key.rows() if row.batch_id)
    assert routes == ["/embed", "/embed", "/rerank", "/rerank", "/score", "/score"]


# ---- the client packages -----------------------------------------------------------------------------------------

def test_llamaindex_embedder(served, new_key, card_embedder):
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    key = new_key("llamaindex-embed")
    query_instruction = f"Instruct: {WEB_SEARCH_QUERY}\nQuery:"
    model = TextEmbeddingsInference(model_name=EMBEDDER, base_url=tei_url(served, EMBEDDER), auth_token=key.secret,
                                    query_instruction=query_instruction, embed_batch_size=4)
    documents = model.get_text_embedding_batch(DOCUMENTS)
    query = model.get_query_embedding(NONEMPTY_QUERIES[0])
    # LlamaIndex strips each text and joins the instruction with a space (format_text / format_query).
    assert close(documents, card_embedder.embeddings([d.strip() for d in DOCUMENTS]))
    assert close([query], card_embedder.embeddings([f"{query_instruction} {NONEMPTY_QUERIES[0]}"]))
    rows = key.rows()
    assert len(rows) == 3 and sum(row.embeddings for row in rows) == len(DOCUMENTS) + 1  # batches of 4, 4, 1


def test_llamaindex_rerank_postprocessor(served, new_key, card_reranker):
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    key = new_key("llamaindex-rerank")
    # It sends auth_token as the whole Authorization header.
    rerank = TextEmbeddingInference(base_url=tei_url(served, RERANKER), auth_token=f"Bearer {key.secret}", top_n=3)
    query = NONEMPTY_QUERIES[1]
    texts = [d for d in DOCUMENTS if d]
    nodes = rerank.postprocess_nodes([NodeWithScore(node=TextNode(text=t), score=0.0) for t in texts],
                                     query_str=query)
    expected = card_reranker.scores(query, texts)
    assert [node.node.text for node in nodes] == [texts[i] for i in np.argsort(expected)[::-1][:3]]
    assert close([node.score for node in nodes], sorted(expected, reverse=True)[:3])
    rows = key.rows()
    assert len(rows) == 1 and rows[0].documents == len(texts)


def test_haystack_embedders(served, new_key, card_embedder):
    from haystack import Document
    from haystack.utils import Secret
    from haystack_integrations.components.embedders.huggingface_api import (HuggingFaceAPIDocumentEmbedder,
                                                                            HuggingFaceAPITextEmbedder)

    key = new_key("haystack-embed")
    params = dict(api_type="text_embeddings_inference", api_params={"url": tei_url(served, EMBEDDER)},
                  token=Secret.from_token(key.secret))
    text = HuggingFaceAPITextEmbedder(**params, prefix=f"Instruct: {WEB_SEARCH_QUERY}\nQuery:")
    query = NONEMPTY_QUERIES[2]
    # Haystack's default normalize=False: the pooled vector, not normalised.
    got = text.run(query)["embedding"]
    card_query = card_embedder.get_detailed_instruct(WEB_SEARCH_QUERY, query)
    assert close([got], card_embedder.embeddings([card_query], normalize=False))
    documents = HuggingFaceAPIDocumentEmbedder(**params, normalize=True, batch_size=5, progress_bar=False)
    embedded = documents.run([Document(content=d) for d in DOCUMENTS])["documents"]
    assert close([d.embedding for d in embedded], card_embedder.embeddings(DOCUMENTS))
    rows = key.rows()
    assert len(rows) == 3 and [row.embeddings for row in rows] == [1, 5, 3]


def test_haystack_ranker_uses_the_bare_rerank_path(served, new_key, card_reranker):
    from haystack import Document
    from haystack.utils import Secret
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    key = new_key("haystack-rank")
    # It posts to urljoin(url, "/rerank"): the server's bare /rerank, served by the default reranker.
    ranker = HuggingFaceTEIRanker(url=tei_url(served, RERANKER), token=Secret.from_token(key.secret), top_k=2)
    query = NONEMPTY_QUERIES[0]
    texts = DOCUMENTS[:5]
    ranked = ranker.run(query=query, documents=[Document(content=t) for t in texts])["documents"]
    expected = card_reranker.scores(query, texts)
    assert close([d.score for d in ranked], sorted(expected, reverse=True)[:2])
    rows = key.rows()
    assert len(rows) == 1 and (rows[0].route, rows[0].model) == ("/rerank", RERANKER)


def test_huggingface_hub_inference_client(served, new_key, card_embedder):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    key = new_key("hf-inference-client")
    client = InferenceClient(model=tei_url(served, EMBEDDER), token=key.secret)  # posts to TEI's root
    vectors = client.feature_extraction(DOCUMENTS)
    assert vectors.dtype == np.float32 and close(vectors, card_embedder.embeddings(DOCUMENTS))
    query = NONEMPTY_QUERIES[0]
    prompted = client.feature_extraction(query, prompt_name="query", dimensions=48, truncate=True,
                                         truncation_direction="right")
    assert close(prompted, card_embedder.embeddings([card_embedder.get_detailed_instruct(WEB_SEARCH_QUERY, query)],
                                                    dimensions=48))
    with pytest.raises(HfHubHTTPError) as refusal:
        client.feature_extraction([LONG])  # TEI's default: no truncation
    assert refusal.value.response.status_code == 413 and "8192" in str(refusal.value)
    rows = key.rows()
    assert len(rows) == 2 and [row.embeddings for row in rows] == [len(DOCUMENTS), 1]
    assert rows[1].dimensions == 48 and rows[0].route == rows[1].route == "/tei/{model:path}"


# ---- README ------------------------------------------------------------------------------------------------------

def readme_snippets(section: str) -> list[str]:
    """The python code blocks of a README section (from its heading to the next heading of that level or above)."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n{section}\n")
    level = section.split(" ")[0]
    end = re.search(rf"\n#{{1,{len(level)}}} ", text[start + 1:])
    body = text[start:start + 1 + end.start()] if end else text[start:]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_readme_tei_snippets_run_as_written(served, api_key):
    """Each snippet, against the live server: the README's URL and placeholder key replaced by the test's."""
    snippets = readme_snippets("### Text Embeddings Inference and vLLM clients")
    assert len(snippets) == 4  # huggingface_hub, LlamaIndex, Haystack, token counting and score
    for snippet in snippets:
        code = snippet.replace("http://127.0.0.1:8000", served.url).replace("unused-until-auth-is-on", api_key)
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example code
