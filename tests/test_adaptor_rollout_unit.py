"""Rolling update, unit level: the passive mode of the sandbox service and of the daemon after a hand-over, the
hand-over order at start (ask the older adaptor, then take the path, then recover), the fallback when the socket
file is replaced without a call, the owned unix socket (published by rename, removed only while ours) and the
ttrpc server's drain. Fakes and a Clock / NodeMemoryReactor; the sockets are real files in a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from caa.adaptor.adapters import NullNetworking
from caa.adaptor.admin import ADMIN_SERVICE, register_admin
from caa.adaptor.daemon import AdaptorDaemon, DaemonSettings
from caa.adaptor.interfaces import SandboxState
from caa.adaptor.listeners import OwnedUnixSocket, socket_identity
from caa.adaptor.service import CloudService, ServiceConfig
from caa.adaptor.store import SandboxStore
from caa.proto import admin_pb2
from caa.reactors import INodeReactor
from caa.ttrpc import Code, Server, TTRPCError
from caa.ttrpc.server import ServerProtocol
from tests.reactors import NodeMemoryReactor
from tests.test_adaptor_daemon import DaemonTestCase, FakeCloud
from tests.test_adaptor_service import SID, Harness, ann

S = SandboxState


class PassiveServiceTests(Harness):
    """CloudService.hand_over: what a passive service refuses, stops, finishes and leaves to the newer one."""

    def newer(self) -> Any:
        """The newer adaptor's service on the same journal, recovered."""
        svc = self.make()
        self.successResultOf(Deferred.fromCoroutine(svc.recover()))
        return svc

    def test_refuses_lifecycle_calls_and_drains_at_stop(self) -> None:
        self.create()
        self.successResultOf(self.start())
        self.assertEqual(self.successResultOf(self.svc.hand_over()), [SID])
        self.assertTrue(self.svc.passive)
        for d, what in ((Deferred.fromCoroutine(self.svc.create_vm("other", ann(pod="b"), self.netns)),
                         "adding sandbox"), (self.start(), "getting sandbox"), (self.stop(), "stopping VM")):
            e = self.error(d)
            self.assertEqual(e.code, Code.UNAVAILABLE)
            self.assertIn(f"{what}: sandbox", e.message)
            self.assertIn("handed its sandboxes over to a newer one", e.message)
        self.assertEqual(self.record().state, S.RUNNING)
        self.assertEqual(len(self.provider.instances), 1)
        [proxy] = self.proxies.live(SID)  # still relaying
        self.successResultOf(Deferred.fromCoroutine(self.svc.shutdown()))
        self.assertEqual(proxy.drained, 20.0)
        self.assertEqual(len(self.provider.instances), 1)  # the VM is the newer adaptor's
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(
            self.svc.get_info("nginx-7d9f", "default", False))), "i-podvm-nginx-7d9f-3f2a9c81")

    def test_not_passive_shutdown_stops_at_once(self) -> None:
        self.create()
        self.successResultOf(self.start())
        [proxy] = self.proxies.live(SID)
        self.successResultOf(Deferred.fromCoroutine(self.svc.shutdown()))
        self.assertTrue(proxy.stopped)
        self.assertIsNone(proxy.drained)

    def test_no_sweep(self) -> None:
        self.create()
        self.successResultOf(self.start())
        os.unlink(self.netns)  # the pod is gone: an active service would stop the sandbox
        self.successResultOf(self.svc.hand_over())
        self.successResultOf(Deferred.fromCoroutine(self.svc.sweep()))
        self.assertEqual(self.record().state, S.RUNNING)
        self.assertEqual(len(self.provider.instances), 1)

    def test_no_recovery(self) -> None:
        self.create()
        self.successResultOf(self.start())
        fresh = self.make()
        self.successResultOf(fresh.hand_over())
        self.successResultOf(Deferred.fromCoroutine(fresh.recover()))
        self.assertEqual(fresh.sandboxes, {})
        self.assertEqual(self.net.calls.count(("ensure", SID)), 0)

    def test_idempotent(self) -> None:
        self.create()
        first, second = self.svc.hand_over(), self.svc.hand_over()
        self.assertEqual(self.successResultOf(first), [SID])
        self.assertEqual(self.successResultOf(second), [SID])
        self.assertEqual(self.successResultOf(self.svc.hand_over()), [SID])

    def test_start_in_provider_create_stops_after_it_without_rollback(self) -> None:
        self.create()
        self.provider.hold_create = True
        d = self.start()
        handing = self.svc.hand_over()
        self.assertNoResult(handing)  # the create is under way: the newer adaptor must not look yet
        self.provider.hold_create = False
        self.provider.release_create()
        e = self.error(d)
        self.assertEqual(e.code, Code.UNAVAILABLE)
        self.assertIn("interrupted by a rolling update", e.message)
        self.assertEqual(self.successResultOf(handing), [SID])
        rec = self.record()
        self.assertEqual(rec.state, S.TUNNEL_INTENT)  # the create's result is journalled, nothing further
        self.assertEqual(len(self.provider.instances), 1)
        self.assertEqual(self.net.tunnels, {})
        newer = self.newer()  # rolls the interrupted start back
        self.assertEqual(self.record().state, S.CREATED)
        self.assertEqual(self.provider.instances, {})
        self.successResultOf(Deferred.fromCoroutine(newer.start_vm(SID, None)))
        self.successResultOf(Deferred.fromCoroutine(newer.stop_vm(SID)))
        self.assertClean()

    def test_start_dialling_stops_at_once(self) -> None:
        self.create()
        self.proxies.auto_ready = False
        d = self.start()
        self.assertEqual(self.record().state, S.TUNNEL_INTENT)
        self.assertEqual(self.successResultOf(self.svc.hand_over()), [SID])
        self.assertEqual(self.error(d).code, Code.UNAVAILABLE)
        self.assertIn(SID, self.net.tunnels)  # left for the newer adaptor
        self.assertEqual(self.proxies.live(SID), [])
        self.proxies.auto_ready = True
        newer = self.newer()
        self.assertEqual(self.record().state, S.CREATED)
        self.assertNotIn(SID, self.net.tunnels)
        self.assertEqual(self.provider.instances, {})
        self.successResultOf(Deferred.fromCoroutine(newer.stop_vm(SID)))
        self.assertClean()

    def test_readoption_dialling_stops_at_once(self) -> None:
        self.create()
        self.successResultOf(self.start())
        self.proxies.auto_ready = False
        older = self.make()  # a restarted adaptor re-adopting: its dial may last --proxy-timeout
        recovering = Deferred.fromCoroutine(older.recover())
        self.assertNoResult(recovering)
        self.assertEqual(self.successResultOf(older.hand_over()), [SID])
        self.successResultOf(recovering)
        self.assertEqual(self.record().state, S.RUNNING)  # no rollback: the newer adaptor re-adopts
        self.assertEqual(len(self.provider.instances), 1)

    def test_stop_in_flight_finishes(self) -> None:
        self.create()
        self.successResultOf(self.start())
        self.provider.delete_delay = 5.0
        stopping = self.stop()
        handing = self.svc.hand_over()
        self.assertNoResult(handing)
        self.clock.advance(5.0)
        self.successResultOf(stopping)
        self.assertEqual(self.successResultOf(handing), [])
        self.assertClean()


