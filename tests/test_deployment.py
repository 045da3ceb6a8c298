"""The model deployment's own logic, on the plain class (no Ray): failure isolation, health, batch sizing."""

import asyncio

import pytest

from models.reranker import RerankJob
from serve_app.errors import InternalError, Overloaded
from serve_app.replica.deployment import ModelServer, job_tokens
from tests.helpers import replica_without_ray


def tiny_reranker(path) -> dict:
    return {"name": "r", "task": "rerank", "source": str(path), "device": "cpu"}


@pytest.fixture(scope="module")
def server(tiny_reranker_path):
    return ModelServer.func_or_class({"name": "r", "task": "rerank", "source": str(tiny_reranker_path),
                                      "device": "cpu"})


def test_one_bad_job_fails_only_itself(server):
    good = server.engine.tokenize("q", ["a document", "another"])
    bad = RerankJob(head_ids=[10**9], tail_ids=[[1, 2, 3]])  # a token id outside the vocabulary
    results = server._run_isolated([good, bad, good])
    assert isinstance(results[1], InternalError) and results[1].status == 500
    expected = server.engine.run([good])[0].scores
    assert results[0].scores == pytest.approx(expected, abs=1e-6)
    assert results[2].scores == pytest.approx(expected, abs=1e-6)


def test_health_check_passes_and_fails_with_the_engine(tiny_reranker_path):
    server = ModelServer.func_or_class({"name": "r", "task": "rerank", "source": str(tiny_reranker_path),
                                        "device": "cpu"})
    asyncio.run(server.check_health())
    server.engine.backbone = None  # what a lost device or corrupted state looks like from here
    with pytest.raises(Exception):
        asyncio.run(server.check_health())


class Unsized:
    @property
    def num_tokens(self):
        raise RuntimeError("broken job")


@pytest.mark.parametrize("jobs, expected", [
    ([RerankJob(head_ids=[1, 2], tail_ids=[[3], [4, 5]])], 7),
    ([Unsized(), object(), None], 3),  # anything odd counts as one token, never raises
    ([], 0),
])
def test_batch_size_fn_never_raises(jobs, expected):
    assert job_tokens(jobs) == expected


def test_max_waiting_requests_refuses_at_once_while_the_engine_is_busy(tiny_reranker_path):
    server = ModelServer.func_or_class({"name": "r", "task": "rerank", "source": str(tiny_reranker_path),
                                        "device": "cpu", "deployment": {"backpressure_retry_after_s": 2}})
    # Every job here is over max_batch_tokens, so it skips @serve.batch (which needs a running Serve replica) and
    # goes straight to the engine queue, where admission is decided.
    # Runs unbounded in time (max_pass_seconds None): the heavy request is one run that the others wait behind.
    server.reconfigure({"max_waiting_requests": 0, "max_batch_tokens": 256, "max_pass_seconds": None})
    heavy = ["a long document about pandas and bamboo " * 40] * 300
    light = ["bamboo " * 300]

    async def in_forward_pass(request):
        task = asyncio.create_task(request)
        while not server._busy:
            await asyncio.sleep(0.005)
        return task

    async def scenario():
        running = await in_forward_pass(server.rerank("q", heavy))
        with pytest.raises(Overloaded) as refused:
            await server.rerank("q", light)
        assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "2"}
        assert len((await running)["scores"]) == 300
        assert len((await server.rerank("q", light))["scores"]) == 1  # the engine is free again: accepted

        # One may wait behind the pass.
        server.reconfigure({"max_waiting_requests": 1, "max_batch_tokens": 256, "max_pass_seconds": None})
        running = await in_forward_pass(server.rerank("q", heavy))
        waiting = asyncio.create_task(server.rerank("q", light))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await server.rerank("q", light)
        assert len((await running)["scores"]) == 300 and len((await waiting)["scores"]) == 1

    asyncio.run(scenario())


