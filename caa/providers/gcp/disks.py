"""Persistent disks of the pod's CSI volumes: each disk id is a Compute disk (`projects/<p>/zones/<z>/disks/<name>`,
the volume handle of the GCE PD CSI driver, or a bare disk name in --gcp-project-id and --zone), attached in the
instances.insert body (`boot: false`, `autoDelete: false`) so the instance's delete leaves it in place. Disk n
gets device name `caa-lun-<n>`: the pod VM finds it as /dev/disk/by-id/google-caa-lun-<n>. Not upstream (its GCP
provider attaches no volumes); the same order and naming as the other providers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from caa.podvm_api.volumes import data_disk_serial
from caa.providers.interfaces import InvalidConfig, ProviderError, TransientError

__all__ = ["attached_disks", "device_name", "disk_path", "disk_problem"]

_DISK_PATH = re.compile(r"projects/[^/]+/(zones|regions)/[^/]+/disks/[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_DISK_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1035, Compute's resource names


def disk_path(disk_id: str, project: str, zone: str) -> str:
    """The `projects/...` path of a CSI disk id (a path, `/projects/...` or a Compute URL; or a bare name in the
    configured project and zone); ValueError for anything else."""
    index = disk_id.find("projects/")
    if index >= 0 and _DISK_PATH.fullmatch(disk_id[index:]):
        return disk_id[index:]
    if _DISK_NAME.fullmatch(disk_id):
        return f"projects/{project}/zones/{zone}/disks/{disk_id}"
    raise ValueError(f"{disk_id!r} is neither projects/<p>/zones/<z>/disks/<name> nor a disk name")


def device_name(index: int) -> str:
    """The device name of the index-th disk: the guest's /dev/disk/by-id/google-<name>."""
    return data_disk_serial(index)


def attached_disks(paths: Sequence[str]) -> list[dict[str, Any]]:
    """The insert body's entries after the boot disk: disk n as device `caa-lun-<n>`, kept when the instance
    goes."""
    return [{"boot": False, "autoDelete": False, "type": "PERSISTENT", "mode": "READ_WRITE", "source": path,
             "deviceName": device_name(n)} for n, path in enumerate(paths)]


def disk_problem(path: str, disk: Any, zone: str, instance: str) -> ProviderError | None:
    """Why `disk` (the JSON of a GET of `path`) cannot be attached to the instance named `instance` in `zone`,
    None when it can: another zone or a failed disk is a configuration error, a disk another instance uses or
    one still being made a transient one. A disk this instance uses already (a create retried) is fine."""
    disk_zone = str(disk.get("zone") or "").rsplit("/", 1)[-1]
    if disk_zone and disk_zone != zone:
        return InvalidConfig(f"disk {path} is in zone {disk_zone}, the instance in {zone}")
    status = str(disk.get("status", ""))
    if status in ("FAILED", "DELETING"):
        return InvalidConfig(f"disk {path} is {status}")
    if status and status != "READY":
        return TransientError(f"disk {path} is {status}, not READY")
    others = [str(u) for u in disk.get("users") or [] if not str(u).endswith(f"/instances/{instance}")]
    if others:
        return TransientError(f"disk {path} is in use by {', '.join(others)}")
    return None
