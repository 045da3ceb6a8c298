"""The queued-work router (serve_app/replica/routing.py): replicas ranked by the tokens they hold, from the router's
own unanswered sends and the replicas' reports; its config; and a deployment routed by it, end to end on Serve's
Python proxy (Ray 2.60 refuses custom routers on a model application under its HAProxy ingress)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from pydantic import ValidationError
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

from serve_app.config import QUEUED_WORK_ROUTER, DeploymentOptions, GatewayConfig
from serve_app.replica.autoscaling import BACKGROUND_TOKENS, ONLINE_TOKENS, estimated_work
from serve_app.replica.routing import QueuedWorkRouter, request_work
from tests.serving import free_port, start_command, stop_command, wait_until_serving

DEPLOYMENT = DeploymentID(name="ModelServer", app_name="routing-test")


@dataclass
class FakeReplica:
    """What the router reads of Serve's RunningReplica."""

    name: str
    routing_stats: dict = field(default_factory=dict)

    @property
    def replica_id(self) -> ReplicaID:
        return ReplicaID(unique_id=self.name, deployment_id=DEPLOYMENT)


def make_router() -> QueuedWorkRouter:
    router = QueuedWorkRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN)
    router.initialize_state()
    return router


def pending(method: str, *args, request_id: str) -> SimpleNamespace:
    return SimpleNamespace(args=list(args), metadata=SimpleNamespace(call_method=method,
                                                                      internal_request_id=request_id))


def ranking(router: QueuedWorkRouter, replicas: list[FakeReplica]) -> list[str]:
    ranks = asyncio.run(router.choose_replicas(replicas))
    assert all(len(rank) == 1 for rank in ranks)
    return [rank[0].name for rank in ranks]


def test_work_is_estimated_as_the_replica_estimates_it_before_tokenizing():
    documents = ["a passage of text"] * 10
    assert request_work("rerank", ["query", documents, None]) == estimated_work(5 + 170, 10, texts=True)
    assert request_work("embed", [["one text", "two"]]) == estimated_work(11, 0, texts=True)
    assert request_work("embed", [[[1, 2, 3], [4]]]) == 4  # token ids count themselves
    group = ["embed", [[["one text", "two"]], [["three"]]]]
    assert request_work("serve_group", group) == estimated_work(11, 0, True) + estimated_work(5, 0, True)
    assert request_work("stats", []) == request_work("describe", []) == 0
    assert request_work("rerank", [None]) == 0  # not our shape: no estimate, no failure


def test_replicas_are_ranked_by_the_larger_of_own_sends_and_their_report():
    router = make_router()
    busy = FakeReplica("busy", {ONLINE_TOKENS: 40_000.0, BACKGROUND_TOKENS: 0.0})
    background = FakeReplica("background", {ONLINE_TOKENS: 0.0, BACKGROUND_TOKENS: 5_000.0})
    fresh = FakeReplica("fresh")  # no report yet
    assert ranking(router, [busy, background, fresh]) == ["fresh", "background", "busy"]
    # A large rerank this router sent to `fresh` counts at once, before any report says so.
    huge = pending("rerank", "q", ["x" * 400] * 1000, request_id="huge")
    router.on_request_routed(huge, fresh.replica_id, result=None)
    assert ranking(router, [busy, background, fresh]) == ["background", "busy", "fresh"]
    # Answered: it no longer counts; a request the router never saw routed (a refusal) changes nothing.
    router.on_request_completed(fresh.replica_id, "huge")
    router.on_request_completed(fresh.replica_id, "never-routed")
    assert ranking(router, [busy, background, fresh]) == ["fresh", "background", "busy"]


def test_idle_replicas_share_the_load():
    router = make_router()
    replicas = [FakeReplica(f"r{i}") for i in range(4)]
    first = {ranking(router, replicas)[0] for _ in range(200)}
    assert first == {"r0", "r1", "r2", "r3"}


