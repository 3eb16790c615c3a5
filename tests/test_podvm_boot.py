"""
The pod VM image booted for real: libvirtd + QEMU (TCG) on a NAT network with DHCP.

The image of podvm/build.sh (development variant: caa's stand-in agent) boots with a NoCloud cidata ISO
holding the user data the adaptor sends (cloud-config writing /run/peerpod/apf.json: a simple pod's
pod-network, TLS off). The test sees the VM's address in the network's DHCP leases, then reaches the
forwarder in the VM on TCP 15150 with caa's ttrpc client and gets SERVING from the agent behind it
(cidata -> caa-process-user-data -> /run/peerpod/apf.json -> agent -> forwarder, all inside the VM).
Then it destroys the domain and checks that nothing is left. Phase times go to the test log and to
_trial_temp/podvm-boot-times.json.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
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

FORWARDER_PORT = 15150
POD_IP = "10.244.1.21/24"


def simple_pod_user_data(worker_ip: str) -> bytes:
    """The cloud-config the adaptor would send for a one-interface pod, with TLS disabled."""
    from caa.adaptor.userdata import user_data
    from caa.podvm_api.apf import APFConfig

    pod_network = {
        "podip": POD_IP,
        "pod-hw-addr": "0a:58:0a:f4:01:15",
        "interface": "eth0",
        "worker-node-ip": f"{worker_ip}/{lh.TEST_NETWORK_PREFIX}",
        "tunnel-type": "vxlan",
        # as the adaptor copies them from the pod's netns: the subnet's link route, then the default route
        "routes": [{"dst": "10.244.1.0/24", "gw": "", "dev": "eth0", "protocol": "kernel", "scope": "link"},
                   {"dst": "", "gw": "10.244.1.1", "dev": "eth0", "protocol": "boot", "scope": "universe"}],
        "neighbors": None,
        "mtu": 1450,
        "index": 0,
        "vxlan-port": 4789,
        "vxlan-id": 555002,
        "dedicated": False,
        "external-net-via-pod-vm": False,
    }
    apf = APFConfig(pod_namespace="default", pod_name="podvm-boot-test", pod_network=pod_network)
    return user_data(apf, {}).encode()


def _tcp_answers(host: str, port: int, timeout: float) -> None:
    """Connect to host:port (retrying until `timeout`); a completed TCP handshake is the answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class PodVMBootTests(TestCase):
    """Boot the development pod VM image and talk to its forwarder from the host."""

    timeout = 1500  # a cold image build (debootstrap) is about 80 s; the boot itself about 15-25 s
    _log = Logger()

    def setUp(self) -> None:
        reason = lh.skip_reason()
        if reason:
            raise SkipTest(reason)

    def test_boot_dhcp_forwarder_health(self) -> Deferred[None]:
        """The fast boot: kernel + stage-1 initrd given to QEMU, the -root.qcow2 disk as vda."""
        return Deferred.fromCoroutine(self._boot(bios=False))

    def test_bios_disk_dhcp_forwarder_health(self) -> Deferred[None]:
        """The BIOS disk through the libvirt provider's domain XML: SeaBIOS -> syslinux -> kernel + stage-1
        initrd from partition 1 -> root partition 2 (by UUID) -> the tiny init (TLS off on a copy's cmdline)."""
        return Deferred.fromCoroutine(self._boot(bios=True))

    def test_floor_disk_listens(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._floor())

    async def _floor(self) -> None:
        """The benchmark's floor disk (podvm/make-floor-disk.sh): the same BIOS disk with caa.init=floor answers
        on 15150 from a bare python3 listener and starts nothing of the pod."""
        image = await deferToThread(lh.podvm_image)
        net = await deferToThread(lh.ensure_network)
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        floor = workdir / "floor.qcow2"
        await deferToThread(subprocess.run, [str(lh.REPO / "podvm" / "make-floor-disk.sh"), str(image.bios_disk),
                                             str(floor)], check=True, capture_output=True, timeout=300)
        vm = await deferToThread(lh.boot_podvm, image, simple_pod_user_data(net.gateway), workdir, None, net.name,
                                 "", 256, floor)
        self.addCleanup(deferToThread, vm.destroy)
        ip = await deferToThread(vm.wait_for_lease, 180.0)
        await deferToThread(vm.wait_for_marker, "floor-listening", 240.0)
        t_listening = time.monotonic() - vm.started_at
        await deferToThread(_tcp_answers, ip, FORWARDER_PORT, 30.0)
        markers = vm.markers()
        self.assertIn("mode=floor", vm.serial())
        for phase in ("init-start", "net-up", "floor-listening"):
            self.assertIn(phase, markers, f"console markers {markers}")
        for pod_phase in ("cidata-mounted", "user-data-done", "forwarder-start", "agent-listening"):
            self.assertNotIn(pod_phase, markers)
        self._log.info("floor disk: listening {t:.1f} s after start; guest uptime {markers}", t=t_listening,
                       markers=markers)
        await deferToThread(vm.destroy)
        self.assertEqual(await deferToThread(vm.leftovers), [])
        floor.unlink()

    async def _boot(self, bios: bool) -> None:
        from caa.proto import health_pb2
        from caa.ttrpc import connect
        from caa.ttrpc.endpoints import tcp_client_endpoint

        times: dict[str, Any] = {}
        t_all = time.monotonic()
        image = await deferToThread(lh.podvm_image)
        times["image_build_or_reuse_s"] = round(image.seconds, 2)
        self.assertEqual(image.variant, "dev")
        t = time.monotonic()
        net = await deferToThread(lh.ensure_network)
        times["libvirtd_and_network_s"] = round(time.monotonic() - t, 2)

        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        if bios:
            disk = await deferToThread(lh.bios_disk_with_cmdline, image.bios_disk, workdir / "bios-notls.qcow2",
                                       "caa.forwarder_options=--disable-tls")
            self.addCleanup(disk.unlink, True)
            vm = await deferToThread(lh.boot_podvm, image, simple_pod_user_data(net.gateway), workdir,
                                     None, net.name, "", 256, disk)
        else:
            vm = await deferToThread(lh.boot_podvm, image, simple_pod_user_data(net.gateway), workdir,
                                     None, net.name, "caa.forwarder_options=--disable-tls")
        self.addCleanup(deferToThread, vm.destroy)
        times["define_start_s"] = round(time.monotonic() - vm.started_at, 2)

        ip = await deferToThread(vm.wait_for_lease, 180.0)
        times["start_to_dhcp_lease_s"] = round(time.monotonic() - vm.started_at, 2)
        self._log.info("{vm}: DHCP lease {ip}", vm=vm.name, ip=ip)
        self.assertTrue(ip.startswith(net.gateway.rsplit(".", 1)[0] + "."), ip)

        # the forwarder listens once the boot chain is through; retry the connection until then
        deadline = time.monotonic() + 240
        client = None
        last_error: Exception | None = None
        while client is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"forwarder at {ip}:{FORWARDER_PORT} not reachable: {last_error!r}; "
                                     f"markers {vm.markers()}; console:\n{vm.serial()[-4000:]}")
            if not await deferToThread(vm.is_active):
                raise AssertionError(f"{vm.name} ended; console:\n{vm.serial()[-4000:]}")
            try:
                client = await connect(tcp_client_endpoint(reactor, ip, FORWARDER_PORT, timeout=2), clock=reactor)
            except Exception as e:
                last_error = e
                await deferLater(reactor, 0.25, lambda: None)
        times["start_to_forwarder_listening_s"] = round(time.monotonic() - vm.started_at, 2)
        try:
            resp = None
            while resp is None:
                try:
                    resp = await client.call("grpc.Health", "Check", health_pb2.CheckRequest(),
                                             health_pb2.HealthCheckResponse, timeout=30.0)
                except Exception as e:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"Health.Check through the forwarder failed: {e!r}; "
                                             f"console:\n{vm.serial()[-4000:]}") from e
                    await deferLater(reactor, 0.5, lambda: None)
        finally:
            client.close()
        times["start_to_health_serving_s"] = round(time.monotonic() - vm.started_at, 2)
        self.assertEqual(resp.status, health_pb2.HealthCheckResponse.SERVING)

        # what the guest did, in guest uptime, from its console markers
        markers = vm.markers()
        for phase in ("init-start", "dhcp-bound", "net-up", "cidata-mounted", "forwarder-start", "user-data-done",
                      "agent-listening"):
            self.assertIn(phase, markers, f"console markers {markers}")
        # one Python start on the critical path: the forwarder provisions the user data, then the agent starts
        self.assertLessEqual(markers["forwarder-start"], markers["user-data-done"])
        self.assertLessEqual(markers["user-data-done"], markers["agent-listening"])
        self.assertNotIn("forwarder-exited", markers, vm.serial()[-4000:])
        times["guest_uptime"] = markers

        t = time.monotonic()
        await deferToThread(vm.destroy)
        times["destroy_s"] = round(time.monotonic() - t, 2)
        self.assertEqual(await deferToThread(vm.leftovers), [])
        times["total_s"] = round(time.monotonic() - t_all, 2)
        self._log.info("podvm boot phases: {times}", times=times)
        times["boot"] = "bios-disk" if bios else "fast"
        out = Path("podvm-boot-times-bios.json" if bios else "podvm-boot-times.json")
        if not out.is_absolute():
            out = Path(os.getcwd()) / out
        out.write_text(json.dumps(times, indent=2) + "\n")
