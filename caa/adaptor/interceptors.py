"""The agent proxy's CreateContainer rewrite (spec-adaptor §3.2) and the log-only interceptors.

`rewrite_create_container` is a pure function of the request bytes, the direct-volumes directory and the disks
the sandbox's VM was created with:

1. a request that does not decode, or has no OCI spec, is forwarded unchanged (upstream crashes here);
2. CSI direct-volume target paths: every OCI mount whose source contains ``/volumes/kubernetes.io~csi/`` and
   whose ``<dir>/<base64url(source)>`` exists is listed, comma-separated, in
   ``io.confidentialcontainers.org.peerpodvolumes.target_path`` (no leading comma, unlike upstream; the
   forwarder splits on commas and trims either way);
3. GPU: a non-empty ``io.katacontainers.config.hypervisor.default_gpus`` adds ``cdi.k8s.io/peer-pods``;
4. cloud volumes: the direct-volumes directory is scanned and ``io.confidentialcontainers.org.cloud_volumes``
   set to the compact JSON of ``vol-<lun>`` entries, each volume numbered by its disk's place in the attach order
   CreateVM journalled (the record's ``spec.volumes``), not by its place in this scan: a volume added or removed
   since CreateVM would otherwise shift the numbers and the VM would mount the wrong disk. A volume whose disk
   was not attached (added after the VM was made) is not announced: the VM has no such disk. (This also keeps
   the numbers right where upstream's diverge: a CreateVM without the pod's uid attaches every pod's volumes,
   while this scan keeps only the pod's.)

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


def _cloud_volumes(spec: Any, volumes_dir: str, attached: tuple[str, ...]) -> list[CloudVolume]:
    """The annotation's entries: the scan of caa.adaptor.directvolumes, each volume numbered by its disk's index
    in `attached` (the disk ids in the order CreateVM attached them: the LUN / `caa-lun-<n>` serial in the VM).
    A volume this container does not mount is left out and keeps its number; an attached disk whose entry is
    gone is left out; a volume whose disk is not attached is left out with a warning."""
    free: dict[str, list[int]] = {}  # disk id -> its attach indexes not yet matched (a disk id given twice)
    for lun, disk_id in enumerate(attached):
        free.setdefault(disk_id, []).append(lun)
    out: list[CloudVolume] = []
    for volume in scan(volumes_dir, spec.Annotations.get(SANDBOX_UID_KEY, "")):
        luns = free.get(volume.disk_id)
        if not luns:
            _log.warn("cloud volume {path}: disk {disk_id} was not attached when the VM was created (added since "
                      "CreateVM): not announced", path=volume.path, disk_id=volume.disk_id)
            continue
        lun = luns.pop(0)
        dest = next((m.destination for m in spec.Mounts if m.source == volume.path), "")
        if not dest:
            _log.info("cloud volume disk {disk_id} has no matching mount in the container spec, skipping",
                      disk_id=volume.disk_id)
            continue
        out.append(CloudVolume(f"vol-{lun}", dest, volume.fs_type, lun, volume.disk_id,
                               encrypt_type=volume.encrypt_type, key_id=volume.key_id))
    gone = [disk_id for disk_id, luns in free.items() if luns]
    if gone:
        _log.info("attached disks {disks} are not among the pod's direct volumes now: not announced", disks=gone)
    return out


def rewrite_create_container(payload: bytes, volumes_dir: str = DIRECT_VOLUMES_DIR, *,
                             attached: tuple[str, ...]) -> bytes:
    """The CreateContainerRequest payload to forward (§3.2); `payload` itself when nothing changes. `attached`:
    the disk ids the sandbox's VM was created with, in attach order (its record's `spec.volumes`)."""
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

    volumes = _cloud_volumes(spec, volumes_dir, attached)
    if volumes:
        ann[CLOUD_VOLUMES_ANNOTATION] = encode_cloud_volumes(volumes)
        changed = True

    return req.SerializeToString() if changed else payload


class CreateContainerInterceptor:
    """The relay interceptor for grpc.AgentService/CreateContainer of one sandbox: `attached` is the disk ids its
    VM was created with, in attach order (the scan directory is a parameter)."""

    def __init__(self, attached: tuple[str, ...], volumes_dir: str = DIRECT_VOLUMES_DIR) -> None:
        self.attached = attached
        self.volumes_dir = volumes_dir

    async def __call__(self, ctx: CallContext, payload: bytes) -> bytes:
        return rewrite_create_container(payload, self.volumes_dir, attached=self.attached)


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
