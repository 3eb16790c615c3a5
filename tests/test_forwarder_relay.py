"""caa-forwarder end to end on real sockets: adaptor-side ttrpc client -> (m)TLS TCP -> ForwarderService ->
unix socket -> the kata-agent stand-in (tests/agent_standin.py)."""

from __future__ import annotations

import datetime
import itertools
import os
import socket
import tempfile
from typing import Any, cast

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint, IStreamServerEndpoint
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from caa import tls
from caa.forwarder.config import ForwarderConfig, parse_config
from caa.forwarder.daemon import ForwarderService, StartupError, TLSSettings, build_server_tls
from caa.proto import agent_pb2, health_pb2
from caa.reactors import as_node_reactor
from caa.ttrpc import Code, TTRPCError, connect
from tests.agent_standin import AgentStandin
from tests.reactors import NodeMemoryReactor

reactor = as_node_reactor(_reactor)
_counter = itertools.count()
NETNS = "/run/netns/podns-test"


class FakePodNetwork:
    """Stands in for caa.network.interfaces.IPodNetwork: records setup/teardown, can fail setup."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    def setup(self, config: Any, pod_netns: str) -> defer.Deferred[None]:
        self.calls.append(("setup", pod_netns))
        if self.fail:
            return defer.fail(RuntimeError("vxlan0 exists"))
        return defer.succeed(None)

    def teardown(self, config: Any, pod_netns: str) -> defer.Deferred[None]:
        self.calls.append(("teardown", pod_netns))
        return defer.succeed(None)


POD_NETWORK = {"podip": "10.244.1.21/24", "pod-hw-addr": "32:b9:59:6b:f0:d5", "interface": "eth0",
               "worker-node-ip": "10.224.0.5/16", "tunnel-type": "vxlan", "mtu": 1450, "vxlan-id": 555002}


class ForwarderTestBase(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"fwd{os.getpid()}-{next(_counter)}-")
        self.agent_path = os.path.join(self.dir, "agent.sock")
        self.agent = AgentStandin(reactor)
        self.ca = tls.CertificateAuthority.create()
        self.server_pair = self.ca.issue_server_certificate("podvm-test")
        self.client_pair = tls.make_client_certificate()
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)  # a plain callable is a log observer
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def tearDown(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    async def start_agent(self) -> None:
        await self.agent.listen(reactor, self.agent_path)
        self.addCleanup(self.agent.stop)

    def config(self, **extra: Any) -> ForwarderConfig:
        doc = {"tls-server-cert": self.server_pair.cert_pem.decode(),
               "tls-server-key": self.server_pair.key_pem.decode(),
               "tls-client-ca": self.client_pair.cert_pem.decode(), **extra}
        return parse_config(doc)

    async def start_forwarder(self, config: ForwarderConfig | None = None, use_tls: bool = True,
                              pod_network: Any = None, port: int = 0, environ: Any = None) -> ForwarderService:
        config = config or self.config()
        opts = build_server_tls(TLSSettings(), config) if use_tls else None
        svc = ForwarderService(
            reactor, config, TCP4ServerEndpoint(reactor, port, interface="127.0.0.1"),
            UNIXClientEndpoint(reactor, self.agent_path, timeout=2), NETNS,
            tls_options=(lambda: opts) if opts is not None else None, pod_network=pod_network,
            environ=environ if environ is not None else {})
        svc.agent.wait_timeout = 5
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        await svc.when_ready()
        return svc

    def port_of(self, svc: ForwarderService) -> int:
        assert svc.port is not None
        host = svc.port.getHost()
        assert isinstance(host, IPv4Address)
        return host.port

    async def dial(self, svc: ForwarderService, client_pair: Any = "default", use_tls: bool = True,
                   ca_pem: bytes | None = None, server_name: str = "podvm-test") -> Any:
        ep: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port_of(svc), timeout=5)
        if use_tls:
            pair = self.client_pair if client_pair == "default" else client_pair
            creator = tls.client_creator(ca_pem or self.ca.cert_pem, pair.cert_pem if pair else None,
                                         pair.key_pem if pair else None, server_name)
            ep = wrapClientTLS(creator, ep)
        client = await connect(ep, clock=reactor)
        self.addCleanup(client.close)
        return client

    async def check(self, client: Any, timeout: float = 5) -> Any:
        return await client.call("grpc.Health", "Check", health_pb2.CheckRequest(),
                                 health_pb2.HealthCheckResponse, timeout=timeout)


class RelayTests(ForwarderTestBase):
    async def test_health_and_generic_passthrough_over_mtls(self) -> None:
        await self.start_agent()
        svc = await self.start_forwarder()
        client = await self.dial(svc)
        resp = await self.check(client)
        self.assertEqual(resp.status, health_pb2.HealthCheckResponse.SERVING)
        v = await client.call("grpc.Health", "Version", health_pb2.CheckRequest(),
                              health_pb2.VersionCheckResponse, timeout=5)
        self.assertEqual(v.agent_version, "3.99.0-standin")
        out = await client.call("grpc.AgentService", "ReadStdout", agent_pb2.ReadStreamRequest(len=(4 << 20) - 64),
                                agent_pb2.ReadStreamResponse, timeout=10)
        self.assertEqual(len(out.data), (4 << 20) - 64)
        # unknown to the stand-in: the agent's status comes back unchanged
        with self.assertRaises(TTRPCError) as cm:
            await client.call_raw("grpc.AgentService", "ListRoutes", b"", 5, None)
        self.assertEqual(cm.exception.code, Code.UNIMPLEMENTED)

    async def test_metadata_and_deadline_propagate(self) -> None:
        await self.start_agent()
        svc = await self.start_forwarder()
        client = await self.dial(svc)
        await client.call("grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse,
                          timeout=7, metadata=[("x-trace", "abc")])
        method, _, metadata, remaining = self.agent.calls[-1]
        self.assertEqual(method, "Check")
        self.assertIn(("x-trace", "abc"), metadata)
        assert remaining is not None
        self.assertTrue(5 < remaining <= 7, remaining)

    async def test_interceptors_applied(self) -> None:
        await self.start_agent()
        svc = await self.start_forwarder()
        client = await self.dial(svc)
        from google.protobuf import empty_pb2

        await client.call("grpc.AgentService", "CreateSandbox",
                          agent_pb2.CreateSandboxRequest(sandbox_id="s1", dns=["nameserver 1.1.1.1"]),
                          empty_pb2.Empty, timeout=5)
        await client.call("grpc.AgentService", "CreateContainer",
                          agent_pb2.CreateContainerRequest(container_id="c1"), empty_pb2.Empty, timeout=5)
        sandbox, container = self.agent.calls[-2][1], self.agent.calls[-1][1]
        self.assertEqual((sandbox.sandbox_id, list(sandbox.dns)), ("s1", []))
        self.assertEqual([(n.Type, n.Path) for n in container.OCI.Linux.Namespaces], [("network", NETNS)])

    async def test_many_calls_in_flight(self) -> None:
        await self.start_agent()
        svc = await self.start_forwarder()
        client = await self.dial(svc)
        waits = [defer.ensureDeferred(client.call("grpc.AgentService", "WaitProcess",
                             agent_pb2.WaitProcessRequest(container_id="c", exec_id=str(i)),
                             agent_pb2.WaitProcessResponse, timeout=10)) for i in range(20)]
        while len(self.agent.waiting) < 20:
            await self.check(client)  # other calls are served while 20 are pending
        self.agent.release()
        results = await defer.gatherResults(waits)
        self.assertEqual(sorted(r.status for r in results), list(range(20)))

    async def test_agent_restart_reconnects(self) -> None:
        await self.start_agent()
        svc = await self.start_forwarder()
        client = await self.dial(svc)
        await self.check(client)
        await self.agent.stop()
        self.agent = AgentStandin(reactor)
        await self.start_agent()
        resp = await self.check(client)
        self.assertEqual(resp.status, health_pb2.HealthCheckResponse.SERVING)
        self.assertGreaterEqual(svc.agent.connections, 2)

    async def test_agent_absent_call_fails_at_its_deadline(self) -> None:
        svc = await self.start_forwarder()
        client = await self.dial(svc)
        with self.assertRaises(TTRPCError) as cm:
            await self.check(client, timeout=0.5)
        self.assertIn(cm.exception.code, (Code.DEADLINE_EXCEEDED, Code.UNAVAILABLE))
        await self.start_agent()  # the agent appears later: calls now work
        self.assertEqual((await self.check(client)).status, health_pb2.HealthCheckResponse.SERVING)

    async def test_forwarder_restart_client_reconnects(self) -> None:
        await self.start_agent()
        svc = await self.start_forwarder()
        port = self.port_of(svc)
        client = await self.dial(svc)
        await self.check(client)
        await svc.stopService()
        await client.when_closed()
        svc2 = await self.start_forwarder(port=port)
        client2 = await self.dial(svc2)
        self.assertEqual((await self.check(client2)).status, health_pb2.HealthCheckResponse.SERVING)

    async def test_plain_tcp(self) -> None:
        await self.start_agent()
        svc = await self.start_forwarder(use_tls=False)
        client = await self.dial(svc, use_tls=False)
        self.assertEqual((await self.check(client)).status, health_pb2.HealthCheckResponse.SERVING)


class MutualTLSTests(ForwarderTestBase):
    async def _refused(self, svc: ForwarderService, **kw: Any) -> None:
        try:
            client = await self.dial(svc, **kw)
            await self.check(client, timeout=3)
        except Exception:
            pass
        else:
            self.fail("the call was served")
        self.assertEqual([m for m in self.agent.methods() if m == "Check"], [])

    def _tls_refusals(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_format", "").startswith("TLS: ")]

    async def test_no_client_certificate(self) -> None:
        await self.start_agent()
        svc = await self.start_forwarder()
        await self._refused(svc, client_pair=None)
        self.assertTrue(any(e.get("alert") == "certificate_required" for e in self._tls_refusals()))

    async def test_wrong_ca(self) -> None:
        await self.start_agent()
        svc = await self.start_forwarder()
        await self._refused(svc, client_pair=tls.make_client_certificate())
        self.assertTrue(self._tls_refusals())

    async def test_expired_client_certificate(self) -> None:
        old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
        expired = tls.make_client_certificate(now=old, validity=datetime.timedelta(days=1))
        self.client_pair = expired
        await self.start_agent()
        svc = await self.start_forwarder()
        await self._refused(svc, client_pair=expired)
        self.assertTrue(any("expired" in e.get("reason", "") for e in self._tls_refusals()))

    async def test_server_name_checked_by_client(self) -> None:
        await self.start_agent()
        svc = await self.start_forwarder()
        await self._refused(svc, server_name="podvm-other")


class LifecycleTests(ForwarderTestBase):
    async def test_network_before_listen_teardown_on_stop_and_ready(self) -> None:
        await self.start_agent()
        notify = os.path.join(self.dir, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(notify)
        self.addCleanup(sock.close)
        net = FakePodNetwork()
        svc = await self.start_forwarder(self.config(**{"pod-network": POD_NETWORK}), pod_network=net,
                                         environ={"NOTIFY_SOCKET": notify})
        self.assertEqual(net.calls, [("setup", NETNS)])
        self.assertEqual(sock.recv(100), b"READY=1")
        await svc.stopService()
        self.assertEqual(net.calls, [("setup", NETNS), ("teardown", NETNS)])
        self.assertEqual(sock.recv(100), b"STOPPING=1")

    async def test_network_setup_failure_no_listen(self) -> None:
        net = FakePodNetwork(fail=True)
        fatal: list[str] = []
        config = self.config(**{"pod-network": POD_NETWORK})
        svc = ForwarderService(reactor, config, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
                               UNIXClientEndpoint(reactor, self.agent_path), NETNS, pod_network=net,
                               on_fatal=fatal.append, environ={})
        svc.startService()
        self.addCleanup(svc.stopService)
        with self.assertRaises(StartupError):
            await svc.when_ready()
        self.assertEqual(fatal, ["failed to set up pod network: vxlan0 exists"])
        self.assertIsNone(svc.port)
        self.assertEqual(net.calls, [("setup", NETNS)])

    async def test_listen_failure_tears_network_down(self) -> None:
        busy = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            __import__("twisted.internet.protocol", fromlist=["Factory"]).Factory())
        self.addCleanup(busy.stopListening)
        net = FakePodNetwork()
        fatal: list[str] = []
        svc = ForwarderService(reactor, self.config(**{"pod-network": POD_NETWORK}),
                               TCP4ServerEndpoint(reactor, busy.getHost().port, interface="127.0.0.1"),
                               UNIXClientEndpoint(reactor, self.agent_path), NETNS, pod_network=net,
                               on_fatal=fatal.append, environ={})
        svc.startService()
        self.addCleanup(svc.stopService)
        with self.assertRaises(StartupError):
            await svc.when_ready()
        self.assertEqual(net.calls, [("setup", NETNS), ("teardown", NETNS)])
        self.assertTrue(fatal and fatal[0].startswith("failed to listen"))


@implementer(IStreamServerEndpoint)
class _ScriptedListen:
    """Stands in for the forwarder's TCP server endpoint: listen() answers when the test says."""

    def __init__(self) -> None:
        self.listening: defer.Deferred[Any] = defer.Deferred()

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return self.listening


