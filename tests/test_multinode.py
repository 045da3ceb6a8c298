"""A prod-like config on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster, logical GPUs):
fractional GPU packing, a replica that does not fit, autoscaling up and down under load (on requests, and on the
work queued), and a dead worker node.

Ray allows one cluster per process, so these tests run first (conftest orders them) and shut their cluster down
before the session's single-node instance starts. The models are the tiny checkpoints on CPU; Ray schedules by
the declared (logical) GPUs exactly as it would on real ones.

The cluster is shared by the module, but each test sets up what it needs (`MultiNode.place_gpu_models`,
`MultiNode.ensure`), so every test passes alone and in any subset.
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
ON_WORK, ON_REQUESTS = "rr-on-queued-work", "rr-on-requests"
GPU_MODELS = (WHOLE, HALF, QUARTER_A, QUARTER_B)
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
        # The same reranker twice under the same few huge requests: scaled on the tokens queued (a 1 s target), and
        # on prod.yaml's request count (16 per replica).
        ON_WORK: model_application(ON_WORK, "rerank", reranker, autoscaling={
            "min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0, "downscale_delay_s": 2,
            "look_back_period_s": 1, "metrics_interval_s": 0.25, "queued_work": {"target_queue_seconds": 1}}),
        ON_REQUESTS: model_application(ON_REQUESTS, "rerank", reranker, autoscaling={
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16, "upscale_delay_s": 0,
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
        self.gpu_nodes = []  # the live GPU worker nodes
        self.deployed: list[str] = []  # the model applications of the config deployed last

    def add_gpu_node(self):
        node = self.cluster.add_node(num_cpus=4, num_gpus=1)
        self.cluster.wait_for_nodes()
        self.gpu_nodes.append(node)
        return node

    def remove_gpu_node(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)
        self.gpu_nodes.remove(node)

    def deploy(self, names: list[str], wait: bool = True) -> None:
        """Deploy exactly these models (and the gateway); applications left out are removed, as by `serve deploy`."""
        self.serve.deploy(self.make_config(names), wait=wait)
        self.deployed = list(names)

    def ensure(self, *names: str) -> None:
        """These models deployed beside whatever is (nothing removed, nothing redeployed that runs already)."""
        missing = [name for name in names if name not in self.deployed]
        if missing:
            self.deploy([*self.deployed, *missing])

    def place_gpu_models(self) -> None:
        """The GPU layout: two GPU nodes, the whole-GPU model alone on one, the 0.5 + 0.25 + 0.25 models sharing
        the other's GPU. The whole-GPU model is deployed first, so that it takes a GPU before the fractions spread."""
        if all(name in self.deployed for name in GPU_MODELS):
            return
        while len(self.gpu_nodes) < 2:
            self.add_gpu_node()
        self.ensure(WHOLE)
        self.ensure(*GPU_MODELS)

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

    multinode.place_gpu_models()
    placements = {app: multinode.placement(app) for app in GPU_MODELS}
    gpu_of = {app: (p["node_id"], tuple(p["gpu_ids"])) for app, p in placements.items()}
    assert {node.node_id for node in multinode.gpu_nodes} == {gpu_of[WHOLE][0], gpu_of[HALF][0]}
    assert gpu_of[HALF] == gpu_of[QUARTER_A] == gpu_of[QUARTER_B], f"small models did not share a GPU: {gpu_of}"
    assert gpu_of[WHOLE] != gpu_of[HALF] and all(len(p["gpu_ids"]) == 1 for p in placements.values())
    assert ray.available_resources().get("GPU", 0) == pytest.approx(0, abs=1e-4)  # 1 + (0.5 + 0.25 + 0.25)
    assert_right(rerank(multinode.serve.url, WHOLE), reference.scores(QUERY, DOCUMENTS))
    assert_right(rerank(multinode.serve.url, QUARTER_A), reference.scores(QUERY, DOCUMENTS))


def test_a_replica_that_does_not_fit_waits_instead_of_overcommitting(multinode, reference):
    import ray
    from ray import serve

    multinode.place_gpu_models()
    before = {app: multinode.running_replicas(app) for app in GPU_MODELS}
    without_extra = list(multinode.deployed)
    multinode.deploy([*without_extra, EXTRA], wait=False)
    time.sleep(10)  # ample time for a tiny replica to start, had there been room for it
    assert not multinode.running_replicas(EXTRA), "a replica was placed on a GPU with no room left"
    assert serve.status().applications[EXTRA].status in ("DEPLOYING", "NOT_STARTED")
    assert ray.available_resources().get("GPU", 0) == pytest.approx(0, abs=1e-4)
    assert {app: multinode.running_replicas(app) for app in before} == before  # nothing evicted or restarted
    assert_right(rerank(multinode.serve.url, QUARTER_A), reference.scores(QUERY, DOCUMENTS))
    multinode.deploy(without_extra)


