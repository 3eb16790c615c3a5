"""
The StartVM rollback contract on real libvirt, the adaptor as a real `twistd caa-adaptor` process: a VM that never
answers is deleted at the proxy timeout. The base volume is an empty qcow2 (SeaBIOS finds nothing to boot, so no
forwarder ever listens); the libvirt provider reserves the VM's address and returns at once, the adaptor builds the
VXLAN tunnel into a pod netns wired like a bridge CNI and dials until --proxy-timeout. StartVM must then fail with
an error naming the proxy connection that never came, and no domain, no volume of the VM, no DHCP reservation
and no tunnel may be left.
"""

from __future__ import annotations

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
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from caa.reactors import as_node_reactor
from tests import libvirt_helpers as lh
from tests.test_providers_libvirt_reservation import empty_base_image, network_hosts, remove_hosts_named

reactor = as_node_reactor(_reactor)
VENV_BIN = Path(sys.executable).parent
PROXY_TIMEOUT = 20


class NeverAnsweringVMTests(TestCase):
    timeout = 300

    def setUp(self) -> None:
        from tests import netns_helpers

        reason = lh.skip_reason()
        if reason:
            raise SkipTest(reason)
        netns_helpers.need_root(self)

    async def _call(self, sock: str, method: str, request: Any, response: type[Any], timeout: float) -> Any:
        from caa.ttrpc import connect
        from caa.ttrpc.endpoints import unix_client_endpoint

        client = await connect(unix_client_endpoint(reactor, sock), clock=reactor)
        try:
            return await client.call("hypervisor.Hypervisor", method, request, response, timeout=timeout)
        finally:
            client.close()

    async def test_vm_that_never_answers_is_deleted_at_the_proxy_timeout(self) -> None:
        from caa.adaptor.userdata import ANN_POD_NAME, ANN_POD_NAMESPACE, ANN_POD_UID
        from caa.proto import hypervisor_pb2 as pb
        from tests import netns_helpers as nh
        from tests.test_e2e_libvirt import _has_vxlan

        net = await deferToThread(lh.ensure_network)
        tmp = Path(tempfile.mkdtemp(prefix="caa-rb-"))  # short: unix socket paths live under it
        self.addCleanup(shutil.rmtree, tmp, True)
        base = await deferToThread(empty_base_image, tmp)
        pool = await deferToThread(lambda: lh.make_pool(base, tmp / "pool", base_volume="empty.qcow2"))
        self.addCleanup(deferToThread, pool.remove)
        worker = nh.make_netns(self, "w")
        nh.bridge(worker, "cni0", "10.244.9.1/24")
        pod = nh.cni_pod(self, worker, "cni0", "10.244.9.5/24", "10.244.9.1")

        sock = tmp / "hypervisor.sock"
        log_path = Path("adaptor-rollback.log").resolve()  # in the trial temp dir: kept after the test
        (tmp / "netns").mkdir()
        argv = [str(VENV_BIN / "twistd"), "--nodaemon", "--pidfile=", "caa-adaptor",
                "--provider", "libvirt", "--socket", str(sock), "--pods-dir", str(tmp / "pods"),
                "--tls-dir", str(tmp / "tls"), "--probe-port", "0", "--proxy-timeout", f"{PROXY_TIMEOUT}s",
                "--netns-dir", str(tmp / "netns"),
                "--vxlan-min-id", str(700000 + (os.getpid() % 100000) * 8),
                "--uri", lh.LIBVIRT_URI, "--pool-name", pool.name, "--network-name", net.name,
                "--vol-name", pool.base_volume, "--firmware", "", "--domain-type", "qemu",
                "--cpu", "1", "--memory", "64", "--root-disk-size", "1"]
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

        self.addCleanup(deferToThread, stop_adaptor)

        def adaptor_log() -> str:
            return log_path.read_text(errors="replace")[-6000:]

        deadline = time.monotonic() + 120
        while not sock.exists() and adaptor.poll() is None:
            self.assertLess(time.monotonic(), deadline, f"no adaptor socket:\n{adaptor_log()}")
            await deferLater(reactor, 0.2, lambda: None)
        self.assertIsNone(adaptor.poll(), f"adaptor exited:\n{adaptor_log()}")

        sid = f"rb{os.getpid()}{int(time.time()) % 100000}"
        prefix = f"podvm-rb-pod-{sid[:8]}"

        def remove_leftovers() -> None:  # only if the test failed: the assertions below want none
            for name in lh.domains_named(prefix):
                lh.destroy_domain(name)
            remove_hosts_named(net.name, prefix)

        self.addCleanup(deferToThread, remove_leftovers)
        await self._call(str(sock), "CreateVM", pb.CreateVMRequest(
            id=sid, networkNamespacePath=pod.path,
            annotations={ANN_POD_NAME: "rb-pod", ANN_POD_NAMESPACE: "default", ANN_POD_UID: f"uid-{sid}"}),
            pb.CreateVMResponse, 60)

        started = time.monotonic()
        with self.assertRaises(Exception) as caught:
            await self._call(str(sock), "StartVM", pb.StartVMRequest(id=sid), pb.StartVMResponse, 240)
        elapsed = time.monotonic() - started
        message = str(caught.exception)
        # the error names what failed and where: upstream's wording, the VM's (reserved) address and port
        self.assertIn("failed to establish agent proxy connection to 192.168.150.", message,
                      f"StartVM error: {message}\n{adaptor_log()}")
        self.assertGreaterEqual(elapsed, PROXY_TIMEOUT - 1, message)
        log_text = log_path.read_text(errors="replace")
        # the provider took the reservation path: the address was known before the guest booted
        self.assertIn(f"on network {net.name}", log_text)
        self.assertRegex(log_text, r"reserved 192\.168\.150\.\d+ for 52:54:00(:[0-9a-f]{2}){3} on network")

        self.assertEqual(await deferToThread(lh.domains_named, prefix), [], adaptor_log())
        self.assertEqual([v for v in await deferToThread(pool.volumes) if v.startswith(prefix)], [])
        self.assertEqual([h for h in await deferToThread(network_hosts, net.name) if h.name.startswith(prefix)], [])
        self.assertFalse(await deferToThread(_has_vxlan, pod), "the tunnel was left in the pod netns")
        # the shim's StopVM after the failed start still succeeds
        await self._call(str(sock), "StopVM", pb.StopVMRequest(id=sid), pb.StopVMResponse, 120)
