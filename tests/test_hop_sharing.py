"""Concurrent requests sharing the hop to their model (serve_app/gateway/hop_sharing.py, the replica's serve_group).

Three levels: the gateway's ModelCalls against a fake handle (which call is made when, and each request's answer,
error, retry and cancellation); the model replica's plain class (a group's results are a single call's, exactly);
and the real served app (answers, per-request errors and usage rows under concurrency).
"""

import asyncio

import httpx
import numpy as np
import pytest
from ray.exceptions import RayActorError
from sqlalchemy import select

from serve_app.accounts.store import connect, usage_records
from serve_app.config import GatewayConfig
from serve_app.errors import InvalidRequest, ServingError
from serve_app.gateway.directory import ModelEntry
from serve_app.gateway.handling import ModelCalls
from serve_app.gateway.hop_sharing import MAX_SHARED_CHARS
from tests.serving import EMBEDDER, RERANKER, application

# ---- the gateway side, against a fake model handle -----------------------------------------------------------


class FakeResponse:
    """A DeploymentResponse whose answer the test gives."""

    def __init__(self, method: str, args: tuple, kwargs: dict):
        self.method, self.args, self.kwargs = method, args, kwargs
        self.future = asyncio.get_running_loop().create_future()
        self.cancelled = False

    def __await__(self):
        return self.future.__await__()

    def cancel(self):
        self.cancelled = True
        if not self.future.done():
            self.future.cancel()

    def answer(self, value):
        self.future.set_result(value)


class FakeHandle:
    def __init__(self):
        self.sent: list[FakeResponse] = []

    def __getattr__(self, method: str):
        handle = self

        class Method:
            def remote(self, *args, **kwargs):
                response = FakeResponse(method, args, kwargs)
                handle.sent.append(response)
                return response

        return Method()


class FakeDirectory:
    def was_removed(self, entry) -> bool:
        return False

    def names_text(self) -> str:
        return "m"


class ManualTimers:
    """The sharer's max_wait_ms timers, fired only when a test says so: no test here depends on the clock."""

    class Timer:
        def __init__(self, callback):
            self.callback, self.cancelled = callback, False

        def cancel(self):
            self.cancelled = True

    def __init__(self):
        self.started: list[ManualTimers.Timer] = []

    def __call__(self, delay: float, callback) -> Timer:
        self.started.append(self.Timer(callback))
        return self.started[-1]

    def fire(self):
        started, self.started = self.started, []
        for timer in started:
            if not timer.cancelled:
                timer.callback()


def model_calls(call_options=None, **sharing) -> tuple[ModelCalls, FakeHandle, ModelEntry]:
    handle = FakeHandle()
    entry = ModelEntry("m", 1.0, {"name": "m", "task": "rerank", "serves_groups": ["rerank", "embed"]}, handle)
    config = GatewayConfig(hop_sharing=sharing)
    calls = ModelCalls(FakeDirectory(), config, call_options=call_options)
    if calls.sharer is not None:
        calls.sharer.call_later = ManualTimers()
    return calls, handle, entry


async def settle():
    """Let every ready task run to its next wait."""
    for _ in range(10):
        await asyncio.sleep(0)


def rerank(calls: ModelCalls, entry: ModelEntry, query: str, documents=("d",)) -> asyncio.Task:
    return asyncio.create_task(calls.call(entry, "rerank", query, list(documents)))


def test_a_lone_request_goes_at_once_and_those_arriving_meanwhile_share_the_next_call():
    async def scenario():
        calls, handle, entry = model_calls()
        first = rerank(calls, entry, "q0")
        await settle()
        assert [(r.method, r.args) for r in handle.sent] == [("rerank", ("q0", ["d"]))]  # no wait when idle
        others = [rerank(calls, entry, f"q{n}") for n in (1, 2, 3)]
        await settle()
        assert len(handle.sent) == 1  # they wait for the call in flight
        handle.sent[0].answer({"scores": [0.0]})
        assert await first == {"scores": [0.0]}
        await settle()
        [group] = handle.sent[1:]
        assert (group.method, group.args) == ("serve_group", ("rerank", [["q1", ["d"]], ["q2", ["d"]], ["q3", ["d"]]]))
        # Each request gets its own outcome: an answer, or the error the replica raised for it alone.
        group.answer([{"scores": [1.0]}, InvalidRequest("no documents", param="documents"), {"scores": [3.0]}])
        assert await others[0] == {"scores": [1.0]} and await others[2] == {"scores": [3.0]}
        with pytest.raises(InvalidRequest) as refused:
            await others[1]
        assert refused.value.status == 400 and refused.value.param == "documents"
        assert calls.sharer.stats == {"calls": 2, "groups": 1, "grouped_requests": 3, "sent_back": 0}

    asyncio.run(scenario())


