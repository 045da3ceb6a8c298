"""The queued-work autoscaling policy on contexts as Serve's controller builds them, through Serve's own wrapper
(smoothing, delays) and bounds; and the signal a model replica reports (no Ray).

Contexts are Serve's AutoscalingContext with the per-replica metrics the controller aggregates over the look-back
window. Their numbers are the tiny reranker's, as recorded from a replica (plain class, 2 shared cores): a rerank of
400 documents of 90 words holds 40,862 tokens of engine work, a one-document rerank ("what do pandas eat?" against
"Pandas eat bamboo.") 81, the instruction prefix included; the engine measured 52,000 to 75,000 tokens per second.
"""

from __future__ import annotations

import asyncio

import pytest
from ray.serve import autoscaling_policy as serve_policies
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig
from ray.serve.config import AutoscalingContext

from serve_app.config import AutoscalingConfig, ModelConfig, ServeConfigFile
from serve_app.replica.autoscaling import (BACKGROUND_TOKENS, MEASURED, ONLINE_REQUESTS, ONLINE_TOKENS,
                                           ONLINE_TOKENS_PER_S, TOKENS_PER_S, QueuedWorkPolicy, WorkSignal,
                                           estimated_tokens_per_s, estimated_work)

MEASURED_RATE = 60_000.0  # tokens/s, the tiny reranker's engine on this machine
HUGE, TINY = 40_000, 81  # tokens held by one 400-document rerank and by one one-document rerank
DEPLOYMENT = DeploymentID(name="ModelServer", app_name="rr")


class Clock:
    """Serve's delay logic reads time.time(); the tests move it by hand."""

    def __init__(self):
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


class Deployment:
    """One deployment's autoscaling as Serve's controller runs it: the policy its config names, wrapped by Serve's
    `_apply_autoscaling_config` (factors and delays), the policy state carried between ticks, min/max bounds."""

    def __init__(self, autoscaling: dict, replicas: int):
        options = AutoscalingConfig.model_validate(autoscaling).serve_options()
        self.config = ServeAutoscalingConfig.model_validate(options)
        self.policy = serve_policies._apply_autoscaling_config(_resolve_policy_callable(self.config.policy))
        self.state: dict = {}
        self.target = replicas

    def tick(self, per_replica: list[dict[str, float]], total_requests: float = 0,
             queued_at_callers: float = 0) -> int:
        """One control-loop decision over the running replicas' aggregated metrics; returns the new target."""
        replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in range(self.target)]
        aggregated: dict[str, dict] = {}
        for replica, metrics in zip(replicas, per_replica):
            for name, value in metrics.items():
                aggregated.setdefault(name, {})[replica] = value
        ctx = AutoscalingContext(
            deployment_id=DEPLOYMENT, deployment_name=DEPLOYMENT.name, app_name=DEPLOYMENT.app_name,
            current_num_replicas=len(replicas), target_num_replicas=self.target, running_replicas=replicas,
            total_num_requests=total_requests, total_queued_requests=queued_at_callers,
            aggregated_metrics=aggregated, raw_metrics={}, capacity_adjusted_min_replicas=self.config.min_replicas,
            capacity_adjusted_max_replicas=self.config.max_replicas, policy_state=dict(self.state),
            last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=self.config)
        decision, self.state = self.policy(ctx)
        self.target = max(self.config.min_replicas, min(self.config.max_replicas, int(decision)))
        return self.target


def held(online: list[int] = (), background: list[int] = (), arriving: float = 0.0) -> dict:
    """What a replica reports (its own WorkSignal) holding these jobs, after a second of measured work, while
    computing `arriving` online tokens per second (the signal's own count of that is tested on its own)."""
    signal = WorkSignal(window_s=30, estimated_tokens_per_s=1)
    signal.run_started(0.0, 0, int(MEASURED_RATE), background=False)
    signal.run_ended(1.0, int(MEASURED_RATE), 1.0)
    for key, work in enumerate(online):
        signal.hold(("online", key), work, background=False)
    for key, work in enumerate(background):
        signal.hold(("background", key), work, background=True)
    return {**signal.report(1.0, int(MEASURED_RATE), len(online)), ONLINE_TOKENS_PER_S: arriving}


WORK = {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 10, "downscale_delay_s": 60,
        "queued_work": {"target_queue_seconds": 0.5}}
REQUESTS = {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 10, "downscale_delay_s": 60,
            "target_ongoing_requests": 16}


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(serve_policies, "time", clock)
    return clock


