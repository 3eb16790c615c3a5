"""The forwarder's interceptors: small rewrites of chosen kata-agent calls (spec-podvm §1.6-§1.7).

Each step is a plain function with its own tests; `Interceptors` strings them together and exposes the
`caa.ttrpc.Relay` interceptor table. Every other call passes through the relay untouched.

- CreateContainer: add the pod network namespace (creating OCI/Linux when missing, never a crash), mount cloud
  volumes and point their OCI mounts at them, create missing bind-mount sources, wait for CSI target paths
  to be mounted, then forward.
- CreateSandbox: clear `dns` so kata-agent leaves the VM's resolv.conf alone.
- DestroySandbox: unmount the cloud volumes (reverse order), then forward.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from caa.podvm_api.godur import parse_duration
from caa.podvm_api.volumes import (
    CLOUD_VOLUMES_ANNOTATION,
    CloudVolume,
    VolumeError,
    data_disk_serial,
    decode_cloud_volumes,
)
from caa.ttrpc import CallContext, Code, TTRPCError

__all__ = [
    "AGENT_SERVICE",
    "TARGET_PATH_ANNOTATION",
    "InterceptError",
    "Interceptors",
    "add_network_namespace",
    "clear_dns",
    "create_bind_sources",
    "target_paths",
    "rewrite_volume_mounts",
    "is_mount_point",
    "wait_for_mounts",
    "wait_for_data_disk",
    "find_data_disk",
    "azure_disk_by_path",
    "disk_by_serial",
    "disk_detect_settings",
    "is_luks",
    "secure_mount_request",
]

AGENT_SERVICE = "grpc.AgentService"
TARGET_PATH_ANNOTATION = "io.confidentialcontainers.org.peerpodvolumes.target_path"
#: Upper bound of a CSI target-path wait (upstream: 3 min), also bounded by the call's deadline.
MOUNT_WAIT_LIMIT = 180.0
MOUNT_WAIT_MAX_DELAY = 5.0

BlockingRunner = Callable[..., "Deferred[Any]"]

_log = Logger(namespace="caa.forwarder.interceptors")


class InterceptError(Exception):
    """An interceptor refused the call; it is answered with this message and not forwarded."""


# --- CreateContainer steps --------------------------------------------------------------------------------


def add_network_namespace(req: Any, netns_path: str) -> None:
    """Append `{Type: "network", Path: netns_path}` to `OCI.Linux.Namespaces` (creating OCI/Linux if absent)."""
    ns = req.OCI.Linux.Namespaces.add()  # protobuf creates the parents on first touch
    ns.Type = "network"
    ns.Path = netns_path


def create_bind_sources(req: Any, makedirs: Callable[[str], None] | None = None) -> list[str]:
    """mkdir -p the source of every bind mount whose source does not exist; failures only logged."""
    mk = makedirs or (lambda p: os.makedirs(p, mode=0o777, exist_ok=True))
    made: list[str] = []
    if not req.HasField("OCI"):
        return made
    for m in req.OCI.Mounts:
        if m.type != "bind" or not m.source or os.path.exists(m.source):
            continue
        try:
            mk(m.source)
            made.append(m.source)
        except OSError as e:
            _log.warn("could not create bind mount source {source}: {error}", source=m.source, error=str(e))
    return made


def target_paths(annotations: Mapping[str, str]) -> list[str]:
    """The CSI target paths to wait for: the annotation split on ',', trimmed, empty entries dropped."""
    raw = annotations.get(TARGET_PATH_ANNOTATION, "")
    return [p.strip() for p in raw.split(",") if p.strip()]


def _unescape_mountinfo(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mount_point(path: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """True when `path` is a mount point per mountinfo (bind mounts included, unlike os.path.ismount)."""
    try:
        with open(mountinfo) as f:
            return any(_unescape_mountinfo(line.split()[4]) == path for line in f if len(line.split()) > 4)
    except OSError:
        return False


async def wait_for_mounts(
    paths: Iterable[str],
    clock: IReactorTime,
    is_mount: Callable[[str], bool] = is_mount_point,
    remaining: float | None = None,
    limit: float = MOUNT_WAIT_LIMIT,
) -> None:
    """Poll each path until it is a mount point: back-off 0.1 s doubling to 5 s, at most `limit` seconds and
    never past the call's `remaining` time. Raises InterceptError naming the path on timeout."""
    budget = limit if remaining is None else min(limit, remaining)
    deadline = clock.seconds() + budget
    for path in paths:
        delay = 0.1
        while not is_mount(path):
            left = deadline - clock.seconds()
            if left <= 0:
                raise InterceptError(
                    f"Timeout waiting for device to mount to {path}: not mounted after {budget:.1f}s"
                )
            await deferLater(clock, min(delay, left), lambda: None)
            delay = min(delay * 2, MOUNT_WAIT_MAX_DELAY)


