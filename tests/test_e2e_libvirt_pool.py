"""
A warm pool on real libvirt + QEMU (TCG): the adaptor as a real `twistd caa-adaptor` process with the libvirt
provider and `--pool-size 1`, the development pod VM image's BIOS disk as the pool's base volume.

The adaptor creates one pool VM from bootstrap-only user data (the pool certificate for its name, the adaptor's
client CA, the claim token's digest): the libvirt provider returns at once with a reserved address, the tiny
init's forwarder (`--provision-user-data`) starts unclaimed, and the pool journals the VM `ready` only once
its forwarder answers a TLS handshake. Then a pod: CreateVM + StartVM over ttrpc, as the Kata shim calls them.
StartVM must claim that VM (the adaptor says so, the sandbox journals the pool VM's instance id), the agent
answers SERVING through the adaptor's agent socket, and a client on the CNI bridge pings the pod IP over the
tunnel. StopVM deletes the VM: no domain, volume or DHCP reservation of it is left. The hit refilled the pool;
stopping the adaptor deletes that VM if it is still booting, and a restart with pools off deletes it if it was
ready: either way no domain, volume or reservation of this test is left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from caa.reactors import as_node_reactor
from tests import libvirt_helpers as lh

reactor = as_node_reactor(_reactor)
VENV_BIN = Path(sys.executable).parent
POD_CIDR = "10.244.11.5/24"
POD_IP = "10.244.11.5"
CLIENT_CIDR = "10.244.11.6/24"
GATEWAY = "10.244.11.1"
BOOT_TIMEOUT = 900  # TCG on a loaded machine: the pool VM's boot is bounded by --proxy-timeout


def domains_with_disks_in(directory: Path) -> list[str]:
    """Names of the defined domains with a disk under `directory` (this test's storage pool): its domains."""
    conn = lh.open_connection()
    try:
        out = []
        for dom in conn.listAllDomains(0):
            xml = ET.fromstring(dom.XMLDesc(0))
            files = [s.get("file", "") for s in xml.findall("devices/disk/source")]
            if any(f.startswith(f"{directory}/") for f in files):
                out.append(dom.name())
        return sorted(out)
    finally:
        conn.close()


class Adaptor:
    """One `twistd caa-adaptor` process of this test, its output appended to `log_path`."""

    def __init__(self, argv: list[str], log_path: Path, cwd: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(cwd))

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self) -> str:
        return self.text()[-6000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class LibvirtPoolTests(TestCase):
    timeout = 2400

    def setUp(self) -> None:
        from tests import netns_helpers

        reason = lh.skip_reason()
        if reason:
            raise SkipTest(reason)
        netns_helpers.need_root(self)

    async def _call(self, sock: Path, method: str, request: Any, response: type[Any], timeout: float) -> Any:
        from caa.ttrpc import connect
        from caa.ttrpc.endpoints import unix_client_endpoint

        client = await connect(unix_client_endpoint(reactor, str(sock)), clock=reactor)
        try:
            return await client.call("hypervisor.Hypervisor", method, request, response, timeout=timeout)
        finally:
            client.close()

    async def _until(self, what: str, check: Callable[[], Any], timeout: float, adaptor: Adaptor,
                    interval: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = await deferToThread(check)
            if got:
                return got
            if adaptor.process.poll() is not None:
                raise AssertionError(f"adaptor exited while waiting for {what}:\n{adaptor.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n{adaptor.tail()}")
            await deferLater(reactor, interval, lambda: None)

    async def test_pool_hit_on_libvirt(self) -> None:
        from caa.adaptor.userdata import ANN_POD_NAME, ANN_POD_NAMESPACE, ANN_POD_UID
        from caa.proto import hypervisor_pb2 as pb
        from tests import netns_helpers as nh
        from tests.test_providers_libvirt_reservation import network_hosts, remove_hosts_named

        image = await deferToThread(lh.podvm_image)
        net = await deferToThread(lh.ensure_network)
        tmp = Path(tempfile.mkdtemp(prefix="caa-lp-"))  # short: unix socket paths live under it
        self.addCleanup(shutil.rmtree, tmp, True)
        images = tmp / "images"
        storage = await deferToThread(lh.make_pool, image.bios_disk, images)
        self.addCleanup(deferToThread, storage.remove)

        worker = nh.make_netns(self, "w")
        nh.bridge(worker, "cni0", f"{GATEWAY}/24")
        pod = nh.cni_pod(self, worker, "cni0", POD_CIDR, GATEWAY)
        client = nh.cni_pod(self, worker, "cni0", CLIENT_CIDR, GATEWAY)

        sock = tmp / "hypervisor.sock"
        pods_dir = tmp / "state" / "pods"
        pool_dir = tmp / "state" / "pool"  # the adaptor journals its pool next to --pods-dir
        (tmp / "netns").mkdir()
        log_path = Path("adaptor-pool.log").resolve()  # in the trial temp dir: kept after the test

        def adaptor(pool_size: int) -> Adaptor:
            return Adaptor([
                str(VENV_BIN / "twistd"), "--nodaemon", "--pidfile=", "caa-adaptor",
                "--provider", "libvirt", "--socket", str(sock), "--pods-dir", str(pods_dir),
                "--tls-dir", str(tmp / "tls"), "--probe-port", "0", "--proxy-timeout", f"{BOOT_TIMEOUT}s",
                "--netns-dir", str(tmp / "netns"),
                "--vxlan-min-id", str(800000 + (os.getpid() % 100000) * 8),
                "--uri", lh.LIBVIRT_URI, "--pool-name", storage.name, "--network-name", net.name,
                "--vol-name", storage.base_volume, "--firmware", "", "--domain-type", "qemu",
                "--cpu", "1", "--memory", "1024", "--root-disk-size", "1", "--ip-timeout", "600s",
                "--pool-size", str(pool_size)], log_path, tmp)

        seen: set[str] = set()  # every domain name of this test: the cleanup of a failed run removes them

        def pool_journal() -> dict[str, dict[str, Any]]:
            out = {}
            for f in pool_dir.glob("*.json") if pool_dir.is_dir() else []:
                try:
                    entry = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue  # replaced while we read it
                out[entry["pool_id"]] = entry
                if entry.get("name"):
                    seen.add(entry["name"])
            return out

        running: list[Adaptor] = []

        def cleanup() -> None:
            for a in running:
                a.stop()
            for name in {*seen, *domains_with_disks_in(images)}:
                lh.destroy_domain(name)
                remove_hosts_named(net.name, name)

        self.addCleanup(deferToThread, cleanup)
        first = adaptor(1)
        running.append(first)
        await self._until("the adaptor's socket", sock.exists, 120, first, 0.2)

        # the pool VM: created at once, journalled ready once its unclaimed forwarder answers
        ready = await self._until("a ready pool VM", lambda: [e for e in pool_journal().values()
                                                             if e["state"] == "ready"], BOOT_TIMEOUT, first)
        (pool_vm,) = ready
        name = pool_vm["name"]
        self.assertRegex(name, r"^podvm-pool-[0-9a-f]{8}$")
        self.assertEqual(await deferToThread(lh.domains_named, name), [name])
        self.assertTrue(re.search(rf"pool \S+: VM {name} ready", first.text()), first.tail())
        self.assertFalse("claimed pool VM" in first.text(), first.tail())

        # the pod: StartVM claims the pool VM
        sid = f"lp{os.getpid()}{int(time.time()) % 100000}"
        created = await self._call(sock, "CreateVM", pb.CreateVMRequest(
            id=sid, networkNamespacePath=pod.path,
            annotations={ANN_POD_NAME: "lp-pod", ANN_POD_NAMESPACE: "default", ANN_POD_UID: f"uid-{sid}"}),
            pb.CreateVMResponse, 60)
        stopped: list[bool] = []

        async def stop_vm() -> None:
            if not stopped and first.process.poll() is None:
                await self._call(sock, "StopVM", pb.StopVMRequest(id=sid), pb.StopVMResponse, 300)

        self.addCleanup(stop_vm)  # runs before `cleanup` (LIFO): while the adaptor still runs
        await self._call(sock, "StartVM", pb.StartVMRequest(id=sid), pb.StartVMResponse, BOOT_TIMEOUT)
        log = first.text()
        self.assertNotRegex(log, rf"{sid}: claiming pool VM .* failed", first.tail())
        self.assertTrue(f"{sid}: claimed pool VM {name}" in log, first.tail())
        journal = json.loads((pods_dir / sid / "sandbox.json").read_text())
        self.assertEqual(journal["instance_id"], pool_vm["instance_id"], journal)
        self.assertEqual(journal["state"], "running", journal)
        self.assertNotIn(pool_vm["pool_id"], pool_journal())  # the sandbox's now, not the pool's

        # the agent, through the adaptor's agent socket, mTLS with the pod's certificate and the forwarder
        check = await deferToThread(
            subprocess.run, [str(VENV_BIN / "caactl"), "agent", "--socket", created.agentSocketPath, "check"],
            capture_output=True, text=True, timeout=120)
        self.assertEqual(check.returncode, 0, f"{check.stderr}\n{first.tail()}")
        self.assertIn("SERVING", check.stdout)
        # pod traffic: another pod on the CNI bridge reaches the pod IP, answered from the VM's pod netns
        ping = await deferToThread(client.run, ["ping", "-c", "3", "-i", "0.3", "-W", "5", POD_IP], False)
        self.assertEqual(ping.returncode, 0, f"{ping.stdout}{ping.stderr}")

        # StopVM deletes the claimed VM: domain, volumes and DHCP reservation
        await self._call(sock, "StopVM", pb.StopVMRequest(id=sid), pb.StopVMResponse, 300)
        stopped.append(True)
        self.assertEqual(await deferToThread(lh.domains_named, name), [])
        self.assertEqual([v for v in await deferToThread(storage.volumes) if v.startswith(name)], [])
        self.assertEqual([h.name for h in await deferToThread(network_hosts, net.name) if h.name == name], [])
        self.assertFalse((pods_dir / sid).exists())

        # the hit refilled the pool; an adaptor with pools off deletes whatever of it is journalled
        refill = [e for e in pool_journal().values() if e["pool_id"] != pool_vm["pool_id"]]
        self.assertEqual(len(refill), 1, refill)
        await deferToThread(first.stop)
        second = adaptor(0)
        running.append(second)
        await self._until("the adaptor's socket", sock.exists, 120, second, 0.2)
        await self._until("the pool journal emptied", lambda: not pool_journal(), 300, second)
        await deferToThread(second.stop)
        self.assertEqual(await deferToThread(domains_with_disks_in, images), [], second.tail())
        self.assertEqual(await deferToThread(storage.volumes), [storage.base_volume])
        names = {e for e in seen if e.startswith("podvm-pool-")}
        self.assertEqual([h.name for h in await deferToThread(network_hosts, net.name) if h.name in names], [])