def test_a_few_huge_requests_scale_up_where_the_request_count_does_not(clock):
    work, requests = Deployment(WORK, replicas=1), Deployment(REQUESTS, replicas=1)
    three_huge = [held(online=[HUGE] * 3)]
    assert work.tick(three_huge) == 1 and requests.tick(three_huge, total_requests=3) == 1  # upscale delay first
    clock.now += 10
    # 120,000 tokens at 60,000/s is 2 s of work against a 0.5 s target: 4 replicas; 3 requests are far below 16.
    assert work.tick(three_huge) == 4
    assert requests.tick(three_huge, total_requests=3) == 1


def test_many_tiny_requests_that_one_replica_serves_stay_on_one(clock):
    work, requests = Deployment(WORK, replicas=1), Deployment(REQUESTS, replicas=1)
    sixty_four_tiny = [held(online=[TINY] * 64)]
    for _ in range(2):
        assert work.tick(sixty_four_tiny) == 1  # 5,184 tokens: 86 ms of work
        requests.tick(sixty_four_tiny, total_requests=64)
        clock.now += 10
    assert requests.target == 4  # 64 requests / 16 per replica


def test_a_draining_queue_scales_down_only_after_the_downscale_delay(clock):
    work = Deployment(WORK, replicas=4)
    busy = [held(online=[HUGE])] * 4
    assert work.tick(busy) == 4  # 160,000 tokens: 2.7 s of work for 4 replicas against 0.5 s
    drained = [held()] * 4
    assert work.tick(drained) == 4
    clock.now += 59
    assert work.tick(drained) == 4
    clock.now += 1
    assert work.tick(drained) == 1
    # Serve's smoothing is honoured too: half the step down at a time.
    halving = Deployment({**WORK, "downscaling_factor": 0.5}, replicas=4)
    halving.tick(drained)
    clock.now += 60
    assert halving.tick(drained) == 3  # ceil(4 - 0.5 x 3)


def test_background_work_alone_scales_up_only_when_the_config_says_it_may(clock):
    bulk = [held(background=[HUGE] * 10)]
    online_only = Deployment(WORK, replicas=1)
    allowed = Deployment({**WORK, "queued_work": {"target_queue_seconds": 0.5, "background_queue_seconds": 2}},
                         replicas=1)
    for _ in range(2):
        online_only.tick(bulk)
        allowed.tick(bulk)
        clock.now += 10
    assert online_only.target == 1
    assert allowed.target == 4  # 400,000 tokens in 2 s at 60,000/s: 3.3 replicas


def test_requests_waiting_at_callers_count_at_the_mean_size_held(clock):
    work = Deployment(WORK, replicas=1)
    # 8 requests inside hold 8 x 2,000 tokens (0.27 s: within target); 16 more wait at the gateways.
    for _ in range(2):
        work.tick([held(online=[2000] * 8)], queued_at_callers=16)
        clock.now += 10
    assert work.target == 2  # (8 + 16) x 2,000 = 48,000 tokens: 0.8 s of work, 1.6 replicas


def test_replicas_busy_with_steady_traffic_are_kept_though_their_queue_is_short(clock):
    work = Deployment(WORK, replicas=3)
    # Each replica computes 45,000 online tokens/s of its 60,000 and holds a 6,000-token queue (0.1 s of work):
    # the queue alone would ask for 0.6 replicas, but 135,000 tokens/s arrive, 2.25 replicas' worth.
    steady = [held(online=[2000] * 3, arriving=45_000)] * 3
    assert work.tick(steady) == 3
    clock.now += 61
    assert work.tick(steady) == 3  # past the downscale delay: (135,000 + 18,000 / 0.5) / 60,000 = 2.85
    lighter = [held(online=[2000] * 3, arriving=20_000)] * 3
    work.tick(lighter)
    clock.now += 61
    assert work.tick(lighter) == 2  # (60,000 + 36,000) / 60,000 = 1.6


def test_no_signal_yet_keeps_the_target(clock):
    work = Deployment(WORK, replicas=2)
    assert work.tick([]) == 2  # replicas that have not reported (starting): no decision either way
    assert work.tick([{**held(), TOKENS_PER_S: 0.0}] * 2) == 2


