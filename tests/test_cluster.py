"""The cluster-launcher files and the capacity planner: Ray's own validator, offline, and prod.yaml's replicas packed
onto each cluster file's node types at min and at max. No Ray cluster is started."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from serve_app.cluster.capacity import (UNIT, DeploymentDemand, NodePlan, deployment_demands, load_cluster, main,
                                        plan_capacity)
from serve_app.cluster.nodes import (ClusterConfigError, ClusterSpec, NodeType, load_cluster_file,
                                     validate_cluster_config)
from serve_app.config import load_config_file

REPO = Path(__file__).resolve().parent.parent
CLUSTER_FILES = sorted(REPO.glob("cluster*.yaml"))
PROD = REPO / "configs" / "prod.yaml"


@pytest.fixture(scope="module")
def prod_demands() -> list[DeploymentDemand]:
    return deployment_demands(load_config_file(PROD))


def worker_types(raw: dict) -> list[str]:
    return [name for name in raw["available_node_types"] if name != raw["head_node_type"]]


# ---- Ray's validator ------------------------------------------------------------------------------------------------

def test_both_cloud_files_are_there():
    assert {path.name for path in CLUSTER_FILES} >= {"cluster.yaml", "cluster-gcp.yaml"}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda path: path.name)
def test_cluster_file_passes_rays_validator(path):
    raw = load_cluster_file(path)
    prepared = validate_cluster_config(raw)
    assert prepared["provider"]["type"] in {"aws", "gcp"}
    for name, node_type in raw["available_node_types"].items():
        resources = node_type["resources"]
        assert isinstance(resources["CPU"], int) and isinstance(resources["GPU"], int), name
    assert raw["available_node_types"][raw["head_node_type"]]["resources"]["GPU"] == 0
    assert all(raw["available_node_types"][name]["resources"]["GPU"] >= 1 for name in worker_types(raw))
    assert "--metrics-export-port=8080" in " ".join(prepared["head_start_ray_commands"])
    assert "--metrics-export-port=8080" in " ".join(prepared["worker_start_ray_commands"])


def _unknown_key(raw: dict) -> None:
    raw["available_node_types"][worker_types(raw)[0]]["resource"] = {"GPU": 1}  # misspelled "resources"


def _fractional_gpu(raw: dict) -> None:
    raw["available_node_types"][worker_types(raw)[0]]["resources"]["GPU"] = 0.5


def _unknown_head_type(raw: dict) -> None:
    raw["head_node_type"] = "no-such-type"


@pytest.mark.parametrize(("breakage", "message"), [
    (_unknown_key, "Additional properties are not allowed"),
    (_fractional_gpu, "is not of type 'integer'"),
    (_unknown_head_type, "head_node_type"),
], ids=["unknown key", "fractional GPU", "unknown head type"])
def test_broken_cluster_file_is_rejected(breakage, message):
    raw = load_cluster_file(REPO / "cluster.yaml")
    breakage(raw)
    with pytest.raises(ClusterConfigError, match=message):
        validate_cluster_config(raw)


# ---- prod.yaml on the cluster files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda path: path.name)
def test_prod_fits_at_min_and_at_max(path, prod_demands):
    cluster = load_cluster(path)
    low, high = (plan_capacity(prod_demands, cluster, scale) for scale in ("min", "max"))
    assert low.fits and high.fits, low.render() + "\n" + high.render()
    for plan in (low, high):
        assert plan.placed() == {demand.name: demand.replicas(plan.scale) for demand in prod_demands}
        for node in plan.nodes:
            assert 0 <= node.free_cpu_units and node.used_cpu_units <= node.node_type.cpus * UNIT
            for gpu in node.gpus:
                assert gpu.free_units >= 0 and sum(units for _, units in gpu.shares) == gpu.used_units <= UNIT
        # The gateway and its batch runner (CPU only) stay on the head.
        assert Counter(plan.nodes[0].replicas) == {"gateway": plan.placed()["gateway"], "gateway-batch-runner": 1}
    # At min one GPU holds one replica of each of the six models: 0.25 + 0.25 + 0.15 + 0.15 + 0.05 + 0.05.
    assert low.gpus_in_use() == 1
    shared_gpu = next(gpu for node in low.nodes for gpu in node.gpus if gpu.shares)
    assert len({name for name, _ in shared_gpu.shares}) == 6 and shared_gpu.used_units == 9000  # 0.9 GPU
    assert high.gpus_in_use() == 8 > low.gpus_in_use()
    assert sum(high.node_counts().values()) >= sum(low.node_counts().values())


def test_prod_node_counts(prod_demands):
    """The plans the cluster files' comments describe."""
    aws, gcp = load_cluster(REPO / "cluster.yaml"), load_cluster(REPO / "cluster-gcp.yaml")
    assert plan_capacity(prod_demands, aws, "min").node_counts() == {"ray.head.cpu": 1, "ray.worker.a100x8": 1}
    # At max one p4de.24xlarge still holds everything: its 96 CPUs, not its GPUs, are the limit.
    aws_max = plan_capacity(prod_demands, aws, "max")
    assert aws_max.node_counts() == {"ray.head.cpu": 1, "ray.worker.a100x8": 1}
    assert aws_max.nodes[1].free_cpu_units == 0
    assert plan_capacity(prod_demands, gcp, "min").node_counts() == {"ray_head_cpu": 1, "ray_worker_a100x1": 1}
    assert plan_capacity(prod_demands, gcp, "max").node_counts() == {
        "ray_head_cpu": 1, "ray_worker_a100x1": 1, "ray_worker_a100x8": 1}


