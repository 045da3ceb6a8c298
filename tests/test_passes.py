"""Bounded engine runs (serve_app/replica/passes.py): what one run takes from a queue, and the models' parts (a
request run in parts, joined, is the request run whole). Planner: pure bookkeeping; parts: the tiny engines."""

import numpy as np
import pytest

from models import Qwen3Embedder, Qwen3Reranker
from models.embedder import EmbedResult
from models.reranker import RerankResult
from serve_app.replica.autoscaling import job_work
from serve_app.replica.passes import PassPlanner, Pending, pass_bound
from tests.helpers import engine_variant
from tests.texts import DOCUMENTS, QUERIES


def any_token(pending: Pending, room: int) -> int:  # a cut at any token (the simulation's)
    return room


def run(planner: PassPlanner, bound: int | None, max_tokens: int = 10**9) -> list[tuple[str, int]]:
    return [(pending.item, share) for pending, share in planner.next_run(bound, any_token, max_tokens)]


def test_the_bound_is_the_time_at_the_measured_rate_within_limits():
    assert pass_bound(40_000, 0.25, 65_536, 1024) == 10_000
    # Never below the engine's micro-batch budget: on the 2-core CPU, runs bounded at a quarter second (about 400
    # tokens) made a long rerank 2.4x slower, at the 1,024-token budget 1.13x (bench/pass_bench.py).
    assert pass_bound(188, 0.25, 65_536, 1024) == 1024
    assert pass_bound(40_000, 0.25, 65_536, 32_768) == 32_768
    assert pass_bound(10**7, 0.25, 65_536, 1024) == 65_536
    assert pass_bound(40_000, 0.25, 8_192, 32_768) == 8_192  # max_batch_tokens bounds it all
    assert pass_bound(40_000, None, 65_536, 1024) is None


def test_whole_requests_gather_oldest_first_up_to_the_bound_and_at_least_one():
    planner = PassPlanner()
    for name, tokens in [("a", 400), ("b", 500), ("c", 300)]:
        planner.add(Pending(name, tokens), bound=1000)
    assert run(planner, 1000) == [("a", 400), ("b", 500)]
    assert run(planner, 1000) == [("c", 300)] and not planner
    planner.add(Pending("big", 5000), bound=None)  # unbounded: a request is never cut, and runs alone
    planner.add(Pending("small", 10), bound=None)
    assert run(planner, None, max_tokens=1000) == [("big", 5000)]
    assert run(planner, None, max_tokens=1000) == [("small", 10)]


def test_a_request_over_the_bound_runs_in_parts_and_newcomers_go_in_between():
    planner = PassPlanner()
    planner.add(Pending("huge", 2500), bound=1000)
    assert run(planner, 1000) == [("huge", 1000)]
    planner.add(Pending("small", 100), bound=1000)  # arrives during the first part
    planner.add(Pending("medium", 600), bound=1000)
    # Whole requests take up to half the bound (at least one) while a request runs in parts; its next part fills
    # the rest, and never less than half.
    assert run(planner, 1000) == [("small", 100), ("huge", 900)]
    assert run(planner, 1000) == [("medium", 600), ("huge", 500)]
    assert run(planner, 1000) == [("huge", 100)] and not planner


def test_requests_in_parts_take_turns_so_a_short_one_is_not_stuck_behind_a_long_one():
    planner = PassPlanner()
    planner.add(Pending("long", 10_000), bound=1000)
    planner.add(Pending("short", 1500), bound=1000)
    taken = [run(planner, 1000)[0] for _ in range(4)]
    assert taken == [("long", 1000), ("short", 1000), ("long", 1000), ("short", 500)]


def test_requests_no_one_waits_for_are_dropped():
    planner = PassPlanner()
    for name, tokens in [("gone", 100), ("kept", 100), ("gone in parts", 5000)]:
        planner.add(Pending(name, tokens), bound=1000)
    planner.drop(lambda pending: pending.item.startswith("gone"))
    assert len(planner) == 1 and run(planner, 1000) == [("kept", 100)]


def run_in_parts(engine, job, size: int):
    return [engine.run([job.part(start, min(start + size, len(job.token_counts)))])[0]
            for start in range(0, len(job.token_counts), size)]


def test_a_rerank_run_in_parts_is_the_rerank_run_whole(tiny_reranker_path):
    # Short windows, so one long document has several (chunked) and parts must keep a document's windows together.
    engine = engine_variant(Qwen3Reranker.from_pretrained(str(tiny_reranker_path), device="cpu"), max_length=160)
    long = " ".join(f"Sentence {i} about pandas and bamboo in the mountains." for i in range(40))
    job = engine.tokenize(QUERIES[0], [*DOCUMENTS[:3], long, *DOCUMENTS[3:6]], max_chunks_per_doc=8)
    assert len(job.tail_ids) > len(job.token_counts)  # the long document has several windows
    # Parts are sized in the engine's work, which runs to nothing once every unit is taken.
    assert job.shared_work + sum(job.unit_work) == job_work(job) and len(job.unit_work) == len(job.token_counts)
    whole = engine.run([job])[0]
    for size in (1, 2, 3):
        joined = RerankResult.joined(run_in_parts(engine, job, size))
        assert joined.token_counts == whole.token_counts and joined.windows == whole.windows
        assert joined.scores == pytest.approx(whole.scores, abs=1e-6)
        assert joined.logits == pytest.approx(whole.logits, abs=1e-5)


def test_embeddings_run_in_parts_are_the_embeddings_run_whole(tiny_embedder_path):
    engine = Qwen3Embedder.from_pretrained(str(tiny_embedder_path), device="cpu")
    job = engine.tokenize([*DOCUMENTS[:5], "short"], dimensions=40)
    assert job.shared_work + sum(job.unit_work) == job_work(job)
    whole = engine.run([job])[0]
    joined = EmbedResult.joined(run_in_parts(engine, job, 2))
    assert joined.token_counts == whole.token_counts and joined.embeddings.shape == whole.embeddings.shape
    np.testing.assert_allclose(joined.embeddings, whole.embeddings, atol=1e-6)
