"""The forwarder's interceptors, one behaviour per test (upstream interceptor_test.go as the list)."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caa.forwarder import interceptors as ic
from caa.podvm_api.volumes import CLOUD_VOLUMES_ANNOTATION, CloudVolume, decode_cloud_volumes
from caa.proto import agent_pb2, oci_pb2
from caa.ttrpc import CallContext, TTRPCError

NETNS = "/run/netns/podns"


def decode_fields(data: bytes) -> dict[int, list[bytes]]:
    """A minimal protobuf reader for length-delimited fields (independent of the encoder under test)."""
    out: dict[int, list[bytes]] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        n = shift = 0
        while True:
            b = data[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    while i < len(data):
        tag = varint()
        assert tag & 7 == 2, tag
        length = varint()
        out.setdefault(tag >> 3, []).append(data[i : i + length])
        i += length
    return out


def _ctx(clock: Clock, method: str, deadline: float | None = None) -> CallContext:
    return CallContext(clock=clock, service="grpc.AgentService", method=method, stream_id=1, deadline=deadline)


class StepTests(SynchronousTestCase):
    def test_network_namespace_appended(self) -> None:
        req = agent_pb2.CreateContainerRequest(container_id="c")
        req.OCI.Linux.Namespaces.add(Type="pid", Path="")
        req.OCI.Linux.Namespaces.add(Type="mount", Path="")
        ic.add_network_namespace(req, NETNS)
        self.assertEqual([(n.Type, n.Path) for n in req.OCI.Linux.Namespaces],
                         [("pid", ""), ("mount", ""), ("network", NETNS)])

    def test_no_oci_no_linux_is_not_a_crash(self) -> None:
        req = agent_pb2.CreateContainerRequest(container_id="c")
        ic.add_network_namespace(req, NETNS)
        self.assertEqual([(n.Type, n.Path) for n in req.OCI.Linux.Namespaces], [("network", NETNS)])
        req = agent_pb2.CreateContainerRequest(OCI=oci_pb2.Spec(Hostname="h"))
        ic.add_network_namespace(req, "")
        self.assertEqual(len(req.OCI.Linux.Namespaces), 1)
        self.assertEqual(req.OCI.Hostname, "h")

    def test_bind_sources_created(self) -> None:
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        req = agent_pb2.CreateContainerRequest()
        missing, existing = os.path.join(d, "a", "b"), d
        req.OCI.Mounts.add(destination="/x", source=missing, type="bind")
        req.OCI.Mounts.add(destination="/y", source=existing, type="bind")
        req.OCI.Mounts.add(destination="/z", source=os.path.join(d, "tmpfs"), type="tmpfs")
        self.assertEqual(ic.create_bind_sources(req), [missing])
        self.assertTrue(os.path.isdir(missing))
        self.assertFalse(os.path.exists(os.path.join(d, "tmpfs")))
        self.assertEqual(ic.create_bind_sources(agent_pb2.CreateContainerRequest()), [])

    def test_bind_source_failure_only_logged(self) -> None:
        req = agent_pb2.CreateContainerRequest()
        req.OCI.Mounts.add(destination="/x", source="/nonexistent/q", type="bind")

        def boom(p: str) -> None:
            raise PermissionError("denied")

        self.assertEqual(ic.create_bind_sources(req, boom), [])

    def test_target_paths(self) -> None:
        a = ic.TARGET_PATH_ANNOTATION
        self.assertEqual(ic.target_paths({a: " /a/b , /c/,, "}), ["/a/b", "/c/"])
        self.assertEqual(ic.target_paths({a: ""}), [])
        self.assertEqual(ic.target_paths({}), [])

    def test_wait_for_mounts(self) -> None:
        clock = Clock()
        mounted: set[str] = set()
        d = Deferred.fromCoroutine(ic.wait_for_mounts(["/t/x"], clock, mounted.__contains__))
        clock.advance(0.1)
        clock.advance(0.2)
        self.assertNoResult(d)
        mounted.add("/t/x")
        clock.advance(0.4)
        self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_wait_exact_match_and_timeout(self) -> None:
        """Trailing slashes matter; the wait is bounded by the call's remaining time."""
        clock = Clock()
        d = Deferred.fromCoroutine(ic.wait_for_mounts(["/t/x/"], clock, {"/t/x"}.__contains__, remaining=3))
        for _ in range(10):
            clock.advance(1)
        f = self.failureResultOf(d, ic.InterceptError)
        self.assertIn("Timeout waiting for device to mount to /t/x/", str(f.value))

    def test_is_mount_point(self) -> None:
        self.assertTrue(ic.is_mount_point("/"))
        self.assertTrue(ic.is_mount_point("/proc"))
        self.assertFalse(ic.is_mount_point("/proc/self"))

    def test_clear_dns(self) -> None:
        for dns in ([], ["nameserver 1.1.1.1"], ["a", "b", "c"]):
            req = agent_pb2.CreateSandboxRequest(dns=dns, sandbox_id="s")
            self.assertEqual(ic.clear_dns(req), bool(dns))
            self.assertEqual(list(req.dns), [])
            self.assertEqual(req.sandbox_id, "s")