def test_a_request_cancelled_while_it_waits_is_never_sent():
    async def scenario():
        calls, handle, entry = model_calls()
        first = rerank(calls, entry, "q0")
        await settle()
        waiting = [rerank(calls, entry, f"q{n}") for n in (1, 2, 3)]
        await settle()
        waiting[1].cancel()  # its client disconnected
        await settle()
        handle.sent[0].answer({"scores": [0.0]})
        await first
        await settle()
        assert handle.sent[1].args == ("rerank", [["q1", ["d"]], ["q3", ["d"]]])
        waiting[2].cancel()  # the last one left too: a lone request goes by the single method
        handle.sent[1].answer([{"scores": [1.0]}, {"scores": [3.0]}])
        assert await waiting[0] == {"scores": [1.0]}
        assert waiting[1].cancelled() and waiting[2].cancelled()

        # Cancelled before the group is sent, leaving one: that one goes alone, by its own method.
        first = rerank(calls, entry, "q4")
        await settle()
        waiting = [rerank(calls, entry, f"q{n}") for n in (5, 6)]
        await settle()
        waiting[0].cancel()
        await settle()
        handle.sent[2].answer({"scores": [4.0]})
        await first
        await settle()
        assert (handle.sent[3].method, handle.sent[3].args) == ("rerank", ("q6", ["d"]))

    asyncio.run(scenario())


def test_a_request_cancelled_after_the_group_was_sent_is_dropped_and_the_last_one_out_cancels_the_call():
    async def scenario():
        calls, handle, entry = model_calls(max_items=2)
        first = rerank(calls, entry, "q0")
        await settle()
        a, b = rerank(calls, entry, "a"), rerank(calls, entry, "b")
        await settle()
        group = handle.sent[1]  # max_items reached: sent at once, while the first call is still in flight
        assert group.method == "serve_group"
        a.cancel()
        await settle()
        assert not group.cancelled  # b still waits for it
        group.answer([{"scores": [1.0]}, {"scores": [2.0]}])
        assert await b == {"scores": [2.0]} and a.cancelled()

        c, d = rerank(calls, entry, "c"), rerank(calls, entry, "d")
        await settle()
        second_group = handle.sent[2]
        c.cancel()
        d.cancel()
        await settle()
        assert second_group.cancelled  # nobody waits for it: the model's work is cancelled
        handle.sent[0].answer({"scores": [0.0]})
        await first

    asyncio.run(scenario())


async def two_grouped_behind_a_lone_call(calls, handle, entry):
    """Requests a and b arrive while a lone request's call is in flight; once it is answered they go as one group
    (handle.sent[1])."""
    first = rerank(calls, entry, "q0")
    await settle()
    a, b = rerank(calls, entry, "a"), rerank(calls, entry, "b")
    await settle()
    handle.sent[0].answer({"scores": [0.0]})
    await first
    await settle()
    return a, b


def test_a_group_whose_replica_died_is_retried_request_by_request():
    async def scenario():
        calls, handle, entry = model_calls()
        a, b = await two_grouped_behind_a_lone_call(calls, handle, entry)
        handle.sent[1].future.set_exception(RayActorError())  # the replica died holding the group
        await settle()
        # Each request retries as its single call would: the first alone, the other waiting for it.
        assert [(r.method, r.args) for r in handle.sent[2:]] == [("rerank", ("a", ["d"]))]
        handle.sent[2].answer({"scores": [1.0]})
        await settle()
        handle.sent[3].answer({"scores": [2.0]})
        assert (await a, await b) == ({"scores": [1.0]}, {"scores": [2.0]})
        assert handle.sent[3].args == ("b", ["d"])

    asyncio.run(scenario())


def test_requests_a_full_replica_sends_back_go_alone():
    async def scenario():
        calls, handle, entry = model_calls()
        a, b = await two_grouped_behind_a_lone_call(calls, handle, entry)
        handle.sent[1].answer([{"scores": [1.0]}, None])  # the replica held max_ongoing_requests already
        await settle()
        assert (handle.sent[2].method, handle.sent[2].args) == ("rerank", ("b", ["d"]))
        handle.sent[2].answer({"scores": [2.0]})
        assert (await a, await b) == ({"scores": [1.0]}, {"scores": [2.0]})
        assert calls.sharer.stats["sent_back"] == 1

    asyncio.run(scenario())