def clear_dns(req: Any) -> bool:
    """Empty CreateSandboxRequest.dns; True when there was something to clear."""
    had = len(req.dns) > 0
    del req.dns[:]
    return had


# --- cloud volumes (the annotation's format is caa.podvm_api.volumes) --------------------------------------


def rewrite_volume_mounts(req: Any, volume: CloudVolume) -> bool:
    """Point the first OCI mount whose destination is the volume's mount point at the host path (bind)."""
    for m in req.OCI.Mounts:
        if m.destination == volume.mount_point:
            m.source = volume.host_path
            m.type = "bind"
            return True
    _log.warn("cloud volume {name}: no OCI mount with destination {dst}", name=volume.name,
              dst=volume.mount_point)
    return False


def disk_by_serial(serial: str, dev: str = "/dev", sys: str = "/sys") -> str | None:
    """The disk whose serial is `serial`: udev's /dev/disk/by-id/virtio-<serial> link, else the `serial` file
    of a virtio disk in sysfs (what the tiny init's VM has: no udev). virtio-blk keeps 20 bytes of a serial."""
    link = f"{dev}/disk/by-id/virtio-{serial}"
    if os.path.exists(link):
        return os.path.realpath(link)
    try:
        names = sorted(os.listdir(f"{sys}/block"))
    except OSError:
        return None
    for name in names:
        try:
            with open(f"{sys}/block/{name}/serial") as f:
                found = f.read().strip()
        except OSError:
            continue
        if found == serial[:20] and os.path.exists(f"{dev}/{name}"):
            return f"{dev}/{name}"
    return None


def find_data_disk(lun: int, disk_id: str = "", dev: str = "/dev", sys: str = "/sys") -> str | None:
    """The block device of a data disk: Azure by-lun links (then upstream's VMBus by-path links off SCSI host 0),
    GCP device-name links, AWS EBS by-id links, the disk whose serial is the LUN's (libvirt,
    caa.podvm_api.volumes.data_disk_serial), else upstream's libvirt guess /dev/vd<b+lun>."""
    import glob

    for p in (f"{dev}/disk/azure/data/by-lun/{lun}", f"{dev}/disk/azure/scsi1/lun{lun}"):
        if os.path.exists(p):
            return os.path.realpath(p)
    azure = azure_disk_by_path(lun, dev, sys)
    if azure:
        return azure
    if lun >= 0:  # GCP: the device name the provider gave disk n (google guest rules, else systemd's SCSI id)
        name = data_disk_serial(lun)
        for p in (f"{dev}/disk/by-id/google-{name}", f"{dev}/disk/by-id/scsi-0Google_PersistentDisk_{name}"):
            if os.path.exists(p):
                return os.path.realpath(p)
    ebs = sorted(p for p in glob.glob(f"{dev}/disk/by-id/nvme-Amazon_Elastic_Block_Store_*") if "-part" not in p)
    if ebs:
        if disk_id:
            want = disk_id.replace("-", "")
            match = [p for p in ebs if want in p]
            return os.path.realpath(match[0]) if match else None
        return os.path.realpath(ebs[lun]) if lun < len(ebs) else None
    if lun >= 0:
        by_serial = disk_by_serial(data_disk_serial(lun), dev, sys)
        if by_serial:
            return by_serial
    if 0 <= lun <= 24:
        vd = f"{dev}/vd{chr(ord('b') + lun)}"
        if os.path.exists(vd):
            return vd
    return None