class CloudVolumeTests(SynchronousTestCase):
    def test_rewrite_mount(self) -> None:
        req = agent_pb2.CreateContainerRequest()
        req.OCI.Mounts.add(destination="/data", source="/var/lib/kubelet/x", type="ext4")
        v = decode_cloud_volumes('{"vol-0": {"mount_point": "/data", "lun": "0"}}')[0]
        self.assertTrue(ic.rewrite_volume_mounts(req, v))
        self.assertEqual((req.OCI.Mounts[0].source, req.OCI.Mounts[0].type), ("/run/cloud-volumes/vol-0", "bind"))
        self.assertFalse(ic.rewrite_volume_mounts(agent_pb2.CreateContainerRequest(), v))

    def test_disk_detect_settings(self) -> None:
        self.assertEqual(ic.disk_detect_settings({}), (15, 2.0))
        self.assertEqual(ic.disk_detect_settings({"CAA_DISK_DETECT_MAX_ATTEMPTS": "3",
                                                  "CAA_DISK_DETECT_RETRY_DELAY": "1m500ms"}), (3, 60.5))
        self.assertEqual(ic.disk_detect_settings({"CAA_DISK_DETECT_MAX_ATTEMPTS": "0",
                                                  "CAA_DISK_DETECT_RETRY_DELAY": "2 s"}), (15, 2.0))

    def test_wait_for_data_disk(self) -> None:
        clock = Clock()
        found: list[str | None] = [None, None, "/dev/vdb"]
        v = decode_cloud_volumes('{"vol-0": {"mount_point": "/d", "lun": "0"}}')[0]
        d = Deferred.fromCoroutine(ic.wait_for_data_disk(v, clock, ic._inline, 5, 2.0,
                                                         find=lambda lun, i: found.pop(0)))
        clock.advance(2)
        self.assertNoResult(d)
        clock.advance(2)
        self.assertEqual(self.successResultOf(d), "/dev/vdb")
        d = Deferred.fromCoroutine(ic.wait_for_data_disk(v, clock, ic._inline, 15, 2.0, remaining=5,
                                                         find=lambda lun, i: None))
        clock.advance(2)
        clock.advance(2)
        f = self.failureResultOf(d, ic.InterceptError)
        self.assertIn("no data disk found for LUN 0 after 3 attempt(s)", str(f.value))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_encrypted_volume_without_cdh(self) -> None:
        v = decode_cloud_volumes(
            '{"v": {"mount_point": "/d", "lun": "0", "encrypt_type": "luks2", "key_id": "k"}}')[0]
        i = ic.Interceptors(NETNS, Clock())
        f = self.failureResultOf(Deferred.fromCoroutine(i._secure_mount(v, "/dev/null", None)),
                                 ic.InterceptError)
        self.assertIn("no confidential-data-hub endpoint", str(f.value))

    def test_is_luks(self) -> None:
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        for name, data, want in (("l", b"LUKS\xba\xbe\x00\x02", True), ("e", b"\0" * 512, False)):
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
            self.assertEqual(ic.is_luks(os.path.join(d, name)), want)
        with open(os.path.join(d, "s"), "wb") as f:
            f.write(b"LUK")
        self.assertRaises(OSError, ic.is_luks, os.path.join(d, "s"))

    def test_secure_mount_request_fields(self) -> None:
        v = decode_cloud_volumes(
            '{"vol-0": {"mount_point": "/d", "lun": "0", "encrypt_type": "LUKS", "key_id": "default/key/1"}}')[0]
        msg = decode_fields(ic.secure_mount_request(v, "/dev/sdc", "empty"))
        self.assertEqual(msg[1], [b"block-device"])
        self.assertEqual(msg[4], [b"/run/cloud-volumes/vol-0"])
        self.assertNotIn(3, msg)
        options = {decode_fields(e)[1][0].decode(): decode_fields(e)[2][0].decode() for e in msg[2]}
        self.assertEqual(options, {
            "devicePath": "/dev/sdc", "sourceType": "empty", "targetType": "fileSystem",
            "encryptionType": "luks2", "filesystemType": "ext4", "key": "kbs:///default/key/1",
            "mapperName": "caa-vol-0"})

    def test_find_data_disk_libvirt(self) -> None:
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        open(os.path.join(d, "vdc"), "w").close()
        self.assertEqual(ic.find_data_disk(1, dev=d), os.path.join(d, "vdc"))
        self.assertIsNone(ic.find_data_disk(0, dev=d))


    def sysfs(self, serials: dict[str, str]) -> str:
        """A /sys/block tree whose disks have the given virtio serials (name -> serial)."""
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root)
        for name, serial in serials.items():
            os.makedirs(os.path.join(root, "block", name))
            with open(os.path.join(root, "block", name, "serial"), "w") as f:
                f.write(serial + "\n")
        os.makedirs(os.path.join(root, "block", "sda"))  # no serial file: not a virtio disk
        return root

    def test_find_data_disk_by_serial(self) -> None:
        dev = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, dev)
        for name in ("vda", "vdb", "vdc"):
            open(os.path.join(dev, name), "w").close()
        # the root disk is SATA and the data disks' names do not follow the LUN: the serial decides
        sys = self.sysfs({"vda": "caa-lun-1", "vdb": "caa-lun-0", "vdc": "someone-else"})
        self.assertEqual(ic.find_data_disk(0, dev=dev, sys=sys), os.path.join(dev, "vdb"))
        self.assertEqual(ic.find_data_disk(1, dev=dev, sys=sys), os.path.join(dev, "vda"))
        self.assertIsNone(ic.find_data_disk(5, dev=dev, sys=sys))
        # udev's link wins when there is one
        os.makedirs(os.path.join(dev, "disk", "by-id"))
        os.symlink(os.path.join(dev, "vdc"), os.path.join(dev, "disk", "by-id", "virtio-caa-lun-0"))
        self.assertEqual(ic.find_data_disk(0, dev=dev, sys=sys), os.path.realpath(os.path.join(dev, "vdc")))
        # a serial in sysfs without its device node is not a disk (yet)
        self.assertIsNone(ic.disk_by_serial("caa-lun-7", dev, self.sysfs({"vdz": "caa-lun-7"})))

    def test_discovery_and_mount_of_a_real_block_device(self) -> None:
        """A loop device stands for the attached disk: found by its serial, formatted once, mounted, data kept."""
        import subprocess

        need_block_devices(self)
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        img = os.path.join(d, "disk.img")
        with open(img, "wb") as f:
            f.truncate(16 << 20)
        dev = subprocess.run(["losetup", "--find", "--show", img], check=True, capture_output=True,
                             text=True).stdout.strip()
        self.addCleanup(subprocess.run, ["losetup", "-d", dev], check=False)
        name = os.path.basename(dev)
        self.assertTrue(os.path.isdir(f"/sys/block/{name}"))  # a real block device
        sys = self.sysfs({name: "caa-lun-3"})  # loop devices have no serial: give it the LUN's
        volume = decode_cloud_volumes('{"vol-3": {"mount_point": "/data", "lun": "3"}}')[0]
        clock = Clock()
        found = self.successResultOf(Deferred.fromCoroutine(ic.wait_for_data_disk(
            volume, clock, lambda f, *a: Deferred.fromCoroutine(_now(f, *a)), 3, 2.0,
            find=lambda lun, disk_id: ic.find_data_disk(lun, disk_id, sys=sys))))
        self.assertEqual(found, dev)
        mp = os.path.join(d, "mnt")
        ic.format_and_mount(found, mp, volume.fs_type)
        self.addCleanup(subprocess.run, ["umount", mp], check=False)
        with open(os.path.join(mp, "hello.txt"), "w") as out:
            out.write("written in the pod VM")
        ic.unmount(mp)
        ic.format_and_mount(found, mp, volume.fs_type)
        with open(os.path.join(mp, "hello.txt")) as back:
            self.assertEqual(back.read(), "written in the pod VM")
        ic.unmount(mp)


