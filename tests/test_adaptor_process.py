"""Integration tests: the real `twistd caa-adaptor` process driven with caactl, with the fake provider in
process mode (each VM is a process serving a forwarder-compatible ttrpc endpoint on 127.77.x.y).

Includes the fault-injection test: the adaptor is killed with SIGKILL at eight points of StartVM/StopVM,
restarted, and each sandbox must then either serve its pod through the same agent socket or be gone
(VM deleted, journal entry removed), and StopVM must succeed.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SkipTest, TestCase

from caa.reactors import as_node_reactor

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_counter = itertools.count()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Adaptor:
    """One adaptor installation (socket, pods dir, fake cloud state) that can be started and killed."""

    def __init__(self, test: TestCase) -> None:
        n = next(_counter)
        self.base = f"/tmp/caa-proc-{os.getpid()}-{n}"
        shutil.rmtree(self.base, ignore_errors=True)
        os.makedirs(self.base)
        test.addCleanup(self.cleanup)
        self.socket = os.path.join(self.base, "hypervisor.sock")
        self.pods = os.path.join(self.base, "pods")
        self.cloud = os.path.join(self.base, "cloud")
        self.netns = os.path.join(self.base, "netns")
        open(self.netns, "w").close()
        self.port = 20000 + (os.getpid() * 7 + n) % 20000
        self.probe_port = 0
        self.env: dict[str, str] = {}
        self.tls_args = ["--disable-tls"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = os.path.join(self.base, "adaptor.log")

    extra_args: list[str] = ["--tunnel-type", "none"]

    def start(self, **env: str) -> None:
        e = dict(os.environ)
        e.update({"PYTHONPATH": ROOT, "CLOUD_PROVIDER": "tests.fakes.provider:FakeProviderFactory",
                  "FAKE_STATE_DIR": self.cloud, "FORWARDER_PORT": str(self.port), "PROXY_TIMEOUT": "20s"})
        e.update(self.env)
        e.update(env)
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.run_adaptor", "-n", "--pidfile=", "caa-adaptor",
             "--socket", self.socket, "--pods-dir", self.pods,
             "--tls-dir", os.path.join(self.base, "tls"), *self.extra_args, *self.tls_args,
             "--probe-port", str(self.probe_port)], stdout=logf, stderr=subprocess.STDOUT, env=e, cwd=ROOT)
        logf.close()
        self.wait_for(lambda: self.ctl("version").returncode == 0, "adaptor serving")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def term(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(20)
        self.proc = None
        return rc

    def cleanup(self) -> None:
        if self.proc is not None:
            self.kill9()
        for rec in self.vms():
            try:
                os.kill(rec["pid"], signal.SIGKILL)
            except (ProcessLookupError, KeyError):
                pass
        shutil.rmtree(self.base, ignore_errors=True)

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [os.path.join(BIN, "caactl")]
        if args and args[0] not in ("list", "agent"):
            cmd += ["--socket", self.socket]
        return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout)

    def ctl_bg(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([os.path.join(BIN, "caactl"), "--socket", self.socket, *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def create(self, sid: str, pod: str) -> str:
        r = self.ctl("create", "--id", sid, "--pod", pod, "--namespace", "default", "--netns", self.netns)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def record(self, sid: str) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.pods, sid, "sandbox.json")) as f:
                return json.load(f)  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            return None

    def vms(self) -> list[dict[str, Any]]:
        out = []
        if os.path.isdir(self.cloud):
            for name in os.listdir(self.cloud):
                if name.endswith(".json"):
                    try:
                        with open(os.path.join(self.cloud, name)) as f:
                            out.append(json.load(f))
                    except (FileNotFoundError, ValueError):
                        pass
        return out

    def wait_for(self, cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            time.sleep(0.05)
        with open(self.log) as f:
            tail = f.read()[-3000:]
        raise AssertionError(f"timed out waiting for {what}\n{tail}")


class ProcessTestCase(TestCase):
    timeout = 240

    def setUp(self) -> None:
        self.a = Adaptor(self)

    def assert_network_clean(self) -> None:
        """No tunnel, NOTRACK rule or VNI left (meaningful with the VXLAN tunnel, see VxlanMixin)."""

    def remove_pod(self) -> None:
        os.unlink(self.a.netns)

    def agent_check(self, path: str) -> str:
        r = self.a.ctl("agent", "--socket", path, "check", timeout=30)
        return r.stdout.strip() if r.returncode == 0 else f"rc={r.returncode} {r.stderr.strip()}"


class LifecycleTests(ProcessTestCase):
    def test_lifecycle_and_bad_input(self) -> None:
        a = self.a
        a.start()
        self.assertEqual(a.ctl("version").stdout, "0.0.0\n")
        path = a.create("s1", "web")
        self.assertEqual(path, os.path.join(a.pods, "s1", "agent.ttrpc"))
        self.assertEqual(oct(os.stat(a.socket).st_mode & 0o777), "0o600")
        r = a.ctl("start", "--id", "s1")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.agent_check(path), "SERVING")
        r = a.ctl("agent", "--socket", path, "call", "grpc.AgentService", "ListRoutes", "--payload-hex", "0a0162")
        self.assertEqual((r.returncode, r.stdout), (0, "0a0162\n"), r.stderr)  # any method is relayed
        info = a.ctl("info", "--pod", "web", "--namespace", "default")
        self.assertEqual(info.stdout.strip(), "fake-podvm-web-s1")
        listing = a.ctl("list", "--pods-dir", a.pods).stdout
        self.assertIn("default/web", listing)
        self.assertIn("running", listing)
        # bad input
        r = a.ctl("start", "--id", "nope")
        self.assertEqual(r.returncode, 1)
        self.assertIn("NOT_FOUND: getting sandbox: sandbox nope does not exist", r.stderr)
        r = a.ctl("create", "--id", "s2", "--pod", "", "--namespace", "default", "--netns", a.netns)
        self.assertEqual(r.returncode, 1)
        self.assertIn("io.kubernetes.cri.sandbox-name", r.stderr)
        self.assertEqual(a.ctl("frobnicate").returncode, 2)
        s = socket.socket(socket.AF_UNIX)
        s.connect(a.socket)
        s.sendall(b"\xff" * 64 + b"garbage")
        s.close()
        self.assertEqual(a.ctl("version").returncode, 0)
        # StopVM removes everything
        r = a.ctl("stop", "--id", "s1")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertFalse(os.path.exists(os.path.join(a.pods, "s1")))
        self.assertEqual(a.vms(), [])
        self.assertIn(a.term(), (0, -signal.SIGTERM))  # twistd re-raises the signal after a clean stop
        self.assertFalse(os.path.exists(a.socket))

    def test_cloud_config_verify_failure_fails_the_process(self) -> None:
        """twistd has no exit-status API once the reactor runs: the daemon stops through SIGTERM (caa.process)."""
        a = self.a
        r = subprocess.run([sys.executable, "-m", "tests.fakes.run_adaptor", "-n", "--pidfile=", "caa-adaptor",
                            "--provider", "tests.fakes.provider:FakeProviderFactory", "--socket", a.socket,
                            "--pods-dir", a.pods, "--tls-dir", os.path.join(a.base, "tls"), "--probe-port", "0",
                            "--tunnel-type", "none", "--cloud-config-verify", "--fake-verify-error", "no such image"],
                           capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
        self.assertEqual(r.returncode, -signal.SIGTERM, r.stdout[-2000:])
        self.assertIn("provider configuration check failed: no such image", r.stdout + r.stderr)
        self.assertFalse(os.path.exists(a.socket))  # a clean stop

    def test_bad_option_fails_start(self) -> None:
        r = subprocess.run([TWISTD, "-n", "--pidfile=", "caa-adaptor", "--provider",
                            "tests.fakes.provider:FakeProviderFactory", "--proxy-timeout", "5"],
                           capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("--proxy-timeout: '5' is not a duration", r.stdout + r.stderr)

    async def _call(self, method: str, req: Any, resp: type[Any]) -> Any:
        from twisted.internet import reactor as global_reactor

        reactor = as_node_reactor(global_reactor)

        from caa.ttrpc import connect
        from caa.ttrpc.endpoints import unix_client_endpoint

        client = await connect(unix_client_endpoint(reactor, self.a.socket), clock=reactor)
        try:
            return await client.call("hypervisor.Hypervisor", method, req, resp, timeout=600.0)
        finally:
            client.close()

    def test_concurrent_fifty(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._fifty())

    async def _fifty(self) -> None:
        """50 sandboxes at once, each RPC on its own connection as the shim makes them."""
        from caa.proto import hypervisor_pb2 as pb

        a = self.a
        a.start()
        sids = [f"c{i:02d}" for i in range(50)]
        paths = await gatherResults([Deferred.fromCoroutine(self._call("CreateVM", pb.CreateVMRequest(
            id=sid, networkNamespacePath=a.netns, annotations={
                "io.kubernetes.cri.sandbox-name": f"pod{i}", "io.kubernetes.cri.sandbox-namespace": "default"}),
            pb.CreateVMResponse)) for i, sid in enumerate(sids)])
        self.assertEqual(len({p.agentSocketPath for p in paths}), 50)
        t0 = time.monotonic()
        await gatherResults([Deferred.fromCoroutine(self._call("StartVM", pb.StartVMRequest(id=sid),
                                                               pb.StartVMResponse)) for sid in sids])
        elapsed = time.monotonic() - t0
        self.assertEqual(len(a.vms()), 50)
        self.assertEqual(self.agent_check(os.path.join(a.pods, sids[0], "agent.ttrpc")), "SERVING")
        self.assertEqual(self.agent_check(os.path.join(a.pods, sids[-1], "agent.ttrpc")), "SERVING")
        await gatherResults([Deferred.fromCoroutine(self._call("StopVM", pb.StopVMRequest(id=sid),
                                                               pb.StopVMResponse)) for sid in sids])
        self.assertEqual(a.vms(), [])
        self.assertEqual([d for d in os.listdir(a.pods) if not d.endswith(".json")], [])
        print(f"\n50 concurrent StartVMs (process VMs) took {elapsed:.1f}s")


class MutualTLSTests(ProcessTestCase):
    def test_auto_mtls_and_restart(self) -> None:
        """Auto mode: the VM serves the certificate CreateVM issued (CN = VM name) and verifies the adaptor's
        client certificate; the CA persists, so a restarted adaptor re-adopts the VM over mTLS."""
        a = self.a
        a.tls_args = ["--tls-min-version", "VersionTLS13"]
        a.start()
        path = a.create("m1", "web")
        r = a.ctl("start", "--id", "m1")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.agent_check(path), "SERVING")
        a.kill9()
        a.start()
        a.wait_for(lambda: self.agent_check(path) == "SERVING", "re-adopted over mTLS")
        self.assertEqual(a.ctl("stop", "--id", "m1").returncode, 0)

    def test_wrong_ca_refused(self) -> None:
        """A VM whose certificate the adaptor's CA did not issue is never trusted: StartVM fails, VM deleted."""
        a = self.a
        a.tls_args = []
        a.start(PROXY_TIMEOUT="2s")
        path = a.create("m2", "web")
        shutil.rmtree(os.path.join(a.base, "tls"))  # a new CA on restart: the VM's certificate is foreign
        a.kill9()
        a.start(PROXY_TIMEOUT="2s")
        r = a.ctl("start", "--id", "m2")
        self.assertEqual(r.returncode, 1)
        self.assertIn("failed to establish agent proxy connection", r.stderr)
        self.assertEqual(a.vms(), [])
        self.assertFalse(os.path.exists(path))
        self.assertEqual(a.ctl("stop", "--id", "m2").returncode, 0)


