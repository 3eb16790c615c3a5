"""caa-forwarder --provision-user-data: the user data's files, then the `provisioned` marker, then the forwarder,
in one process; a bad user data ends it with one line and no marker; and what its start-up does not import."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

from twisted.application.service import IService, Service
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from caa.forwarder import tap
from caa.forwarder.daemon import ForwarderService
from caa.forwarder.provision import PROVISIONED, PROVISIONED_PATH, ProvisioningService, StartError
from caa.forwarder.userdata import UserDataError
from caa.podvm_api.cloudconfig import APF_PATH, AUTH_PATH, PEERPOD_DIR, WriteFile, render
from caa.proto import health_pb2
from caa.reactors import as_node_reactor
from tests import netns_helpers as nh
from tests.test_forwarder_relay import ForwarderTestBase

reactor = as_node_reactor(_reactor)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTH = '{"auths":{"quay.io":{"auth":"dXNlcjpwYXNz"}}}\n'


def user_data(apf: dict[str, Any]) -> str:
    """The cloud-config as the adaptor renders it: apf.json and auth.json."""
    return render([WriteFile(APF_PATH, json.dumps(apf, indent=4) + "\n"), WriteFile(AUTH_PATH, AUTH)])


class ProvisioningServiceTests(SynchronousTestCase):
    """The order of effects, driven by hand: provision -> marker -> the forwarder's service."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fwdprov"))
        self.addCleanup(shutil.rmtree, self.dir)
        self.provisioning: Deferred[list[str]] = Deferred()
        self.fatal: list[str] = []
        self.built: list[Service] = []
        self.build_error: Exception | None = None
        self.clock = Clock()

    def build(self) -> IService:
        if self.build_error is not None:
            raise self.build_error
        assert (self.dir / PROVISIONED).exists(), "the forwarder is built only after the marker"
        child = Service()
        self.built.append(child)
        return child

    def service(self) -> ProvisioningService:
        return ProvisioningService(lambda: self.provisioning, str(self.dir), self.build, self.fatal.append,
                                   self.clock)

    def test_marker_after_the_files_then_the_forwarder(self) -> None:
        svc = self.service()
        svc.startService()
        started = svc.when_started()
        self.assertFalse((self.dir / PROVISIONED).exists())
        self.assertEqual(self.built, [])
        self.assertNoResult(started)
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        self.clock.advance(2.5)
        self.provisioning.callback(["apf.json", "aa.toml", "initdata.digest"])
        done = [e for e in events if e["log_format"].startswith("provisioned ")]
        self.assertEqual([(e["files"], e["elapsed"], e["marker"]) for e in done],
                         [("apf.json,aa.toml,initdata.digest", 2.5, str(self.dir / PROVISIONED))])
        marker = self.dir / PROVISIONED
        self.assertEqual(marker.read_bytes(), b"")
        self.assertEqual(oct(marker.stat().st_mode & 0o777), oct(0o644))
        self.assertEqual(len(self.built), 1)
        self.assertIs(self.successResultOf(started), self.built[0])
        self.assertTrue(self.built[0].running)
        self.assertIs(self.built[0].parent, svc)
        self.assertIs(self.successResultOf(svc.when_started()), self.built[0])
        self.successResultOf(svc.stopService())
        self.assertFalse(self.built[0].running)
        self.assertEqual(self.fatal, [])
        self.assertEqual(PROVISIONED_PATH, f"{PEERPOD_DIR}/provisioned")

    def test_provisioning_failure_is_fatal_without_marker(self) -> None:
        svc = self.service()
        svc.startService()
        started = svc.when_started()
        self.provisioning.errback(UserDataError("failed to retrieve cloud config: invalid cloud-config YAML"))
        self.assertEqual(self.fatal, ["provisioning the user data failed: failed to retrieve cloud config: "
                                      "invalid cloud-config YAML"])
        self.assertFalse((self.dir / PROVISIONED).exists())
        self.assertEqual(self.built, [])
        self.failureResultOf(started)
        self.failureResultOf(svc.when_started())
        self.flushLoggedErrors()

    def test_unwritable_output_is_fatal(self) -> None:
        svc = self.service()
        svc.startService()
        self.provisioning.errback(PermissionError(13, "Permission denied", "/run/peerpod/apf.json"))
        self.assertEqual(self.fatal, ["provisioning the user data failed: cannot write /run/peerpod/apf.json: "
                                      "Permission denied"])

    def test_bad_apf_json_after_provisioning_is_fatal(self) -> None:
        self.build_error = StartError("failed to decode a Agent Protocol Forwarder config file file: x")
        svc = self.service()
        svc.startService()
        self.provisioning.callback(["apf.json"])
        self.assertEqual(self.fatal, ["failed to decode a Agent Protocol Forwarder config file file: x"])
        self.assertTrue((self.dir / PROVISIONED).exists())  # the files are there; the forwarder refused them

    def test_stop_while_provisioning(self) -> None:
        cancelled: list[bool] = []
        self.provisioning = Deferred(lambda d: cancelled.append(True))
        svc = self.service()
        svc.startService()
        self.successResultOf(svc.stopService())
        self.assertEqual(cancelled, [True])
        self.assertEqual(self.fatal, [])
        self.assertFalse((self.dir / PROVISIONED).exists())


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="fwdprov")
        self.addCleanup(shutil.rmtree, self.dir)

    def test_apf_json_is_read_after_provisioning(self) -> None:
        """The file does not exist yet when the options are parsed."""
        o = tap.Options()
        o.parseOptions(["--provision-user-data", "--config", os.path.join(self.dir, "apf.json"),
                        "--cidata-dir", self.dir, "--user-data-fetch-timeout", "7"])
        self.assertTrue(o["provision-user-data"])
        self.assertIsNone(o["apf"])
        self.assertEqual((o["cidata-dir"], o["user-data-fetch-timeout"]), (self.dir, 7.0))
        with self.assertRaises(usage.UsageError) as cm:
            tap.Options().parseOptions(["--config", os.path.join(self.dir, "apf.json")])
        self.assertIn("failed to open", str(cm.exception))

    def test_errors(self) -> None:
        cases = [
            (["--provision-user-data", "--config", os.path.join(self.dir, "forwarder.json")],
             "--config must name a file apf.json"),
            (["--provision-user-data", "--user-data-fetch-timeout", "0"], "--user-data-fetch-timeout must be positive"),
            (["--user-data-file", "/tmp/x"], "--user-data-file needs --provision-user-data"),
            (["--cidata-dir", "/tmp"], "--cidata-dir needs --provision-user-data"),
        ]
        for argv, message in cases:
            with self.assertRaises(usage.UsageError) as cm:
                tap.Options().parseOptions(argv)
            self.assertIn(message, str(cm.exception))