def test_the_signal_counts_queued_and_running_tokens_apart_and_measures_throughput():
    signal = WorkSignal(window_s=30, estimated_tokens_per_s=1000)
    assert signal.report(0.0, 0, 0) == {ONLINE_TOKENS: 0, ONLINE_REQUESTS: 0, BACKGROUND_TOKENS: 0,
                                        TOKENS_PER_S: 1000, MEASURED: 0, ONLINE_TOKENS_PER_S: 0}
    signal.hold("a", 500, background=False)
    signal.hold("b", 300, background=False)
    signal.hold("c", 7000, background=True)
    signal.hold("a", 0, background=False)  # as the replica does: a job run whole leaves nothing held
    signal.run_started(1.0, counter=100, work=500, background=False)
    # 2 s into the run the engine has computed 200 of its 500 tokens (100 tokens/s).
    report = signal.report(3.0, counter=300, online_requests=2)
    assert report[ONLINE_TOKENS] == 300 + 300
    assert report[BACKGROUND_TOKENS] == 7000 and report[TOKENS_PER_S] == 100 and report[MEASURED] == 1
    assert report[ONLINE_TOKENS_PER_S] == 200 / 30  # the online pass's computed tokens over the 30 s window
    signal.run_ended(4.0, tokens=500, seconds=3.0)
    signal.release("a")
    assert signal.report(4.0, 600, 1)[ONLINE_TOKENS] == 300
    # A window without runs falls back to the replica's whole life, not to the estimate.
    assert signal.report(100.0, 600, 1)[TOKENS_PER_S] == pytest.approx(500 / 3)
    # The 300 online tokens wait behind the background pass, 1,000 of its 7,000 tokens computed: the other 6,000
    # are ahead of the online work, so they count as online.
    signal.hold("c", 0, background=True)
    signal.run_started(100.0, counter=600, work=7000, background=True)
    report = signal.report(101.0, counter=1600, online_requests=1)
    assert report[ONLINE_TOKENS] == 300 + 6000 and report[BACKGROUND_TOKENS] == 0
    signal.release("b")
    report = signal.report(101.0, counter=1600, online_requests=0)
    assert report[ONLINE_TOKENS] == 0 and report[BACKGROUND_TOKENS] == 6000
    # Online work arriving: the online run ended at 4 s, out of the window now; the background pass is not online.
    assert report[ONLINE_TOKENS_PER_S] == 0
    signal.run_ended(102.0, tokens=7000, seconds=2.0)
    signal.hold("d", 0, background=False)
    signal.run_started(102.0, counter=7600, work=300, background=False)
    signal.run_ended(103.0, tokens=300, seconds=1.0)
    assert signal.report(103.0, 7900, 0)[ONLINE_TOKENS_PER_S] == 300 / 30


def test_a_background_request_in_parts_counts_only_its_running_part_as_ahead_of_online_work():
    # As the replica reports a run that computes part of a job: the job's rest stays held under its own kind, and
    # the run's work is the part's.
    signal = WorkSignal(window_s=30, estimated_tokens_per_s=1000)
    signal.hold("bulk", 200_000 - 10_000, background=True)
    signal.run_started(0.0, counter=0, work=10_000, background=True)
    signal.hold("online", 50, background=False)
    report = signal.report(1.0, counter=2_000, online_requests=1)
    # The online request waits behind the rest of the running part only; the bulk job's rest yields to it.
    assert report[ONLINE_TOKENS] == 50 + 8_000 and report[BACKGROUND_TOKENS] == 190_000


def test_the_replica_reports_its_signal(tiny_reranker_path):
    import threading

    from serve_app.replica.deployment import ModelServer

    server = ModelServer.func_or_class({"name": "r", "task": "rerank", "source": str(tiny_reranker_path),
                                        "device": "cpu", "deployment": {"autoscaling": {"queued_work": {}}}})
    # Over max_batch_tokens: the job skips @serve.batch (which needs a running Serve replica).
    # One run (max_pass_seconds None): in parts, each part would compute the query head again.
    server.reconfigure({"max_batch_tokens": 256, "max_pass_seconds": None})
    documents = ["a long document about pandas and bamboo " * 20] * 200
    tokenizer_gate, engine_gate = threading.Event(), threading.Event()

    async def scenario():
        before = await server.record_autoscaling_stats()
        # Neither thread can start the request's step until its gate opens.
        server._tokenizer_thread.submit(tokenizer_gate.wait)
        server._engine_thread.submit(engine_gate.wait)
        running = asyncio.create_task(server.rerank("q", documents))
        while not server._tokenizing:  # handed to the (held) tokenizer thread
            await asyncio.sleep(0.005)
        tokenizing = await server.record_autoscaling_stats()
        tokenizer_gate.set()
        while not server._busy:  # the engine loop has taken the job: its pass is due
            await asyncio.sleep(0.005)
        held = await server.record_autoscaling_stats()
        engine_gate.set()
        await running
        return before, tokenizing, held, await server.record_autoscaling_stats()

    before, tokenizing, held, after = asyncio.run(scenario())
    assert before[MEASURED] == 0 and before[TOKENS_PER_S] == server.work.estimate
    size = 1 + sum(map(len, documents))
    assert tokenizing[ONLINE_TOKENS] == estimated_work(size, len(documents), texts=True)
    job = server.engine.tokenize("q", documents)
    assert held[ONLINE_TOKENS] == len(job.head_ids) + sum(map(len, job.tail_ids)) and held[ONLINE_REQUESTS] == 1
    assert after[ONLINE_TOKENS] == 0 and after[ONLINE_REQUESTS] == 0 and after[MEASURED] == 1
    assert after[TOKENS_PER_S] == pytest.approx(server.work.total_tokens / server.work.total_seconds)
    assert server.work.total_tokens == held[ONLINE_TOKENS]  # what the engine computed is what was held
    # The tokenize and detokenize endpoints share the tokenizer path but make no engine work: they hold nothing.
    counted = asyncio.run(server.tokenize(["pandas eat bamboo"], query="what do pandas eat?"))
    decoded = asyncio.run(server.detokenize([server.engine.encode_text("bamboo").tolist()]))
    assert counted["texts"] and decoded == {"texts": ["bamboo"]} and server.work.held == {}


