"""The config schema, the shipped configs, the builders' validation and the gateway's model table (no Ray)."""

import asyncio
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.config import (AutoscalingConfig, GatewayConfig, ModelConfig, ServeConfigFile, load_config_file,
                              validate_args)
from serve_app.errors import InvalidRequest, ModelNotFound, ModelStarting
from serve_app.gateway.directory import STARTING_RETRY_AFTER_S, ModelApp, ModelDirectory, model_apps
from serve_app.replica.weights import ModelLoadError, fetch_weights, main

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def raw(name: str) -> dict:
    return yaml.safe_load(next(p for p in CONFIGS if p.stem == name).read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_pass_our_schema_and_serves(path):
    config = load_config_file(path)
    ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert config.model_configs()


def test_prod_serves_all_six_models_on_gpu_fractions_with_autoscaling():
    models = load_config_file(next(p for p in CONFIGS if p.stem == "prod")).model_configs()
    assert sorted(m.source for m in models) == sorted(f"Qwen/Qwen3-{kind}-{size}" for kind in ("Reranker", "Embedding")
                                                      for size in ("0.6B", "4B", "8B"))
    assert all(0 < m.deployment.num_gpus < 1 and m.deployment.autoscaling for m in models)
    assert all(m.deployment.autoscaling.queued_work for m in models)  # every model scales on its queued work
    assert sum(m.deployment.num_gpus for m in models) <= 1.0  # one replica of each fits one GPU
    gateway = GatewayConfig.model_validate(raw("prod")["applications"][0]["args"])
    assert gateway.deployment.autoscaling.min_replicas >= 2


def test_local_serves_the_two_small_models_from_the_hub_on_cpu():
    models = load_config_file(next(p for p in CONFIGS if p.stem == "local")).model_configs()
    assert {(m.source, m.device) for m in models} == {("Qwen/Qwen3-Reranker-0.6B", "cpu"),
                                                      ("Qwen/Qwen3-Embedding-0.6B", "cpu")}


@pytest.mark.parametrize("path, value, expected", [
    (("args", "batching", "token_budgt"), 1024, "applications.1.args.batching.token_budgt: Extra inputs"),
    (("args", "deployment", "num_gpu"), 1, "applications.1.args.deployment.num_gpu: Extra inputs"),
    (("args", "task"), "classify", "applications.1.args.task: Input should be 'rerank' or 'embed'"),
    (("args", "source"), "not a source", "neither a hub repo id"),
    (("args", "deployment", "max_ongoing_requests"), 0, "max_ongoing_requests: Input should be greater"),
    (("route_prefx",), "/x", "applications.1.route_prefx: Extra inputs"),
    (("name",), "other-name", "must equal its model's name"),
])
def test_bad_keys_are_named(path, value, expected):
    config = raw("tiny")
    target = config["applications"][1]
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    with pytest.raises(ValueError) as error:
        ServeConfigFile.model_validate(config)
    assert expected in str(error.value)


def test_misspelled_deployment_override_is_rejected_not_dropped():
    config = raw("tiny")
    config["applications"][1]["deployments"] = [{"name": "ModelServer", "user_config": {"max_wait": 5}}]
    with pytest.raises(ValueError, match="user_config.max_wait: Extra inputs"):
        ServeConfigFile.model_validate(config)
    config["applications"][1]["deployments"] = [{"name": "ModelServer", "num_replicas": 3}]
    with pytest.raises(ValueError, match="num_replicas: Extra inputs"):
        ServeConfigFile.model_validate(config)


def test_duplicate_names_and_missing_gateway():
    config = raw("tiny")
    config["applications"][2]["args"]["aliases"] = ["Qwen/Qwen3-Reranker-0.6B"]
    with pytest.raises(ValueError, match="already used by application 'qwen3-reranker-tiny'"):
        ServeConfigFile.model_validate(config)
    config = raw("tiny")
    del config["applications"][0]
    with pytest.raises(ValueError, match="exactly one gateway"):
        ServeConfigFile.model_validate(config)


def test_builders_validate_their_args():
    with pytest.raises(ValueError, match="invalid model config:\n  batching.max_items: Input should be greater"):
        validate_args(ModelConfig, {"name": "m", "task": "embed", "source": "./x", "batching": {"max_items": 0}},
                      "model")
    with pytest.raises(ValueError, match="max_body_byte: Extra inputs"):
        validate_args(GatewayConfig, {"max_body_byte": 5}, "gateway")


def test_both_scaling_modes_at_once_is_an_error():
    with pytest.raises(ValueError, match="either num_replicas or autoscaling"):
        ModelConfig(name="m", task="embed", source="./x", deployment={"num_replicas": 2, "autoscaling": {}})


def test_a_look_back_window_shorter_than_the_load_reports_is_an_error():
    """Each load report covers only the last look_back_period_s: a window no longer than the interval between reports
    (10 s by default) leaves the load between them unseen. Serve's own defaults (30 s window) count too."""
    with pytest.raises(ValueError, match=r"look_back_period_s \(5\) must be longer than "
                                         r"metrics_interval_s \(10, Serve default\)"):
        AutoscalingConfig(look_back_period_s=5)
    with pytest.raises(ValueError, match=r"look_back_period_s \(30, Serve default\) must be longer than "
                                         r"metrics_interval_s \(60\)"):
        AutoscalingConfig(metrics_interval_s=60)
    options = ModelConfig(name="m", task="embed", source="./x", deployment={"autoscaling": {
        "look_back_period_s": 1, "metrics_interval_s": 0.25}}).deployment.serve_options()["autoscaling_config"]
    assert options["look_back_period_s"] == 1 and options["metrics_interval_s"] == 0.25
    from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig

    assert ServeAutoscalingConfig.model_validate(options).metrics_interval_s == 0.25  # what Serve itself takes


def test_deployment_options_become_serve_options():
    options = ModelConfig(name="m", task="embed", source="./x",
                          deployment={"num_gpus": 0.25, "autoscaling": {"max_replicas": 3}}).deployment.serve_options()
    actor_options = options["ray_actor_options"]
    assert actor_options["num_cpus"] == 1 and actor_options["num_gpus"] == 0.25
    # Gateway <-> model messages up to 1 GiB (Serve's gRPC default of 4 MiB made 32 MiB bodies a 500).
    assert actor_options["runtime_env"]["env_vars"]["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"] == str(1 << 30)
    assert options["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in options
    # Serve's own refusals (queue full in front of a deployment) tell clients when to come back.
    assert options["backpressure_config"] == {"status_code": 503, "retry_after_s": 1}
    from ray.serve.config import BackpressureConfig

    BackpressureConfig.model_validate(options["backpressure_config"])  # what Serve itself accepts


def test_config_checker_cli(tmp_path, capsys):
    assert main([str(p) for p in CONFIGS]) == 0
    bad = tmp_path / "bad.yaml"
    config = raw("tiny")
    config["applications"][1]["args"]["dtyp"] = "float32"
    bad.write_text(yaml.safe_dump(config))
    assert main([str(bad)]) == 1
    assert "applications.1.args.dtyp: Extra inputs are not permitted" in capsys.readouterr().err


def test_unreachable_hub_names_the_offline_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="configs/tiny.yaml"):
        fetch_weights(ModelConfig(name="r", task="rerank", source="Qwen/Qwen3-Reranker-0.6B"))


def test_missing_local_checkpoint_says_how_to_build_it(tmp_path):
    with pytest.raises(ModelLoadError, match="python -m models.checkpoints"):
        fetch_weights(ModelConfig(name="r", task="rerank", source=str(tmp_path / "none")))


def test_gateway_modules_never_import_torch():
    code = "import sys, serve_app.gateway.ingress, serve_app.app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the gateway's model table --------------------------------------------------------------------------

async def handle_of(app: str) -> str:
    return app  # the fake handle is the application's name


class FakeServe:
    """Stands in for the Serve controller and the model replicas: which apps run, what they describe."""

    def __init__(self):
        self.apps: dict[str, ModelApp] = {}
        self.facts: dict[str, dict] = {}
        self.describe_calls: list[str] = []

    def add(self, app, task, aliases=(), deployed_at=1.0, running=True):
        self.apps[app] = ModelApp(deployed_at, running=running, names=(app, *aliases))
        self.facts[app] = {"name": app, "task": task, "aliases": list(aliases), "source": app, "max_length": 8192}

    def directory(self):
        async def describe(app):
            self.describe_calls.append(app)
            return copy.deepcopy(self.facts[app])

        def list_apps():
            self.listings += 1
            return dict(self.apps)

        self.listings = 0
        return ModelDirectory(60, list_apps=list_apps, get_handle=handle_of, describe=describe)


def test_directory_resolves_names_aliases_and_refreshes_on_a_miss():
    fake = FakeServe()
    fake.add("rr", "rerank", aliases=["Qwen/Qwen3-Reranker-0.6B"])

    async def scenario():
        directory = fake.directory()
        reranker = await directory.resolve("Qwen/Qwen3-Reranker-0.6B", "rerank")
        assert reranker.name == "rr"
        fake.add("emb", "embed")  # deployed later: a miss refreshes at once
        await asyncio.sleep(0.6)
        assert (await directory.resolve("emb", "embed")).name == "emb"
        with pytest.raises(InvalidRequest, match="is a rerank model; embed models: emb"):
            await directory.resolve("rr", "embed")
        fake.apps["rr"] = ModelApp(1.0, running=False)  # its only replica is restarting: still served (Serve
        await directory.refresh()  # holds requests until it is back), never a 404
        assert await directory.resolve("rr", "rerank") is reranker and not directory.was_removed(reranker)
        fake.apps["rr"] = ModelApp(5.0, running=False)  # redeployed, no new replica up yet: the old facts hold
        await directory.refresh()
        assert await directory.resolve("rr", "rerank") is reranker
        del fake.apps["rr"]
        await directory.refresh()
        assert directory.was_removed(reranker)  # requests still waiting on it now get a 404
        with pytest.raises(ModelNotFound, match="served models: emb"):  # and so do new ones
            await directory.resolve("rr", "rerank")
        calls = len(fake.describe_calls)
        await directory.refresh()  # nothing changed: nothing re-described
        assert len(fake.describe_calls) == calls
        fake.add("emb", "embed", aliases=["new-alias"], deployed_at=2.0)  # redeployed: described again
        await directory.refresh()
        assert (await directory.resolve("new-alias", "embed")).name == "emb"

    asyncio.run(scenario())


def test_directory_skips_a_model_that_cannot_describe_itself():
    fake = FakeServe()
    fake.add("ok", "embed")
    fake.add("broken", "embed")

    broken = {"broken"}

    async def describe(app):
        if app in broken:
            raise RuntimeError("replica not answering yet")
        return fake.facts[app]

    async def scenario():
        directory = ModelDirectory(60, list_apps=lambda: dict(fake.apps), get_handle=handle_of, describe=describe)
        assert [entry.name for entry in await directory.entries()] == ["ok"]
        broken.clear()  # it answers now: the next listing retries at once, not after the 60 s background refresh
        await asyncio.sleep(0.6)
        assert [entry.name for entry in await directory.entries()] == ["broken", "ok"]

    asyncio.run(scenario())


def test_a_deployed_model_without_a_running_replica_is_starting_not_unknown():
    fake = FakeServe()
    fake.add("ok", "embed")
    fake.add("slow", "rerank", aliases=["Org/Slow"], running=False)  # deployed, weights still loading

    async def scenario():
        directory = fake.directory()
        readiness = await directory.readiness()
        assert (readiness.models, readiness.starting, readiness.ready) == (["ok", "slow"], ["slow"], False)
        for name in ("slow", "Org/Slow"):  # by name or alias, from the deployed config: a 503, never a 404
            with pytest.raises(ModelStarting, match="model 'slow' is starting") as error:
                await directory.resolve(name, "rerank")
            assert error.value.status == 503 and error.value.headers == {"Retry-After": str(STARTING_RETRY_AFTER_S)}
        with pytest.raises(ModelNotFound, match="served models: ok"):  # no application serves it: 404 as before
            await directory.resolve("nope", "rerank")
        fake.add("slow", "rerank", aliases=["Org/Slow"])  # its replica is up
        await asyncio.sleep(0.6)
        readiness = await directory.readiness()  # not ready: refreshes at once rather than after refresh_s
        assert (readiness.starting, readiness.ready) == ([], True)
        assert (await directory.resolve("Org/Slow", "rerank")).name == "slow"
        listings = fake.listings
        await directory.readiness()  # ready: answered from the last listing
        assert fake.listings == listings
        fake.apps["ok"] = fake.apps["ok"]._replace(running=False)  # its only replica restarts: still served
        await directory.refresh()
        assert (await directory.readiness()).starting == ["ok"] and (await directory.resolve("ok", "embed"))
        del fake.apps["ok"], fake.apps["slow"]
        await directory.refresh()
        readiness = await directory.readiness()
        assert (readiness.models, readiness.ready) == ([], False)  # nothing deployed: nothing to be ready for

    asyncio.run(scenario())


def test_a_burst_of_readiness_probes_shares_one_listing():
    fake = FakeServe()
    fake.add("slow", "embed", running=False)

    async def scenario():
        directory = fake.directory()
        results = await asyncio.gather(*(directory.readiness() for _ in range(50)))
        assert all(result.starting == ["slow"] for result in results)
        assert fake.listings == 1, fake.listings  # probes need no key: they must not each reach the controller

    asyncio.run(scenario())


def test_grafana_dashboard_queries_only_metrics_we_publish():
    import json
    import re

    metrics_source = (CONFIGS[0].parent.parent / "serve_app" / "metrics.py").read_text()
    published = set(re.findall(r'(?:Counter|Gauge|Histogram)\("(qwen3_\w+)"', metrics_source))
    dashboard = json.loads((CONFIGS[0].parent / "grafana" / "qwen3-serve.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"ray_(qwen3_\w+?)(?:_total|_bucket|_count|_sum)?\b", target["expr"])}
    assert used and used <= published, used - published


def test_the_model_listing_counts_an_application_not_built_yet_as_starting():
    """The controller's details while a config is applied: the reranker's application is still being built (no
    deployment yet, its config known), the embedder's replica is loading, a Python-deployed app has no config, an
    unrelated application and one being deleted are left out."""
    model = "serve_app.app:model_app"
    details = {"applications": {
        "rr": {"status": "DEPLOYING", "last_deployed_time_s": 5.0, "deployments": {},
               "deployed_app_config": {"import_path": model, "args": {"name": "rr", "aliases": ["Org/RR"]}}},
        "emb": {"status": "DEPLOYING", "last_deployed_time_s": 4.0,
                "deployments": {"ModelServer": {"replicas": [{"state": "STARTING"}]}},
                "deployed_app_config": {"import_path": model, "args": {"name": "emb"}}},
        "py": {"status": "RUNNING", "last_deployed_time_s": 3.0,
               "deployments": {"ModelServer": {"replicas": [{"state": "RUNNING"}]}}, "deployed_app_config": None},
        "floor": {"status": "DEPLOYING", "last_deployed_time_s": 2.0, "deployments": {},
                  "deployed_app_config": {"import_path": "bench.floor_app:floor_app", "args": {}}},
        "gone": {"status": "DELETING", "last_deployed_time_s": 1.0, "deployments": {},
                 "deployed_app_config": {"import_path": model, "args": {"name": "gone"}}},
    }}
    assert model_apps(details) == {"rr": ModelApp(5.0, False, ("rr", "Org/RR")), "emb": ModelApp(4.0, False, ("emb",)),
                                   "py": ModelApp(3.0, True, ())}