async def _now(f: Any, *args: Any) -> Any:
    return f(*args)


class InterceptorTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.mounted: list[str] = []
        self.unmounted: list[str] = []
        async def mount(v: CloudVolume, remaining: float | None) -> None:
            self.mounted.append(v.name)

        self.ic = ic.Interceptors(NETNS, self.clock, mount_volume=mount,
                                  unmount_volume=lambda v: self.unmounted.append(v.name),
                                  is_mount=lambda p: True)

    def _call(self, method: str, payload: bytes) -> Any:
        fn = self.ic.table()[("grpc.AgentService", method)]
        return Deferred.fromCoroutine(fn(_ctx(self.clock, method), payload))  # type: ignore[arg-type]

    def test_create_container(self) -> None:
        req = agent_pb2.CreateContainerRequest(container_id="c1")
        req.OCI.Mounts.add(destination="/data", source="/k", type="bind")
        req.OCI.Annotations[CLOUD_VOLUMES_ANNOTATION] = (
            '{"vol-1": {"mount_point": "/data", "lun": "1"}, "vol-0": {"mount_point": "/x", "lun": "0"}}')
        out = agent_pb2.CreateContainerRequest.FromString(self.successResultOf(
            self._call("CreateContainer", req.SerializeToString())))
        self.assertEqual(out.container_id, "c1")
        self.assertEqual(out.OCI.Linux.Namespaces[-1].Path, NETNS)
        self.assertEqual(out.OCI.Mounts[0].source, "/run/cloud-volumes/vol-1")
        self.assertEqual(self.mounted, ["vol-0", "vol-1"])
        self.successResultOf(self._call("DestroySandbox", b""))
        self.assertEqual(self.unmounted, ["vol-1", "vol-0"])

    def test_target_path_of_a_cloud_volume_is_not_waited_for(self) -> None:
        """The adaptor marks a direct volume's mount both ways; once the cloud_volumes step rewrote its source,
        only mounts whose source still is a target path are waited for (upstream: exact source match)."""
        def run(f: Any, *args: Any) -> Deferred[Any]:
            # bind sources are not made here: they would be directories on this machine
            return Deferred.fromCoroutine(_now(lambda *a: None if f is ic.create_bind_sources else f(*a), *args))

        async def mount(v: CloudVolume, remaining: float | None) -> None:
            self.mounted.append(v.name)

        never = ic.Interceptors(NETNS, self.clock, run_blocking=run, mount_volume=mount,
                                unmount_volume=lambda v: None, is_mount=lambda p: False)
        csi = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv/mount"
        other = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pv2/mount"
        req = agent_pb2.CreateContainerRequest(container_id="c1")
        req.OCI.Mounts.add(destination="/data", source=csi, type="bind")
        req.OCI.Annotations[CLOUD_VOLUMES_ANNOTATION] = '{"vol-0": {"mount_point": "/data", "lun": "0"}}'
        req.OCI.Annotations[ic.TARGET_PATH_ANNOTATION] = csi
        fn = never.table()[("grpc.AgentService", "CreateContainer")]
        out = agent_pb2.CreateContainerRequest.FromString(self.successResultOf(Deferred.fromCoroutine(
            fn(_ctx(self.clock, "CreateContainer"), req.SerializeToString()))))  # type: ignore[arg-type]
        self.assertEqual(out.OCI.Mounts[0].source, "/run/cloud-volumes/vol-0")
        req.OCI.Mounts.add(destination="/other", source=other, type="bind")
        req.OCI.Annotations[ic.TARGET_PATH_ANNOTATION] = f"{csi},{other}"
        d: Deferred[bytes] = Deferred.fromCoroutine(
            fn(_ctx(self.clock, "CreateContainer"), req.SerializeToString()))  # type: ignore[arg-type]
        self.assertNoResult(d)  # /other still has its target path as source: waited for
        self.clock.advance(ic.MOUNT_WAIT_LIMIT + 1)
        self.clock.pump([5.0] * 40)
        self.assertIn(f"Timeout waiting for device to mount to {other}",
                      str(self.failureResultOf(d, TTRPCError).value))

    def test_create_container_refused_not_forwarded(self) -> None:
        req = agent_pb2.CreateContainerRequest(container_id="c1")
        req.OCI.Annotations[CLOUD_VOLUMES_ANNOTATION] = "{corrupt"
        f = self.failureResultOf(self._call("CreateContainer", req.SerializeToString()), TTRPCError)
        self.assertIn("corrupt cloud_volumes annotation", str(f.value))

    def test_create_container_empty_payload(self) -> None:
        out = agent_pb2.CreateContainerRequest.FromString(self.successResultOf(self._call("CreateContainer", b"")))
        self.assertEqual(out.OCI.Linux.Namespaces[0].Type, "network")

    def test_start_remove_container_forwarded_unchanged(self) -> None:
        raw = agent_pb2.RemoveContainerRequest(container_id="c9", timeout=3).SerializeToString()
        self.assertIs(self.successResultOf(self._call("RemoveContainer", raw)), raw)
        self.assertIs(self.successResultOf(self._call("StartContainer", b"\xff\xff")), b"\xff\xff")

    def test_create_sandbox(self) -> None:
        req = agent_pb2.CreateSandboxRequest(sandbox_id="s", dns=["nameserver 8.8.8.8"], hostname="h")
        out = agent_pb2.CreateSandboxRequest.FromString(self.successResultOf(
            self._call("CreateSandbox", req.SerializeToString())))
        self.assertEqual((list(out.dns), out.hostname, out.sandbox_id), ([], "h", "s"))
        raw = agent_pb2.CreateSandboxRequest(sandbox_id="s").SerializeToString()
        self.assertIs(self.successResultOf(self._call("CreateSandbox", raw)), raw)


