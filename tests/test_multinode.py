"""A prod-like config on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster, logical GPUs):
fractional GPU packing, a replica that does not fit, autoscaling up and down under load, and a dead worker node.

Ray allows one cluster per process, so these tests run first (conftest orders them) and shut their cluster down
before the session's single-node instance starts. The models are the tiny checkpoints on CPU; Ray schedules by
the declared (logical) GPUs exactly as it would on real ones.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.reference import ModelCardReranker
from tests.serving import ServeInstance, free_port, use_ingress

pytestmark = pytest.mark.multinode

WHOLE, HALF, QUARTER_A, QUARTER_B = "rr-whole-gpu", "emb-half-gpu", "rr-quarter-gpu", "emb-quarter-gpu"
AUTOSCALED, EXTRA = "rr-autoscaled", "rr-does-not-fit"
QUERY, DOCUMENTS = "what do pandas eat?", ["Pandas eat bamboo.", "Paris is in France.", "熊猫吃竹子。"]


def model_application(name: str, task: str, source, **deployment) -> dict:
    return {"name": name, "route_prefix": None, "import_path": "serve_app.app:model_app",
            "args": {"name": name, "task": task, "source": str(source), "device": "auto",
                     "batching": {"max_wait_ms": 1},
                     "deployment": {"num_cpus": 0.5, "max_ongoing_requests": 16, **deployment}}}


def cluster_config(port: int, database_url: str, reranker, embedder, names: list[str]) -> dict:
    """prod.yaml's shape (one app per model, fractional GPUs, an autoscaled model) on the tiny checkpoints."""
    apps = {
        WHOLE: model_application(WHOLE, "rerank", reranker, num_gpus=1.0),
        HALF: model_application(HALF, "embed", embedder, num_gpus=0.5),
        QUARTER_A: model_application(QUARTER_A, "rerank", reranker, num_gpus=0.25),
        QUARTER_B: model_application(QUARTER_B, "embed", embedder, num_gpus=0.25),
        EXTRA: model_application(EXTRA, "rerank", reranker, num_gpus=0.25),
        # Short delays, and load reported every 0.25 s instead of 10 s, so the test sees a whole scale-up and
        # scale-down cycle in seconds.
        AUTOSCALED: model_application(AUTOSCALED, "rerank", reranker, max_ongoing_requests=2, autoscaling={
            "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "upscale_delay_s": 0,
            "downscale_delay_s": 2, "look_back_period_s": 1, "metrics_interval_s": 0.25}),
    }
    gateway = {"name": "gateway", "route_prefix": "/", "import_path": "serve_app.app:gateway_app",
               "args": {"database_url": database_url, "auth": {"enabled": False}, "model_refresh_s": 0.5,
                        "deployment": {"num_cpus": 0.5, "num_replicas": 1}}}
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [gateway, *(apps[name] for name in names)]}


class MultiNode:
    def __init__(self, cluster, serve_instance: ServeInstance, make_config):
        self.cluster = cluster
        self.serve = serve_instance
        self.make_config = make_config
        self.gpu_nodes = []

    def add_gpu_node(self):
        node = self.cluster.add_node(num_cpus=4, num_gpus=1)
        self.cluster.wait_for_nodes()
        self.gpu_nodes.append(node)
        return node

    def placement(self, app: str) -> dict:
        from ray import serve

        return serve.get_app_handle(app).stats.remote().result(timeout_s=60)["placement"]

    def running_replicas(self, app: str) -> list[dict]:
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()["applications"].get(app)
        if details is None:
            return []
        return [replica for deployment in details["deployments"].values() for replica in deployment["replicas"]
                if replica["state"] == "RUNNING"]


@pytest.fixture(scope="module")
def multinode(tiny_reranker_path, tiny_embedder_path, tmp_path_factory):
    from ray import serve
    from ray.cluster_utils import Cluster

    import ray

    # Every node of the cluster starts with the ingress the cluster files give it (HAProxy), from this environment.
    ingress = use_ingress()
    # Head: controller, proxy and gateway (no GPU, as on cluster.yaml's head); GPU workers are added per test.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0})
    port = free_port()
    database_url = f"sqlite:///{tmp_path_factory.mktemp('multinode') / 'serve.db'}"
    instance = None
    try:
        instance = ServeInstance.start_on_cluster(port, cluster.address, ingress)
        try:
            yield MultiNode(cluster, instance, lambda names: cluster_config(
                port, database_url, tiny_reranker_path, tiny_embedder_path, names))
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        cluster.shutdown()
        if instance is not None:
            instance.end_leftovers()


