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

import os
from typing import Any

from google.protobuf.message import DecodeError
from twisted.logger import Logger

from caa.adaptor.directvolumes import CSI_PATH_PART, DIRECT_VOLUMES_DIR, encode_name, scan
from caa.podvm_api.volumes import CLOUD_VOLUMES_ANNOTATION, CloudVolume, encode_cloud_volumes
from caa.proto import agent_pb2
from caa.ttrpc import CallContext

TARGET_PATH_KEY = "io.confidentialcontainers.org.peerpodvolumes.target_path"
CDI_KEY = "cdi.k8s.io/peer-pods"
CDI_VALUE = "nvidia.com/gpu=all"
GPUS_KEY = "io.katacontainers.config.hypervisor.default_gpus"
SANDBOX_UID_KEY = "io.kubernetes.cri.sandbox-uid"
IMAGE_GUEST_PULL = "image_guest_pull"

_log = Logger(namespace="caa.adaptor.interceptors")


def _cloud_volumes(spec: Any, volumes_dir: str) -> list[CloudVolume]:
    """The annotation's entries: the scan of caa.adaptor.directvolumes (the order CreateVM attached the disks
    in), each numbered by its place in that order; a volume this container does not mount keeps its number."""
    out: list[CloudVolume] = []
    for lun, volume in enumerate(scan(volumes_dir, spec.Annotations.get(SANDBOX_UID_KEY, ""))):
        dest = next((m.destination for m in spec.Mounts if m.source == volume.path), "")
        if not dest:
            _log.info("cloud volume disk {disk_id} has no matching mount in the container spec, skipping",
                      disk_id=volume.disk_id)
            continue
        out.append(CloudVolume(f"vol-{lun}", dest, volume.fs_type, lun, volume.disk_id,
                               encrypt_type=volume.encrypt_type, key_id=volume.key_id))
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
               and os.path.exists(os.path.join(volumes_dir, encode_name(m.source)))]
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
