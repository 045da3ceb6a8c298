"""A KubeRay RayService manifest (k8s/rayservice.yaml), read and checked offline.

- `validate_rayservice` checks a manifest against KubeRay's RayService CRD (k8s/crd/, the file KubeRay publishes)
  the way the API server would, and stricter: an unknown key is refused, where the API server prunes it silently
  (a misspelt `minReplica` would leave the group at KubeRay's default). The CRD's `x-kubernetes-*` keys (CEL rules,
  list types) are not checked; everything else in it is JSON Schema (OpenAPI 3.0, draft 4 style).
- `serve_config` is the Serve config inside `spec.serveConfigV2`, for the project's own schema.
- `rayservice_cluster` turns the head group and the worker groups into the capacity planner's node types
  (serve_app/cluster/capacity.py), with the CPUs and GPUs KubeRay hands Ray for each pod, and each group's minReplicas and
  maxReplicas.

What Ray is told a pod has, in KubeRay's order (ray-operator's generateRayStartCommand): a group's `resources`
(`CPU`, a key ending in `gpu`) first, then `rayStartParams` `num-cpus` / `num-gpus`, then the Ray container's (the
first container's) limits (`cpu`, else its request; a limit whose name ends in `gpu`, e.g. `nvidia.com/gpu`),
each quantity rounded up to an integer.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from serve_app import PROJECT_ROOT
from serve_app.cluster.nodes import ClusterConfigError, ClusterSpec, NodeType
from serve_app.config import ServeConfigFile

RAYSERVICE_CRD = PROJECT_ROOT / "k8s" / "crd" / "ray.io_rayservices.yaml"
API_VERSION = "ray.io/v1"

# Fields of the top-level metadata (ObjectMeta) a manifest may set; the CRD leaves metadata unchecked.
METADATA_KEYS = {"name", "namespace", "labels", "annotations"}

_QUANTITY = re.compile(r"^(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))(?P<suffix>[KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": 1, "k": 10**3,
            "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def is_rayservice(raw: Any) -> bool:
    return isinstance(raw, dict) and raw.get("kind") == "RayService"


def load_manifest(path: str | Path) -> dict[str, Any]:
    raw = yaml.safe_load(Path(path).read_text())
    if not is_rayservice(raw):
        raise ClusterConfigError(f"{path}: not a RayService manifest (kind: RayService)")
    return raw


# ---- the CRD's schema --------------------------------------------------------------------------------------------

@functools.cache
def crd_schema(path: Path = RAYSERVICE_CRD) -> dict[str, Any]:
    """The openAPIV3Schema of the CRD's ray.io/v1 version, with unknown keys refused."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1 MB: libyaml reads it ~10x faster
    crd = yaml.load(path.read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == API_VERSION.split("/")[1])
    return refuse_unknown_keys(version["schema"]["openAPIV3Schema"])


