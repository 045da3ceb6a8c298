"""Qwen3-Embedding engine: parity with the model card's code, dimensions, token ids, batching invariance."""

import dataclasses

import numpy as np
import pytest
from transformers import AutoTokenizer

from models import EngineInputError, Qwen3Embedder
from models.embedder import query_text
from tests.helpers import engine_variant
from tests.reference import ModelCardEmbedder
from tests.texts import DOCUMENTS, LONG_DOCUMENT, QUERIES

TOLERANCE = 1e-5
TASK = "Given a web search query, retrieve relevant passages that answer the query"
TEXTS = QUERIES + DOCUMENTS


@pytest.fixture(scope="module")
def engine(tiny_embedder_path):
    return Qwen3Embedder.from_pretrained(str(tiny_embedder_path), device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_embedder_path):
    return ModelCardEmbedder(str(tiny_embedder_path))


def max_abs_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))



def test_tokenizer_appends_end_of_text(engine):
    assert engine.tokenizer_appends_eos
    job = engine.tokenize(["hello", ""])
    assert all(ids[-1] == engine.eos_id for ids in job.input_ids)
    assert job.input_ids[1].tolist() == [engine.eos_id]
    assert all(ids.dtype == np.int32 for ids in job.input_ids)  # 4 bytes a token while a request waits


def test_documents_match_model_card(engine, reference):
    result = engine.embed(TEXTS)
    assert result.embeddings.dtype == np.float32
    assert result.embeddings.shape == (len(TEXTS), engine.native_dimensions)
    assert max_abs_diff(result.embeddings, reference.embeddings(TEXTS).numpy()) <= TOLERANCE
    assert result.token_counts == reference.batch_dict(TEXTS)["attention_mask"].sum(dim=1).tolist()


def test_queries_with_instruction_match_model_card(engine, reference):
    expected = reference.embeddings([reference.get_detailed_instruct(TASK, q) for q in QUERIES]).numpy()
    result = engine.embed(QUERIES, instruction=TASK)
    assert max_abs_diff(result.embeddings, expected) <= TOLERANCE
    assert query_text("q", TASK) == f"Instruct: {TASK}\nQuery:q"
    assert max_abs_diff(result.embeddings, engine.embed(QUERIES).embeddings) > 1e-3


@pytest.mark.parametrize("dimensions", [32, 33, 48, 63, 64])
def test_every_dimensions_case_matches_model_card(engine, reference, dimensions):
    # 64 is the tiny model's native size: it must be accepted, not rejected (vLLM's mistake).
    result = engine.embed(TEXTS, dimensions=dimensions)
    assert result.embeddings.shape == (len(TEXTS), dimensions)
    assert max_abs_diff(result.embeddings, reference.embeddings(TEXTS, dimensions=dimensions).numpy()) <= TOLERANCE
    assert np.allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-6)


def test_dimensions_cut_before_normalising(engine):
    full = engine.embed(TEXTS[:3]).embeddings
    cut = engine.embed(TEXTS[:3], dimensions=32).embeddings
    assert not np.allclose(cut, full[:, :32], atol=1e-3)  # normalise-then-cut would give this
    renormalised = full[:, :32] / np.linalg.norm(full[:, :32], axis=1, keepdims=True)
    assert max_abs_diff(cut, renormalised) <= 1e-6


@pytest.mark.parametrize("dimensions", [0, 31, 65, -1, True, 32.0])
def test_bad_dimensions_are_input_errors(engine, dimensions):
    with pytest.raises(EngineInputError) as error:
        engine.tokenize(["x"], dimensions=dimensions)
    assert error.value.param == "dimensions"


def test_input_longer_than_max_length_matches_model_card(engine, reference):
    texts = [LONG_DOCUMENT, "short"]
    result = engine.embed(texts)
    assert result.token_counts[0] == 8192
    assert max_abs_diff(result.embeddings, reference.embeddings(texts).numpy()) <= TOLERANCE


def test_truncation_can_be_refused(engine):
    with pytest.raises(EngineInputError) as error:
        engine.tokenize([LONG_DOCUMENT], truncate=False)
    assert "limit is 8192" in error.value.message


def test_token_id_inputs_equal_text_inputs(engine):
    plain = engine.tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    nonempty = [ids for ids in plain if ids]
    texts = [t for t, ids in zip(TEXTS, plain) if ids]
    from_ids = engine.embed(nonempty)  # end token appended by the engine
    with_eos = engine.embed([ids + [engine.eos_id] for ids in nonempty])  # already present: not doubled
    from_text = engine.embed(texts)
    assert max_abs_diff(from_ids.embeddings, from_text.embeddings) <= 1e-6
    assert max_abs_diff(with_eos.embeddings, from_text.embeddings) <= 1e-6
    assert from_ids.token_counts == from_text.token_counts == with_eos.token_counts


@pytest.mark.parametrize("bad", [[[]], [[-1]], [[151669]], [["a"]], [[1.5]], [[True]], ["a", [1]]])
def test_bad_token_ids_are_input_errors(engine, bad):
    with pytest.raises(EngineInputError):
        engine.tokenize(bad)


def test_tokenizer_without_end_token_gets_it_appended(engine, tiny_reranker_path):
    # The reranker's tokenizer is Qwen3's plain one (no post-processor), like older embedding tokenizers.
    plain = AutoTokenizer.from_pretrained(str(tiny_reranker_path))
    variant = Qwen3Embedder(engine.backbone, plain, engine.runtime, source="plain-tokenizer")
    assert not variant.tokenizer_appends_eos
    assert max_abs_diff(variant.embed(TEXTS).embeddings, engine.embed(TEXTS).embeddings) <= 1e-6


@pytest.mark.parametrize("changes", [{"token_budget": 16}, {"max_batch_items": 1},
                                     {"token_budget": 10**6, "max_batch_items": 10**4},
                                     {"cut_last_layer": False}, {"cut_last_layer": False, "token_budget": 16}])
def test_vectors_do_not_depend_on_batching(engine, changes):
    texts = TEXTS + [DOCUMENTS[1] * 5]
    baseline = engine.embed(texts).embeddings
    assert max_abs_diff(engine_variant(engine, **changes).embed(texts).embeddings, baseline) <= 1e-6
    assert max_abs_diff(engine.embed(texts[::-1]).embeddings[::-1], baseline) <= 1e-6


def test_packed_sequences_match_padded(engine):
    packed = engine_variant(engine, runtime=dataclasses.replace(engine.runtime, pack_sequences=True))
    assert max_abs_diff(packed.embed(TEXTS).embeddings, engine.embed(TEXTS).embeddings) <= 1e-6


def test_jobs_with_different_dimensions_in_one_run(engine):
    jobs = [engine.tokenize(TEXTS[:4], dimensions=32), engine.tokenize(TEXTS[4:], instruction=TASK),
            engine.tokenize([[1, 2, 3]], dimensions=40)]
    together = engine.run(jobs)
    for job, result in zip(jobs, together):
        alone = engine.run([job])[0]
        assert alone.embeddings.shape == result.embeddings.shape == (len(job.input_ids), job.dimensions)
        assert max_abs_diff(alone.embeddings, result.embeddings) <= 1e-6


def test_empty_input_list_is_an_input_error(engine):
    with pytest.raises(EngineInputError):
        engine.tokenize([])