class JournalLoadingTests(Harness):
    """The newer adaptor serves its socket before it has read the journal: StopVM / StartVM wait for the read."""

    def test_stop_waits_for_the_journal(self) -> None:
        self.create()
        self.successResultOf(self.start())
        pending: list[tuple[Any, Deferred[Any]]] = []

        def run(f: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append((f, d))
            return d

        newer = CloudService(self.clock, self.provider, self.proxies, SandboxStore(self.pods_dir, run), self.net,
                             self.tls, ServiceConfig(pods_dir=self.pods_dir), wallclock=self.clock.seconds)
        recovering = Deferred.fromCoroutine(newer.recover())
        stopping = Deferred.fromCoroutine(newer.stop_vm(SID))
        self.assertNoResult(stopping)  # unknown until the journal is read: no NOT_FOUND
        while pending:
            f, d = pending.pop(0)
            d.callback(f())
        self.successResultOf(recovering)
        self.successResultOf(stopping)
        self.assertEqual(self.provider.instances, {})
        self.assertEqual(self.records(), [])


def call(server: Server, method: str, payload: bytes) -> bytes:
    """One ttrpc call to `server` over a StringTransport; the response payload (or the TTRPCError raised)."""
    from caa.ttrpc.envelope import decode_response, encode_request
    from caa.ttrpc.framing import TYPE_REQUEST, Frame, FrameDecoder, encode_frame

    proto = server.factory().buildProtocol(None)
    assert isinstance(proto, ServerProtocol)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(encode_frame(1, TYPE_REQUEST, 0, encode_request(ADMIN_SERVICE, method, payload, 0, [])))
    [frame] = list(FrameDecoder().feed(transport.value()))
    assert isinstance(frame, Frame)
    return decode_response(frame.data)


class HandOverRPCTests(SynchronousTestCase):
    def test_handover_method(self) -> None:
        server = Server(clock=Clock())
        asked: list[str] = []

        def hand_over(successor: str) -> Deferred[list[str]]:
            asked.append(successor)
            return succeed(["a", "b"])

        register_admin(server, list, hand_over)
        payload = call(server, "HandOver", admin_pb2.HandOverRequest(successor="pid 7").SerializeToString())
        answer = admin_pb2.HandOverResponse.FromString(payload)
        self.assertEqual((list(answer.sandbox_ids), answer.pid), (["a", "b"], os.getpid()))
        self.assertEqual(asked, ["pid 7"])

    def test_without_handover_unimplemented(self) -> None:
        server = Server(clock=Clock())
        register_admin(server, list)
        e = self.assertRaises(TTRPCError, call, server, "HandOver", b"")
        self.assertEqual(e.code, Code.UNIMPLEMENTED)


class HandingCloud(FakeCloud):
    """FakeCloud (the daemon's view of CloudService) with the hand-over."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(log)
        self.passive = False

    def hand_over(self) -> Deferred[list[str]]:
        self.log.append("hand over")
        self.passive = True
        return succeed(["s1"])

    async def sweep(self) -> None:
        self.log.append("sweep")


class DaemonTakeoverTests(DaemonTestCase):
    def daemon_with(self, call: Any, **settings: Any) -> AdaptorDaemon:
        self.daemon()  # the collaborators of DaemonTestCase
        self.cloud = HandingCloud(self.log)
        return AdaptorDaemon(
            self.reactor, DaemonSettings(socket_path=self.path, **settings), server=self.server, cloud=self.cloud,
            provider=self.provider, store=SandboxStore(os.path.join(self.dir, "pods")), network=NullNetworking(),
            thread_pools=[self.pool], on_fatal=lambda: self.fatal.append("fatal"), hand_over_call=call)

    def old_socket(self) -> socket.socket:
        """A socket file at the path, as the running older adaptor has it."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        s = socket.socket(socket.AF_UNIX)
        s.bind(self.path)
        s.listen(1)
        self.addCleanup(s.close)
        return s

    def test_asks_the_older_adaptor_before_taking_the_path(self) -> None:
        self.old_socket()
        theirs = socket_identity(self.path)
        asked: list[tuple[str, str, float]] = []
        answer: Deferred[admin_pb2.HandOverResponse] = Deferred()

        def call(reactor: INodeReactor, path: str, successor: str, timeout: float) -> Deferred[Any]:
            asked.append((path, successor, timeout))
            return answer

        d = self.daemon_with(call)
        d.startService()
        self.assertEqual(asked, [(self.path, f"pid {os.getpid()}", 120.0)])
        self.assertEqual(socket_identity(self.path), theirs)  # not ours until the older one answered
        self.assertNotIn("recover", self.log)
        answer.callback(admin_pb2.HandOverResponse(sandbox_ids=["s1"], pid=1))
        self.assertNotEqual(socket_identity(self.path), theirs)
        self.assertTrue(d.hypervisor.ours())
        self.assertIn("recover", self.log)
        self.assertTrue(d.recovered)
        self.successResultOf(d.stopService())
        self.assertFalse(os.path.exists(self.path))

    def test_nobody_answers_takes_over_anyway(self) -> None:
        self.old_socket()

        def call(reactor: INodeReactor, path: str, successor: str, timeout: float) -> Deferred[Any]:
            return fail(ConnectionRefusedError("killed"))

        d = self.daemon_with(call)
        d.startService()
        self.assertTrue(d.hypervisor.ours())
        self.assertTrue(d.recovered)
        self.assertTrue(any("no hand-over from an adaptor" in e["log_format"] for e in self.events))
        self.successResultOf(d.stopService())

    def test_no_socket_no_call(self) -> None:
        def call(reactor: INodeReactor, path: str, successor: str, timeout: float) -> Deferred[Any]:
            raise AssertionError("nothing to ask")

        d = self.daemon_with(call)
        d.startService()
        self.assertTrue(d.recovered)
        self.successResultOf(d.stopService())

    def test_passive_after_hand_over(self) -> None:
        d = self.daemon_with(None, sweep_interval=60.0)
        d.startService()
        self.reactor.advance(60)
        self.assertEqual(self.log, ["pool start", "recover", "sweep"])
        self.assertEqual(self.successResultOf(d.hand_over("pid 9")), ["s1"])
        self.assertTrue(d.passive)
        self.reactor.advance(600)
        self.assertEqual(self.log.count("sweep"), 1)  # no round after the hand-over
        self.successResultOf(d.stopService())
        self.assertTrue(any("after a hand-over" in e["log_format"] for e in self.events))
        self.assertFalse(os.path.exists(self.path))  # still our file: removed

    def test_socket_replaced_without_a_call(self) -> None:
        d = self.daemon_with(None, socket_check_interval=1.0)
        d.startService()
        newer = OwnedUnixSocket(self.reactor, self.reactor, self.path, self.server.factory())
        newer.bind()
        newer.publish()
        self.addCleanup(newer.close)
        theirs = socket_identity(self.path)
        self.assertFalse(d.passive)
        self.reactor.advance(1.0)
        self.assertTrue(d.passive)
        self.assertIn("hand over", self.log)
        self.successResultOf(d.stopService())
        self.assertEqual(socket_identity(self.path), theirs)


class OwnedUnixSocketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="caa-owned-")  # short: unix socket paths have a length limit
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "s", "agent.ttrpc")
        self.reactor = NodeMemoryReactor()

    def owned(self) -> OwnedUnixSocket:
        s = OwnedUnixSocket(self.reactor, self.reactor, self.path, Server(clock=self.reactor).factory(),
                            mode=0o600, dir_mode=0o700)
        self.addCleanup(s.close)
        return s

    def connects(self) -> bool:
        with socket.socket(socket.AF_UNIX) as c:
            try:
                c.connect(self.path)
            except OSError:
                return False
            return True

    def test_bound_then_published(self) -> None:
        s = self.owned()
        s.bind()
        self.assertFalse(os.path.exists(self.path))  # bound under a temporary name
        self.assertEqual(len(os.listdir(os.path.dirname(self.path))), 1)
        s.publish()
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["agent.ttrpc"])
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(os.path.dirname(self.path)).st_mode & 0o777, 0o700)
        self.assertTrue(s.ours())
        self.assertTrue(self.connects())
        s.close()
        self.assertFalse(os.path.exists(self.path))

    def test_unpublished_close_removes_the_temporary_name(self) -> None:
        s = self.owned()
        s.bind()
        s.close()
        self.assertEqual(os.listdir(os.path.dirname(self.path)), [])

    def test_replaced_by_a_newer_one(self) -> None:
        old = self.owned()
        old.bind()
        old.publish()
        new = self.owned()
        new.bind()
        self.assertTrue(self.connects())  # the old one still serves the path
        new.publish()  # one rename: the path is never missing
        self.assertFalse(old.ours())
        self.assertTrue(new.ours())
        old.close()
        self.assertTrue(new.ours())
        self.assertTrue(self.connects())
        self.assertEqual(self.reactor.readers, {new})

    def test_directory_in_the_way(self) -> None:
        os.makedirs(self.path)
        s = self.owned()
        e = self.assertRaises(OSError, s.bind)
        self.assertIn("is a directory", str(e))
        self.assertEqual(self.reactor.readers, set())