@implementer(IStreamClientEndpoint)
class _SilentAgent:
    """Stands in for kata-agent's unix endpoint: the dial never answers (cancellable)."""

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        return defer.Deferred()


class ReadyWaitTests(SynchronousTestCase):
    """when_ready() on the clock alone: every waiter gets the port (or the startup error), later callers at once,
    and stopping leaves nothing scheduled."""

    def setUp(self) -> None:
        self.clock = NodeMemoryReactor()
        self.listen = _ScriptedListen()
        self.svc = ForwarderService(self.clock, parse_config({}), self.listen, _SilentAgent(), NETNS, environ={},
                                    on_fatal=lambda msg: None)
        self.svc.startService()

    def test_waiters_get_the_port(self) -> None:
        a, b = self.svc.when_ready(), self.svc.when_ready()
        self.assertNoResult(a)
        port = StubPort()
        self.listen.listening.callback(port)
        self.assertIs(self.successResultOf(a), port)
        self.assertIs(self.successResultOf(b), port)
        self.assertIs(self.successResultOf(self.svc.when_ready()), port)
        self.successResultOf(self.svc.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_startup_failure_reaches_every_waiter(self) -> None:
        a = self.svc.when_ready()
        self.listen.listening.errback(OSError("address in use"))
        for d in (a, self.svc.when_ready()):
            err = self.failureResultOf(d, StartupError)
            self.assertIn("failed to listen: address in use", str(err.value))
        self.successResultOf(self.svc.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelled_waiter_is_forgotten(self) -> None:
        a = self.svc.when_ready()
        a.cancel()
        self.failureResultOf(a, defer.CancelledError)
        self.listen.listening.callback(StubPort())
        self.successResultOf(self.svc.when_ready())
        self.successResultOf(self.svc.stopService())


@implementer(IListeningPort)
class StubPort:
    """Stands in for the TCP listening port."""

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        pass

    def getHost(self) -> Any:
        return IPv4Address("TCP", "127.0.0.1", 15150)
