"""The agent proxy's CreateContainer rewrite (spec-adaptor §3.2) and the log-only interceptors.

`rewrite_create_container` is a pure function of the request bytes and the direct-volumes directory:

1. a request that does not decode, or has no OCI spec, is forwarded unchanged (upstream crashes here);
2. CSI direct-volume target paths: every OCI mount whose source contains ``/volumes/kubernetes.io~csi/`` and
   whose ``<dir>/<base64url(source)>`` exists is listed, comma-separated, in
   ``io.confidentialcontainers.org.peerpodvolumes.target_path`` (no leading comma, unlike upstream; the
   forwarder splits on commas and trims either way);
3. GPU: a non-empty ``io.katacontainers.config.hypervisor.default_gpus`` adds ``cdi.k8s.io/peer-pods``;
4. cloud volumes: the direct-volumes directory is scanned in name order and
   ``io.confidentialcontainers.org.cloud_volumes`` set to the compact JSON of ``vol-<lun>`` entries.

When nothing changes the original bytes are returned, so the request reaches the agent byte for byte.
Annotation values are never logged (they may carry initdata / policy text).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from typing import Any

from google.protobuf.message import DecodeError
from twisted.logger import Logger

from caa.podvm_api.volumes import CLOUD_VOLUMES_ANNOTATION, CloudVolume, encode_cloud_volumes
from caa.proto import agent_pb2
from caa.ttrpc import CallContext

DIRECT_VOLUMES_DIR = "/run/kata-containers/shared/direct-volumes"
CSI_PATH_PART = "/volumes/kubernetes.io~csi/"
TARGET_PATH_KEY = "io.confidentialcontainers.org.peerpodvolumes.target_path"
CDI_KEY = "cdi.k8s.io/peer-pods"
CDI_VALUE = "nvidia.com/gpu=all"
GPUS_KEY = "io.katacontainers.config.hypervisor.default_gpus"
SANDBOX_UID_KEY = "io.kubernetes.cri.sandbox-uid"
IMAGE_GUEST_PULL = "image_guest_pull"

_B64URL = re.compile(r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2}==|[A-Za-z0-9_-]{3}=)?$")

_log = Logger(namespace="caa.adaptor.interceptors")


def _b64url_decode(name: str) -> str | None:
    """Strict URL-safe base64 with padding (Go's base64.URLEncoding); None when `name` is not one."""
    if not name or not _B64URL.match(name):
        return None
    try:
        return base64.b64decode(name.encode("ascii"), altchars=b"-_", validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def _cloud_volumes(spec: Any, volumes_dir: str) -> list[CloudVolume]:
    try:
        names = sorted(os.listdir(volumes_dir))
    except OSError:
        return []
    pod_uid = spec.Annotations.get(SANDBOX_UID_KEY, "")
    out: list[CloudVolume] = []
    idx = 0
    for name in names:
        entry = os.path.join(volumes_dir, name)
        if not os.path.isdir(entry):
            continue
        path = _b64url_decode(name)
        if path is None or CSI_PATH_PART not in path:
            continue
        if pod_uid and f"/pods/{pod_uid}/" not in path:
            continue
        try:
            with open(os.path.join(entry, "mountInfo.json"), "rb") as f:
                info = json.loads(f.read())
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            _log.warn("could not read mountInfo.json for {path}: {error}", path=path, error=str(e))
            continue
        md = info.get("metadata")
        md = md if isinstance(md, dict) else {}
        disk_id = md.get("cloud-volume-path") if isinstance(md.get("cloud-volume-path"), str) else ""
        if not disk_id:
            disk_id = info.get("device") if isinstance(info.get("device"), str) else ""
        if not disk_id:
            _log.warn("cloud volume at {path} has no disk ID, skipping", path=path)
            continue
        fstype = info.get("fstype")
        fs_type = fstype if isinstance(fstype, str) and fstype else "ext4"
        dest = next((m.destination for m in spec.Mounts if m.source == path), "")
        if not dest:
            _log.info("cloud volume disk {disk_id} has no matching mount in the container spec, skipping",
                      disk_id=disk_id)
            idx += 1
            continue
        encrypt_type, key_id = md.get("encrypt-type"), md.get("kbs-key-id")
        out.append(CloudVolume(f"vol-{idx}", dest, fs_type, idx, disk_id,
                               encrypt_type=encrypt_type if isinstance(encrypt_type, str) else "",
                               key_id=key_id if isinstance(key_id, str) else ""))
        idx += 1
    return out


def rewrite_create_container(payload: bytes, volumes_dir: str = DIRECT_VOLUMES_DIR) -> bytes:
    """The CreateContainerRequest payload to forward (§3.2); `payload` itself when nothing changes."""
    req = agent_pb2.CreateContainerRequest()
    try:
        req.ParseFromString(payload)
    except DecodeError as e:
        _log.warn("CreateContainer: undecodable request forwarded unchanged: {error}", error=str(e))
        return payload
    if not req.HasField("OCI"):
        _log.warn("CreateContainer {container_id}: request without OCI spec forwarded unchanged",
                  container_id=req.container_id)
        return payload
    spec = req.OCI
    ann = spec.Annotations
    changed = False

    targets = [m.source for m in spec.Mounts
               if CSI_PATH_PART in os.path.normpath(m.source)
               and os.path.exists(os.path.join(
                   volumes_dir, base64.urlsafe_b64encode(m.source.encode()).decode("ascii")))]
    if targets:
        prior = ann.get(TARGET_PATH_KEY, "")
        ann[TARGET_PATH_KEY] = ",".join(([prior] if prior else []) + targets)
        changed = True

    guest_pull = any(s.driver == IMAGE_GUEST_PULL for s in req.storages)
    _log.info("CreateContainer {container_id}: {mounts} mounts, {storages} storages, {devices} devices, "
              "annotation keys {keys}", container_id=req.container_id, mounts=len(spec.Mounts),
              storages=len(req.storages), devices=len(req.devices), keys=sorted(ann.keys()))
    if not guest_pull:
        _log.warn("CreateContainer {container_id}: no image_guest_pull storage; pulling image separately "
                  "not supported", container_id=req.container_id)

    if ann.get(GPUS_KEY, ""):
        ann[CDI_KEY] = CDI_VALUE
        changed = True

    volumes = _cloud_volumes(spec, volumes_dir)
    if volumes:
        ann[CLOUD_VOLUMES_ANNOTATION] = encode_cloud_volumes(volumes)
        changed = True

    return req.SerializeToString() if changed else payload


class CreateContainerInterceptor:
    """The relay interceptor for grpc.AgentService/CreateContainer (the scan directory is a parameter)."""

    def __init__(self, volumes_dir: str = DIRECT_VOLUMES_DIR) -> None:
        self.volumes_dir = volumes_dir

    async def __call__(self, ctx: CallContext, payload: bytes) -> bytes:
        return rewrite_create_container(payload, self.volumes_dir)


_LOGGED: dict[str, Any] = {
    "StartContainer": agent_pb2.StartContainerRequest,
    "RemoveContainer": agent_pb2.RemoveContainerRequest,
    "CreateSandbox": agent_pb2.CreateSandboxRequest,
    "DestroySandbox": agent_pb2.DestroySandboxRequest,
    "SetPolicy": agent_pb2.SetPolicyRequest,
}


def describe_call(method: str, payload: bytes) -> str:
    """A one-line summary of a lifecycle call for the log (never the policy text)."""
    cls = _LOGGED.get(method)
    if cls is None:
        return ""
    try:
        req: Any = cls.FromString(payload)
    except DecodeError:
        return "undecodable request"
    if method in ("StartContainer", "RemoveContainer"):
        return f"containerID:{req.container_id}"
    if method == "CreateSandbox":
        storages = "; ".join(f"mountpoint:{s.mount_point} source:{s.source} fstype:{s.fstype} driver:{s.driver}"
                             for s in req.storages)
        return f"hostname:{req.hostname} sandboxId:{req.sandbox_id} storages:[{storages}]"
    if method == "SetPolicy":
        return f"policy of {len(req.policy)} bytes"
    return ""


LOGGED_METHODS = frozenset(_LOGGED)