class FormatAndMountTests(SynchronousTestCase):
    """format_and_mount on a real loop device (root): an empty disk is formatted once, never again."""

    def test_format_once_then_mount(self) -> None:
        import subprocess

        need_block_devices(self)
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        img = os.path.join(d, "disk.img")
        with open(img, "wb") as f:
            f.truncate(16 << 20)
        dev = subprocess.run(["losetup", "--find", "--show", img], check=True, capture_output=True,
                             text=True).stdout.strip()
        self.addCleanup(subprocess.run, ["losetup", "-d", dev], check=False)
        mp = os.path.join(d, "mnt")
        ic.format_and_mount(dev, mp, "ext4")
        self.addCleanup(subprocess.run, ["umount", mp], check=False)
        self.assertTrue(ic.is_mount_point(mp))
        with open(os.path.join(mp, "kept"), "w") as f:
            f.write("data")
        ic.format_and_mount(dev, mp, "ext4")  # already mounted: nothing happens
        ic.unmount(mp)
        self.assertFalse(ic.is_mount_point(mp))
        ic.format_and_mount(dev, mp, "ext4")  # has a filesystem: mounted, not reformatted
        with open(os.path.join(mp, "kept")) as f:
            self.assertEqual(f.read(), "data")
        ic.unmount(mp)


def need_block_devices(testcase: SynchronousTestCase) -> None:
    """A real loop device and ext4 (run as root after scripts/setup.sh): fail, never skip, without them."""
    missing = [tool for tool in ("losetup", "mkfs.ext4") if not shutil.which(tool)]
    if os.geteuid() != 0 or missing:
        testcase.fail(f"needs root and {', '.join(missing) or 'nothing else'} for a real block device")