def test_the_per_device_estimate():
    # Qwen3-0.6B: 596 M parameters, 151,669 x 1,024 of them the embedding table; 2 threads: BENCHMARKS' 188 tokens/s.
    assert estimated_tokens_per_s("cpu", 596_049_920, 151_669 * 1024, 2) == pytest.approx(181, abs=1)
    assert estimated_tokens_per_s("cuda:0", 596_049_920, 151_669 * 1024, 2) == pytest.approx(227_000, rel=0.01)


@pytest.mark.parametrize("queued_work, expected", [
    ({"target_queue_seconds": 0}, "queued_work.target_queue_seconds: Input should be greater than 0"),
    ({"target_queue_seconds": -1}, "queued_work.target_queue_seconds: Input should be greater than 0"),
    ({"background_queue_seconds": 0}, "queued_work.background_queue_seconds: Input should be greater than 0"),
    ({"estimated_tokens_per_s": -5}, "queued_work.estimated_tokens_per_s: Input should be greater than 0"),
    ({"target_queue_secs": 1}, "queued_work.target_queue_secs: Extra inputs are not permitted"),
])
def test_bad_autoscaling_knobs_are_refused_by_name(queued_work, expected):
    config = {"proxy_location": "HeadOnly", "applications": [
        {"name": "gateway", "import_path": "serve_app.app:gateway_app"},
        {"name": "m", "import_path": "serve_app.app:model_app", "args": {
            "name": "m", "task": "embed", "source": "./x",
            "deployment": {"autoscaling": {"queued_work": queued_work}}}}]}
    with pytest.raises(ValueError) as error:
        ServeConfigFile.model_validate(config)
    assert f"applications.1.args.deployment.autoscaling.{expected}" in str(error.value)


def test_the_policy_is_selected_in_config_and_serves_stays_selectable():
    model = ModelConfig(name="m", task="embed", source="./x", deployment={"autoscaling": {
        "queued_work": {"target_queue_seconds": 2}}})
    assert ModelConfig.model_validate(model.model_dump()) == model  # the builder hands the replica its dump
    work = model.deployment.serve_options()["autoscaling_config"]
    assert work["policy"] == {"policy_function": "serve_app.replica.autoscaling:QueuedWorkPolicy",
                              "policy_kwargs": {"target_queue_seconds": 2, "background_queue_seconds": None}}
    assert isinstance(_resolve_policy_callable(ServeAutoscalingConfig.model_validate(work).policy), QueuedWorkPolicy)
    requests = ModelConfig(name="m", task="embed", source="./x", deployment={"autoscaling": {
        "target_ongoing_requests": 4}}).deployment.serve_options()["autoscaling_config"]
    assert "policy" not in requests
    assert ServeAutoscalingConfig.model_validate(requests).policy.is_default_policy_function()
    with pytest.raises(ValueError, match="target_ongoing_requests is the request-count policy's target"):
        AutoscalingConfig(queued_work={}, target_ongoing_requests=4)
    from serve_app.config import GatewayConfig

    with pytest.raises(ValueError, match="deployment.autoscaling.queued_work: only model deployments"):
        GatewayConfig(deployment={"autoscaling": {"queued_work": {}}})