def test_only_model_deployments_take_the_router_and_it_reaches_serve():
    options = DeploymentOptions(request_router="queued_work", routing_stats_period_s=0.5).serve_options()
    assert options["request_router_config"] == {"request_router_class": QUEUED_WORK_ROUTER,
                                                 "request_routing_stats_period_s": 0.5}
    assert "request_router_config" not in DeploymentOptions().serve_options()  # Serve's own by default
    from ray.serve.config import RequestRouterConfig

    RequestRouterConfig.model_validate(options["request_router_config"])
    with pytest.raises(ValidationError, match="request_router"):
        GatewayConfig.model_validate({"deployment": {"request_router": "queued_work"}})
    with pytest.raises(ValidationError, match="routing_stats_period_s"):
        DeploymentOptions(routing_stats_period_s=0)
    with pytest.raises(ValidationError, match="request_router"):
        DeploymentOptions(request_router="least_loaded")


def test_under_haproxy_the_router_is_refused_in_our_words(monkeypatch, tiny_reranker_path):
    from serve_app.app import model_app

    args = {"name": "routed", "task": "rerank", "source": str(tiny_reranker_path), "device": "cpu",
            "deployment": {"num_replicas": 2, "request_router": "queued_work"}}
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    with pytest.raises(ValueError, match="QWEN3_SERVE_HAPROXY=0"):
        model_app(args)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    assert model_app(args) is not None


def test_small_requests_avoid_the_replica_running_a_huge_one(tmp_path, tiny_reranker_path):
    """`qwen3-serve` on Serve's Python proxy with a reranker of two replicas routed on queued work: while one
    replica runs a rerank of about 1.4M tokens (every digit is a token: seconds of work even on a fast CPU), rounds
    of 8 concurrent small reranks all go to the other, however many small requests it has in flight (Serve's power
    of two choices compares requests in flight, so it would send a small request to the busy replica whenever the
    other holds two). Where each call ran is read from the replicas' own access logs."""
    port = free_port()
    routed = {"name": "routed", "route_prefix": None, "import_path": "serve_app.app:model_app",
              "args": {"name": "routed", "task": "rerank", "source": str(tiny_reranker_path), "device": "cpu",
                       "deployment": {"num_cpus": 0.1, "num_replicas": 2, "request_router": "queued_work",
                                      "routing_stats_period_s": 0.5}}}
    gateway = {"name": "gateway", "route_prefix": "/", "import_path": "serve_app.app:gateway_app",
               "args": {"auth": {"enabled": False}, "deployment": {"num_cpus": 0.1}}}
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"http_options": {"host": "127.0.0.1", "port": port},
                                      "applications": [gateway, routed]}))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must stay short
    command, environment = start_command(config, tmp_path, haproxy_on=False, RAY_TMPDIR=str(ray_tmp))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(command, url)
        huge_body = {"model": "routed", "query": "q", "documents": ["0123456789" * 140] * 1000, "top_n": 1}
        small_body = {"model": "routed", "query": "what do pandas eat?", "documents": ["Pandas eat bamboo."]}

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                huge = asyncio.create_task(client.post("/v1/rerank", json=huge_body))
                await asyncio.sleep(1.5)  # routed and accepted: this gateway's router counts it from then on
                small = []
                for _ in range(4):
                    small += await asyncio.gather(*(client.post("/v1/rerank", json=small_body) for _ in range(8)))
                overlapped = not huge.done()
                return await huge, small, overlapped

        huge, small, overlapped = asyncio.run(scenario())
        assert huge.status_code == 200 and all(response.status_code == 200 for response in small)
        assert overlapped, "the huge rerank ended before the small ones did: the test proves nothing"
        time.sleep(1)  # access log lines are written by the replicas
        serve_logs = ray_tmp / "ray" / "session_latest" / "logs" / "serve"  # Ray keeps its files in $RAY_TMPDIR/ray
        replica_logs = list(serve_logs.glob("replica_routed_ModelServer_*.log"))
        assert len(replica_logs) == 2, replica_logs
        calls = {path.name: [line for line in path.read_text().splitlines()
                             if " CALL " in line and ("rerank" in line or "serve_group" in line)]
                 for path in replica_logs}
        busy = [name for name, lines in calls.items() if any(huge.headers["x-request-id"] in line for line in lines)]
        assert len(busy) == 1, calls
        idle = next(name for name in calls if name != busy[0])
        assert len(calls[busy[0]]) == 1, f"small calls reached the busy replica: {calls[busy[0]]}"
        assert calls[idle], "no small call in the other replica's log (the check reads the wrong lines)"
    finally:
        stop_command(command, environment)
        shutil.rmtree(ray_tmp, ignore_errors=True)
