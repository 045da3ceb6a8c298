"""k8s/rayservice.yaml, checked offline: KubeRay's RayService CRD with unknown keys refused, serveConfigV2 equal to
configs/prod.yaml and valid for our schema and Serve's, the database URL from a Secret, the PodMonitor matching the
pods' metrics port, and prod.yaml's replicas packed onto the manifest's groups at min and at max. No Kubernetes and
no Ray cluster: the CRD schema is read with jsonschema, the packing is serve_app.cluster.capacity's."""

import copy
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from sqlalchemy.engine import make_url

from serve_app.cluster.capacity import deployment_demands, main, plan_capacity
from serve_app.cluster.kuberay import (load_manifest, parse_quantity, ray_resources, rayservice_cluster, serve_config,
                                       validate_rayservice)
from serve_app.cluster.nodes import ClusterConfigError

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "k8s" / "rayservice.yaml"
PODMONITOR = REPO / "k8s" / "podmonitor.yaml"
PROD = REPO / "configs" / "prod.yaml"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return load_manifest(MANIFEST)


def cluster_config(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterConfig"]


def groups(manifest: dict) -> list[dict]:
    """The head group, then the worker groups."""
    return [cluster_config(manifest)["headGroupSpec"], *cluster_config(manifest)["workerGroupSpecs"]]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


# ---- the CRD ---------------------------------------------------------------------------------------------------

def test_manifest_matches_the_rayservice_crd(manifest):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert validate_rayservice(manifest) == []


def _misspelt_group_key(manifest):
    group = cluster_config(manifest)["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")


def _number_for_a_start_param(manifest):
    cluster_config(manifest)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 16


def _bad_gpu_quantity(manifest):
    ray_container(cluster_config(manifest)["workerGroupSpecs"][0])["resources"]["limits"]["nvidia.com/gpu"] = "one"


def _misspelt_pod_key(manifest):
    container = ray_container(cluster_config(manifest)["headGroupSpec"])
    container["resource"] = container.pop("resources")


def _group_without_template(manifest):
    del cluster_config(manifest)["workerGroupSpecs"][0]["template"]


def _unknown_metadata_key(manifest):
    manifest["metadata"]["label"] = {"a": "b"}


@pytest.mark.parametrize(("breakage", "message"), [
    (_misspelt_group_key, "workerGroupSpecs.0: Additional properties are not allowed ('minReplica' was unexpected)"),
    (_number_for_a_start_param, "rayStartParams.num-cpus: 16 is not of type 'string'"),
    (_bad_gpu_quantity, "limits.nvidia.com/gpu: 'one' does not match"),
    (_misspelt_pod_key, "containers.0: Additional properties are not allowed ('resource' was unexpected)"),
    (_group_without_template, "workerGroupSpecs.0: 'template' is a required property"),
    (_unknown_metadata_key, "metadata.label: not an ObjectMeta field"),
], ids=["misspelt minReplicas", "number for a string", "bad quantity", "misspelt pod key", "no template",
        "metadata"])
def test_a_broken_manifest_is_refused_naming_the_key(manifest, breakage, message):
    broken = copy.deepcopy(manifest)
    breakage(broken)
    errors = validate_rayservice(broken)
    assert any(message in error for error in errors), errors


# ---- what it deploys -------------------------------------------------------------------------------------------

def test_serve_config_v2_is_prod_yaml_and_valid(manifest):
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load(PROD.read_text()), (
        "spec.serveConfigV2 of k8s/rayservice.yaml differs from configs/prod.yaml: copy prod.yaml (below its header "
        "comments) into it")
    ServeDeploySchema.model_validate(embedded)  # what KubeRay hands Serve
    models = serve_config(manifest).model_configs()  # our schema
    assert len(models) == 6 and all(model.deployment.num_gpus > 0 for model in models)


def test_the_database_url_comes_from_a_secret(manifest):
    gateway = serve_config(manifest).gateway_config()
    assert make_url(gateway.database_url).password is None  # no password in the manifest
    for group in groups(manifest):
        env = {item["name"]: item for item in ray_container(group)["env"]}
        assert "value" not in env["QWEN3_SERVE_DB"]
        assert env["QWEN3_SERVE_DB"]["valueFrom"]["secretKeyRef"] == {"name": "qwen3-serve-db", "key": "url"}


def test_gpu_groups_autoscaling_metrics_and_probes(manifest):
    config = cluster_config(manifest)
    assert config["enableInTreeAutoscaling"] is True and config["rayVersion"] == "2.60.0"
    workers = config["workerGroupSpecs"]
    assert workers and any(group["minReplicas"] >= 1 for group in workers)
    for group in workers:
        resources = ray_container(group)["resources"]
        assert int(resources["requests"]["nvidia.com/gpu"]) == int(resources["limits"]["nvidia.com/gpu"]) >= 1
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert "nvidia.com/gpu" not in ray_container(config["headGroupSpec"])["resources"]["limits"]
    for group in groups(manifest):
        container = ray_container(group)
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports["metrics"] == int(group["rayStartParams"]["metrics-export-port"]) == 8080
        assert ports["serve"] == 8000
        assert container["readinessProbe"] and container["livenessProbe"]


def test_the_podmonitor_scrapes_every_pods_metrics_port(manifest):
    monitor = yaml.safe_load(PODMONITOR.read_text())
    assert monitor["kind"] == "PodMonitor" and monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    ports = {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]}
    for group in groups(manifest):
        labels = group["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), labels
        assert ports <= {port["name"] for port in ray_container(group)["ports"]}


# ---- capacity ---------------------------------------------------------------------------------------------------

def test_prod_fits_the_manifests_groups_at_min_and_at_max(manifest):
    cluster = rayservice_cluster(manifest)
    assert [(node.name, node.cpus, node.gpus, node.min_workers, node.max_workers) for node in cluster.node_types] == [
        ("head", 16, 0, 0, 0), ("gpu-80gb", 16, 1, 1, 9)]
    demands = deployment_demands(serve_config(manifest))
    low, high = (plan_capacity(demands, cluster, scale) for scale in ("min", "max"))
    assert low.fits and high.fits, low.render() + "\n" + high.render()
    for plan in (low, high):
        assert plan.placed() == {demand.name: demand.replicas(plan.scale) for demand in demands}
        # The head holds CPU-only replicas: every gateway replica, and the Batch API runner where room is left (at max
        # the gateway replicas fill it and the runner goes to a GPU pod's spare CPUs).
        assert set(plan.nodes[0].replicas) <= {"gateway", "gateway-batch-runner"}
        assert list(plan.nodes[0].replicas).count("gateway") == plan.placed()["gateway"]
    # min: one GPU pod holds one replica of each model (0.9 GPU, 12 of its 16 CPUs).
    assert low.node_counts() == {"head": 1, "gpu-80gb": 1} and low.gpus_in_use() == 1
    assert low.nodes[1].used_cpu_units == 12 * 10_000
    # max: 48 model replicas on 8 GPU pods, within maxReplicas (one spare).
    assert high.node_counts() == {"head": 1, "gpu-80gb": 8} and high.gpus_in_use() == 8
    # Fewer GPU pods allowed than the max plan needs: it does not fit and says which group ran out.
    small = copy.deepcopy(manifest)
    cluster_config(small)["workerGroupSpecs"][0]["maxReplicas"] = 6
    short = plan_capacity(demands, rayservice_cluster(small), "max")
    assert not short.fits and "gpu-80gb at its max_workers 6" in short.render()


def test_ray_resources_follow_kuberays_precedence():
    def group(limits=None, requests=None, params=None, resources=None):
        spec = {"template": {"spec": {"containers": [{"resources": {"limits": limits or {},
                                                                    "requests": requests or {}}}]}}}
        return {**spec, "rayStartParams": params or {}, **({"resources": resources} if resources else {})}

    assert ray_resources(group(limits={"cpu": "12500m", "nvidia.com/gpu": 2}), "g") == (13, 2)  # rounded up
    assert ray_resources(group(limits={"cpu": "0"}, requests={"cpu": "3"}), "g") == (3, 0)  # request if no limit
    assert ray_resources(group(limits={"cpu": 8, "nvidia.com/gpu": 1}, params={"num-cpus": "4", "num-gpus": "0"}),
                         "g") == (4, 0)
    assert ray_resources(group(limits={"cpu": 8}, params={"num-cpus": "4"}, resources={"CPU": "2", "GPU": "1"}),
                         "g") == (2, 1)
    with pytest.raises(ClusterConfigError, match="declare the Ray container's CPUs"):
        ray_resources(group(), "g")
    assert parse_quantity("500m") == Fraction(1, 2) and parse_quantity("64Gi") == 64 * 2**30
    assert parse_quantity("1e3") == 1000 and parse_quantity(2) == 2


def test_capacity_cli_reads_a_rayservice(capsys):
    assert main(["--cluster", str(MANIFEST)]) == 0
    out = capsys.readouterr().out
    assert "valid against KubeRay's RayService CRD" in out and "spec.serveConfigV2" in out
    assert "== min replicas: fits on 2 nodes" in out and "== max replicas: fits on 9 nodes" in out


def test_capacity_cli_refuses_a_manifest_the_crd_refuses(tmp_path, capsys, manifest):
    broken = copy.deepcopy(manifest)
    _misspelt_group_key(broken)
    path = tmp_path / "rayservice.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert main(["--cluster", str(path), "--config", str(PROD)]) == 1
    assert "'minReplica' was unexpected" in capsys.readouterr().err


def test_every_pod_starts_ray_with_the_ingress_and_loops_the_project_sets(manifest):
    """What `python -m serve_app.cluster.haproxy env` gives the cluster files, every pod gets here (the image's
    launcher path and run dir are the image's own, k8s/Dockerfile)."""
    from serve_app.cluster.haproxy import SERVE_LOOPS

    for group in groups(manifest):
        env = {item["name"]: item.get("value") for item in ray_container(group)["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert {name: env.get(name) for name in SERVE_LOOPS} == SERVE_LOOPS