def test_the_wait_is_bounded_and_large_requests_never_wait():
    async def scenario():
        calls, handle, entry = model_calls()
        first = rerank(calls, entry, "q0")
        await settle()
        large = rerank(calls, entry, "large", ["x" * (MAX_SHARED_CHARS + 1)])
        a, b = rerank(calls, entry, "a"), rerank(calls, entry, "b")
        await settle()
        assert [r.method for r in handle.sent] == ["rerank", "rerank"]  # the large request went at once, alone
        calls.sharer.call_later.fire()  # max_wait_ms passes
        await settle()
        # The small ones went when their wait ran out, though the first call has not returned.
        assert [r.method for r in handle.sent] == ["rerank", "rerank", "serve_group"]
        for response, answer in zip(handle.sent, ({"scores": [0.0]}, {"scores": [9.0]},
                                                  [{"scores": [1.0]}, {"scores": [2.0]}])):
            response.answer(answer)
        assert [await t for t in (first, large, a, b)] == [{"scores": [s]} for s in (0.0, 9.0, 1.0, 2.0)]

    asyncio.run(scenario())


def test_with_more_calls_allowed_in_flight_requests_wait_only_past_them():
    async def scenario():
        calls, handle, entry = model_calls(max_calls_in_flight=2)
        first, second = rerank(calls, entry, "q0"), rerank(calls, entry, "q1")
        a, b = rerank(calls, entry, "a"), rerank(calls, entry, "b")
        await settle()
        assert [r.method for r in handle.sent] == ["rerank", "rerank"]  # two at once; the others wait for one
        handle.sent[1].answer({"scores": [1.0]})
        await settle()
        assert (handle.sent[2].method, handle.sent[2].args) == ("serve_group", ("rerank", [["a", ["d"]], ["b", ["d"]]]))
        handle.sent[0].answer({"scores": [0.0]})
        handle.sent[2].answer([{"scores": [2.0]}, {"scores": [3.0]}])
        assert [await t for t in (first, second, a, b)] == [{"scores": [s]} for s in (0.0, 1.0, 2.0, 3.0)]

    asyncio.run(scenario())


def test_background_calls_never_share_a_call_with_online_ones():
    async def scenario():
        calls, handle, entry = model_calls(call_options={"background": True})
        sharer = calls.sharer
        online = asyncio.ensure_future(sharer.send(entry, "rerank", ("q", ["d"]), {}))
        background = asyncio.ensure_future(sharer.send(entry, "rerank", ("q", ["d"]), {"background": True}))
        await settle()
        assert [r.kwargs for r in handle.sent] == [{}, {"background": True}]  # two lanes: both went at once
        # The runner's own calls carry its options, in groups too.
        waiting = [asyncio.create_task(calls.call(entry, "rerank", "q", ["d"])) for _ in range(2)]
        await settle()
        handle.sent[1].answer({"scores": [0.0]})
        await settle()
        assert (handle.sent[2].method, handle.sent[2].kwargs) == ("serve_group", {"background": True})
        handle.sent[0].answer({"scores": [0.0]})
        handle.sent[2].answer([{"scores": [1.0]}, {"scores": [2.0]}])
        assert await online == await background == {"scores": [0.0]}
        assert [await t for t in waiting] == [{"scores": [1.0]}, {"scores": [2.0]}]

    asyncio.run(scenario())


def test_methods_the_replica_does_not_group_always_get_their_own_call():
    """TEI's and vLLM's tokenize and detokenize go through the same ModelCalls, but serve_group runs rerank and
    embed only: concurrent tokenize calls must each go alone, never as a group the replica would refuse."""
    async def scenario():
        calls, handle, entry = model_calls()
        tasks = [asyncio.create_task(calls.call(entry, "tokenize", [f"text {n}"], True, None, None)) for n in range(3)]
        await settle()
        assert [r.method for r in handle.sent] == ["tokenize"] * 3
        for response in handle.sent:
            response.answer({"tokens": []})
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_off_or_with_models_that_cannot_answer_groups_every_request_has_its_own_call():
    async def scenario():
        for calls, handle, entry in (model_calls(enabled=False), model_calls()):
            if calls.sharer is not None:
                entry = ModelEntry("m", 1.0, {"name": "m", "task": "rerank"}, handle)  # an older replica
            tasks = [rerank(calls, entry, f"q{n}") for n in range(3)]
            await settle()
            assert [r.method for r in handle.sent] == ["rerank"] * 3
            for response in handle.sent:
                response.answer({"scores": [0.0]})
            await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_a_lone_call_ends_once_however_it_ends_and_idle_lanes_are_forgotten():
    async def scenario():
        calls, handle, entry = model_calls()
        task = rerank(calls, entry, "q")
        await settle()
        handle.sent[0].answer({"scores": [0.0]})
        await task
        await settle()
        assert calls.sharer._lanes == {}
        cancelled = rerank(calls, entry, "gone")  # its client disconnects while its own call is in flight
        await settle()
        cancelled.cancel()
        await settle()
        assert handle.sent[1].cancelled and calls.sharer._lanes == {}
        after = rerank(calls, entry, "next")  # nothing in flight any more: it goes at once
        await settle()
        assert (handle.sent[2].method, handle.sent[2].args) == ("rerank", ("next", ["d"]))
        handle.sent[2].answer({"scores": [1.0]})
        assert await after == {"scores": [1.0]}

    asyncio.run(scenario())