def test_an_idle_engine_runs_a_lone_request_at_once(tiny_reranker_path):
    server = ModelServer.func_or_class({"name": "r", "task": "rerank", "source": str(tiny_reranker_path),
                                        "device": "cpu"})
    # A long gather window: a lone request that entered @serve.batch would wait for it (and @serve.batch needs a
    # running Serve replica, so outside one it would not be answered at all).
    server.reconfigure({"max_wait_ms": 1000})

    async def scenario():
        for _ in range(3):
            await asyncio.wait_for(server.rerank("q", ["a document"]), timeout=30)

    asyncio.run(scenario())
    stats = server._stats
    assert stats["immediate_jobs"] == stats["jobs"] == stats["engine_runs"] == 3 and stats["batches"] == 0


def test_stats_count_the_forward_work_the_engine_did(tiny_reranker_path):
    """stats() reports what the forward passes held (bench/batch_bench.py reads it per phase): real tokens, padded
    slots and micro-batches, summed over the replica's runs exactly as the engine counted them."""
    server = ModelServer.func_or_class({"name": "r", "task": "rerank", "source": str(tiny_reranker_path),
                                        "device": "cpu"})

    async def scenario():
        await server.rerank("q", ["short", "a much longer document " * 20])
        await server.rerank("q", ["one more document"])

    asyncio.run(scenario())
    stats, work = server._stats, server.engine.work
    assert stats["engine_runs"] == 2 and stats["micro_batches"] == work.micro_batches >= 2
    assert stats["forward_tokens"] == work.real_tokens > 0
    assert stats["padded_slots"] == work.computed_slots > stats["forward_tokens"]  # the short document was padded


def test_requests_that_arrive_while_the_engine_is_busy_gather_for_its_next_pass(tiny_reranker_path):
    # The heavy request is one run (bounded runs: below).
    server, gathered = replica_without_ray(tiny_reranker(tiny_reranker_path), max_pass_seconds=None)
    heavy = ["a long document about pandas and bamboo " * 40] * 300
    waiting = [[f"document {i} about bamboo"] for i in range(3)]

    async def scenario():
        running = asyncio.create_task(server.rerank("q", heavy))
        while not server._busy:
            await asyncio.sleep(0.005)
        answers = await asyncio.gather(*(server.rerank("q", documents) for documents in waiting))
        await running
        return answers

    answers = asyncio.run(scenario())
    stats = server._stats
    assert stats["immediate_jobs"] == 1 and len(gathered) == 3  # the first found the engine idle; the rest waited
    assert stats["engine_runs"] == 2 and stats["largest_run_jobs"] == 3, stats  # the heavy one, then all three
    for documents, answer in zip(waiting, answers):
        assert answer["scores"] == pytest.approx(server.engine.rerank("q", documents).scores, abs=1e-6)


def in_finishing_order(finished: list[str]):
    """`tracked(name, request)`: awaits the request and appends its name to `finished` when it ends."""
    async def tracked(name, request):
        result = await request
        finished.append(name)
        return result

    return tracked


def test_background_jobs_yield_to_online_ones_and_never_count_against_admission(tiny_reranker_path):
    server = ModelServer.func_or_class({"name": "r", "task": "rerank", "source": str(tiny_reranker_path),
                                        "device": "cpu"})
    # Online jobs here are over max_batch_tokens, so they skip @serve.batch (which needs a running Serve replica).
    server.reconfigure({"max_waiting_requests": 1, "max_batch_tokens": 256})
    heavy = ["a long document about pandas and bamboo " * 40] * 300
    finished: list[str] = []
    tracked = in_finishing_order(finished)

    async def scenario():
        running = asyncio.create_task(tracked("heavy", server.rerank("q", heavy)))
        while not server._busy:
            await asyncio.sleep(0.005)
        background = [asyncio.create_task(tracked(f"batch-{i}", server.rerank("q", [f"doc {i}"], background=True)))
                      for i in range(3)]
        await asyncio.sleep(0.05)
        # Three background jobs wait, yet an online request is admitted (max_waiting_requests counts online only)
        # and runs before them.
        online = await tracked("online", server.rerank("q", ["bamboo " * 300]))
        await asyncio.gather(running, *background)
        return online

    assert len(asyncio.run(scenario())["scores"]) == 1
    # The online request runs between the heavy one's parts (bounded runs), so it may end first; the background jobs
    # wait for both.
    assert set(finished[:2]) == {"heavy", "online"} and sorted(finished[2:]) == ["batch-0", "batch-1", "batch-2"]
    assert server._stats["background_jobs"] == 3


