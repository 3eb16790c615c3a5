"""The node daemon's lifecycle (caa.adaptor.daemon) on a NodeMemoryReactor: start, listen failures, the
hypervisor socket takeover, the probe, the sweeper on the clock, the ordered stop, the late-failure exit.

The hypervisor socket is a real unix socket in a temporary directory (its file identity is the point of the
takeover tests); everything the reactor would do is recorded by the memory reactor and driven by hand.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from collections.abc import Sized
from typing import Any

from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.test.requesthelper import DummyRequest

from caa.adaptor.adapters import NullNetworking
from caa.adaptor.daemon import AdaptorDaemon, DaemonSettings, StartupProbe, build_daemon, can_connect
from caa.adaptor.interfaces import SandboxRecord
from caa.adaptor.listeners import ListenError, UnixSocketService, listen_reuseport, socket_identity
from caa.adaptor.options import AdaptorOptions
from caa.adaptor.store import SandboxStore, run_inline
from caa.process import fail_process
from caa.ttrpc import Server
from tests.fakes.provider import FakeProvider
from tests.reactors import NodeMemoryReactor


class FakeCloud:
    """Stands in for CloudService as the daemon sees it (caa.adaptor.daemon.CloudLifecycle): records calls."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.sandboxes: Sized = {}
        self.sweep_error: Exception | None = None

    async def recover(self) -> None:
        self.log.append("recover")

    async def sweep(self) -> None:
        self.log.append("sweep")
        if self.sweep_error is not None:
            raise self.sweep_error

    async def shutdown(self) -> None:
        self.log.append("shutdown")

    def records(self) -> list[SandboxRecord]:
        return []

    def hand_over(self) -> Deferred[list[str]]:
        self.log.append("hand over")
        return succeed([])