class ServerDrainTests(SynchronousTestCase):
    def connect(self, server: Server) -> tuple[Any, StringTransport]:
        proto = server.factory().buildProtocol(None)
        assert isinstance(proto, ServerProtocol)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_waits_for_clients_to_close(self) -> None:
        clock = Clock()
        server = Server(clock=clock)
        proto, _ = self.connect(server)
        d = Deferred.fromCoroutine(server.drain(20.0))
        clock.advance(19.0)
        self.assertNoResult(d)
        proto.connectionLost()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_drops_the_rest_at_the_deadline(self) -> None:
        clock = Clock()
        server = Server(clock=clock)
        self.connect(server)
        _, transport = self.connect(server)
        d = Deferred.fromCoroutine(server.drain(20.0))
        clock.advance(20.0)
        self.assertEqual(self.successResultOf(d), 2)
        self.assertEqual(server.connection_count, 0)
        self.assertTrue(transport.disconnecting)

    def test_nothing_open(self) -> None:
        server = Server(clock=Clock())
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(server.drain(20.0))), 0)


class DrainTimeoutOptionTests(SynchronousTestCase):
    def test_flag_env_default_and_bad_values(self) -> None:
        from twisted.python.usage import UsageError

        from tests.test_adaptor_options import parse

        self.assertEqual(parse([])["drain-timeout"], 20.0)
        self.assertEqual(parse([], {"DRAIN_TIMEOUT": "45s"})["drain-timeout"], 45.0)
        self.assertEqual(parse(["--drain-timeout", "1m"], {"DRAIN_TIMEOUT": "45s"})["drain-timeout"], 60.0)
        self.assertEqual(parse(["--drain-timeout", "0"])["drain-timeout"], 0.0)
        e = self.assertRaises(UsageError, parse, ["--drain-timeout", "-5s"])
        self.assertIn("--drain-timeout must not be negative", str(e))
        e = self.assertRaises(UsageError, parse, ["--drain-timeout", "20"])
        self.assertIn("--drain-timeout", str(e))