def test_autoscaling_follows_load_up_and_back_down(multinode, reference):
    expected = reference.scores(QUERY, DOCUMENTS)
    multinode.ensure(AUTOSCALED)
    wait_until(lambda: len(multinode.running_replicas(AUTOSCALED)) == 1, 90, "one replica before the load")
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


def test_autoscaling_on_queued_work_adds_a_replica_for_a_few_huge_requests_and_removes_it(multinode):
    """Three clients each keep one 1,000-document rerank in flight (about 100,000 tokens each) against two
    deployments of the same model: the one scaled on queued work (a 1 s target) scales up, the one scaled on
    prod.yaml's request count (16 per replica) stays at one replica; the first comes back down once the work is
    done."""
    multinode.ensure(ON_WORK, ON_REQUESTS)
    for app in (ON_WORK, ON_REQUESTS):
        wait_until(lambda: len(multinode.running_replicas(app)) == 1, 90, f"one replica of {app} before the load")
    documents = [f"Document {i}: giant pandas eat bamboo shoots and leaves in the mountain forests of China, "
                 "and sometimes small animals." * 3 for i in range(1000)]
    statuses: dict[str, list[int]] = {ON_WORK: [], ON_REQUESTS: []}
    peak = {ON_WORK: 1, ON_REQUESTS: 1}

    async def load(min_s: float, max_s: float, after_scale_up_s: float) -> None:
        async with httpx.AsyncClient(base_url=multinode.serve.url, timeout=120) as client:
            started = time.monotonic()
            stop = started + max_s

            async def worker(app: str):
                while time.monotonic() < stop:
                    response = await client.post("/v1/rerank", json={"model": app, "query": QUERY,
                                                                      "documents": documents, "top_n": 1})
                    statuses[app].append(response.status_code)

            async def watch():
                nonlocal stop
                while time.monotonic() < stop:
                    for app in peak:
                        peak[app] = max(peak[app], len(await asyncio.to_thread(multinode.running_replicas, app)))
                    if peak[ON_WORK] >= 2:
                        stop = min(stop, max(started + min_s, time.monotonic() + after_scale_up_s))
                    await asyncio.sleep(0.5)

            await asyncio.gather(watch(), *(worker(app) for app in peak for _ in range(3)))

    started = time.monotonic()
    asyncio.run(load(min_s=10, max_s=90, after_scale_up_s=2))
    print(f"queued work: peaks {peak}, requests {({app: len(s) for app, s in statuses.items()})}, "
          f"load for {time.monotonic() - started:.1f} s")
    assert all(statuses[app] and set(statuses[app]) == {200} for app in statuses), statuses
    assert peak[ON_WORK] >= 2, "a few huge requests never scaled the queued-work deployment up"
    assert peak[ON_REQUESTS] == 1, "3 requests in flight against target_ongoing_requests=16 scaled up"
    wait_until(lambda: len(multinode.running_replicas(ON_WORK)) == 1, 90, "scale-down to min_replicas")
    assert len(multinode.running_replicas(ON_REQUESTS)) == 1


def test_replicas_of_a_dead_worker_node_come_back_on_the_others(multinode, reference):
    multinode.place_gpu_models()
    shared_gpu_node = multinode.placement(HALF)["node_id"]
    dying = next(node for node in multinode.gpu_nodes if node.node_id == shared_gpu_node)
    spare = multinode.add_gpu_node()  # the room the moved replicas need
    multinode.remove_gpu_node(dying)
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
    gateway_nodes = {replica["node_id"] for replica in details["applications"]["gateway"]["deployments"]["Gateway"][
        "replicas"] if replica["state"] == "RUNNING"}  # the app's BatchRunner stays on the head
    head = multinode.cluster.head_node.node_id
    assert gateway_nodes and head not in gateway_nodes
    assert_right(rerank(multinode.serve.url, "rr-cpu"), reference.scores(QUERY, DOCUMENTS))