class RecordingPool(ThreadPool):
    """A thread pool that starts no thread: records when the daemon starts and stops it."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(name="test")
        self.log = log

    def start(self) -> None:
        self.log.append("pool start")

    def stop(self) -> None:
        self.log.append("pool stop")


class DaemonTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="caa-daemon-")
        self.addCleanup(self._cleanup)
        self.path = os.path.join(self.dir, "run", "hypervisor.sock")
        self.log: list[str] = []
        self.reactor = NodeMemoryReactor()
        self.fatal: list[str] = []
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def _cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    def daemon(self, reactor: NodeMemoryReactor | None = None, **settings: Any) -> AdaptorDaemon:
        reactor = reactor or self.reactor
        self.provider = FakeProvider(reactor)
        self.cloud = FakeCloud(self.log)
        self.server = Server(clock=reactor, name="hypervisor")
        self.pool = RecordingPool(self.log)
        return AdaptorDaemon(
            reactor, DaemonSettings(socket_path=self.path, **settings), server=self.server, cloud=self.cloud,
            provider=self.provider, store=SandboxStore(os.path.join(self.dir, "pods")), network=NullNetworking(),
            thread_pools=[self.pool], on_fatal=lambda: self.fatal.append("fatal"))

    def assertNoTimers(self, reactor: NodeMemoryReactor | None = None) -> None:
        self.assertEqual((reactor or self.reactor).getDelayedCalls(), [])


class StartTests(DaemonTestCase):
    def test_start_listens_recovers_then_serves(self) -> None:
        d = self.daemon()
        d.startService()
        self.assertTrue(d.running)
        self.assertIn(d.hypervisor.socket, self.reactor.readers)
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        self.assertEqual(self.log, ["pool start", "recover"])  # pools only once listening worked
        self.assertTrue(d.recovered)
        assert d.recovery is not None
        self.successResultOf(d.recovery)

        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.connect(self.path)
        d.hypervisor.socket.doRead()
        [(fd, family, factory)] = self.reactor.adoptedStreamConnections
        self.assertEqual(family, socket.AF_UNIX)
        self.assertIsInstance(factory.buildProtocol(UNIXAddress(self.path)), type(self.server.factory().buildProtocol(
            UNIXAddress(self.path))))
        d.hypervisor.socket.doRead()  # nothing pending: returns without adopting
        self.assertEqual(len(self.reactor.adoptedStreamConnections), 1)
        self.successResultOf(d.stopService())
        self.assertNoTimers()

    def test_socket_mode_and_stale_file(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("stale")
        d = self.daemon(socket_mode=0o660)
        d.startService()
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o660)
        self.successResultOf(d.stopService())
        self.assertFalse(os.path.exists(self.path))

    def test_listen_failure_aborts_start(self) -> None:
        self.path = os.path.join(self.dir, "x" * 120, "hypervisor.sock")  # over the AF_UNIX path limit
        d = self.daemon()
        e = self.assertRaises(ListenError, d.startService)
        self.assertIn(f"cannot listen on {self.path}", str(e))
        self.assertFalse(d.running)
        self.assertEqual(self.log, [])  # no thread pool started, no recovery
        self.assertEqual(self.reactor.readers, set())
        [critical] = [e for e in self.events if e["log_level"] == LogLevel.critical]
        self.assertIn("cannot listen on", critical["error"])
        self.assertNoTimers()

    def test_metrics_listen_failure_aborts_start_and_removes_socket(self) -> None:
        with socket.socket() as holder:  # another program holds the port without SO_REUSEPORT
            holder.bind(("127.0.0.1", 0))
            holder.listen(1)
            port = holder.getsockname()[1]
            d = self.daemon(metrics_port=port)
            e = self.assertRaises(ListenError, d.startService)
        self.assertIn(f"127.0.0.1:{port} (metrics)", str(e))
        self.assertIn("Address already in use", str(e))
        self.assertFalse(os.path.exists(self.path))  # the hypervisor socket that did start is undone
        self.assertEqual(self.reactor.readers, set())
        self.assertEqual(self.log, [])
        self.assertFalse(any(s.running for s in d))
        self.assertNoTimers(self.reactor)

    def test_probe_and_metrics_listen(self) -> None:
        ports = []
        for _ in range(2):
            with socket.socket() as s:  # free ports for the real SO_REUSEPORT binds
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        probe_port, metrics_port = ports
        d = self.daemon(probe_port=probe_port, metrics_port=metrics_port)
        d.startService()
        self.assertEqual([family for _fd, family, _f in self.reactor.adoptedPorts], [socket.AF_INET] * 2)
        # SO_REUSEPORT on both: the next adaptor of a rolling update (host network) binds the same ports while
        # this one runs
        for port in ports:
            listen_reuseport(self.reactor, "127.0.0.1", port, Site(Resource()))
        self.assertEqual(len(self.reactor.adoptedPorts), 4)
        self.assertEqual(self.reactor.tcpServers, [])
        self.successResultOf(d.stopService())

    def test_verify_config_failure_is_fatal(self) -> None:
        d = self.daemon(verify_config=True)
        self.provider.verify_error = "no such image"
        d.startService()
        self.assertEqual(self.fatal, ["fatal"])
        self.assertTrue(d.failed)
        self.assertFalse(d.recovered)
        self.assertNotIn("recover", self.log)
        [critical] = [e for e in self.events if e["log_level"] == LogLevel.critical]
        self.assertEqual(critical["error"], "no such image")
        self.successResultOf(d.stopService())


class TakeoverTests(DaemonTestCase):
    def test_stop_leaves_a_newer_adaptors_socket(self) -> None:
        old = self.daemon()
        old.startService()
        newer = UnixSocketService(self.reactor, self.reactor, self.path, self.server.factory())
        newer.startService()  # a rolling update: the new adaptor removes our file and binds its own
        theirs = socket_identity(self.path)
        self.successResultOf(old.stopService())
        self.assertEqual(socket_identity(self.path), theirs)
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.connect(self.path)  # still the newer one's listening socket
        newer.stopService()
        self.assertFalse(os.path.exists(self.path))

    def test_stop_when_the_file_is_gone(self) -> None:
        d = self.daemon()
        d.startService()
        os.unlink(self.path)
        self.successResultOf(d.stopService())
        self.assertFalse(os.path.exists(self.path))


class StopTests(DaemonTestCase):
    def test_stop_order(self) -> None:
        d = self.daemon()
        d.startService()
        self.successResultOf(d.stopService())
        self.assertEqual(self.log, ["pool start", "recover", "shutdown", "pool stop"])
        self.assertEqual(self.reactor.readers, set())
        self.assertFalse(os.path.exists(self.path))
        self.assertFalse(d.running)
        self.assertNoTimers()


class SweeperTests(DaemonTestCase):
    def test_sweeps_on_the_clock_and_survives_errors(self) -> None:
        d = self.daemon(sweep_interval=60.0)
        d.startService()
        self.assertNotIn("sweep", self.log)  # the first round comes at start, before recovery: skipped
        self.cloud.sweep_error = RuntimeError("provider down")
        self.reactor.advance(60)
        self.assertEqual(self.log.count("sweep"), 1)
        [failure] = [e for e in self.events if "log_failure" in e]
        self.assertIsInstance(failure["log_failure"].value, RuntimeError)
        self.flushLoggedErrors(RuntimeError)
        self.cloud.sweep_error = None
        self.reactor.advance(60)
        self.assertEqual(self.log.count("sweep"), 2)  # the loop lives on
        self.successResultOf(d.stopService())
        self.assertNoTimers()


def render(probe: StartupProbe, request: DummyRequest) -> bytes | int:
    """DummyRequest stands in for twisted.web.server.Request (the methods the probe uses)."""
    return probe.render(request)  # type: ignore[arg-type]


class ProbeTests(DaemonTestCase):
    def probe(self, recovered: bool = True) -> StartupProbe:
        return StartupProbe(lambda: recovered, lambda: can_connect(self.reactor, self.path))

    def test_not_recovered(self) -> None:
        request = DummyRequest([b"startup"])
        body = render(self.probe(recovered=False), request)
        self.assertEqual((request.responseCode, body), (500, b"not ready\n"))
        self.assertEqual(self.reactor.unixClients, [])

    def test_answers_after_a_connect_through_the_reactor(self) -> None:
        request = DummyRequest([b"startup"])
        self.assertEqual(render(self.probe(), request), NOT_DONE_YET)
        [(path, factory, timeout, _pid)] = self.reactor.unixClients
        self.assertEqual((path, timeout), (self.path, 1.0))
        self.assertEqual(request.finished, 0)
        proto = factory.buildProtocol(UNIXAddress(path))
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertEqual((request.finished, request.responseCode), (1, 200))
        self.assertTrue(transport.disconnecting)  # the check's connection is closed again

    def test_refused(self) -> None:
        request = DummyRequest([b"startup"])
        render(self.probe(), request)
        [(_path, factory, _timeout, _pid)] = self.reactor.unixClients
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(ConnectionRefusedError()))
        self.assertEqual((request.finished, request.responseCode), (1, 500))
        self.assertEqual(b"".join(request.written), b"not ready\n")

    def test_client_gone_cancels_the_check(self) -> None:
        request = DummyRequest([b"startup"])
        render(self.probe(), request)
        request.processingFailed(Failure(ConnectionRefusedError("client went away")))
        self.assertEqual(request.written, [])
        self.assertEqual(self.reactor.connectors[-1].stoppedConnecting, True)


class FailProcessTests(SynchronousTestCase):
    def test_running_reactor_gets_sigterm(self) -> None:
        reactor = NodeMemoryReactor()
        reactor.running = True
        kills: list[tuple[int, int]] = []
        fail_process(reactor, kill=lambda pid, sig: kills.append((pid, sig)))
        self.assertEqual(kills, [(os.getpid(), signal.SIGTERM)])

    def test_before_the_reactor_runs(self) -> None:
        reactor = NodeMemoryReactor()
        kills: list[tuple[int, int]] = []
        fail_process(reactor, kill=lambda pid, sig: kills.append((pid, sig)))
        self.assertEqual(kills, [])  # the default SIGTERM action would skip the clean stop
        reactor.run()
        self.assertEqual(kills, [(os.getpid(), signal.SIGTERM)])


class BuildTests(DaemonTestCase):
    def options(self, *args: str) -> AdaptorOptions:
        options = AdaptorOptions()
        options.parseOptions(["--provider", "tests.fakes.provider:FakeProviderFactory", "--socket", self.path,
                              "--pods-dir", os.path.join(self.dir, "pods"), "--tls-dir", os.path.join(self.dir, "tls"),
                              "--tunnel-type", "none", *args])
        return options

    def test_from_the_command_line(self) -> None:
        with socket.socket() as s:  # a free port for the real SO_REUSEPORT bind of the metrics listener
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        options = self.options("--probe-port", "0", "--metrics-port", str(port), "--socket-mode", "0660",
                               "--disable-tls")
        d = build_daemon(self.reactor, options, on_fatal=lambda: None, environ={}, journal_runner=run_inline)
        self.assertEqual(d.settings, DaemonSettings(
            socket_path=self.path, socket_mode=0o660, probe_port=0, metrics_port=port, metrics_interface="127.0.0.1",
            verify_config=False, provider_name="tests.fakes.provider:FakeProviderFactory", disable_tls=True))
        d.startService()
        self.assertTrue(d.recovered)  # the real CloudService recovered an empty journal
        [(_fd, _family, site)] = self.reactor.adoptedPorts
        assert isinstance(site, Site)
        self.assertEqual(list(site.resource.children), [b"metrics"])
        self.successResultOf(d.stopService())
        self.assertFalse(os.path.exists(self.path))
        self.assertNoTimers()
