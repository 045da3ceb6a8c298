"""Serving behaviour beyond single requests: concurrent batching, live reconfiguration, redeploys, readiness."""

import asyncio
import copy
import time

import httpx
import pytest

from tests.reference import ModelCardReranker
from tests.serving import EMBEDDER, NARROW_RERANKER, RERANKER, application
from tests.texts import DOCUMENTS, NONEMPTY_QUERIES

TOLERANCE = 1e-5
EXTRA_EMBEDDER = "qwen3-embedding-extra"
STARTING_EMBEDDER = "qwen3-embedding-starting"
UNBUILT_RERANKER = "qwen3-reranker-unbuilt"


@pytest.fixture(scope="module")
def reference(tiny_reranker_path):
    return ModelCardReranker(str(tiny_reranker_path))


def stats(served, app: str) -> dict:
    return served.model_handle(app).stats.remote().result(timeout_s=30)


def test_concurrent_requests_share_batches_and_all_answers_are_right(served, reference):
    requests = [(NONEMPTY_QUERIES[i % len(NONEMPTY_QUERIES)], DOCUMENTS[i % 5:i % 5 + 1 + i % 4]) for i in range(64)]
    before = stats(served, RERANKER)

    async def send_all():
        async with httpx.AsyncClient(base_url=served.url, headers=served.headers, timeout=120) as client:
            return await asyncio.gather(*(
                client.post("/v1/rerank", json={"model": RERANKER, "query": q, "documents": d, "top_n": len(d)})
                for q, d in requests))

    responses = asyncio.run(send_all())
    after = stats(served, RERANKER)
    for (query, documents), response in zip(requests, responses):
        assert response.status_code == 200, response.text
        expected = reference.scores(query, documents)
        for result in response.json()["results"]:
            assert abs(result["relevance_score"] - expected[result["index"]]) <= TOLERANCE
    jobs, runs = after["jobs"] - before["jobs"], after["engine_runs"] - before["engine_runs"]
    assert jobs == 64
    assert runs < jobs, f"64 concurrent requests took {runs} engine runs: no forward pass was shared"
    assert after["largest_run_jobs"] > 1