class BuiltDaemonTests(DaemonTestCase):
    def test_drain_timeout_and_hand_over_wired(self) -> None:
        from caa.adaptor.daemon import build_daemon
        from caa.adaptor.options import AdaptorOptions
        from caa.adaptor.store import run_inline

        options = AdaptorOptions({})
        options.parseOptions(["--provider", "tests.fakes.provider:FakeProviderFactory", "--socket", self.path,
                              "--pods-dir", os.path.join(self.dir, "pods"), "--tls-dir", os.path.join(self.dir, "tls"),
                              "--tunnel-type", "none", "--disable-tls", "--probe-port", "0", "--drain-timeout", "7s"])
        d = build_daemon(self.reactor, options, on_fatal=lambda: None, environ={}, journal_runner=run_inline)
        self.assertEqual(d.settings.drain_timeout, 7.0)
        assert isinstance(d.cloud, CloudService)
        self.assertEqual(d.cloud.config.drain_timeout, 7.0)
        d.startService()
        # HandOver is served on the daemon's own socket server and makes it passive
        answer = admin_pb2.HandOverResponse.FromString(
            call(d.server, "HandOver", admin_pb2.HandOverRequest(successor="pid 1").SerializeToString()))
        self.assertEqual(list(answer.sandbox_ids), [])
        self.assertTrue(d.passive)
        self.assertTrue(d.cloud.passive)
        self.successResultOf(d.stopService())
