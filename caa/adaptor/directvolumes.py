"""The CSI direct volumes of a pod: what a CSI driver left in `/run/kata-containers/shared/direct-volumes`.

A CSI driver that hands block volumes to Kata (`kata-runtime direct-volume add`) makes one directory per volume,
named by the URL-safe base64 (with padding) of the volume's target path on the node
(`/var/lib/kubelet/pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount`), holding `mountInfo.json`:
`{"volume-type", "device", "fstype", "metadata": {...}, "options": [...]}`.

`scan` reads them the way upstream does (spec-adaptor §5.8 and §3.2 step 5): entries in name order; only
directories whose decoded name contains `/volumes/kubernetes.io~csi/` (and `/pods/<uid>/` when the pod's uid is
known); the disk id is `metadata["cloud-volume-path"]`, else `device`. An entry that cannot be read, does not
parse or names no disk is skipped with a log line: a bad entry never fails the pod.

The order of CreateVM's scan is the attach order: CreateVM hands the disk ids to the provider in this order (the
index is the LUN / the disk's serial) and journals them (`spec.volumes`); the agent proxy numbers the
`cloud_volumes` annotation by that journalled list, since a later scan may list volumes added or removed since.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.logger import Logger

__all__ = ["CSI_PATH_PART", "DIRECT_VOLUMES_DIR", "MOUNT_INFO", "DirectVolume", "decode_name", "encode_name",
           "scan"]

DIRECT_VOLUMES_DIR = "/run/kata-containers/shared/direct-volumes"
CSI_PATH_PART = "/volumes/kubernetes.io~csi/"
MOUNT_INFO = "mountInfo.json"
#: metadata keys (upstream's): the cloud's disk id, and the CDH encryption settings
CLOUD_VOLUME_PATH = "cloud-volume-path"
ENCRYPT_TYPE = "encrypt-type"
KBS_KEY_ID = "kbs-key-id"
#: mountInfo.json is a few hundred bytes; a bigger file is not one
MAX_MOUNT_INFO = 64 * 1024

_B64URL = re.compile(r"(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2}==|[A-Za-z0-9_-]{3}=)?")

_log = Logger(namespace="caa.adaptor.directvolumes")


@attrs.frozen
class DirectVolume:
    """One usable entry: the volume's target path on the node and what its mountInfo.json says."""

    path: str
    disk_id: str
    fs_type: str = "ext4"
    encrypt_type: str = ""
    key_id: str = ""


def encode_name(path: str) -> str:
    """The directory name of a target path (Go's base64.URLEncoding: URL-safe alphabet, padded)."""
    return base64.urlsafe_b64encode(path.encode()).decode("ascii")


def decode_name(name: str) -> str | None:
    """The target path a directory name stands for; None when the name is not strict padded base64url of UTF-8."""
    if not name or not _B64URL.fullmatch(name):
        return None
    try:
        return base64.b64decode(name.encode("ascii"), altchars=b"-_", validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def _string(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    return value if isinstance(value, str) else ""


def _read_mount_info(entry: str) -> dict[str, Any]:
    with open(os.path.join(entry, MOUNT_INFO), "rb") as f:
        data = f.read(MAX_MOUNT_INFO + 1)
    if len(data) > MAX_MOUNT_INFO:
        raise ValueError(f"larger than {MAX_MOUNT_INFO} bytes")
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def scan(volumes_dir: str = DIRECT_VOLUMES_DIR, pod_uid: str = "") -> list[DirectVolume]:
    """The pod's CSI direct volumes in attach order (blocking file reads: a few small files on a tmpfs).
    A missing directory is no volumes."""
    try:
        names = sorted(os.listdir(volumes_dir))
    except FileNotFoundError:
        return []
    except OSError as e:
        _log.warn("direct volumes: cannot list {dir}: {error}", dir=volumes_dir, error=str(e))
        return []
    out: list[DirectVolume] = []
    for name in names:
        entry = os.path.join(volumes_dir, name)
        path = decode_name(name)
        if path is None or CSI_PATH_PART not in path or not os.path.isdir(entry):
            continue
        if pod_uid and f"/pods/{pod_uid}/" not in path:
            continue
        try:
            info = _read_mount_info(entry)
        except (OSError, ValueError) as e:
            _log.warn("direct volumes: skipping {path}: {file}: {error}", path=path, file=MOUNT_INFO, error=str(e))
            continue
        metadata = info.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else {}
        disk_id = _string(metadata, CLOUD_VOLUME_PATH) or _string(info, "device")
        if not disk_id:
            _log.warn("direct volumes: skipping {path}: {file} names no disk (no metadata {key} and no device)",
                      path=path, file=MOUNT_INFO, key=CLOUD_VOLUME_PATH)
            continue
        out.append(DirectVolume(path, disk_id, _string(info, "fstype") or "ext4",
                                _string(metadata, ENCRYPT_TYPE), _string(metadata, KBS_KEY_ID)))
    return out
