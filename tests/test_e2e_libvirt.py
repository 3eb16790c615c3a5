"""
End to end on real libvirt + QEMU (TCG): the adaptor as a real process, the Go ttrpc reference client acting as
the Kata shim, the development pod VM image booted by the libvirt provider through its firmware (BIOS) disk.

CreateVM (a pod netns wired like a bridge CNI) -> StartVM: the VM boots, reads its cidata, the forwarder builds
the pod netns + VXLAN end and serves mTLS -> StartVM returns -> `caactl agent check` through the adaptor's agent
socket answers SERVING -> a process in another netns on the CNI bridge reaches the pod IP (ping, and HTTP
to the development image's stand-in workload on 8080 in the VM's pod netns) over the tunnel -> StopVM ->
domain, volume, tunnel and journal entry are gone.

Storage (the CSI direct-volume path) rides on the same VM (one boot: these machines are slow): a pool volume
with an ext4 filesystem and a file written on the node, and the direct-volume entry a CSI driver would leave
for the pod; CreateVM picks the disk up, the libvirt provider attaches it as a virtio disk with the LUN's serial;
a CreateContainer through the adaptor's agent socket (the adaptor adds `cloud_volumes`) makes the forwarder
find the disk by its serial, mount it and rewrite the container's mount; the development agent shows the
container's mounts to the development workload, so the file is read over the pod network at the container's
mount point; DestroySandbox unmounts; after StopVM the volume is still in the pool with its file.
Phase times are logged and written to _trial_temp/e2e-libvirt-times.json.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase

from caa.reactors import as_node_reactor
from tests import libvirt_helpers as lh

reactor = as_node_reactor(_reactor)

VENV_BIN = Path(sys.executable).parent
POD_CIDR = "10.244.7.5/24"
POD_IP = "10.244.7.5"
CLIENT_CIDR = "10.244.7.6/24"
GATEWAY = "10.244.7.1"
PV_TEXT = "written on the node before the pod started\n"
HTTP_GET = "import urllib.request; print(urllib.request.urlopen('{url}', timeout=20).read().decode())"


def _has_vxlan(ns: Any) -> bool:
    r = ns.run(["ip", "-d", "-o", "link", "show"], False)
    if r.returncode != 0:
        raise AssertionError(f"listing links in {ns.path} (exists: {os.path.exists(ns.path)}): {r.stderr}")
    return " vxlan id " in r.stdout


def _make_ext4_volume(image: Path, source: Path) -> None:
    """A 32 MiB raw ext4 image holding hello.txt (what a CSI driver's volume holds from an earlier pod)."""
    source.mkdir()
    (source / "hello.txt").write_text(PV_TEXT)
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(source), str(image)], check=True, capture_output=True)


def _read_ext4_file(image: Path, path: str) -> str:
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], check=True, capture_output=True, text=True)
    return r.stdout


def _write_direct_volume(directory: Path, target: str, disk_id: str) -> None:
    """What `kata-runtime direct-volume add` writes for a CSI block volume (the disk id in the metadata)."""
    from caa.adaptor.directvolumes import encode_name

    entry = directory / encode_name(target)
    entry.mkdir(parents=True)
    (entry / "mountInfo.json").write_text(json.dumps({
        "volume-type": "block", "device": "/dev/unused-on-peer-pods", "fstype": "ext4",
        "metadata": {"cloud-volume-path": disk_id}, "options": []}))


def _data_disk_sources(domain_name: str) -> list[str]:
    import xml.etree.ElementTree as ET

    conn = lh.open_connection()
    try:
        xml = ET.fromstring(conn.lookupByName(domain_name).XMLDesc(0))
    finally:
        conn.close()
    return [d.find("source").get("file", "") for d in xml.findall("devices/disk")  # type: ignore[union-attr]
            if (d.findtext("serial") or "").startswith("caa-lun-")]


def _create_container(target: str) -> bytes:
    """The CreateContainer the shim sends for a container mounting the CSI volume at /data."""
    from caa.proto import agent_pb2

    req = agent_pb2.CreateContainerRequest(container_id="c-storage")
    req.OCI.Mounts.add(destination="/data", source=target, type="bind", options=["rbind", "rw"])
    return req.SerializeToString()


def _agent_call(socket_path: str, method: str, payload: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "caactl"), "agent", "--socket", socket_path, "call", "grpc.AgentService",
                           method, "--payload-hex", payload.hex()], capture_output=True, text=True, timeout=300)


