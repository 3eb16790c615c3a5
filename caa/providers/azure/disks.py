"""Managed data disks of the pod's CSI volumes (spec-providers §4.2): each disk id is the ARM id of a managed disk
(what the Azure Disk CSI driver gives as its volume handle, `cloud-volume-path`), attached in the VM's
`storageProfile.dataDisks` at creation with LUN = its index in the adaptor's order and deleteOption Detach, so
ARM detaches (never deletes) it when the VM goes. The pod VM finds disk n at LUN n.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from caa.providers.interfaces import InvalidConfig, ProviderError, TransientError

__all__ = ["DISK_ID", "MAX_LUNS", "data_disks", "disk_problem"]

#: a managed disk's ARM id; ARM ids are case-insensitive
DISK_ID = re.compile(
    r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Compute/disks/[^/]+", re.IGNORECASE)
#: ARM accepts LUNs 0-63 whatever the size allows
MAX_LUNS = 64
#: diskState values of a disk some VM holds
_HELD = frozenset({"attached", "reserved"})


def data_disks(disk_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The `storageProfile.dataDisks` of the VM: disk n at LUN n, attached as it is, detached with the VM."""
    return [{"lun": lun, "createOption": "Attach", "deleteOption": "Detach", "managedDisk": {"id": disk_id}}
            for lun, disk_id in enumerate(disk_ids)]


def disk_problem(disk_id: str, disk: Any, region: str, vm_id: str) -> ProviderError | None:
    """Why `disk` (the JSON of a GET of `disk_id`) cannot be attached to the VM `vm_id` in `region`, None when it
    can: another region is a configuration error, a disk another VM holds a transient one (the pod before may
    still be releasing it). A disk this VM holds already (a create retried) is fine."""
    location = str(disk.get("location", ""))
    if location.replace(" ", "").lower() != region.replace(" ", "").lower():
        return InvalidConfig(f"disk {disk_id} is in {location}, not in the VM's region {region}")
    state = str((disk.get("properties") or {}).get("diskState", ""))
    owner = str(disk.get("managedBy") or "")
    if owner.lower() == vm_id.lower():
        return None
    if state.lower() in _HELD or owner:
        return TransientError(f"disk {disk_id} is {state or 'Attached'}" + (f" to {owner}" if owner else ""))
    return None