class RestartTests(ProcessTestCase):
    def test_sigterm_keeps_vm_and_readopts(self) -> None:
        a = self.a
        a.probe_port = a.port + 1
        a.start()
        path = a.create("t1", "web")
        self.assertEqual(a.ctl("start", "--id", "t1").returncode, 0)
        probe = f"http://127.0.0.1:{a.probe_port}/startup"
        import urllib.request

        self.assertEqual(urllib.request.urlopen(probe, timeout=5).status, 200)
        vms = a.vms()
        a.term()
        self.assertEqual(a.vms(), vms)  # the VM stays
        self.assertEqual(a.record("t1")["state"], "running")  # type: ignore[index]
        a.start()
        a.wait_for(lambda: self.agent_check(path) == "SERVING", "re-adopted after SIGTERM")
        self.assertEqual(a.ctl("stop", "--id", "t1").returncode, 0)
        self.assertEqual(a.vms(), [])

    def test_socket_takeover(self) -> None:
        """A second adaptor on the same socket takes it over; the first one's exit leaves it in place."""
        a = self.a
        a.start()
        first = a.proc
        a.proc = None
        before = os.stat(a.socket)
        a.start()
        def replaced() -> bool:
            try:
                st = os.stat(a.socket)
            except FileNotFoundError:
                return False
            return (st.st_ino, st.st_ctime_ns) != (before.st_ino, before.st_ctime_ns)

        a.wait_for(replaced, "the second adaptor bound the socket")
        a.wait_for(lambda: "journal recovery done" in open(a.log).read().split("starting up.")[-1], "second ready")
        assert first is not None
        first.terminate()
        first.wait(20)
        self.assertTrue(os.path.exists(a.socket), open(a.log).read()[-2500:])
        self.assertEqual(a.ctl("version").returncode, 0)