def bounded_server(tiny_reranker_path):
    """A replica whose runs stop at 4,096 tokens (max_batch_tokens bounds max_pass_seconds' share of the tiny
    engine's throughput)."""
    return replica_without_ray(tiny_reranker(tiny_reranker_path), max_batch_tokens=4096, max_pass_seconds=0.25)[0]


HEAVY = ["a long document about pandas and bamboo " * 40] * 300  # about 90,000 tokens: 20-odd bounded runs


def test_a_long_request_runs_in_bounded_parts_and_a_short_one_ends_in_between(tiny_reranker_path):
    server = bounded_server(tiny_reranker_path)
    finished: list[str] = []
    tracked = in_finishing_order(finished)

    async def scenario():
        heavy = asyncio.create_task(tracked("heavy", server.rerank("q", HEAVY)))
        while not server._busy:  # its first part is running
            await asyncio.sleep(0.001)
        short = await tracked("short", server.rerank("q", ["Pandas eat bamboo."]))
        return await heavy, short

    heavy, short = asyncio.run(scenario())
    assert finished == ["short", "heavy"]
    stats = server._stats
    assert stats["jobs"] == 2 and stats["engine_runs"] >= 20, stats  # a request counts once, however many parts
    whole = server.engine.rerank("q", HEAVY)
    assert heavy["scores"] == pytest.approx(whole.scores, abs=1e-6) and heavy["token_counts"] == whole.token_counts
    assert short["scores"] == pytest.approx(server.engine.rerank("q", ["Pandas eat bamboo."]).scores, abs=1e-6)
    assert server.work.report(0.0, server.engine.work.real_tokens, 0)["online_tokens"] == 0  # nothing left held


def test_a_request_given_up_between_its_parts_runs_no_more_of_them(tiny_reranker_path):
    server = bounded_server(tiny_reranker_path)

    async def scenario():
        heavy = asyncio.create_task(server.rerank("q", HEAVY))
        while server._stats["engine_runs"] < 2:
            assert not heavy.done(), "the heavy request ran in fewer than 3 runs"
            await asyncio.sleep(0.001)
        heavy.cancel()  # what Serve does when the caller is gone
        at_cancel = server._stats["engine_runs"]
        await asyncio.sleep(0.5)  # the other parts would have run by now
        return at_cancel

    at_cancel = asyncio.run(scenario())
    assert server._stats["engine_runs"] <= at_cancel + 1  # at most the part running then
    assert server._stats["jobs"] == 0 and not server._engine_queue


def test_a_request_that_will_run_in_parts_skips_the_gathered_batch(tiny_reranker_path):
    """A gathered batch answers all its requests at once, so a request larger than a run must not join one: the
    small requests gathered with it would wait for its last part."""
    # Runs of the engine's 1,024-token budget; batches up to 65,536.
    server, gathered = replica_without_ray(tiny_reranker(tiny_reranker_path), max_pass_seconds=0.001)
    in_parts = ["a document about pandas and bamboo " * 10] * 40  # about 3,000 tokens: over a run, under a batch

    async def scenario():
        heavy = asyncio.create_task(server.rerank("q", HEAVY))
        while not server._busy:
            await asyncio.sleep(0.001)
        small, parted = await asyncio.gather(server.rerank("q", ["Pandas eat bamboo."]), server.rerank("q", in_parts))
        await heavy
        return small, parted

    small, parted = asyncio.run(scenario())
    assert len(gathered) == 1 and len(gathered[0].tail_ids) == 1  # only the small one was gathered
    assert server._stats["solo_jobs"] == 1 and len(parted["scores"]) == 40