def wait_for(condition, timeout_s=60, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def test_batching_changes_through_user_config_without_a_restart(served, serve_config):
    before = served.replicas()
    changed = copy.deepcopy(serve_config)
    application(changed, RERANKER)["deployments"] = [
        {"name": "ModelServer", "user_config": {"max_wait_ms": 7, "max_items": 16, "token_budget": 512}}]
    try:
        served.deploy(changed)
        wait_for(lambda: stats(served, RERANKER)["batching"]["max_wait_ms"] == 7, what="user_config applied")
        facts = served.model_handle(RERANKER).describe.remote().result(timeout_s=30)
        assert facts["token_budget"] == 512
        assert served.replicas() == before
    finally:
        served.deploy(serve_config)


def test_adding_and_removing_a_model_restarts_no_other_replica(served, serve_config):
    before = served.replicas()
    grown = copy.deepcopy(serve_config)
    extra = copy.deepcopy(application(grown, EMBEDDER))
    extra["name"] = extra["args"]["name"] = EXTRA_EMBEDDER
    extra["args"]["aliases"] = []
    grown["applications"].append(extra)
    try:
        served.deploy(grown)  # returns once the gateway serves the new model too
        after_add = served.replicas()
        assert {app: after_add[app] for app in before} == before, "a redeploy restarted replicas"
        response = httpx.post(f"{served.url}/v1/embeddings", json={"model": EXTRA_EMBEDDER, "input": "x"},
                                  headers=served.headers, timeout=60)
        assert response.status_code == 200
    finally:
        served.deploy(serve_config)
    after_remove = served.replicas()
    assert {app: after_remove[app] for app in before} == before
    assert not after_remove.get(EXTRA_EMBEDDER)  # being deleted: no running replica left
    response = httpx.post(f"{served.url}/v1/embeddings", json={"model": EXTRA_EMBEDDER, "input": "x"},
                                  headers=served.headers, timeout=60)
    assert response.status_code == 404


def test_a_model_that_cannot_start_yet_answers_503_and_ready_names_it(served, serve_config):
    """A model application that is deployed but has no running replica (here: it asks for more CPUs than the
    cluster has, so its replica waits for resources): its name and alias get 503 "is starting" with Retry-After,
    /ready (no key) is 503 naming it, a name nothing serves is still 404; once it is removed, /ready is 200."""
    grown = copy.deepcopy(serve_config)
    waiting = copy.deepcopy(application(grown, EMBEDDER))
    waiting["name"] = waiting["args"]["name"] = STARTING_EMBEDDER
    waiting["args"]["aliases"] = ["Org/Starting-Embedder"]
    # No room for it anywhere; and nothing to wait for when it is removed (its replica never started).
    waiting["args"]["deployment"].update(num_cpus=64, graceful_shutdown_timeout_s=0)
    grown["applications"].append(waiting)

    def ready_answer(status: int) -> httpx.Response:
        """The first /ready answer with `status` (no Authorization: probes are open). Each gateway replica
        answers from its own listing, up to model_refresh_s old, so the two replicas agree within that."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            response = httpx.get(f"{served.url}/ready", timeout=30)
            if response.status_code == status:
                return response
            time.sleep(0.2)
        raise TimeoutError(f"/ready never answered {status}: {response.status_code} {response.text}")

    try:
        served.deploy(grown, wait=False)
        response = ready_answer(503)
        assert int(response.headers["Retry-After"]) > 0
        error = response.json()["error"]
        assert error["code"] == "model_starting"
        assert error["message"] == f"not ready: 1 of 4 models still starting: {STARTING_EMBEDDER}"
        for name in (STARTING_EMBEDDER, "Org/Starting-Embedder"):  # a miss refreshes the listing: no waiting
            response = httpx.post(f"{served.url}/v1/embeddings", json={"model": name, "input": "x"},
                                  headers=served.headers, timeout=60)
            assert response.status_code == 503 and response.headers["Retry-After"], response.text
            assert response.json()["error"]["code"] == "model_starting"
            assert f"model {STARTING_EMBEDDER!r} is starting" in response.json()["error"]["message"]
        wait_for(lambda: httpx.get(f"{served.url}/v1/models/{STARTING_EMBEDDER}", headers=served.headers,
                                   timeout=30).status_code == 503, timeout_s=30, what="/v1/models/{id}: 503")
        response = httpx.post(f"{served.url}/v1/embeddings", json={"model": "no-such-model", "input": "x"},
                              headers=served.headers, timeout=60)
        assert response.status_code == 404
        # The running models are served meanwhile.
        response = httpx.post(f"{served.url}/v1/embeddings", json={"model": EMBEDDER, "input": "x"},
                              headers=served.headers, timeout=60)
        assert response.status_code == 200
    finally:
        served.deploy(serve_config)
    assert ready_answer(200).json() == {"status": "ready", "models": sorted([EMBEDDER, NARROW_RERANKER, RERANKER])}


def test_a_model_whose_application_is_not_built_yet_answers_503_by_name_and_alias(served, serve_config):
    """From the moment a config naming a model is applied, before Serve has built its application (no deployment
    exists yet): 503 model_starting with Retry-After by name and alias, never 404. The build is held on purpose: its
    deployment asks for a node label no node has, and Serve schedules the build task where its replicas may run."""
    unbuilt = copy.deepcopy(application(serve_config, RERANKER))
    unbuilt["name"] = unbuilt["args"]["name"] = UNBUILT_RERANKER
    unbuilt["args"]["aliases"] = ["Org/Unbuilt-Reranker"]
    unbuilt["deployments"] = [{"name": "ModelServer", "ray_actor_options": {"label_selector": {"qwen3-test": "none"}}}]
    try:
        served.deploy(serve_config, wait=False, unchecked_applications=[unbuilt])
        # Each gateway replica lists the applications every model_refresh_s, and on a miss at most every 0.5 s:
        # /ready naming the model (from any replica, several times) shows the listings have it.
        wait_for(lambda: all(UNBUILT_RERANKER in httpx.get(f"{served.url}/ready", timeout=30).text for _ in range(4)),
                 timeout_s=60, what="/ready naming the unbuilt model")
        for name in (UNBUILT_RERANKER, "Org/Unbuilt-Reranker"):
            response = httpx.post(f"{served.url}/v1/rerank", json={"model": name, "query": "q", "documents": ["d"]},
                                  headers=served.headers, timeout=60)
            assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0, response.text
            assert response.json()["error"]["code"] == "model_starting"
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()["applications"][UNBUILT_RERANKER]
        assert not details.get("deployments"), "the application was built after all: the test proves nothing"
    finally:
        served.deploy(serve_config)
