"""Capacity planner: does a Serve config fit a Ray cluster file, with every deployment at its fewest and at its most
replicas?

    python -m serve_app.capacity --config configs/prod.yaml --cluster cluster.yaml
    python -m serve_app.capacity --cluster k8s/rayservice.yaml     # KubeRay: its own serveConfigV2

checks the cluster file with Ray's own validator (what `ray up` runs, offline), or a RayService manifest against
KubeRay's CRD (serve_app/cluster/kuberay.py: its head and worker groups become node types, minReplicas..maxReplicas pods
each), then packs every replica of the validated Serve config onto the file's node types twice, at "min"
(num_replicas, or autoscaling.min_replicas) and at "max" (num_replicas, or autoscaling.max_replicas), prints both
plans and exits 1 if either does not fit.

How Ray places a replica, and so how the planner packs:
- A replica asks for its deployment's `num_cpus` and `num_gpus`. Ray counts resources in fixed point, 1/10000 of a
  CPU or GPU, truncating; the planner counts the same units, so twenty 0.05 GPU shares fill exactly one GPU.
- A node's CPUs are one pool. Its GPUs are separate instances: a fraction below 1 must fit inside ONE GPU (the raylet
  never splits it across two, and takes the GPU it fills best), a whole number takes that many completely free GPUs
  of one node, and a fraction above 1 (1.5) is refused by Ray outright.
- First-fit decreasing: replicas in order of GPU demand, then CPU demand, largest first; each goes on the first open
  node that can take it: the head first, then workers in the order they opened, so CPU-only replicas (the gateway)
  fill the head before anything else. The head and every node type's min_workers are open from the start.
- A replica that no open node can take opens a worker of the first node type in the cluster file's order that may
  start one more (below its max_workers and the file's global max_workers) and whose empty node could hold it: list
  the preferred scale-out type first.
Ray's autoscaler picks node types by a utilization score and Serve (with RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY=1)
picks nodes best-fit, so a running cluster's mix of nodes can differ; a plan that fits shows a placement that exists
within the cluster file's limits, one that does not names the replicas left over and why. `memory_gib` requests are
not packed: a cluster file does not declare its nodes' memory.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import ray
import yaml
from ray._raylet import RESOURCE_UNIT_SCALING

from serve_app.cluster.kuberay import check_rayservice, serve_config
from serve_app.cluster.nodes import (ClusterConfigError, ClusterSpec, NodeType, load_cluster_file,
                                     validate_cluster_config)
from serve_app.config import GATEWAY_IMPORT_PATH, DeploymentOptions, ServeConfigFile, load_config_file

Scale = Literal["min", "max"]
SCALES: tuple[Scale, ...] = ("min", "max")

# One GPU (or CPU) in Ray's fixed-point units.
UNIT = RESOURCE_UNIT_SCALING


def to_units(quantity: float) -> int:
    # int() truncates, as Ray's FixedPoint(double) does.
    return int(quantity * UNIT)


def format_units(units: int) -> str:
    return f"{units / UNIT:.4f}".rstrip("0").rstrip(".")


def load_cluster(path: str | Path) -> ClusterSpec:
    """A cluster-launcher file checked by Ray's validator, or a KubeRay RayService manifest checked against its CRD
    (serve_app/cluster/kuberay.py), as node types."""
    raw = load_cluster_file(path)
    if raw.get("kind") == "RayService":
        return check_rayservice(raw)
    return ClusterSpec.from_prepared(validate_cluster_config(raw))


# ---- the Serve config's demand -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeploymentDemand:
    """What one deployment asks of the cluster: per replica, and how many replicas."""

    name: str
    num_cpus: float
    num_gpus: float
    min_replicas: int
    max_replicas: int

    @classmethod
    def from_options(cls, name: str, options: DeploymentOptions) -> DeploymentDemand:
        if options.autoscaling is not None:
            fewest, most = options.autoscaling.min_replicas, options.autoscaling.max_replicas
        else:
            # As DeploymentOptions.serve_options() deploys it: num_replicas, 1 when unset.
            fewest = most = options.num_replicas or 1
        return cls(name, options.num_cpus, options.num_gpus, fewest, most)

    def replicas(self, scale: Scale) -> int:
        return self.min_replicas if scale == "min" else self.max_replicas

    def describe(self) -> str:
        gpus = f"{format_units(to_units(self.num_gpus))} GPU" if self.num_gpus else ""
        return (f"  {self.name:<22} {format_units(to_units(self.num_cpus)):>4} CPU {gpus:<9}"
                f" {self.min_replicas}..{self.max_replicas} replicas")


def deployment_demands(config: ServeConfigFile) -> list[DeploymentDemand]:
    """The gateway and its batch runner, then every model deployment in the config file's order."""
    gateway_name = next(raw.get("name", "gateway") for raw in config.applications
                        if raw.get("import_path") == GATEWAY_IMPORT_PATH)
    gateway = config.gateway_config()
    return [DeploymentDemand.from_options(gateway_name, gateway.deployment),
            DeploymentDemand.from_options(f"{gateway_name}-batch-runner", gateway.batches.runner),
            *(DeploymentDemand.from_options(model.name, model.deployment) for model in config.model_configs())]