class FaultInjectionTests(ProcessTestCase):
    """kill -9 at a phase, restart, then: VM serves through the same socket or is gone; StopVM works."""

    def settle(self, sid: str, path: str, expect_running: bool) -> None:
        a = self.a
        a.start()
        a.wait_for(lambda: (r := a.record(sid)) is None or r["state"] in ("running", "created"),
                   f"{sid} recovered")
        rec = a.record(sid)
        if expect_running:
            assert rec is not None
            self.assertEqual(rec["state"], "running")
            self.assertEqual(rec["socket_path"], path)
            a.wait_for(lambda: self.agent_check(path) == "SERVING", f"{sid} agent socket serving")
        elif rec is not None:
            self.assertEqual(rec["state"], "created")
            self.assertEqual(a.vms(), [])  # the half-built VM was deleted
        if rec is not None:
            r = a.ctl("stop", "--id", sid)
            self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIsNone(a.record(sid))
        self.assertFalse(os.path.exists(os.path.join(a.pods, sid)))
        self.assertEqual(a.vms(), [])
        for vm in a.vms():
            self.assertFalse(_alive(vm["pid"]))
        self.assert_network_clean()
        a.kill9()

    def kill_during_start(self, sid: str, cond: Callable[[], bool], what: str, **env: str) -> str:
        a = self.a
        a.start(**env)
        path = a.create(sid, "web")
        p = a.ctl_bg("start", "--id", sid)
        a.wait_for(cond, what)
        a.kill9()
        p.communicate(timeout=30)
        return path

    def test_01_after_create_vm(self) -> None:
        a = self.a
        a.start()
        path = a.create("f1", "web")
        a.kill9()
        a.start()
        r = a.ctl("start", "--id", "f1")
        self.assertEqual(r.returncode, 0, r.stderr)
        a.kill9()
        self.settle("f1", path, expect_running=True)

    def test_02_during_provider_create_before_vm(self) -> None:
        a = self.a
        path = self.kill_during_start("f2", lambda: (a.record("f2") or {}).get("state") == "create-intent",
                                      "create-intent", FAKE_CREATE_DELAY="30s")
        self.settle("f2", path, expect_running=False)

    def test_03_during_provider_create_after_vm(self) -> None:
        a = self.a
        path = self.kill_during_start("f3", lambda: any(v.get("pid") for v in a.vms()), "VM exists, unjournalled",
                                      FAKE_CREATE_DELAY_AFTER="30s")
        self.assertEqual(a.record("f3")["state"], "create-intent")  # type: ignore[index]
        self.settle("f3", path, expect_running=False)

    def test_04_during_vm_boot(self) -> None:
        a = self.a
        path = self.kill_during_start("f4", lambda: (a.record("f4") or {}).get("state") == "tunnel-intent",
                                      "proxy dialling", FAKE_VM_BOOT_DELAY="30s")
        self.settle("f4", path, expect_running=False)

    def test_05_running(self) -> None:
        a = self.a
        path = self.kill_during_start("f5", lambda: (a.record("f5") or {}).get("state") == "running", "running")
        self.settle("f5", path, expect_running=True)

    def test_06_during_delete_before_vm_gone(self) -> None:
        a = self.a
        a.start(FAKE_DELETE_DELAY="30s")
        path = a.create("f6", "web")
        self.assertEqual(a.ctl("start", "--id", "f6").returncode, 0)
        p = a.ctl_bg("stop", "--id", "f6")
        a.wait_for(lambda: (a.record("f6") or {}).get("state") == "stop-intent", "stop-intent")
        a.kill9()
        p.communicate(timeout=30)
        a.start()
        a.wait_for(lambda: a.record("f6") is None, "stop finished by recovery")
        self.assertEqual(a.vms(), [])
        self.assertFalse(os.path.exists(path))
        self.assert_network_clean()
        a.kill9()

    def test_07_during_delete_after_vm_gone(self) -> None:
        a = self.a
        a.start(FAKE_DELETE_DELAY_AFTER="30s")
        a.create("f7", "web")
        self.assertEqual(a.ctl("start", "--id", "f7").returncode, 0)
        p = a.ctl_bg("stop", "--id", "f7")
        a.wait_for(lambda: a.vms() == [], "VM deleted, journal not yet")
        self.assertIsNotNone(a.record("f7"))
        a.kill9()
        p.communicate(timeout=30)
        a.start()
        a.wait_for(lambda: a.record("f7") is None, "stop finished by recovery")
        self.assert_network_clean()
        a.kill9()

    def test_08_running_pod_gone(self) -> None:
        a = self.a
        self.kill_during_start("f8", lambda: (a.record("f8") or {}).get("state") == "running", "running")
        self.remove_pod()
        a.start()
        a.wait_for(lambda: a.record("f8") is None, "record of a vanished pod cleaned")
        self.assertEqual(a.vms(), [])
        self.assert_network_clean()
        a.kill9()

    def test_09_failed_start_then_kill(self) -> None:
        a = self.a
        a.start(PROXY_TIMEOUT="1s", FAKE_VM_BOOT_DELAY="30s")
        path = a.create("f9", "web")
        r = a.ctl("start", "--id", "f9")
        self.assertEqual(r.returncode, 1)
        self.assertIn("failed to establish agent proxy connection to 127.77", r.stderr)
        self.assertEqual(a.vms(), [])
        a.kill9()
        self.settle("f9", path, expect_running=False)


