"""The `cloud_volumes` annotation: the CSI cloud disks of a container, adaptor -> pod VM.

The adaptor's agent proxy sets `io.confidentialcontainers.org.cloud_volumes` on CreateContainer to the
compact Go JSON of `{<name>: {mount_point, fs_type, lun, disk_id, fs_group?, encrypt_type?, key_id?}}`
(every value a string, names sorted as Go sorts map keys, fields in upstream's struct order; spec-adaptor
§3.2 step 5). The forwarder decodes and checks it before mounting (spec-podvm §1.7, upstream's error texts).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

import attrs

from caa.podvm_api import gojson

__all__ = [
    "CLOUD_VOLUMES_ANNOTATION",
    "CLOUD_VOLUMES_DIR",
    "CloudVolume",
    "DATA_DISK_SERIAL_PREFIX",
    "FS_TYPES",
    "VolumeError",
    "data_disk_serial",
    "decode_cloud_volumes",
    "encode_cloud_volumes",
]

CLOUD_VOLUMES_ANNOTATION = "io.confidentialcontainers.org.cloud_volumes"
#: Where the pod VM mounts each volume (`<dir>/<name>`), the source the OCI mount is rewritten to.
CLOUD_VOLUMES_DIR = "/run/cloud-volumes"
FS_TYPES = ("ext4", "ext3", "xfs")
#: The serial of the LUN-th data disk where the provider chooses it (libvirt: `<serial>` of a virtio disk, which
#: the guest sees in /sys/block/vdX/serial and as /dev/disk/by-id/virtio-<serial>). Not upstream (its libvirt
#: provider attaches no data disks); at most 20 bytes, virtio-blk's limit.
DATA_DISK_SERIAL_PREFIX = "caa-lun-"
_LUN = re.compile(r"[+-]?[0-9]+")  # Go's strconv.Atoi


class VolumeError(ValueError):
    """The annotation is corrupt or names a volume the pod VM must refuse; upstream's wording."""


@attrs.frozen
class CloudVolume:
    name: str
    mount_point: str
    fs_type: str
    lun: int
    disk_id: str = ""
    fs_group: str = ""
    encrypt_type: str = ""
    key_id: str = ""

    @property
    def host_path(self) -> str:
        return f"{CLOUD_VOLUMES_DIR}/{self.name}"

    @property
    def mapper_name(self) -> str:
        return f"caa-{self.name}"

    def to_json(self) -> dict[str, str]:
        out = {"mount_point": self.mount_point, "fs_type": self.fs_type, "lun": str(self.lun),
               "disk_id": self.disk_id}
        for key, value in (("fs_group", self.fs_group), ("encrypt_type", self.encrypt_type),
                           ("key_id", self.key_id)):
            if value:  # omitempty
                out[key] = value
        return out


def data_disk_serial(lun: int) -> str:
    """The serial the node gives the LUN-th data disk and the pod VM looks for."""
    if not 0 <= lun < 10**12:
        raise ValueError(f"lun {lun} out of range")
    return f"{DATA_DISK_SERIAL_PREFIX}{lun}"


def encode_cloud_volumes(volumes: Iterable[CloudVolume]) -> str:
    """The annotation value: compact Go JSON, volumes in sorted name order."""
    return gojson.dumps({v.name: v.to_json() for v in sorted(volumes, key=lambda v: v.name)})


def decode_cloud_volumes(text: str) -> list[CloudVolume]:
    """The annotation -> volumes in sorted name order, checked; an empty value is no volumes."""
    if not text.strip():
        return []
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise VolumeError(f"corrupt cloud_volumes annotation: {e}") from None
    if not isinstance(doc, dict):
        raise VolumeError("corrupt cloud_volumes annotation: expected a JSON object")
    out: list[CloudVolume] = []
    for name in sorted(doc):
        spec = doc[name]
        if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
            raise VolumeError(f"corrupt cloud_volumes annotation: cloud volume {name}: values must be strings")
        mount_point, lun = spec.get("mount_point", ""), spec.get("lun", "")
        if not mount_point or not lun:
            raise VolumeError(f"cloud volume {name}: missing required mount_point or lun field")
        if name in ("", ".", "..") or os.path.basename(name) != name:
            raise VolumeError(f"cloud volume {name!r}: unsafe name")
        fs_type = spec.get("fs_type") or "ext4"
        if fs_type not in FS_TYPES:
            raise VolumeError(f"cloud volume {name}: unsupported filesystem type {fs_type!r}")
        if not _LUN.fullmatch(lun):
            raise VolumeError(f"cloud volume {name}: invalid lun {lun!r}")
        encrypt = spec.get("encrypt_type", "")
        if encrypt:
            if encrypt.lower() not in ("luks", "luks2"):
                raise VolumeError(f"cloud volume {name}: unsupported encryption type {encrypt!r}")
            encrypt = "luks2"
            if not spec.get("key_id"):
                raise VolumeError(f"cloud volume {name}: key_id is required for encryption")
        out.append(CloudVolume(name, mount_point, fs_type, int(lun), spec.get("disk_id", ""),
                               spec.get("fs_group", ""), encrypt, spec.get("key_id", "")))
    return out