# ---- the model replica's serve_group, on the plain class -----------------------------------------------------

# Each job below is over max_batch_tokens (256): it skips @serve.batch (which needs a running Serve replica) and the
# engine runs it alone, so a group's results must equal single calls' bit for bit. LONG is 272 tokens.
LONG = "a long document about pandas and bamboo forests in the mountains of Sichuan " * 18


@pytest.fixture
def servers(tiny_reranker_path, tiny_embedder_path):
    """A tiny reranker and embedder per test: a replica's engine loop belongs to the event loop it first ran on."""
    from serve_app.replica.deployment import ModelServer

    made = {}
    for task, path in (("rerank", tiny_reranker_path), ("embed", tiny_embedder_path)):
        server = ModelServer.func_or_class({"name": task, "task": task, "source": str(path), "device": "cpu",
                                            "deployment": {"max_ongoing_requests": 4}})
        server.reconfigure({"max_batch_tokens": 256})
        made[task] = server
    return made


def test_a_group_answers_each_call_exactly_as_a_single_call(servers):
    rerank_calls = [["query one", [LONG, LONG + "end"]], ["query two", [LONG * 2], "Judge the document."],
                    ["query three", [LONG, "short", "a"]]]
    embed_calls = [[[LONG, LONG * 2]], [[LONG + "!"], "Represent this", 32], [[LONG, "short"], None, 64]]

    async def scenario():
        singles = {"rerank": [await servers["rerank"].rerank(*args) for args in rerank_calls],
                   "embed": [await servers["embed"].embed(*args) for args in embed_calls]}
        groups = {"rerank": await servers["rerank"].serve_group("rerank", rerank_calls),
                  "embed": await servers["embed"].serve_group("embed", embed_calls)}
        return singles, groups

    singles, groups = asyncio.run(scenario())
    for single, grouped in zip(singles["rerank"], groups["rerank"]):
        assert grouped["scores"] == single["scores"] and grouped["logits"] == single["logits"]
        assert grouped["token_counts"] == single["token_counts"] and grouped["windows"] == single["windows"]
    for single, grouped in zip(singles["embed"], groups["embed"]):
        assert np.array_equal(grouped["embeddings"], single["embeddings"])
        assert grouped["token_counts"] == single["token_counts"]
    assert servers["rerank"]._stats["groups"] == 1 and servers["rerank"]._stats["grouped_requests"] == 3


def test_a_bad_call_in_a_group_fails_alone(servers):
    async def scenario():
        return await servers["embed"].serve_group("embed", [[[LONG]], [[LONG], None, 10**6], [[LONG + "."]]])

    good, bad, other = asyncio.run(scenario())
    assert isinstance(bad, InvalidRequest) and bad.status == 400 and bad.param == "dimensions"
    assert good["embeddings"].shape[0] == 1 and other["embeddings"].shape[0] == 1


def test_a_full_replica_sends_the_rest_of_a_group_back(servers):
    server = servers["rerank"]  # max_ongoing_requests 4

    async def scenario():
        return await server.serve_group("rerank", [["q", [LONG]]] * 6)

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, dict) for o in outcomes[:4]) and outcomes[4:] == [None, None]
    with pytest.raises(InvalidRequest):
        asyncio.run(server.serve_group("describe", []))


def test_models_on_the_request_count_policy_take_no_groups(tiny_reranker_path):
    """Serve's request-count policy scales on ongoing handle calls: a group would count once, so a model on it gets
    none. The queued-work policy counts the tokens each request holds, so its models take groups."""
    from serve_app.replica.deployment import ModelServer

    def facts(deployment: dict) -> dict:
        server = ModelServer.func_or_class({"name": "r", "task": "rerank", "source": str(tiny_reranker_path),
                                            "device": "cpu", "deployment": deployment})
        return asyncio.run(server.describe())

    assert facts({"num_replicas": 2})["serves_groups"] == ["rerank", "embed"]
    assert facts({"autoscaling": {"min_replicas": 1, "max_replicas": 4}})["serves_groups"] == []
    assert facts({"autoscaling": {"min_replicas": 1, "max_replicas": 4,
                                  "queued_work": {"target_queue_seconds": 1}}})["serves_groups"] == ["rerank", "embed"]