# ---- packing -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Replica:
    deployment: str
    cpu_units: int
    gpu_units: int


@dataclass
class GPUPlan:
    free_units: int = UNIT
    shares: list[tuple[str, int]] = field(default_factory=list)  # (deployment, units), one per replica

    @property
    def used_units(self) -> int:
        return UNIT - self.free_units


@dataclass
class NodePlan:
    node_type: NodeType
    label: str
    free_cpu_units: int
    gpus: list[GPUPlan]
    replicas: list[str] = field(default_factory=list)  # the deployment of each replica placed here

    @classmethod
    def empty(cls, node_type: NodeType, label: str) -> NodePlan:
        return cls(node_type, label, node_type.cpus * UNIT, [GPUPlan() for _ in range(node_type.gpus)])

    @property
    def used_cpu_units(self) -> int:
        return self.node_type.cpus * UNIT - self.free_cpu_units

    def gpus_for(self, gpu_units: int) -> list[int] | None:
        """The GPUs the raylet would give a replica asking for `gpu_units`; None when this node has no room."""
        if gpu_units == 0:
            return []
        if gpu_units < UNIT:
            # One GPU: the one left with the least room after it, the lowest index on a tie, as the raylet picks
            # (NodeResourceInstanceSet::TryAllocate).
            fitting = [index for index, gpu in enumerate(self.gpus) if gpu.free_units >= gpu_units]
            return [min(fitting, key=lambda index: self.gpus[index].free_units)] if fitting else None
        completely_free = [index for index, gpu in enumerate(self.gpus) if gpu.free_units == UNIT]
        needed = gpu_units // UNIT
        return completely_free[:needed] if len(completely_free) >= needed else None

    def place(self, replica: Replica) -> bool:
        if replica.cpu_units > self.free_cpu_units:
            return False
        chosen = self.gpus_for(replica.gpu_units)
        if chosen is None:
            return False
        self.free_cpu_units -= replica.cpu_units
        share = min(replica.gpu_units, UNIT)
        for index in chosen:
            self.gpus[index].free_units -= share
            self.gpus[index].shares.append((replica.deployment, share))
        self.replicas.append(replica.deployment)
        return True

    def render(self) -> list[str]:
        header = f"  {self.label:<10} {self.node_type.name} ({self.node_type.instance})"
        header += f"  CPU {format_units(self.used_cpu_units)}/{self.node_type.cpus}"
        if self.gpus:
            header += f"  GPU {format_units(sum(gpu.used_units for gpu in self.gpus))}/{len(self.gpus)}"
        lines = [header]
        cpu_only = Counter(self.replicas) - Counter(name for gpu in self.gpus for name, _ in gpu.shares)
        if cpu_only:
            lines.append("      CPU only: " + ", ".join(f"{name} x{count}" for name, count in cpu_only.items()))
        index = 0
        while index < len(self.gpus):
            if self.gpus[index].shares:
                gpu = self.gpus[index]
                shares = ", ".join(f"{name} {count} x {format_units(units)}" if count > 1
                                   else f"{name} {format_units(units)}"
                                   for (name, units), count in Counter(gpu.shares).items())
                lines.append(f"      GPU {index:<4} {format_units(gpu.used_units):<6} {shares}")
                index += 1
                continue
            run_end = index
            while run_end + 1 < len(self.gpus) and not self.gpus[run_end + 1].shares:
                run_end += 1
            which = f"{index}" if run_end == index else f"{index}-{run_end}"
            lines.append(f"      GPU {which:<4} free")
            index = run_end + 1
        return lines