@pytest.fixture(scope="module")
def reference(tiny_reranker_path):
    return ModelCardReranker(str(tiny_reranker_path))


def rerank(url: str, model: str, client: httpx.Client | None = None) -> httpx.Response:
    send = client.post if client is not None else httpx.post
    return send(f"{url}/v1/rerank", json={"model": model, "query": QUERY, "documents": DOCUMENTS,
                                          "top_n": len(DOCUMENTS)}, timeout=60)


def scores_of(response: httpx.Response) -> list[float]:
    ranked = sorted(response.json()["results"], key=lambda result: result["index"])
    return [result["relevance_score"] for result in ranked]


def assert_right(response: httpx.Response, reference_scores: list[float]) -> None:
    assert response.status_code == 200, response.text
    assert all(abs(a - b) <= 1e-5 for a, b in zip(scores_of(response), reference_scores))


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_fractional_replicas_share_gpus_as_planned(multinode, reference):
    """One whole-GPU model on one node; 0.5 + 0.25 + 0.25 of three other models packed onto the other GPU."""
    import ray

    first, second = multinode.add_gpu_node(), multinode.add_gpu_node()
    multinode.serve.deploy(multinode.make_config([WHOLE]))
    whole_node = multinode.placement(WHOLE)["node_id"]
    multinode.serve.deploy(multinode.make_config([WHOLE, HALF, QUARTER_A, QUARTER_B, AUTOSCALED]))

    placements = {app: multinode.placement(app) for app in (WHOLE, HALF, QUARTER_A, QUARTER_B)}
    gpu_of = {app: (p["node_id"], tuple(p["gpu_ids"])) for app, p in placements.items()}
    assert {first.node_id, second.node_id} == {whole_node, gpu_of[HALF][0]}
    assert gpu_of[HALF] == gpu_of[QUARTER_A] == gpu_of[QUARTER_B], f"small models did not share a GPU: {gpu_of}"
    assert gpu_of[WHOLE] != gpu_of[HALF] and all(len(p["gpu_ids"]) == 1 for p in placements.values())
    assert ray.available_resources().get("GPU", 0) == pytest.approx(0, abs=1e-4)  # 1 + (0.5 + 0.25 + 0.25)
    assert_right(rerank(multinode.serve.url, WHOLE), reference.scores(QUERY, DOCUMENTS))
    assert_right(rerank(multinode.serve.url, QUARTER_A), reference.scores(QUERY, DOCUMENTS))


def test_a_replica_that_does_not_fit_waits_instead_of_overcommitting(multinode, reference):
    import ray
    from ray import serve

    before = {app: multinode.running_replicas(app) for app in (WHOLE, HALF, QUARTER_A, QUARTER_B)}
    everything = multinode.make_config([WHOLE, HALF, QUARTER_A, QUARTER_B, AUTOSCALED, EXTRA])
    multinode.serve.deploy(everything, wait=False)
    time.sleep(10)  # ample time for a tiny replica to start, had there been room for it
    assert not multinode.running_replicas(EXTRA), "a replica was placed on a GPU with no room left"
    assert serve.status().applications[EXTRA].status in ("DEPLOYING", "NOT_STARTED")
    assert ray.available_resources().get("GPU", 0) == pytest.approx(0, abs=1e-4)
    assert {app: multinode.running_replicas(app) for app in before} == before  # nothing evicted or restarted
    assert_right(rerank(multinode.serve.url, QUARTER_A), reference.scores(QUERY, DOCUMENTS))
    multinode.serve.deploy(multinode.make_config([WHOLE, HALF, QUARTER_A, QUARTER_B, AUTOSCALED]))