class GoShimTests(ProcessTestCase):
    """The Go reference ttrpc client (containerd/ttrpc) plays the Kata shim against the adaptor process."""

    def setUp(self) -> None:
        from tests import goshim

        if not goshim.go_available() and not os.environ.get("CI"):
            raise SkipTest("go / golang-github-containerd-ttrpc-dev missing")
        super().setUp()

    def test_shim_lifecycle(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._shim())

    async def _shim(self) -> None:
        from twisted.internet import reactor as global_reactor

        reactor = as_node_reactor(global_reactor)

        from tests import goshim

        a = self.a
        a.start()
        sock = a.socket
        r = await goshim.hv_version(reactor, sock, "x")
        self.assertEqual(r.get("version"), "0.0.0")
        r = await goshim.hv_create(reactor, sock, "g1", a.netns, {
            "io.kubernetes.cri.sandbox-name": "web", "io.kubernetes.cri.sandbox-namespace": "default",
            "io.katacontainers.config.hypervisor.default_vcpus": "2"})
        self.assertTrue(r["ok"], r)
        path = r["agentSocketPath"]
        # GetInfo(wait) honours its deadline while nothing has an id yet
        t0 = time.monotonic()
        r = await goshim.pod_info(reactor, sock, "web", "default", wait=True, timeout=0.5)
        self.assertEqual(r.get("code"), 4, r)
        self.assertLess(time.monotonic() - t0, 5)
        r = await goshim.hv_start(reactor, sock, "g1", timeout=600)
        self.assertTrue(r["ok"], r)
        r = await goshim.raw_call(reactor, path, "grpc.Health", "Check", b"", timeout=5)
        self.assertEqual(r.get("payload"), "0801", r)
        r = await goshim.pod_info(reactor, sock, "web", "default", wait=True, timeout=5)
        self.assertEqual(r.get("VMID"), "fake-podvm-web-g1", r)
        r = await goshim.hv_start(reactor, sock, "unknown", timeout=5)
        self.assertEqual((r["ok"], r["code"]), (False, 5), r)
        self.assertIn("getting sandbox: sandbox unknown does not exist", r["message"])
        r = await goshim.hv_create(reactor, sock, "g2", a.netns, {"io.kubernetes.cri.sandbox-namespace": "x"})
        self.assertEqual((r["ok"], r["code"]), (False, 3), r)
        r = await goshim.hv_stop(reactor, sock, "g1")
        self.assertTrue(r["ok"], r)
        self.assertEqual(a.vms(), [])
        r = await goshim.hv_stop(reactor, sock, "g1")
        self.assertEqual((r["ok"], r["code"]), (False, 5), r)


