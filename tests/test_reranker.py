"""Qwen3-Reranker engine: parity with the model card's code, truncation, token counts, batching invariance."""

import dataclasses

import pytest
import torch

from models import EngineInputError, Qwen3Reranker
from models.checkpoints import build_checkpoint
from models.reranker import DEFAULT_INSTRUCTION
from tests.helpers import engine_variant
from tests.reference import ModelCardReranker
from tests.texts import DOCUMENTS, LONG_DOCUMENT, QUERIES

TOLERANCE = 1e-5
SHORT_MAX_LENGTH = 160  # small enough that several test documents are truncated


@pytest.fixture(scope="module")
def engine(tiny_reranker_path):
    return Qwen3Reranker.from_pretrained(str(tiny_reranker_path), device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_reranker_path):
    return ModelCardReranker(str(tiny_reranker_path))


def max_abs_diff(a, b):
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_default_instruction_is_the_model_cards():
    assert DEFAULT_INSTRUCTION == "Given a web search query, retrieve relevant passages that answer the query"


def test_prompt_template_token_counts(engine):
    assert len(engine.prefix_ids) == 39 and len(engine.suffix_ids) == 9
    assert engine.tokenizer.convert_ids_to_tokens(
        [int(engine.tokenizer.convert_tokens_to_ids("yes")), int(engine.tokenizer.convert_tokens_to_ids("no"))]
    ) == ["yes", "no"]


@pytest.mark.parametrize("query", QUERIES)
def test_scores_match_model_card(engine, reference, query):
    expected = reference.scores(query, DOCUMENTS)
    result = engine.rerank(query, DOCUMENTS)
    assert max_abs_diff(result.scores, expected) <= TOLERANCE
    assert result.token_counts == reference.token_counts(query, DOCUMENTS)


def test_document_longer_than_max_length_matches_model_card(engine, reference):
    # The reference materialises 8192 x 151669 fp32 logits (5 GB) for this one document, so it runs alone.
    documents = [DOCUMENTS[0], LONG_DOCUMENT]
    expected = reference.scores(QUERIES[0], documents[:1]) + reference.scores(QUERIES[0], documents[1:])
    result = engine.rerank(QUERIES[0], documents)
    assert max_abs_diff(result.scores, expected) <= TOLERANCE
    assert result.token_counts[1] == reference.token_counts(QUERIES[0], documents[1:])[0] == 8192


def test_scores_are_spread_so_parity_is_meaningful(engine):
    scores = engine.rerank(QUERIES[0], DOCUMENTS).scores
    assert max(scores) - min(scores) > 0.05, scores


@pytest.mark.parametrize("instruction", ["Find the passage that answers a question about animals", "", "指令 🐼"])
def test_custom_instruction_matches_model_card(engine, reference, instruction):
    expected = reference.scores(QUERIES[2], DOCUMENTS, instruction=instruction)
    result = engine.rerank(QUERIES[2], DOCUMENTS, instruction=instruction)
    assert max_abs_diff(result.scores, expected) <= TOLERANCE
    assert result.scores != engine.rerank(QUERIES[2], DOCUMENTS).scores


def test_truncation_matches_model_card_at_short_max_length(tiny_reranker_path, engine):
    short = engine_variant(engine, max_length=SHORT_MAX_LENGTH)
    reference = ModelCardReranker(str(tiny_reranker_path), max_length=SHORT_MAX_LENGTH)
    documents = DOCUMENTS + [LONG_DOCUMENT, DOCUMENTS[1] * 4]
    for query in QUERIES[:3]:
        result = short.rerank(query, documents)
        assert max_abs_diff(result.scores, reference.scores(query, documents)) <= TOLERANCE
        assert result.token_counts == reference.token_counts(query, documents)
        assert max(result.token_counts) == SHORT_MAX_LENGTH


def test_truncation_cuts_only_the_document_and_keeps_the_suffix(engine):
    job = engine.tokenize(QUERIES[0], [LONG_DOCUMENT, "short"])
    long_tail, short_tail = (tail.tolist() for tail in job.tail_ids)
    suffix, prefix = engine.suffix_ids.tolist(), engine.prefix_ids.tolist()
    assert job.token_counts[0] == engine.max_length
    assert long_tail[-len(suffix):] == suffix and short_tail[-len(suffix):] == suffix
    assert job.head_ids.tolist()[:len(prefix)] == prefix
    text = engine.tokenizer.decode(job.head_ids.tolist() + long_tail)
    assert QUERIES[0] in text and text.endswith("<think>\n\n</think>\n\n")