class EndToEndTests(ForwarderTestBase):
    """build_service with --provision-user-data on the real reactor: a cidata-like directory in, the files and
    the marker out, then the forwarder serving mTLS with that apf.json; the agent starts after it (in parallel,
    as the init does once the marker exists) and the forwarder's agent link finds it."""

    def apf(self) -> dict[str, Any]:
        return {"pod-namespace": "default", "pod-name": "nginx",
                "tls-server-cert": self.server_pair.cert_pem.decode(),
                "tls-server-key": self.server_pair.key_pem.decode(),
                "tls-client-ca": self.client_pair.cert_pem.decode()}

    async def test_provision_then_serve(self) -> None:
        cidata = Path(self.dir, "cidata")
        cidata.mkdir()
        (cidata / "user-data").write_text(user_data(self.apf()))
        out = Path(self.dir, "peerpod")
        options = tap.Options()
        options.parseOptions(["--provision-user-data", "--cidata-dir", str(cidata), "--config", str(out / "apf.json"),
                              "--listen", "127.0.0.1:0", "--kata-agent-socket", self.agent_path, "--agent-wait", "10"])
        fatal: list[str] = []
        svc = tap.build_service(reactor, options, IReactorThreads(reactor).getThreadPool(), fatal.append)
        self.assertIsInstance(svc, ProvisioningService)
        svc.startService()
        self.addCleanup(svc.stopService)
        forwarder = cast(ForwarderService, await cast(ProvisioningService, svc).when_started())
        await forwarder.when_ready()
        self.assertEqual(sorted(os.listdir(out)), ["aa.toml", "apf.json", "auth.json", "initdata",
                                                   "initdata.digest", PROVISIONED])
        self.assertEqual((out / "auth.json").read_text(), AUTH)
        self.assertEqual(forwarder.config.pod_name, "nginx")
        provisioned = [e for e in self.events if e.get("log_format", "").startswith("provisioned ")]
        self.assertEqual(len(provisioned), 1)
        self.assertEqual(provisioned[0]["files"], "apf.json,auth.json,aa.toml,initdata.digest")
        client = await self.dial(forwarder)  # mTLS with the provisioned certificate
        await self.start_agent()
        resp = await self.check(client, timeout=10)
        self.assertEqual(resp.status, health_pb2.HealthCheckResponse.SERVING)
        self.assertEqual(fatal, [])