class VxlanMixin(ProcessTestCase):
    """The adaptor in a worker netns (its "node") with the real VXLAN tunnel into a CNI-like pod netns."""

    def setUp(self) -> None:
        from tests import netns_helpers as nh

        nh.need_root(self)
        super().setUp()
        self.worker = nh.make_netns(self, "caw")
        other = nh.make_netns(self, "cao")
        nh.underlay(self, self.worker, other, net="192.168.79.0/24")
        nh.bridge(self.worker, "cbr0", "10.88.0.1/24")
        nh.set_up(self.worker, "lo")
        self.pod = nh.cni_pod(self, self.worker, "cbr0", "10.88.0.5/24", "10.88.0.1")
        netns_dir = os.path.join(self.a.base, "netns.d")
        os.makedirs(netns_dir)
        os.symlink(self.pod.path, os.path.join(netns_dir, "pod"))
        self.a.netns = self.pod.path
        self.a.env["CAA_TEST_NETNS"] = self.worker.path
        self.a.extra_args = ["--tunnel-type", "vxlan", "--vxlan-port", str(self.a.port + 2), "--netns-dir", netns_dir]

    def vxlan_in_pod(self) -> bool:
        r = self.pod.run(["ip", "-d", "link", "show", "vxlan1"], check=False)
        return r.returncode == 0

    def vnis(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.a.pods, "vni.json")) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        return data.get("allocation", data) if isinstance(data, dict) else {}

    def assert_network_clean(self) -> None:
        if os.path.exists(self.pod.path):
            self.assertFalse(self.vxlan_in_pod(), "vxlan1 left in the pod netns")
        self.assertEqual(self.vnis(), {}, "VNI left allocated")
        rules = self.worker.run(["iptables-save"], check=False).stdout
        self.assertNotIn("peerpod", rules, "NOTRACK rule left on the node")
        links = self.worker.run(["ip", "-o", "link", "show", "type", "vxlan"], check=False).stdout
        self.assertEqual(links.strip(), "", "VXLAN device left on the node")

    def remove_pod(self) -> None:
        self.pod.remove()


