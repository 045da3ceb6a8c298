"""The cluster a plan is made for: node types with their CPUs, GPUs and worker bounds.

A Ray cluster-launcher file (cluster.yaml, cluster-gcp.yaml) is checked here with Ray's own validator, offline;
a KubeRay RayService manifest is read into the same node types by kuberay.py. capacity.py packs replicas onto them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


class ClusterConfigError(ValueError):
    """A cluster file that `ray up` would refuse, or that does not declare what the planner needs."""


# ---- the cluster file ----------------------------------------------------------------------------------------------

def load_cluster_file(path: str | Path) -> dict[str, Any]:
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ClusterConfigError("a cluster file is a YAML mapping")
    return raw


def validate_cluster_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Ray's own checks of a cluster file, run offline; returns the config as `ray up` prepares it.

    `ray up` runs prepare_config (merge the provider's defaults.yaml, fill each type's min/max_workers), then the
    provider's fillout_available_node_types_resources, then validate_config (ray-schema.json: unknown keys and
    non-integer resources are rejected; head_node_type must exist; the min_workers must fit the global max_workers).
    Only the middle step needs the cloud: on AWS it asks EC2 (boto3) for the vCPUs and GPUs of instance types whose
    `resources` leave them out; on GCP it only adds TPU pod resources. Skipping it is exact for files that declare CPU
    and GPU for every node type, which the planner requires anyway. prepare_config imports nothing but the
    ray.autoscaler.aws / ray.autoscaler.gcp packages (to find their defaults.yaml): no boto3, no Google client.
    """
    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(part) for part in exc.absolute_path) or "top level"
        raise ClusterConfigError(f"{where}: {exc.message}") from None
    except KeyError as exc:
        raise ClusterConfigError(f"missing key {exc}") from None
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        raise ClusterConfigError(str(exc)) from None
    return prepared


@dataclass(frozen=True)
class NodeType:
    name: str
    instance: str  # InstanceType (AWS) or machineType (GCP): only printed
    cpus: int
    gpus: int
    min_workers: int
    max_workers: int


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    provider: str
    head: NodeType
    node_types: tuple[NodeType, ...]  # in the file's order, the head's type among them
    max_workers: int  # worker nodes of all types together

    @classmethod
    def from_prepared(cls, prepared: dict[str, Any]) -> ClusterSpec:
        """The node types of a config returned by validate_cluster_config."""
        node_types = []
        for name, node_type in prepared["available_node_types"].items():
            resources = node_type["resources"]
            missing = [key for key in ("CPU", "GPU") if key not in resources]
            if missing:
                raise ClusterConfigError(f"available_node_types.{name}.resources: declare {' and '.join(missing)} "
                                         "explicitly (the planner cannot look instance sizes up offline)")
            node_config = node_type["node_config"]
            node_types.append(NodeType(
                name=name, instance=node_config.get("InstanceType") or node_config.get("machineType", ""),
                cpus=int(resources["CPU"]), gpus=int(resources["GPU"]),
                min_workers=node_type["min_workers"], max_workers=node_type["max_workers"]))
        head = next(node_type for node_type in node_types if node_type.name == prepared["head_node_type"])
        return cls(name=prepared["cluster_name"], provider=prepared["provider"]["type"], head=head,
                   node_types=tuple(node_types), max_workers=prepared["max_workers"])

    def describe(self) -> list[str]:
        lines = []
        for node_type in self.node_types:
            role = "head" if node_type is self.head else f"workers {node_type.min_workers}..{node_type.max_workers}"
            lines.append(f"  {node_type.name:<20} {node_type.instance:<16} {node_type.cpus:>4} CPU"
                         f" {node_type.gpus:>2} GPU   {role}")
        lines.append(f"  at most {self.max_workers} workers in all")
        return lines
