"""Embedder truncation as /v2/embed asks for it: max_tokens per input, cut at the end or the start, or refused."""

import numpy as np
import pytest

from models import EngineInputError, Qwen3Embedder
from tests.reference import ModelCardEmbedder
from tests.texts import DOCUMENTS

TOLERANCE = 1e-5
TASK = "Given a web search query, retrieve relevant passages that answer the query"
LONG = "The giant panda lives in the mountains of central China and eats bamboo almost exclusively. " * 6


@pytest.fixture(scope="module")
def engine(tiny_embedder_path):
    return Qwen3Embedder.from_pretrained(str(tiny_embedder_path), device="cpu")


def text_tokens(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text, add_special_tokens=False)


def test_max_tokens_cut_at_the_end_is_the_model_cards_truncation(engine, tiny_embedder_path):
    texts = [LONG, DOCUMENTS[0]]
    result = engine.embed(texts, max_tokens=20)
    reference = ModelCardEmbedder(str(tiny_embedder_path), max_length=20).embeddings(texts).numpy()
    assert np.abs(result.embeddings - reference).max() <= TOLERANCE
    assert result.token_counts == [20, len(text_tokens(engine, DOCUMENTS[0])) + 1]


def test_a_cut_at_the_start_keeps_the_last_tokens_and_the_end_token(engine):
    job = engine.tokenize([LONG], max_tokens=20, truncate_side="start")
    assert job.input_ids[0].tolist() == text_tokens(engine, LONG)[-19:] + [engine.eos_id]
    # The same vector as those token ids sent as they are.
    cut = engine.embed([LONG], max_tokens=20, truncate_side="start").embeddings
    assert np.abs(cut - engine.embed([job.input_ids[0].tolist()]).embeddings).max() <= 1e-6
    assert np.abs(cut - engine.embed([LONG], max_tokens=20).embeddings).max() > 1e-3  # the two ends differ


def test_a_cut_at_the_start_of_a_query_keeps_its_instruction(engine):
    job = engine.tokenize([LONG], instruction=TASK, max_tokens=40, truncate_side="start")
    head = engine.tokenizer.encode(f"Instruct: {TASK}\nQuery:", add_special_tokens=False)
    room = 40 - len(head) - 1
    assert job.input_ids[0].tolist() == head + text_tokens(engine, LONG)[-room:] + [engine.eos_id]
    # An input that fits is embedded exactly as without a cap, whichever side would be cut.
    fits = engine.tokenize([DOCUMENTS[0]], instruction=TASK, max_tokens=500, truncate_side="start")
    assert fits.input_ids[0].tolist() == engine.tokenize([DOCUMENTS[0]], instruction=TASK).input_ids[0].tolist()


def test_without_truncation_a_long_input_is_refused_naming_it_and_the_limit(engine):
    with pytest.raises(EngineInputError) as error:
        engine.tokenize([DOCUMENTS[0], LONG], truncate=False, max_tokens=20)
    assert error.value.param == "input"
    assert "input[1]" in error.value.message and "limit is 20 (max_tokens)" in error.value.message
    assert engine.tokenize([DOCUMENTS[0]], truncate=False, max_tokens=20).token_counts[0] <= 20


def test_a_cap_that_leaves_no_room_for_text_is_refused(engine):
    with pytest.raises(EngineInputError) as error:
        engine.tokenize([LONG], instruction=TASK, max_tokens=10)
    assert error.value.param == "max_tokens" and "instruction" in error.value.message
    with pytest.raises(EngineInputError):
        engine.tokenize([LONG], max_tokens=1)


@pytest.mark.parametrize("changes, param", [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
                                            ({"truncate_side": "middle"}, "truncate")])
def test_bad_truncation_settings_are_input_errors(engine, changes, param):
    with pytest.raises(EngineInputError) as error:
        engine.tokenize(["x"], **changes)
    assert error.value.param == param