@dataclass(frozen=True)
class Unplaced:
    deployment: str
    replicas: int
    reason: str


@dataclass
class Plan:
    scale: Scale
    nodes: list[NodePlan]
    unplaced: list[Unplaced]

    @property
    def fits(self) -> bool:
        return not self.unplaced

    def node_counts(self) -> dict[str, int]:
        """Nodes per node type, the head included, in the order they opened."""
        return dict(Counter(node.node_type.name for node in self.nodes))

    def placed(self) -> Counter[str]:
        return Counter(name for node in self.nodes for name in node.replicas)

    def gpus_in_use(self) -> int:
        return sum(1 for node in self.nodes for gpu in node.gpus if gpu.shares)

    def summary(self) -> str:
        counts = ", ".join(f"{name} x{count}" for name, count in self.node_counts().items())
        if self.fits:
            gpus = self.gpus_in_use()
            return (f"{self.scale} replicas: fits on {len(self.nodes)} nodes ({counts}), "
                    f"{gpus} GPU{'s' * (gpus != 1)} used")
        missing = sum(unplaced.replicas for unplaced in self.unplaced)
        return f"{self.scale} replicas: DOES NOT FIT, {missing} replicas left over (nodes opened: {counts})"

    def render(self) -> str:
        lines = [f"== {self.summary()}"]
        for node in self.nodes:
            lines.extend(node.render())
        lines.extend(f"  not placed: {unplaced.deployment} x{unplaced.replicas}: {unplaced.reason}"
                     for unplaced in self.unplaced)
        return "\n".join(lines)


def _replicas(demands: list[DeploymentDemand], scale: Scale) -> list[Replica]:
    replicas = [Replica(demand.name, to_units(demand.num_cpus), to_units(demand.num_gpus))
                for demand in demands for _ in range(demand.replicas(scale))]
    # Largest GPU demand first, then CPU; a stable sort keeps the config's order among equals.
    return sorted(replicas, key=lambda replica: (-replica.gpu_units, -replica.cpu_units))


def _impossible(replica: Replica, cluster: ClusterSpec) -> str | None:
    """Why no node of this cluster could ever hold `replica`, or None."""
    if replica.gpu_units > UNIT and replica.gpu_units % UNIT:
        return (f"asks for {format_units(replica.gpu_units)} GPUs per replica: Ray allocates a fraction of one GPU "
                "or whole GPUs, never a fraction above 1")
    startable = [node_type for node_type in cluster.node_types
                 if node_type is cluster.head or node_type.max_workers > 0]
    if not any(NodePlan.empty(node_type, "").place(replica) for node_type in startable):
        sizes = ", ".join(f"{node_type.name} {node_type.cpus} CPU/{node_type.gpus} GPU" for node_type in startable)
        return (f"one replica needs {format_units(replica.cpu_units)} CPU and {format_units(replica.gpu_units)} GPU, "
                f"more than any node has ({sizes})")
    return None