class VxlanTests(VxlanMixin):
    """No tunnel or VNI survives StopVM or a rollback after kill -9; a running pod keeps its tunnel."""

    def test_tunnel_lifecycle_and_kill(self) -> None:
        a = self.a
        a.start()
        path = a.create("v1", "web")
        rec = a.record("v1")
        assert rec is not None
        self.assertEqual(rec["vni"], 555000)
        with open(os.path.join(a.pods, "v1", "apf.json")) as f:
            apf = json.load(f)
        self.assertEqual(apf["pod-network"]["podip"], "10.88.0.5/24")
        r = a.ctl("start", "--id", "v1")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(self.vxlan_in_pod())
        self.assertIn("peerpod", self.worker.run(["iptables-save"], check=False).stdout)  # what the checks look for
        self.assertEqual(self.vnis(), {"555000": "v1"})
        a.kill9()
        a.start()
        a.wait_for(lambda: self.agent_check(path) == "SERVING", "re-adopted")
        self.assertTrue(self.vxlan_in_pod())
        self.assertEqual(a.ctl("stop", "--id", "v1").returncode, 0)
        self.assertFalse(self.vxlan_in_pod())
        self.assertEqual(self.vnis(), {})
        self.assertEqual(a.vms(), [])
        # kill -9 while the proxy dials a booting VM: rollback removes the tunnel
        a.kill9()
        a.start(FAKE_VM_BOOT_DELAY="30s")
        a.create("v2", "web")
        p = a.ctl_bg("start", "--id", "v2")
        a.wait_for(lambda: (a.record("v2") or {}).get("state") == "tunnel-intent" and self.vxlan_in_pod(),
                   "tunnel up, proxy dialling")
        self.assertTrue(self.vxlan_in_pod())
        a.kill9()
        p.communicate(timeout=30)
        a.start()
        a.wait_for(lambda: (a.record("v2") or {}).get("state") == "created", "rolled back")
        self.assertFalse(self.vxlan_in_pod())
        self.assertEqual(a.vms(), [])
        self.assertEqual(a.ctl("stop", "--id", "v2").returncode, 0)
        self.assertEqual(self.vnis(), {})
        a.kill9()


class FaultInjectionVxlanTests(VxlanMixin, FaultInjectionTests):
    """The nine kill -9 points again, with the real VXLAN tunnel: no tunnel, rule or VNI is ever left."""