def azure_disk_by_path(lun: int, dev: str = "/dev", sys: str = "/sys") -> str | None:
    """Upstream's Azure fallback without Azure's udev rules: systemd's /dev/disk/by-path/*vmbus*-lun-<lun> link
    (not a partition) whose disk is not on SCSI host 0, the OS disk's controller (sysfs `device` links to its
    H:C:T:L; a disk sysfs says nothing about is taken)."""
    import glob

    for link in sorted(glob.glob(f"{dev}/disk/by-path/*vmbus*-lun-{lun}")):
        device = os.path.realpath(link)
        hctl = f"{sys}/block/{os.path.basename(device)}/device"
        if not os.path.exists(hctl) or os.path.basename(os.path.realpath(hctl)).split(":", 1)[0] != "0":
            return device
    return None


def disk_detect_settings(environ: Mapping[str, str] = os.environ) -> tuple[int, float]:
    """(attempts, delay) from CAA_DISK_DETECT_MAX_ATTEMPTS (int > 0, default 15) and
    CAA_DISK_DETECT_RETRY_DELAY (Go duration, default 2s); bad values fall back to the defaults."""
    attempts, delay = 15, 2.0
    raw = environ.get("CAA_DISK_DETECT_MAX_ATTEMPTS", "")
    if raw.isdigit() and int(raw) > 0:
        attempts = int(raw)
    raw = environ.get("CAA_DISK_DETECT_RETRY_DELAY", "")
    if raw:
        try:
            delay = parse_duration(raw)
        except ValueError:
            _log.warn("ignoring CAA_DISK_DETECT_RETRY_DELAY={value!r}", value=raw)
    return attempts, delay


async def wait_for_data_disk(
    volume: CloudVolume,
    clock: IReactorTime,
    run_blocking: BlockingRunner,
    attempts: int,
    delay: float,
    remaining: float | None = None,
    find: Callable[[int, str], str | None] | None = None,
) -> str:
    """Look the volume's disk up `attempts` times, `delay` apart, never past the call's remaining time."""
    finder = find or (lambda lun, disk_id: find_data_disk(lun, disk_id))
    deadline = None if remaining is None else clock.seconds() + remaining
    for attempt in range(1, attempts + 1):
        device = await run_blocking(finder, volume.lun, volume.disk_id)
        if device:
            return str(device)
        if attempt == attempts or (deadline is not None and clock.seconds() + delay > deadline):
            break
        await deferLater(clock, delay, lambda: None)
    raise InterceptError(
        f"cloud volume {volume.name}: no data disk found for LUN {volume.lun} after {attempt} attempt(s)")


CDH_SOCKET = "/run/confidential-containers/cdh.sock"
CDH_SERVICE = "api.SecureMountService"
LUKS_MAGIC = b"LUKS\xba\xbe"


def is_luks(device: str) -> bool:
    """True when `device` starts with the LUKS magic; OSError on a short read or read failure."""
    with open(device, "rb") as f:
        head = f.read(6)
    if len(head) < 6:
        raise OSError(f"short read from {device}")
    return head == LUKS_MAGIC


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def secure_mount_request(volume: CloudVolume, device: str, source_type: str) -> bytes:
    """CDH `SecureMountRequest{volume_type=1, options=2 (map), flags=3, mount_point=4}`, protobuf-encoded
    (CDH's proto is not vendored; four fields are written by hand)."""
    options = {
        "devicePath": device,
        "sourceType": source_type,
        "targetType": "fileSystem",
        "encryptionType": "luks2",
        "filesystemType": volume.fs_type,
        "key": f"kbs:///{volume.key_id}",
        "mapperName": volume.mapper_name,
    }
    out = _bytes_field(1, b"block-device")
    for k in sorted(options):
        entry = _bytes_field(1, k.encode()) + _bytes_field(2, options[k].encode())
        out += _bytes_field(2, entry)
    return out + _bytes_field(4, volume.host_path.encode())


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def format_and_mount(device: str, mount_point: str, fs_type: str) -> None:
    """Mount `device`; format it only when blkid finds no signature at all (never reformat). Blocking."""
    os.makedirs(mount_point, mode=0o755, exist_ok=True)
    if is_mount_point(mount_point):
        return
    if _run("mount", "-t", fs_type, device, mount_point).returncode == 0:
        return
    probe = _run("blkid", "-p", device)
    if probe.stdout.strip():
        r = _run("mount", device, mount_point)
        if r.returncode:
            raise InterceptError(f"mount {device} at {mount_point} failed: {r.stderr.strip()}")
        return
    if probe.returncode != 2:
        raise InterceptError(f"refusing to format {device}: blkid exit {probe.returncode}")
    r = _run(f"mkfs.{fs_type}", device)
    if r.returncode:
        raise InterceptError(f"mkfs.{fs_type} {device} failed: {r.stderr.strip()}")
    r = _run("mount", "-t", fs_type, device, mount_point)
    if r.returncode:
        raise InterceptError(f"mount {device} at {mount_point} failed: {r.stderr.strip()}")


