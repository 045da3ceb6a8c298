"""Long documents reranked by chunks (max_chunks_per_doc): windows, scores, token counts, refusals. Engine only."""

import pytest
import torch

from models import EngineInputError, Qwen3Reranker
from tests.helpers import engine_variant
from tests.reference import ModelCardReranker
from tests.texts import DOCUMENTS, QUERIES

TOLERANCE = 1e-5
MAX_LENGTH = 160  # windows of about 80 document tokens with this query: a 400-token document takes several
LONG = " ".join(f"Sentence {i} of a long text about pandas, bamboo and the mountains of Sichuan." for i in range(30))


@pytest.fixture(scope="module")
def engine(tiny_reranker_path):
    return engine_variant(Qwen3Reranker.from_pretrained(str(tiny_reranker_path), device="cpu"), max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def reference(tiny_reranker_path):
    return ModelCardReranker(str(tiny_reranker_path), max_length=MAX_LENGTH)


def document_tokens(engine, window) -> list[int]:
    """A window's own document tokens: without the "<Document>:" marker and the suffix."""
    return window.tolist()[engine._min_document_tokens:len(window) - len(engine.suffix_ids)]


def test_windows_are_consecutive_and_the_first_is_what_truncation_keeps(engine):
    truncated = engine.tokenize(QUERIES[0], [LONG])
    chunked = engine.tokenize(QUERIES[0], [LONG], max_chunks_per_doc=100)
    assert chunked.tail_ids[0].tolist() == truncated.tail_ids[0].tolist()
    whole = engine.tokenizer.encode(f"<Document>: {LONG}", add_special_tokens=False)
    marker = engine._min_document_tokens
    assert [token for window in chunked.tail_ids for token in document_tokens(engine, window)] == whole[marker:]
    assert chunked.window_counts == [len(chunked.tail_ids)] and len(chunked.tail_ids) >= 4
    for window in chunked.tail_ids:  # each fits with the query head, marker first, suffix last
        assert len(chunked.head_ids) + len(window) <= MAX_LENGTH
        assert window[:marker].tolist() == whole[:marker]
        assert window[len(window) - len(engine.suffix_ids):].tolist() == engine.suffix_ids.tolist()
    assert engine.tokenize(QUERIES[0], [LONG], max_chunks_per_doc=3).window_counts == [3]


def test_a_chunked_score_is_the_best_of_its_windows_scored_as_documents_by_the_model_card(engine, reference):
    documents = [DOCUMENTS[1], LONG, DOCUMENTS[3]]
    result = engine.rerank(QUERIES[0], documents, max_chunks_per_doc=3)
    assert result.windows == [1, 3, 1]
    job = engine.tokenize(QUERIES[0], documents, max_chunks_per_doc=3)
    # Every window as a separate prompt through the model card's own scoring (full vocabulary, no shared head).
    window_scores = []
    for tail in job.tail_ids:
        ids = torch.tensor([job.head_ids.tolist() + tail.tolist()])
        window_scores.extend(reference.compute_logits({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    expected = [window_scores[0], max(window_scores[1:4]), window_scores[4]]
    assert max(abs(got - want) for got, want in zip(result.scores, expected)) <= TOLERANCE
    assert len(set(round(score, 6) for score in window_scores[1:4])) == 3  # the windows really differ
    # The documents that fit score as they do without chunks; usage counts every window's prompt.
    plain = engine.rerank(QUERIES[0], documents)
    assert result.scores[0] == pytest.approx(plain.scores[0], abs=1e-6)
    assert result.token_counts[1] == sum(len(job.head_ids) + len(tail) for tail in job.tail_ids[1:4])
    assert result.token_counts[0] == plain.token_counts[0]


def test_windows_share_the_query_head_like_documents(engine):
    before = engine.work.snapshot()
    result = engine.rerank(QUERIES[0], [LONG], max_chunks_per_doc=4)
    work = engine.work.since(before)
    job = engine.tokenize(QUERIES[0], [LONG], max_chunks_per_doc=4)
    # The head's tokens are computed once; each window computes only its own tail.
    assert work.real_tokens == len(job.head_ids) + sum(len(tail) for tail in job.tail_ids)
    whole = engine_variant(engine, reuse_query_prefix=False).rerank(QUERIES[0], [LONG], max_chunks_per_doc=4)
    assert result.scores == pytest.approx(whole.scores, abs=1e-6)


def test_max_tokens_per_doc_sizes_the_windows(engine):
    job = engine.tokenize(QUERIES[0], [LONG], max_tokens_per_doc=10, max_chunks_per_doc=5)
    assert job.window_counts == [5]
    assert all(len(document_tokens(engine, window)) == 10 for window in job.tail_ids)


def test_without_truncation_only_what_the_windows_cannot_hold_is_refused(engine):
    needed = len(engine.tokenize(QUERIES[0], [LONG], max_chunks_per_doc=100).tail_ids)
    assert engine.tokenize(QUERIES[0], [LONG], truncate=False, max_chunks_per_doc=needed).window_counts == [needed]
    with pytest.raises(EngineInputError) as error:
        engine.tokenize(QUERIES[0], [LONG], truncate=False, max_chunks_per_doc=needed - 1)
    assert error.value.param == "documents" and f"{needed - 1} windows" in error.value.message


@pytest.mark.parametrize("chunks", [0, -1, 1.5, True])
def test_max_chunks_per_doc_must_be_a_positive_integer(engine, chunks):
    with pytest.raises(EngineInputError) as error:
        engine.tokenize(QUERIES[0], [LONG], max_chunks_per_doc=chunks)
    assert error.value.param == "max_chunks_per_doc"