class ProcessTests(SynchronousTestCase):
    """The flag in a real process: `python -m caa.forwarder` serves after provisioning; twistd ends a failed
    provisioning with one line on stderr and SIGTERM (caa.process)."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fwdprov"))
        self.addCleanup(shutil.rmtree, self.dir)
        self.out = self.dir / "peerpod"

    def argv(self, port: int, *extra: str) -> list[str]:
        return ["caa-forwarder", "--provision-user-data", "--config", str(self.out / "apf.json"), "--disable-tls",
                "--listen", f"127.0.0.1:{port}", "--kata-agent-socket", str(self.dir / "a.sock"), *extra]

    def test_python_m_provisions_then_listens(self) -> None:
        (self.dir / "user-data").write_text(user_data({"pod-name": "p"}))
        notify = str(self.dir / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(notify)
        sock.settimeout(60)
        self.addCleanup(sock.close)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = [sys.executable, "-m", "caa.forwarder",
                *self.argv(port, "--cidata-dir", str(self.dir))[1:]]
        p = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, NOTIFY_SOCKET=notify),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            self.assertEqual(sock.recv(64), b"READY=1")
            self.assertTrue((self.out / PROVISIONED).exists())
            self.assertEqual(json.loads((self.out / "apf.json").read_text()), {"pod-name": "p"})
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
            p.send_signal(signal.SIGTERM)
            stdout, stderr = p.communicate(timeout=30)
            self.assertEqual(p.returncode, 0, stderr)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        self.assertIn("provisioned apf.json,auth.json", stdout)

    def test_twistd_bad_user_data_fails_without_marker(self) -> None:
        (self.dir / "user-data").write_text("#cloud-config\nruncmd: [reboot]\n")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        argv = [twistd, "-n", "--pidfile=",
                *self.argv(0, "--user-data-file", str(self.dir / "user-data"), "--user-data-fetch-timeout", "1")]
        r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, -signal.SIGTERM, r.stdout[-2000:])
        self.assertIn("caa-forwarder: provisioning the user data failed: failed to retrieve cloud config: "
                      "cloud-config: unsupported key(s) runcmd", r.stdout + r.stderr)  # twistd logs stderr
        self.assertFalse((self.out / PROVISIONED).exists())
        self.assertFalse((self.out / "apf.json").exists())
        self.assertNotIn("listening on", r.stdout)


class ImportTests(SynchronousTestCase):
    """What the guest's start-up does not import (docs/benchmarks.md, Forwarder start-up imports)."""

    NEVER = ("kubernetes", "hypothesis", "treq", "twisted.web.client", "caa.adaptor", "caa.providers", "caa.k8s")

    def imported(self, code: str) -> tuple[set[str], str]:
        """The modules loaded when `code` has run (even if it ends the interpreter, as task.react does), and what
        it printed."""
        hook = "import atexit, sys\natexit.register(lambda: print('MODULES', ' '.join(sys.modules)))\n"
        r = subprocess.run([sys.executable, "-c", hook + code], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        *printed, line = r.stdout.splitlines()
        self.assertTrue(line.startswith("MODULES "), r.stdout)
        return set(line.split()[1:]), "\n".join(printed)

    def test_tap_imports_nothing_lazy(self) -> None:
        modules, _ = self.imported("import caa.forwarder.tap")
        self.assertIn("caa.forwarder.tap", modules)
        lazy = (*self.NEVER, "caa.forwarder.userdata", "caa.forwarder.daemon", "yaml", "pyroute2")
        self.assertEqual([name for name in lazy if name in modules], [])

    def test_pod_network_imports_pyroute2_minimal(self) -> None:
        """With a pod network the forwarder imports caa.network.podvm before it listens: pyroute2 comes from
        the pyroute2-minimal distribution, whose package __init__ leaves out NDB, IPDB, ethtool, NSPopen and
        9p (the full distribution's __init__ imports them all); IPRoute still works."""
        modules, printed = self.imported(
            "import caa.forwarder.tap, caa.forwarder.daemon, caa.network.podvm\n"
            "from importlib.metadata import PackageNotFoundError, version\n"
            "from caa.network import _netlink\n"
            "with _netlink.ipr_in(None) as ipr:\n"
            "    print('LO', _netlink.link_index(ipr, 'lo'))\n"
            "for dist in ('pyroute2-minimal', 'pyroute2'):\n"
            "    try:\n"
            "        print('DIST', dist, version(dist))\n"
            "    except PackageNotFoundError:\n"
            "        print('DIST', dist, None)\n")
        self.assertIn("pyroute2.iproute.linux", modules)
        heavy = ("pyroute2.ndb", "pyroute2.ipdb", "pyroute2.ethtool", "pyroute2.nslink", "pyroute2.plan9")
        self.assertEqual([name for name in heavy if name in modules], [])
        self.assertIn("LO 1", printed.splitlines())  # a real netlink socket answered: lo is index 1
        dists = dict(line.split()[1:] for line in printed.splitlines() if line.startswith("DIST "))
        self.assertNotEqual(dists["pyroute2-minimal"], "None")
        self.assertEqual(dists["pyroute2"], "None", "the full pyroute2 would replace the light __init__")

    def test_pod_network_setup_imports_no_heavy_pyroute2(self) -> None:
        """Building and removing a real pod network (VXLAN into a pod netns, as the forwarder does before it
        listens) loads none of the full pyroute2's extra modules either (root: network namespaces)."""
        nh.need_root(self)
        worker, vm, pod = nh.make_netns(self, "iw"), nh.make_netns(self, "iv"), nh.make_netns(self, "ip")
        nh.set_up(pod, "lo")
        nh.underlay(self, worker, vm, net="192.168.93.0/24")
        d = Path(tempfile.mkdtemp(prefix="fwdimp"))
        self.addCleanup(shutil.rmtree, d)
        (d / "apf.json").write_text(json.dumps({
            "pod-namespace": "default", "pod-name": "p",
            "pod-network": {"podip": "10.244.9.21/24", "pod-hw-addr": "32:b9:59:6b:f0:d9", "interface": "eth0",
                            "worker-node-ip": "192.168.93.1/24", "tunnel-type": "vxlan", "mtu": 1500,
                            "vxlan-port": 4789, "vxlan-id": 556000 + os.getpid() % 10000,
                            "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.9.1", "dev": "eth0"},
                                       {"dst": "10.244.9.0/24", "gw": "", "dev": "eth0", "protocol": "kernel",
                                        "scope": "link"}]}}))
        code = f"""
from twisted.internet import task
from twisted.internet.defer import Deferred
from caa.forwarder.config import load_config
from caa.network import _netlink
from caa.network.podvm import PodNetwork
async def run(reactor):
    net = load_config({str(d / "apf.json")!r}).pod_network
    pods = PodNetwork(reactor, reactor.getThreadPool(), host_netns={vm.path!r})
    await pods.setup(net, {pod.path!r})
    with _netlink.ipr_in({pod.path!r}) as ipr:
        print("POD_ETH0", _netlink.link_index(ipr, "eth0"))
    await pods.teardown(net, {pod.path!r})
task.react(lambda r: Deferred.fromCoroutine(run(r)))
"""
        modules, printed = self.imported(code)
        index = [line.split()[1] for line in printed.splitlines() if line.startswith("POD_ETH0 ")]
        self.assertEqual(len(index), 1, printed)
        self.assertNotEqual(index[0], "None", "the pod interface was not built")
        heavy = ("pyroute2.ndb", "pyroute2.ipdb", "pyroute2.ethtool", "pyroute2.nslink", "pyroute2.plan9")
        self.assertEqual([name for name in heavy if name in modules], [])
        with pod.ipr() as ipr:
            self.assertEqual(list(ipr.get_links(ifname="eth0")), [])  # torn down again

    def test_one_process_start_from_cidata(self) -> None:
        """The whole one-process start from a cidata directory, up to the forwarder listening: no HTTP client, and
        none of the forwarder's own modules before the marker (kata-agent starts while they are imported)."""
        d = Path(tempfile.mkdtemp(prefix="fwdprov"))
        self.addCleanup(shutil.rmtree, d)
        (d / "user-data").write_text(user_data({"pod-name": "p"}))
        code = f"""
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from caa.forwarder import tap
from caa.reactors import as_node_reactor
def at_marker(event):
    if event.get("log_format", "").startswith("provisioned "):
        print("AT_MARKER", " ".join(m for m in sys.modules if m.startswith(("caa.", "google.protobuf"))))
globalLogPublisher.addObserver(at_marker)
options = tap.Options()
options.parseOptions(["--provision-user-data", "--cidata-dir", {str(d)!r}, "--config", {str(d / "o" / "apf.json")!r},
                      "--disable-tls", "--listen", "127.0.0.1:0", "--kata-agent-socket", {str(d / "a.sock")!r}])
async def run(reactor):
    svc = tap.build_service(reactor, options, reactor.getThreadPool(), print)
    svc.startService()
    await svc.when_started()
    await svc.child.when_ready()
    await svc.stopService()
task.react(lambda r: Deferred.fromCoroutine(run(as_node_reactor(r))))
"""
        modules, printed = self.imported(code)
        self.assertTrue((d / "o" / PROVISIONED).exists())
        self.assertIn("caa.forwarder.daemon", modules)
        self.assertIn("yaml", modules)
        self.assertEqual([name for name in self.NEVER if name in modules], [])
        at_marker = printed.split("AT_MARKER")[1].split()
        self.assertIn("caa.forwarder.userdata", at_marker)
        forwarder = ("caa.forwarder.daemon", "caa.ttrpc", "caa.tls", "caa.forwarder.interceptors", "google.protobuf")
        self.assertEqual([name for name in forwarder if name in at_marker], [])