def unmount(mount_point: str) -> None:
    r = _run("umount", mount_point)
    if r.returncode:
        _log.warn("umount {path} failed: {error}", path=mount_point, error=r.stderr.strip())


# --- the interceptor table ------------------------------------------------------------------------------


def _inline(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return succeed(f(*args))


class Interceptors:
    """Builds the `Relay` interceptors. `run_blocking(f, *args) -> Deferred` runs mounts and disk lookups off
    the reactor thread (a thread pool in the daemon; inline in tests)."""

    _log = Logger()

    def __init__(
        self,
        netns_path: str,
        clock: IReactorTime,
        run_blocking: BlockingRunner = _inline,
        is_mount: Callable[[str], bool] = is_mount_point,
        mount_volume: Callable[[CloudVolume, float | None], Awaitable[None]] | None = None,
        unmount_volume: Callable[[CloudVolume], None] | None = None,
        environ: Mapping[str, str] = os.environ,
        cdh_endpoint: Callable[[], Any] | None = None,
    ) -> None:
        self.netns_path = netns_path
        self._cdh_endpoint = cdh_endpoint
        self._clock = clock
        self._run_blocking = run_blocking
        self._is_mount = is_mount
        self._mount_volume = mount_volume or self._default_mount
        self._disk_attempts, self._disk_delay = disk_detect_settings(environ)
        self._unmount_volume = unmount_volume or self._default_unmount
        #: cloud volumes mounted so far (one sandbox per VM), unmounted at DestroySandbox
        self.mounted: list[CloudVolume] = []

    def table(self) -> dict[tuple[str, str], Callable[[CallContext, bytes], Awaitable[bytes]]]:
        return {
            (AGENT_SERVICE, "CreateContainer"): self.create_container,
            (AGENT_SERVICE, "CreateSandbox"): self.create_sandbox,
            (AGENT_SERVICE, "DestroySandbox"): self.destroy_sandbox,
            (AGENT_SERVICE, "StartContainer"): self.log_container("StartContainer"),
            (AGENT_SERVICE, "RemoveContainer"): self.log_container("RemoveContainer"),
        }

    def log_container(self, method: str) -> Callable[[CallContext, bytes], Awaitable[bytes]]:
        """Diagnostics only: log the container id (field 1 of Start/RemoveContainerRequest), forward as is."""

        async def log(ctx: CallContext, payload: bytes) -> bytes:
            from caa.proto import agent_pb2

            try:
                cid = agent_pb2.StartContainerRequest.FromString(payload).container_id
            except Exception:
                cid = "?"
            self._log.info("{method} {container_id}", method=method, container_id=cid)
            return payload

        return log

    async def _default_mount(self, volume: CloudVolume, remaining: float | None) -> None:
        device = await wait_for_data_disk(volume, self._clock, self._run_blocking, self._disk_attempts,
                                          self._disk_delay, remaining)
        if volume.encrypt_type:
            await self._secure_mount(volume, device, remaining)
        else:
            await self._run_blocking(format_and_mount, device, volume.host_path, volume.fs_type)
        if volume.fs_group.isdigit():
            try:
                os.chown(volume.host_path, -1, int(volume.fs_group))
                os.chmod(volume.host_path, 0o2775)
            except OSError as e:
                _log.warn("cloud volume {name}: fs_group: {error}", name=volume.name, error=str(e))
        self._log.info("cloud volume {name}: {device} mounted at {path}", name=volume.name, device=device,
                       path=volume.host_path)

    async def _secure_mount(self, volume: CloudVolume, device: str, remaining: float | None) -> None:
        """Encrypted volume: CDH formats/opens it with a key from the KBS and mounts it (spec-podvm §1.7)."""
        if self._cdh_endpoint is None:
            raise InterceptError(f"cloud volume {volume.name}: no confidential-data-hub endpoint configured")
        try:
            luks = await self._run_blocking(is_luks, device)
        except OSError as e:
            raise InterceptError(f"cloud volume {volume.name}: reading {device}: {e}") from None
        await self._run_blocking(lambda: os.makedirs(volume.host_path, mode=0o755, exist_ok=True))
        payload = secure_mount_request(volume, device, "encrypted" if luks else "empty")
        from caa.ttrpc import connect

        client: Any = None
        last = ""
        for attempt in range(1, 11):
            try:
                client = await connect(self._cdh_endpoint(), clock=self._clock, name="cdh")
                break
            except Exception as e:
                last = str(e)
                if attempt < 10:
                    await deferLater(self._clock, 2.0, lambda: None)
        if client is None:
            raise InterceptError(f"cloud volume {volume.name}: cannot reach confidential-data-hub: {last}")
        try:
            await client.call_raw(CDH_SERVICE, "SecureMount", payload, remaining, None)
        except TTRPCError as e:
            raise InterceptError(f"cloud volume {volume.name}: SecureMount: {e}") from None
        finally:
            client.close()

    @staticmethod
    def _default_unmount(volume: CloudVolume) -> None:
        unmount(volume.host_path)
        if volume.encrypt_type:
            r = _run("cryptsetup", "close", volume.mapper_name)
            if r.returncode:
                _log.warn("cryptsetup close {mapper} failed: {error}", mapper=volume.mapper_name,
                          error=r.stderr.strip())

    @staticmethod
    def _refuse(e: InterceptError) -> TTRPCError:
        return TTRPCError(Code.INTERNAL, str(e))

    async def create_container(self, ctx: CallContext, payload: bytes) -> bytes:
        from caa.proto import agent_pb2

        req = agent_pb2.CreateContainerRequest()
        req.ParseFromString(payload)
        try:
            add_network_namespace(req, self.netns_path)
            annotations = dict(req.OCI.Annotations)
            try:
                volumes = decode_cloud_volumes(annotations.get(CLOUD_VOLUMES_ANNOTATION, ""))
            except VolumeError as e:
                raise InterceptError(str(e)) from None
            for volume in volumes:
                await self._mount_volume(volume, ctx.remaining())
                if volume not in self.mounted:
                    self.mounted.append(volume)
                rewrite_volume_mounts(req, volume)
            await self._run_blocking(create_bind_sources, req)
            # only mounts whose source still is a target path (upstream: exact match), so a CSI volume the
            # cloud_volumes step mounted (its source rewritten) is not waited for
            sources = {m.source for m in req.OCI.Mounts}
            paths = [p for p in target_paths(annotations) if p in sources]
            if paths:
                await wait_for_mounts(paths, self._clock, self._is_mount, ctx.remaining())
        except InterceptError as e:
            self._log.error("CreateContainer {container_id}: {error}", container_id=req.container_id,
                            error=str(e))
            raise self._refuse(e) from None
        self._log.info("CreateContainer {container_id}", container_id=req.container_id)
        return req.SerializeToString()

    async def create_sandbox(self, ctx: CallContext, payload: bytes) -> bytes:
        from caa.proto import agent_pb2

        req = agent_pb2.CreateSandboxRequest()
        req.ParseFromString(payload)
        self._log.info("CreateSandbox {sandbox_id}", sandbox_id=req.sandbox_id)
        if clear_dns(req):
            return req.SerializeToString()
        return payload

    async def destroy_sandbox(self, ctx: CallContext, payload: bytes) -> bytes:
        volumes, self.mounted = self.mounted, []
        for volume in reversed(volumes):
            try:
                await self._run_blocking(self._unmount_volume, volume)
            except Exception as e:
                self._log.warn("DestroySandbox: unmounting {name}: {error}", name=volume.name, error=str(e))
        self._log.info("DestroySandbox")
        return payload