def test_cluster_too_small_for_max_names_the_deployments(prod_demands):
    raw = load_cluster_file(REPO / "cluster-gcp.yaml")
    for name in ("ray_worker_a100x8", "ray_worker_h100x8"):
        raw["available_node_types"][name]["max_workers"] = 0
    cluster = ClusterSpec.from_prepared(validate_cluster_config(raw))
    assert plan_capacity(prod_demands, cluster, "min").fits
    high = plan_capacity(prod_demands, cluster, "max")
    assert not high.fits
    left_over = {unplaced.deployment for unplaced in high.unplaced}
    assert "qwen3-reranker-8b" in left_over and "gateway" not in left_over
    assert "ray_worker_a100x1 at its max_workers 1" in high.render()
    assert sum(unplaced.replicas for unplaced in high.unplaced) + sum(high.placed().values()) == 65


# ---- packing rules, on hand-made clusters ---------------------------------------------------------------------------

HEAD = NodeType("head", "cpu", cpus=4, gpus=0, min_workers=0, max_workers=0)


def one_gpu_cluster(max_workers: int = 2) -> ClusterSpec:
    gpu_node = NodeType("gpu1", "one-gpu", cpus=8, gpus=1, min_workers=0, max_workers=max_workers)
    return ClusterSpec("test", "aws", HEAD, (HEAD, gpu_node), max_workers=max_workers)


def shares(plan) -> list[list[list[tuple[str, int]]]]:
    return [[gpu.shares for gpu in node.gpus] for node in plan.nodes]


def test_fractional_packing_on_two_one_gpu_nodes():
    demands = [DeploymentDemand("quarter", 1, 0.25, 2, 2), DeploymentDemand("half", 1, 0.5, 1, 1),
               DeploymentDemand("whole", 1, 1, 1, 1)]
    plan = plan_capacity(demands, one_gpu_cluster(), "min")
    assert plan.fits
    # Largest first: the whole GPU opens node 1, the half opens node 2 and both quarters fill it up.
    assert shares(plan) == [[], [[("whole", UNIT)]], [[("half", 5000), ("quarter", 2500), ("quarter", 2500)]]]
    # One quarter more has nowhere to go: both one-GPU nodes are full and max_workers is 2.
    demands[0] = DeploymentDemand("quarter", 1, 0.25, 3, 3)
    plan = plan_capacity(demands, one_gpu_cluster(), "min")
    assert [(unplaced.deployment, unplaced.replicas) for unplaced in plan.unplaced] == [("quarter", 1)]
    assert "gpu1 at its max_workers 2" in plan.unplaced[0].reason


def test_a_fraction_takes_the_gpu_it_fills_best():
    node = NodePlan.empty(NodeType("gpu3", "", cpus=8, gpus=3, min_workers=0, max_workers=1), "worker 1")
    node.gpus[0].free_units, node.gpus[1].free_units = 5000, 3000
    assert node.gpus_for(2500) == [1]  # the raylet's best fit, not the first GPU with room
    assert node.gpus_for(6000) == [2]
    assert node.gpus_for(2 * UNIT) is None  # only GPU 2 is completely free


@pytest.mark.parametrize(("demand", "message"), [
    (DeploymentDemand("cpu-hungry", 200, 0, 1, 1), "more than any node has"),
    (DeploymentDemand("gpu-hungry", 1, 16, 1, 1), "more than any node has"),
    (DeploymentDemand("one-and-a-half", 1, 1.5, 1, 1), "never a fraction above 1"),
])
def test_replica_larger_than_any_node_is_unplaceable(demand, message):
    plan = plan_capacity([demand], one_gpu_cluster(), "max")
    assert not plan.fits
    assert [unplaced.deployment for unplaced in plan.unplaced] == [demand.name]
    assert message in plan.unplaced[0].reason
    assert len(plan.nodes) == 1  # no worker was started for it


# ---- the command line -----------------------------------------------------------------------------------------------

def test_cli_prints_both_plans_and_exits_0(capsys):
    assert main(["--config", str(PROD), "--cluster", str(REPO / "cluster.yaml")]) == 0
    out = capsys.readouterr().out
    assert "valid for the cluster launcher of Ray" in out
    assert "== min replicas: fits" in out and "== max replicas: fits" in out
    assert "GPU 0    0.9    qwen3-reranker-8b 0.25" in out


def test_cli_exits_1_when_max_does_not_fit(tmp_path, capsys):
    raw = load_cluster_file(REPO / "cluster-gcp.yaml")
    for name in ("ray_worker_a100x8", "ray_worker_h100x8"):
        raw["available_node_types"][name]["max_workers"] = 0
    small = tmp_path / "cluster-small.yaml"
    small.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(PROD), "--cluster", str(small)]) == 1
    assert "max replicas: DOES NOT FIT" in capsys.readouterr().out


def test_cli_exits_1_on_a_cluster_file_ray_rejects(tmp_path, capsys):
    raw = load_cluster_file(REPO / "cluster.yaml")
    _fractional_gpu(raw)
    broken = tmp_path / "cluster-broken.yaml"
    broken.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(PROD), "--cluster", str(broken)]) == 1
    assert "resources.GPU: 0.5 is not of type 'integer'" in capsys.readouterr().err


def test_cli_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "serve_app.capacity", "--config", "configs/prod.yaml",
                             "--cluster", "cluster-gcp.yaml"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "max replicas: fits on 3 nodes" in result.stdout