def plan_capacity(demands: list[DeploymentDemand], cluster: ClusterSpec, scale: Scale) -> Plan:
    """Pack every replica at `scale` onto the cluster (first-fit decreasing, as the module docstring describes)."""
    nodes = [NodePlan.empty(cluster.head, "head")]
    workers: Counter[str] = Counter()

    def may_start(node_type: NodeType) -> bool:
        return workers[node_type.name] < node_type.max_workers and workers.total() < cluster.max_workers

    def start_worker(node_type: NodeType) -> NodePlan:
        workers[node_type.name] += 1
        node = NodePlan.empty(node_type, f"worker {workers.total()}")
        nodes.append(node)
        return node

    for node_type in cluster.node_types:
        for _ in range(node_type.min_workers):
            start_worker(node_type)

    left_over: Counter[str] = Counter()
    reasons: dict[str, str] = {}
    for replica in _replicas(demands, scale):
        if any(node.place(replica) for node in nodes):  # any() stops at the first node that takes it
            continue
        reason = _impossible(replica, cluster)
        if reason is None:
            holders = [node_type for node_type in cluster.node_types if NodePlan.empty(node_type, "").place(replica)]
            node_type = next((node_type for node_type in holders if may_start(node_type)), None)
            if node_type is not None:
                start_worker(node_type).place(replica)
                continue
            limits = [f"{node_type.name} at its max_workers {node_type.max_workers}" for node_type in holders
                      if workers[node_type.name] >= node_type.max_workers]
            if workers.total() >= cluster.max_workers:
                limits.append(f"{workers.total()} workers, the global max_workers")
            reason = f"no room on the open nodes, and no node that could hold one may start ({'; '.join(limits)})"
        left_over[replica.deployment] += 1
        reasons.setdefault(replica.deployment, reason)
    return Plan(scale, nodes, [Unplaced(name, count, reasons[name]) for name, count in left_over.items()])


# ---- the command line ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.capacity",
        description="Check a Ray cluster file with Ray's validator (or a KubeRay RayService manifest against its "
                    "CRD) and pack a Serve config's replicas onto it, at the minimum and at the maximum replica "
                    "counts. Exits 1 if either does not fit.")
    parser.add_argument("--config", help="Serve config, e.g. configs/prod.yaml (default for a RayService: its "
                                         "serveConfigV2)")
    parser.add_argument("--cluster", required=True,
                        help="Ray cluster-launcher file (cluster.yaml) or RayService manifest (k8s/rayservice.yaml)")
    args = parser.parse_args(argv)
    try:
        cluster = load_cluster(args.cluster)
    except (ClusterConfigError, OSError, yaml.YAMLError) as exc:
        print(f"{args.cluster}: {exc}", file=sys.stderr)
        return 1
    config_name = args.config or f"{args.cluster} spec.serveConfigV2"
    try:
        if args.config is not None:
            config = load_config_file(args.config)  # its errors name the file
        elif cluster.provider == "kuberay":
            config = serve_config(load_cluster_file(args.cluster))
        else:
            parser.error("--config is required with a cluster-launcher file")
    except (ValueError, OSError, yaml.YAMLError) as exc:
        print(f"{config_name}: {exc}", file=sys.stderr)
        return 1
    demands = deployment_demands(config)
    if cluster.provider == "kuberay":
        print(f"RayService {args.cluster} ({cluster.name}): valid against KubeRay's RayService CRD")
    else:
        print(f"Cluster {args.cluster} ({cluster.name} on {cluster.provider}): "
              f"valid for the cluster launcher of Ray {ray.__version__}")
    print("\n".join(cluster.describe()))
    print(f"Serve config {config_name}: per replica, and replicas at min..max")
    print("\n".join(demand.describe() for demand in demands))
    plans = [plan_capacity(demands, cluster, scale) for scale in SCALES]
    for plan in plans:
        print()
        print(plan.render())
    print()
    for plan in plans:
        print(plan.summary())
    return 0 if all(plan.fits for plan in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