# ---- the real served app ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines_run_jobs_alone(served, serve_config):
    """The served models with max_batch_tokens 256 (a user_config change: no restart), so each of the requests below
    (each over 256 tokens) runs alone in the engine, and its answer cannot depend on what shared its forward pass:
    grouped or not, it must be the single call's bit for bit."""
    import copy

    changed = copy.deepcopy(serve_config)
    for name in (RERANKER, EMBEDDER):
        application(changed, name)["deployments"] = [{"name": "ModelServer", "user_config": {"max_batch_tokens": 256}}]
    served.deploy(changed)
    try:
        yield
    finally:
        served.deploy(serve_config)


def grouped_requests(served) -> int:
    return sum(served.model_handle(app).stats.remote().result(timeout_s=30)["grouped_requests"]
               for app in (RERANKER, EMBEDDER))


def test_concurrent_requests_share_calls_and_each_keeps_its_answer_error_and_usage_row(
        served, engines_run_jobs_alone, key_store, key_database):
    key, secret = key_store.create("hop-sharing")
    headers = {"Authorization": f"Bearer {secret}"}
    workload = []
    for n in range(16):
        if n % 2:
            workload.append(("/v1/embeddings", {"model": EMBEDDER, "input": [LONG * (1 + n % 3), f"text {n}"]}))
        else:
            workload.append(("/v1/rerank", {"model": RERANKER, "query": f"query {n}",
                                            "documents": [LONG * (1 + n % 4), f"document {n}"]}))
    # Errors the model replica raises for one request: each must come back to that request alone.
    bad = [("/v1/embeddings", {"model": EMBEDDER, "input": [LONG], "dimensions": 10**6}, "dimensions"),
           ("/rerank", {"model": RERANKER, "query": "q", "texts": ["short", "word " * 9000], "truncate": False},
            "texts")]

    def answer(path: str, response: httpx.Response):
        body = response.json()
        if path == "/v1/embeddings":
            return [item["embedding"] for item in body["data"]]
        return sorted((r["index"], r["relevance_score"]) for r in body["results"])

    with httpx.Client(base_url=served.url, headers=headers, timeout=120) as client:
        alone = [answer(path, client.post(path, json=body)) for path, body in workload]

    async def burst():
        async with httpx.AsyncClient(base_url=served.url, headers=headers, timeout=120) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body, *_ in workload + bad))

    before = grouped_requests(served)
    served_ok, bursts = [], 0
    # Whether requests meet a call in flight depends on timing; a burst of 18 on two gateway replicas nearly always
    # makes groups, and the bursts repeat (up to 5) until the models have answered at least one.
    while bursts < 5 and (bursts == 0 or grouped_requests(served) == before):
        responses = asyncio.run(burst())
        bursts += 1
        for (path, _), response, single in zip(workload, responses, alone):
            assert response.status_code == 200, response.text
            assert answer(path, response) == single  # exactly the answer it got alone
            served_ok.append(response)
        for (path, _, param), response in zip(bad, responses[len(workload):]):
            assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
            assert "X-Usage-Id" not in response.headers
    assert grouped_requests(served) > before, "no request shared a call in 5 bursts: the test proved nothing"
    with connect(key_database).connect() as connection:
        rows = [row.request_id for row in connection.execute(
            select(usage_records.c.request_id).where(usage_records.c.key_id == key.id))]
    # One row per answered request, alone or grouped: the sequential ones' and every burst's 200s, none twice.
    assert len(rows) == len(set(rows)) == len(workload) + len(served_ok)
    assert {r.headers["X-Usage-Id"] for r in served_ok} <= set(rows)


def test_serving_error_kinds_cross_the_hop_intact():
    """A per-request error travels in a list (pickled with the rest of the answer): it must keep its kind, param,
    code and headers, as a ServingError raised by the replica does."""
    import pickle

    error = InvalidRequest("bad", param="texts", code="x", headers={"Retry-After": "1"})
    copy = pickle.loads(pickle.dumps([{"scores": [1.0]}, error]))[1]
    assert isinstance(copy, InvalidRequest) and isinstance(copy, ServingError)
    assert (copy.message, copy.param, copy.code, copy.headers) == ("bad", "texts", "x", {"Retry-After": "1"})
