"""
Shared instance-type selection (spec-providers §1.4), for clouds that offer named sizes.

Order: the pod's explicit type annotation; else with GPUs the smallest type with enough GPUs, vCPUs and
memory; else, when both vCPUs and memory are asked for, the smallest GPU-less type with enough of both;
else the provider's default. The result must be in the operator's allowed list (when that list is empty,
only the default is accepted). Unlike upstream (a binary search on a non-monotone predicate), "smallest"
is a linear scan of the list sorted by (GPUs, memory, vCPUs), so a fitting type is never missed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from attrs import frozen

from caa.providers.interfaces import InstanceSpec, InvalidConfig


@frozen
class InstanceTypeInfo:
    """One size a cloud offers: its name and resources (memory in MiB)."""

    name: str
    vcpus: int
    memory_mib: int
    gpus: int = 0
    arch: str = ""


def sort_by_resources(types: Iterable[InstanceTypeInfo]) -> list[InstanceTypeInfo]:
    """Ascending by (GPUs, memory, vCPUs); ties keep their order."""
    return sorted(types, key=lambda t: (t.gpus, t.memory_mib, t.vcpus))


def best_fit(
    types: Iterable[InstanceTypeInfo], vcpus: int, memory_mib: int, gpus: int = 0
) -> InstanceTypeInfo | None:
    """The smallest type with at least the given resources; GPU-less types only when `gpus` is 0."""
    for candidate in sort_by_resources(types):
        if gpus == 0 and candidate.gpus > 0:
            continue
        if candidate.gpus >= gpus and candidate.vcpus >= vcpus and candidate.memory_mib >= memory_mib:
            return candidate
    return None


def select_instance_type(
    spec: InstanceSpec,
    types: Sequence[InstanceTypeInfo],
    allowed: Sequence[str],
    default: str,
) -> str:
    """
    The instance type to create for `spec`, or `InvalidConfig` with upstream's message (e2e tests match
    on "is not part of supported instance types list").
    """
    candidate = ""
    if spec.instance_type:
        candidate = spec.instance_type
    elif spec.gpus > 0:
        found = best_fit(types, spec.vcpus, spec.memory_mib, spec.gpus)
        if found is None:
            raise InvalidConfig(
                "failed to get instance type based on GPU, vCPU, and memory annotations: no instance type "
                f"found for the given GPUs ({spec.gpus}), vCPUs ({spec.vcpus}), and memory ({spec.memory_mib})"
            )
        candidate = found.name
    elif spec.vcpus != 0 and spec.memory_mib != 0:
        found = best_fit(types, spec.vcpus, spec.memory_mib)
        if found is None:
            raise InvalidConfig(
                "failed to get instance type based on vCPU and memory annotations: no instance type found "
                f"for the given vcpus ({spec.vcpus}) and memory ({spec.memory_mib})"
            )
        candidate = found.name
    if candidate == "":
        return default
    if not allowed:
        if candidate != default:
            raise InvalidConfig(
                f'failed to verify instance type: requested instance type ("{candidate}") is not default '
                f'("{default}") and supported instance types list is empty'
            )
        return candidate
    if candidate not in allowed:
        raise InvalidConfig(
            f'failed to verify instance type: requested instance type ("{candidate}") is not part of '
            "supported instance types list"
        )
    return candidate