def test_query_too_long_is_an_input_error(engine):
    with pytest.raises(EngineInputError) as error:
        engine.tokenize("query " * 9000, ["doc"])
    assert error.value.param == "query" and "max_length 8192" in error.value.message


def test_max_tokens_per_doc_caps_each_document(engine):
    job = engine.tokenize(QUERIES[0], [LONG_DOCUMENT, "tiny doc"], max_tokens_per_doc=20)
    marker = engine._min_document_tokens
    assert len(job.tail_ids[0]) == marker + 20 + len(engine.suffix_ids)
    assert job.tail_ids[1].tolist() == engine.tokenize(QUERIES[0], ["tiny doc"]).tail_ids[0].tolist()


def test_truncate_false_refuses_a_document_that_does_not_fit(engine):
    with pytest.raises(EngineInputError) as error:
        engine.tokenize(QUERIES[0], [DOCUMENTS[0], LONG_DOCUMENT], truncate=False)
    assert error.value.param == "documents" and "document 1" in str(error.value)
    fitting = engine.tokenize(QUERIES[0], DOCUMENTS, truncate=False)
    assert fitting.token_counts == engine.tokenize(QUERIES[0], DOCUMENTS).token_counts


def test_logits_are_the_raw_scores_behind_the_probabilities(engine, reference):
    # TEI's raw_scores: logit(P(yes)) = log P(yes) - log P(no) of the model card's two-way softmax.
    result = engine.rerank(QUERIES[1], DOCUMENTS)
    expected = [torch.logit(torch.tensor(p, dtype=torch.float64)).item()
                for p in reference.scores(QUERIES[1], DOCUMENTS)]
    assert max_abs_diff(result.logits, expected) <= 1e-4
    assert max_abs_diff(torch.sigmoid(torch.tensor(result.logits)).tolist(), result.scores) <= 1e-7


def test_empty_documents_list_is_an_input_error(engine):
    with pytest.raises(EngineInputError):
        engine.tokenize("q", [])



BATCHING_DOCUMENTS = DOCUMENTS + [LONG_DOCUMENT, DOCUMENTS[1] * 3]


@pytest.fixture(scope="module")
def default_batching_scores(engine):
    """The scores with the engine's own batching, computed once for every variant below (each run includes an
    8192-token document)."""
    return engine.rerank(QUERIES[1], BATCHING_DOCUMENTS).scores


@pytest.mark.parametrize("changes", [
    {"token_budget": 64},
    {"token_budget": 1_000_000, "max_batch_items": 1000},
    {"max_batch_items": 1},
    {"max_batch_items": 3, "token_budget": 600},
    {"reuse_query_prefix": False},
    {"reuse_query_prefix": False, "token_budget": 300},
    {"cut_last_layer": False},  # transformers' full forward: the last-layer cut changes nothing
    {"cut_last_layer": False, "reuse_query_prefix": False, "token_budget": 300},
])
def test_scores_do_not_depend_on_batching(engine, default_batching_scores, changes):
    variant = engine_variant(engine, **changes)
    assert max_abs_diff(variant.rerank(QUERIES[1], BATCHING_DOCUMENTS).scores, default_batching_scores) <= 1e-6


def test_packed_sequences_match_padded(engine):
    packed = engine_variant(engine, reuse_query_prefix=False)
    packed.runtime = dataclasses.replace(engine.runtime, pack_sequences=True)
    documents = DOCUMENTS
    assert max_abs_diff(packed.rerank(QUERIES[0], documents).scores,
                        engine.rerank(QUERIES[0], documents).scores) <= 1e-6


MIXED_MAX_LENGTH = 600  # LONG_DOCUMENT is cut to this: the mixed runs and their reference stay cheap
MIXED_REQUESTS = [  # (query, documents, instruction): short and long heads, 1 to 8 documents, tiny and cut ones
    (QUERIES[0] * 8, DOCUMENTS, None),
    (QUERIES[1], [LONG_DOCUMENT], None),
    (QUERIES[2], ["x", "", DOCUMENTS[1] * 3], "Find the passage that answers a question about animals"),
    (QUERIES[4], DOCUMENTS[3:5], ""),
    (QUERIES[3], [DOCUMENTS[0]], "指令 🐼"),
    (QUERIES[1], DOCUMENTS[5:] + [LONG_DOCUMENT, "ok"], None),
]


@pytest.fixture(scope="module")
def mixed(engine):
    """The mixed requests tokenized at MIXED_MAX_LENGTH, and each one's result when it runs alone."""
    short = engine_variant(engine, max_length=MIXED_MAX_LENGTH)
    jobs = [short.tokenize(query, documents, instruction) for query, documents, instruction in MIXED_REQUESTS]
    return short, jobs, [short.run([job])[0] for job in jobs]