def test_autoscaling_follows_load_up_and_back_down(multinode, reference):
    expected = reference.scores(QUERY, DOCUMENTS)
    assert len(multinode.running_replicas(AUTOSCALED)) == 1
    responses: list[httpx.Response] = []
    peak = 1

    async def load(stop_after_s: float, after_scale_up_s: float) -> None:
        """8 clients for up to stop_after_s, and for after_scale_up_s once a second replica runs: long enough for
        the new replica to serve its share (every answer is checked), without loading the machine for nothing."""
        async with httpx.AsyncClient(base_url=multinode.serve.url, timeout=60) as client:
            stop = time.monotonic() + stop_after_s

            async def worker():
                while time.monotonic() < stop:
                    responses.append(await client.post("/v1/rerank", json={
                        "model": AUTOSCALED, "query": QUERY, "documents": DOCUMENTS, "top_n": 3}))

            async def watch():
                nonlocal peak, stop
                while time.monotonic() < stop:
                    peak = max(peak, len(await asyncio.to_thread(multinode.running_replicas, AUTOSCALED)))
                    if peak >= 2:
                        stop = min(stop, time.monotonic() + after_scale_up_s)
                    await asyncio.sleep(0.5)

            await asyncio.gather(watch(), *(worker() for _ in range(8)))

    started = time.monotonic()
    asyncio.run(load(stop_after_s=40, after_scale_up_s=5))
    print(f"autoscaling: {len(responses)} requests, peak {peak} replicas, load for {time.monotonic() - started:.1f} s")
    assert peak >= 2, "8 concurrent clients against target_ongoing_requests=1 never scaled the model up"
    assert responses and all(r.status_code == 200 for r in responses), {r.status_code for r in responses}
    for response in responses:
        assert_right(response, expected)
    wait_until(lambda: len(multinode.running_replicas(AUTOSCALED)) == 1, 90, "scale-down to min_replicas")
    assert_right(rerank(multinode.serve.url, AUTOSCALED), expected)


def test_replicas_of_a_dead_worker_node_come_back_on_the_others(multinode, reference):
    shared_gpu_node = multinode.placement(HALF)["node_id"]
    dying = next(node for node in multinode.gpu_nodes if node.node_id == shared_gpu_node)
    spare = multinode.add_gpu_node()  # the room the moved replicas need
    multinode.cluster.remove_node(dying, allow_graceful=False)
    expected = reference.scores(QUERY, DOCUMENTS)

    def all_back() -> bool:
        try:
            placed = {app: multinode.placement(app)["node_id"] for app in (HALF, QUARTER_A, QUARTER_B)}
        except Exception:  # noqa: BLE001 - replicas still being replaced
            return False
        return set(placed.values()) == {spare.node_id}

    wait_until(all_back, 120, "the dead node's replicas to restart on the spare node")
    for model in (WHOLE, QUARTER_A):
        wait_until(lambda: rerank(multinode.serve.url, model).status_code == 200, 60, f"{model} to answer")
        assert_right(rerank(multinode.serve.url, model), expected)
    response = httpx.post(f"{multinode.serve.url}/v1/embeddings", json={"model": HALF, "input": ["a"]}, timeout=60)
    assert response.status_code == 200, response.text


def test_haproxy_on_the_head_reaches_a_gateway_replica_on_another_node(multinode, reference, tiny_reranker_path):
    """The gateway asks for more CPUs than the head has, so its replica runs on a worker node; requests still enter
    through the head's haproxy (proxy_location HeadOnly) and are served."""
    from ray.serve.context import _get_global_client

    multinode.cluster.add_node(num_cpus=8, num_gpus=0)
    multinode.cluster.wait_for_nodes()
    config = multinode.make_config([])
    config["applications"][0]["args"]["deployment"]["num_cpus"] = 5  # the head has 4
    config["applications"].append(model_application("rr-cpu", "rerank", tiny_reranker_path, num_gpus=0))
    multinode.serve.deploy(config)
    details = _get_global_client().get_serve_details()
    gateway_nodes = {replica["node_id"] for deployment in details["applications"]["gateway"]["deployments"].values()
                     for replica in deployment["replicas"] if replica["state"] == "RUNNING"}
    head = multinode.cluster.head_node.node_id
    assert gateway_nodes and head not in gateway_nodes
    assert_right(rerank(multinode.serve.url, "rr-cpu"), reference.scores(QUERY, DOCUMENTS))
