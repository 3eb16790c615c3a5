"""The pod rewrite of the peer-pods webhook (spec-providers §12.1), as pure functions on decoded JSON.

A pod of the target runtime class runs in a cloud VM, so its CPU/memory/GPU are not node resources: they
become VM-size annotations (read by the adaptor when it picks the instance type), every container's
resources are cleared, and the first container asks for one `kata.peerpods.io/vm`, the node's VM slots.
Sums run over containers *and* init containers (not Kubernetes' max-of-init rule; upstream does this and
its tests expect it, spec-providers §16.2 #24).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import attrs

from caa.webhook.quantity import ZERO, Format, Quantity, QuantityError, parse_json_quantity, round_up_mib, value_ceil

__all__ = [
    "CPU_ANNOTATION",
    "MEMORY_ANNOTATION",
    "GPU_ANNOTATION",
    "GPU_RESOURCE",
    "DEFAULT_RUNTIME_CLASS",
    "DEFAULT_EXTENDED_RESOURCE",
    "InvalidPod",
    "MutationConfig",
    "PodTotals",
    "is_target",
    "pod_totals",
    "vm_annotations",
    "mutate_pod",
]

CPU_ANNOTATION = "io.katacontainers.config.hypervisor.default_vcpus"
MEMORY_ANNOTATION = "io.katacontainers.config.hypervisor.default_memory"
GPU_ANNOTATION = "io.katacontainers.config.hypervisor.default_gpus"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_RUNTIME_CLASS = "kata-remote"
DEFAULT_EXTENDED_RESOURCE = "kata.peerpods.io/vm"


class InvalidPod(ValueError):
    """The AdmissionRequest's object does not decode as a Pod (upstream answers 400)."""


def _or_runtime_class(value: str) -> str:
    return value or DEFAULT_RUNTIME_CLASS


def _or_extended_resource(value: str) -> str:
    return value or DEFAULT_EXTENDED_RESOURCE


@attrs.frozen
class MutationConfig:
    """`TARGET_RUNTIMECLASS` and `POD_VM_EXTENDED_RESOURCE` (an empty value means the default, as upstream)."""

    target_runtime_class: str = attrs.field(default=DEFAULT_RUNTIME_CLASS, converter=_or_runtime_class)
    extended_resource: str = attrs.field(default=DEFAULT_EXTENDED_RESOURCE, converter=_or_extended_resource)


@attrs.frozen
class PodTotals:
    cpu_requests: Quantity
    cpu_limits: Quantity
    memory_requests: Quantity
    memory_limits: Quantity
    gpu_requests: Quantity


def _object(value: Any, what: str) -> Mapping[str, Any]:
    """A JSON object, or {} for an absent/null one; anything else cannot be a Pod."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidPod(f"{what}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidPod(f"{what}: expected an array, got {type(value).__name__}")
    return value


def is_target(pod: Any, config: MutationConfig) -> bool:
    """Whether `spec.runtimeClassName` is the target runtime class (nothing else is looked at)."""
    if not isinstance(pod, dict):
        raise InvalidPod(f"the object is not a Pod: {type(pod).__name__}")
    spec = pod.get("spec")
    return isinstance(spec, dict) and spec.get("runtimeClassName") == config.target_runtime_class


def _containers(pod: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = _object(pod.get("spec"), "spec")
    out: list[tuple[str, dict[str, Any]]] = []
    for key in ("containers", "initContainers"):  # upstream's order: it decides a sum's printed format
        for i, c in enumerate(_list(spec.get(key), f"spec.{key}")):
            out.append((f"spec.{key}[{i}]", dict(_object(c, f"spec.{key}[{i}]"))))
    return out


def _sum(pod: Mapping[str, Any], kind: str, resource: str, start: Quantity) -> Quantity:
    total = start
    for where, container in _containers(pod):
        resources = _object(container.get("resources"), f"{where}.resources")
        values = _object(resources.get(kind), f"{where}.resources.{kind}")
        if resource in values:
            try:
                total = total + parse_json_quantity(values[resource])
            except QuantityError as e:
                raise InvalidPod(f"{where}.resources.{kind}[{resource!r}]: {e}") from None
    return total


def pod_totals(pod: Mapping[str, Any]) -> PodTotals:
    """Upstream's sums (`GetResourceRequestQuantity`/`GetResourceLimitQuantity`); pod overhead excluded."""
    binary_zero = Quantity(ZERO.value, Format.BINARY_SI)
    return PodTotals(
        cpu_requests=_sum(pod, "requests", "cpu", ZERO),
        cpu_limits=_sum(pod, "limits", "cpu", ZERO),
        memory_requests=_sum(pod, "requests", "memory", binary_zero),
        memory_limits=_sum(pod, "limits", "memory", binary_zero),
        gpu_requests=_sum(pod, "requests", GPU_RESOURCE, ZERO),
    )


def _limit_or_request(request: Quantity, limit: Quantity) -> Quantity | None:
    """The limit when there is a request and the limit covers it; else a positive request; else nothing."""
    if request.value != 0 and limit.value >= request.value:
        return limit
    if request.value > 0:
        return request
    return None


def vm_annotations(totals: PodTotals) -> dict[str, str]:
    """The VM-size annotations for these totals (absent ones are not set)."""
    out: dict[str, str] = {}
    cpu = _limit_or_request(totals.cpu_requests, totals.cpu_limits)
    if cpu is not None:
        out[CPU_ANNOTATION] = str(value_ceil(cpu))
    memory = _limit_or_request(totals.memory_requests, totals.memory_limits)
    if memory is not None:
        out[MEMORY_ANNOTATION] = str(round_up_mib(memory))
    if totals.gpu_requests.value > 0:
        out[GPU_ANNOTATION] = str(totals.gpu_requests)
    return out


def mutate_pod(pod: Any, config: MutationConfig) -> Any:
    """The mutated copy of a decoded Pod (`pod` itself is never changed); other runtime classes: an
    unchanged copy. Raises `InvalidPod` when a field the rewrite reads has the wrong shape."""
    mutated = copy.deepcopy(pod)
    if not is_target(pod, config):
        return mutated
    annotations = vm_annotations(pod_totals(pod))
    spec = mutated["spec"]
    containers = _list(spec.get("containers"), "spec.containers")
    if not containers:
        raise InvalidPod("spec.containers: a pod needs at least one container")
    if annotations:
        metadata = mutated.get("metadata")
        if metadata is None:
            metadata = mutated["metadata"] = {}
        elif not isinstance(metadata, dict):
            raise InvalidPod("metadata: expected an object")
        if metadata.get("annotations") is None:
            metadata["annotations"] = {}
        elif not isinstance(metadata["annotations"], dict):
            raise InvalidPod("metadata.annotations: expected an object")
        metadata["annotations"].update(annotations)
    for key in ("containers", "initContainers"):
        for container in _list(spec.get(key), f"spec.{key}"):
            container["resources"] = {}
    one = {config.extended_resource: "1"}
    containers[0]["resources"] = {"limits": dict(one), "requests": dict(one)}
    return mutated