@pytest.mark.parametrize("expand_shared_head", [True, False])
@pytest.mark.parametrize("changes", [
    {},
    {"token_budget": 64},  # one document per pass: every pass continues a single head
    {"token_budget": 300},
    {"token_budget": 1_000_000, "max_batch_items": 1000},  # one pass for all heads, one for all documents
    {"max_batch_items": 3, "cut_last_layer": False},
    {"max_length": 100},  # heads held in waves of at most 100 slots: a wave or two per head
])
def test_requests_sharing_passes_score_as_if_alone(mixed, changes, expand_shared_head):
    short, jobs, alone = mixed
    variant = engine_variant(short, runtime=dataclasses.replace(short.runtime, expand_shared_head=expand_shared_head),
                             **changes)
    together = variant.run(jobs[::-1])[::-1]
    for result, expected in zip(together, alone, strict=True):
        assert max_abs_diff(result.scores, expected.scores) <= 1e-6
        assert result.token_counts == expected.token_counts


def test_requests_sharing_passes_match_model_card(tiny_reranker_path, mixed):
    short, jobs, _ = mixed
    reference = ModelCardReranker(str(tiny_reranker_path), max_length=MIXED_MAX_LENGTH)
    for (query, documents, instruction), result in zip(MIXED_REQUESTS, short.run(jobs), strict=True):
        expected = reference.scores(query, documents, instruction=instruction, batch_size=2)
        assert max_abs_diff(result.scores, expected) <= TOLERANCE
        assert result.token_counts == reference.token_counts(query, documents, instruction=instruction)


def test_work_counters_count_every_pass_head_passes_included(engine):
    jobs = [engine.tokenize(query, DOCUMENTS[:count]) for query, count in zip(QUERIES, (1, 3, 8))]
    heads = [len(job.head_ids) for job in jobs]
    tails = [len(tail) for job in jobs for tail in job.tail_ids]
    roomy = engine_variant(engine, token_budget=1_000_000, max_batch_items=1000)
    before = roomy.work.snapshot()
    roomy.run(jobs)
    together = roomy.work.since(before)
    assert together.micro_batches == 2  # every head in one pass, then every document in one
    assert together.real_tokens == sum(heads) + sum(tails)  # each head once
    assert together.computed_slots == len(heads) * max(heads) + len(tails) * max(tails)
    assert together.tokens_per_pass == together.real_tokens / 2
    before = roomy.work.snapshot()
    for job in jobs:
        roomy.run([job])
    # Alone, a one-document request has no head to reuse and runs whole in one pass; the others take two.
    assert roomy.work.since(before).micro_batches == 1 + 2 + 2


def test_a_run_of_one_document_requests_takes_one_pass_and_the_same_scores(engine):
    jobs = [engine.tokenize(query, DOCUMENTS[i:i + 1]) for i, query in enumerate(QUERIES)]
    roomy = engine_variant(engine, token_budget=1_000_000, max_batch_items=1000)
    before = roomy.work.snapshot()
    alone = roomy.run(jobs)
    assert roomy.work.since(before).micro_batches == 1
    # The same requests beside a multi-document one take the shared-head path: the scores must not move.
    beside = roomy.run(jobs + [engine.tokenize(QUERIES[0], DOCUMENTS[:2])])
    for one, other in zip(alone, beside):
        assert max_abs_diff(one.scores, other.scores) <= 1e-6


def test_document_order_does_not_change_scores(engine):
    forward = engine.rerank(QUERIES[0], DOCUMENTS).scores
    backward = engine.rerank(QUERIES[0], DOCUMENTS[::-1]).scores
    assert max_abs_diff(forward, backward[::-1]) <= 1e-6


def test_untied_checkpoint_drops_the_lm_head_and_keeps_parity(tmp_path):
    # The 8B reranker has an untied LM head: only the yes/no difference vector must survive loading.
    path = build_checkpoint(tmp_path / "untied", "rerank", "tiny", tie_word_embeddings=False, seed=1)
    engine = Qwen3Reranker.from_pretrained(str(path), device="cpu")
    assert not any("lm_head" in name for name, _ in engine.backbone.named_parameters())
    assert engine.score_direction.dtype == torch.float32
    reference = ModelCardReranker(str(path))
    assert max_abs_diff(engine.rerank(QUERIES[0], DOCUMENTS).scores,
                        reference.scores(QUERIES[0], DOCUMENTS)) <= TOLERANCE
