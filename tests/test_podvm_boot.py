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


class PodVMBootTests(TestCase):
    """Boot the development pod VM image and talk to its forwarder from the host."""

    timeout = 1500  # a cold image build (debootstrap) is about 80 s; the boot itself about 15-25 s
    _log = Logger()

    def setUp(self) -> None:
        reason = lh.skip_reason()
        if reason:
            raise SkipTest(reason)

    def test_boot_dhcp_forwarder_health(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._boot())

    async def _boot(self) -> None:
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
        for phase in ("init-start", "net-up", "cidata-mounted", "user-data-done", "agent-listening",
                      "forwarder-start"):
            self.assertIn(phase, markers, f"console markers {markers}")
        times["guest_uptime"] = markers

        t = time.monotonic()
        await deferToThread(vm.destroy)
        times["destroy_s"] = round(time.monotonic() - t, 2)
        self.assertEqual(await deferToThread(vm.leftovers), [])
        times["total_s"] = round(time.monotonic() - t_all, 2)
        self._log.info("podvm boot phases: {times}", times=times)
        out = Path("podvm-boot-times.json")
        if not out.is_absolute():
            out = Path(os.getcwd()) / out
        out.write_text(json.dumps(times, indent=2) + "\n")