class LibvirtEndToEndTests(TestCase):
    timeout = 1800
    _log = Logger()

    def setUp(self) -> None:
        from tests import goshim, netns_helpers

        reason = lh.skip_reason()
        if reason is None and not os.environ.get("CI") and not goshim.go_available():
            reason = "Go toolchain for the reference shim client is missing"
        if reason:
            raise SkipTest(reason)
        netns_helpers.need_root(self)

    def test_pod_lifecycle(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._e2e())

    async def _poll(self, what: str, check: Any, timeout: float, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while not await deferToThread(check):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            await deferLater(reactor, interval, lambda: None)

    async def _e2e(self) -> None:
        from caa.adaptor.userdata import ANN_POD_NAME, ANN_POD_NAMESPACE, ANN_POD_UID
        from tests import goshim
        from tests import netns_helpers as nh

        times: dict[str, Any] = {}
        t_all = time.monotonic()
        await deferToThread(goshim.build_go_peer)
        image = await deferToThread(lh.podvm_image)
        times["image_build_or_reuse_s"] = round(image.seconds, 2)
        net = await deferToThread(lh.ensure_network)
        tmp = Path(tempfile.mkdtemp(prefix="caa-e2e-"))  # short: unix socket paths live under it
        self.addCleanup(shutil.rmtree, tmp, True)
        pool = await deferToThread(lh.make_pool, image.bios_disk, tmp / "pool")
        self.addCleanup(deferToThread, pool.remove)

        # the pod as a bridge CNI would wire it, and a second pod on the same bridge as the client
        worker = nh.make_netns(self, "w")
        nh.bridge(worker, "cni0", f"{GATEWAY}/24")
        pod = nh.cni_pod(self, worker, "cni0", POD_CIDR, GATEWAY)
        client = nh.cni_pod(self, worker, "cni0", CLIENT_CIDR, GATEWAY)

        # a CSI volume: a pool volume with a file in it, and the entry a CSI driver leaves for the pod
        sid = f"e2e{os.getpid()}{int(time.time()) % 100000}"
        uid = f"uid-{sid}"
        pv_name = f"pv-{sid}.img"
        await deferToThread(_make_ext4_volume, tmp / "pool" / pv_name, tmp / "pv-src")
        target = f"/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~csi/pvc-e2e/mount"
        direct_volumes = tmp / "direct-volumes"
        _write_direct_volume(direct_volumes, target, pv_name)

        # the adaptor, a real twistd process
        sock = tmp / "hypervisor.sock"
        pods_dir = tmp / "pods"
        log_path = Path("adaptor.log").resolve()  # in the trial temp dir: kept after the test
        (tmp / "netns").mkdir()
        argv = [str(VENV_BIN / "twistd"), "--nodaemon", "--pidfile=", "caa-adaptor",
                "--provider", "libvirt", "--socket", str(sock), "--pods-dir", str(pods_dir),
                "--tls-dir", str(tmp / "tls"), "--probe-port", "0", "--proxy-timeout", "900s",
                # sweep only our own (empty) netns dir: other tests' pod netns are not this adaptor's
                "--netns-dir", str(tmp / "netns"), "--direct-volumes-dir", str(direct_volumes),
                # VXLAN sockets share the root netns: a VNI range of our own, apart from other adaptors' (demo)
                "--vxlan-min-id", str(600000 + (os.getpid() % 100000) * 8),
                "--uri", lh.LIBVIRT_URI, "--pool-name", pool.name, "--network-name", net.name,
                "--vol-name", pool.base_volume, "--firmware", "", "--domain-type", "qemu",
                "--cpu", "1", "--memory", "1024", "--root-disk-size", "1", "--ip-timeout", "600s"]
        log = open(log_path, "wb")
        self.addCleanup(log.close)
        adaptor = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp))

        def stop_adaptor() -> None:
            if adaptor.poll() is None:
                adaptor.send_signal(signal.SIGTERM)
                try:
                    adaptor.wait(30)
                except subprocess.TimeoutExpired:
                    adaptor.kill()
                    adaptor.wait()

        self.addCleanup(stop_adaptor)

        def adaptor_log() -> str:
            return log_path.read_text(errors="replace")[-6000:]

        t = time.monotonic()
        await self._poll("the adaptor's socket", lambda: sock.exists() or adaptor.poll() is not None, 120, 0.2)
        self.assertIsNone(adaptor.poll(), f"adaptor exited:\n{adaptor_log()}")
        times["adaptor_ready_s"] = round(time.monotonic() - t, 2)

        annotations = {ANN_POD_NAME: "e2e-pod", ANN_POD_NAMESPACE: "default", ANN_POD_UID: uid}
        stopped_ok: list[bool] = []

        async def stop_if_needed() -> None:
            # a failed run must not leak its VM: StopVM while the adaptor still runs, then destroy leftovers
            if not stopped_ok:
                await goshim.hv_stop(reactor, str(sock), sid, timeout=300)
            for name in await deferToThread(lh.domains_named, f"podvm-e2e-pod-{sid[:8]}"):
                await deferToThread(lh.destroy_domain, name)

        self.addCleanup(lambda: Deferred.fromCoroutine(stop_if_needed()))
        t = time.monotonic()
        created = await goshim.hv_create(reactor, str(sock), sid, pod.path, annotations)
        times["create_vm_s"] = round(time.monotonic() - t, 2)
        self.assertTrue(created.get("ok"), f"CreateVM: {created}\n{adaptor_log()}")
        agent_socket = created["agentSocketPath"]

        t = time.monotonic()
        started = await goshim.hv_start(reactor, str(sock), sid, timeout=900)
        times["start_vm_s"] = round(time.monotonic() - t, 2)
        self.assertTrue(started.get("ok"), f"StartVM: {started}\n{adaptor_log()}")
        vms = await deferToThread(lh.domains_named, f"podvm-e2e-pod-{sid[:8]}")
        self.assertEqual(len(vms), 1, vms)
        self.assertEqual(await deferToThread(_data_disk_sources, vms[0]), [str(tmp / "pool" / pv_name)])
        journal = json.loads((pods_dir / sid / "sandbox.json").read_text())
        self.assertEqual(journal["spec"]["volumes"], [pv_name])

        # the agent, through the adaptor's agent socket, the mTLS link and the forwarder
        t = time.monotonic()
        check = await deferToThread(
            subprocess.run, [str(VENV_BIN / "caactl"), "agent", "--socket", agent_socket, "check"],
            capture_output=True, text=True, timeout=120)
        times["caactl_agent_check_s"] = round(time.monotonic() - t, 2)
        self.assertEqual(check.returncode, 0, check.stderr)
        self.assertIn("SERVING", check.stdout)

        # pod traffic: the client on the CNI bridge reaches the pod IP; the VM's pod netns answers over VXLAN
        self.assertTrue(await deferToThread(_has_vxlan, pod), "no VXLAN end in the pod netns")
        t = time.monotonic()
        ping = await deferToThread(client.run, ["ping", "-c", "3", "-i", "0.3", "-W", "5", POD_IP], False)
        times["pod_ip_ping_s"] = round(time.monotonic() - t, 2)
        self.assertEqual(ping.returncode, 0, f"{ping.stdout}{ping.stderr}")
        # the development image's stand-in workload listens on 8080 in the VM's pod netns
        t = time.monotonic()
        get = await deferToThread(client.run, [sys.executable, "-c", HTTP_GET.format(url=f"http://{POD_IP}:8080/")],
                                  False)
        times["pod_ip_tcp_s"] = round(time.monotonic() - t, 2)
        self.assertEqual(get.returncode, 0, get.stderr)
        self.assertIn("hello from the pod network namespace", get.stdout)
        self.assertIn(vms[0], get.stdout)  # the VM's hostname: the answer came from inside that VM

        # the container with the CSI volume at /data: the file written on the node, read at the container's
        # mount point inside the VM (the development workload serves the container's mounts)
        t = time.monotonic()
        created_c = await deferToThread(_agent_call, agent_socket, "CreateContainer", _create_container(target))
        times["create_container_s"] = round(time.monotonic() - t, 2)
        self.assertEqual(created_c.returncode, 0, f"{created_c.stderr}\n{adaptor_log()}")
        url = f"http://{POD_IP}:8080/containers/c-storage/data/hello.txt"
        got = await deferToThread(client.run, [sys.executable, "-c", HTTP_GET.format(url=url)], False)
        self.assertEqual(got.returncode, 0, got.stderr)
        self.assertEqual(got.stdout, PV_TEXT + "\n")  # print() adds the last newline
        destroyed = await deferToThread(_agent_call, agent_socket, "DestroySandbox", b"")
        self.assertEqual(destroyed.returncode, 0, destroyed.stderr)

        # StopVM: everything goes
        t = time.monotonic()
        stopped = await goshim.hv_stop(reactor, str(sock), sid, timeout=300)
        times["stop_vm_s"] = round(time.monotonic() - t, 2)
        self.assertTrue(stopped.get("ok"), f"StopVM: {stopped}\n{adaptor_log()}")
        stopped_ok.append(True)
        self.assertEqual(await deferToThread(lh.domains_named, f"podvm-e2e-pod-{sid[:8]}"), [])
        # ... but the CSI volume, detached with the domain, and its data
        self.assertEqual(await deferToThread(pool.volumes), sorted([pool.base_volume, pv_name]))
        self.assertEqual(await deferToThread(_read_ext4_file, tmp / "pool" / pv_name, "/hello.txt"), PV_TEXT)
        self.assertFalse(await deferToThread(_has_vxlan, pod), "VXLAN end left in the pod netns")
        self.assertFalse((pods_dir / sid).exists(), list(pods_dir.iterdir()) if pods_dir.exists() else None)
        times["total_s"] = round(time.monotonic() - t_all, 2)
        self._log.info("e2e libvirt phases: {times}", times=times)
        Path("e2e-libvirt-times.json").resolve().write_text(json.dumps(times, indent=2) + "\n")