def refuse_unknown_keys(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a structural schema in which every object that lists its properties allows no others (what
    `kubectl apply --validate=strict` enforces), unless it says it keeps unknown fields."""
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


def validate_rayservice(manifest: dict[str, Any], schema: dict[str, Any] | None = None) -> list[str]:
    """Every way `manifest` breaks the CRD (unknown keys included), as `dotted.path: message` lines; [] if none."""
    validator = jsonschema.Draft4Validator(schema if schema is not None else crd_schema())
    errors = [f"{'.'.join(str(part) for part in error.absolute_path) or 'top level'}: {error.message}"
              for error in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))]
    if manifest.get("apiVersion") != API_VERSION:
        errors.append(f"apiVersion: {manifest.get('apiVersion')!r} is not {API_VERSION!r}")
    metadata = manifest.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
        errors.append("metadata.name: a RayService needs a name")
    else:
        errors.extend(f"metadata.{key}: not an ObjectMeta field a manifest sets" for key in set(metadata) - METADATA_KEYS)
    return errors


# ---- what runs in it ---------------------------------------------------------------------------------------------

def serve_config(manifest: dict[str, Any]) -> ServeConfigFile:
    """The Serve config in spec.serveConfigV2, through the project's schema (a ValueError names bad keys)."""
    text = manifest.get("spec", {}).get("serveConfigV2")
    if not isinstance(text, str):
        raise ValueError("spec.serveConfigV2: missing (a string holding the Serve config)")
    return ServeConfigFile.model_validate(yaml.safe_load(text))


def parse_quantity(quantity: str | int | float) -> Fraction:
    """A Kubernetes quantity ("12", "500m", "64Gi", "1e3") as an exact number."""
    match = _QUANTITY.match(str(quantity).strip())
    if match is None:
        raise ClusterConfigError(f"{quantity!r} is not a Kubernetes quantity")
    number, suffix = Fraction(match["number"]), match["suffix"] or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    return number * Fraction(10) ** int(suffix[1:])


def _whole(quantity: str | int | float) -> int:
    return math.ceil(parse_quantity(quantity))  # Quantity.Value() rounds up, as KubeRay passes it to ray start


def _is_gpu_key(key: str) -> bool:
    return key.lower().endswith("gpu")


def ray_resources(group: dict[str, Any], where: str) -> tuple[int, int]:
    """(CPUs, GPUs) that KubeRay tells Ray each pod of this group has."""
    container = group["template"]["spec"]["containers"][0]
    limits = container.get("resources", {}).get("limits", {})
    requests = container.get("resources", {}).get("requests", {})
    group_resources = {key.lower(): value for key, value in (group.get("resources") or {}).items()}
    params = group.get("rayStartParams") or {}

    if "cpu" in group_resources:
        cpus = _whole(group_resources["cpu"])
    elif "num-cpus" in params:
        cpus = _whole(params["num-cpus"])
    elif "cpu" in limits and parse_quantity(limits["cpu"]):
        cpus = _whole(limits["cpu"])
    elif "cpu" in requests and parse_quantity(requests["cpu"]):
        cpus = _whole(requests["cpu"])
    else:
        raise ClusterConfigError(f"{where}: declare the Ray container's CPUs (resources.limits.cpu) or "
                                 "rayStartParams num-cpus: without them Ray counts the whole machine's cores")
    gpu_keys = sorted(key for key in group_resources if _is_gpu_key(key))
    if gpu_keys:
        gpus = _whole(group_resources[gpu_keys[0]])
    elif "num-gpus" in params:
        gpus = _whole(params["num-gpus"])
    else:
        gpus = next((_whole(limits[key]) for key in sorted(limits) if _is_gpu_key(key) and parse_quantity(limits[key])),
                    0)
    return cpus, gpus


def rayservice_cluster(manifest: dict[str, Any]) -> ClusterSpec:
    """The planner's view of the manifest's Ray cluster: the head, then each worker group (one Ray node per pod),
    with minReplicas pods open from the start and at most maxReplicas each. KubeRay's autoscaler has no global cap
    of its own: it is the sum of the groups' maxReplicas."""
    cluster = manifest["spec"]["rayClusterConfig"]
    head_cpus, head_gpus = ray_resources(cluster["headGroupSpec"], "headGroupSpec")
    head = NodeType("head", "pod", head_cpus, head_gpus, min_workers=0, max_workers=0)
    node_types = [head]
    for index, group in enumerate(cluster.get("workerGroupSpecs", [])):
        where = f"workerGroupSpecs.{index} ({group['groupName']})"
        if group.get("numOfHosts", 1) != 1:
            raise ClusterConfigError(f"{where}: numOfHosts > 1 (multi-host TPU slices) is not planned here")
        if group.get("suspend"):
            continue
        cpus, gpus = ray_resources(group, where)
        node_types.append(NodeType(group["groupName"], "pod", cpus, gpus,
                                   min_workers=group.get("minReplicas", 0),
                                   max_workers=group.get("maxReplicas", 2**31 - 1)))
    return ClusterSpec(name=manifest["metadata"]["name"], provider="kuberay", head=head,
                       node_types=tuple(node_types), max_workers=sum(t.max_workers for t in node_types[1:]))


def check_rayservice(manifest: dict[str, Any]) -> ClusterSpec:
    """The manifest's cluster, once the manifest matches the CRD (else a ClusterConfigError listing every
    problem)."""
    errors = validate_rayservice(manifest)
    if errors:
        raise ClusterConfigError("does not match KubeRay's RayService CRD:\n  " + "\n  ".join(errors))
    return rayservice_cluster(manifest)
