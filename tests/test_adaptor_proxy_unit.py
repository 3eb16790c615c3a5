"""Unit tests of caa.adaptor.proxy with a MemoryReactorClock and a scripted endpoint: the dial back-off schedule
(cap 1 s), the deadline, cancellation by stop() or by the caller, the attempt timeout and the reconnect."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer, provider
from zope.interface.verify import verifyObject

from caa.adaptor import metrics
from caa.adaptor.interfaces import IAgentProxy, IAgentProxyFactory
from caa.adaptor.proxy import AgentProxy, AgentProxyFactory
from caa.dialer import BootWindow, dial_backoff
from caa.ttrpc import CallContext, Code, TTRPCError
from tests.reactors import NodeMemoryReactor


class _Transport(StringTransport):
    """A StringTransport whose close reaches the protocol at once (like a socket error would)."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: Any = None

    def loseConnection(self) -> None:
        self.abortConnection()

    def abortConnection(self) -> None:
        if self.protocol is not None:
            p, self.protocol = self.protocol, None
            p.connectionLost(Failure(ConnectionRefusedError("closed")))


@implementer(IStreamClientEndpoint)
class ScriptedEndpoint:
    """Stands in for the forwarder's TCP/TLS endpoint: each connect() is answered as `mode` says."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.mode = "refuse"  # refuse | hang | accept
        self.attempts: list[float] = []
        self.cancelled = 0
        self.transports: list[_Transport] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        self.attempts.append(self.clock.seconds())
        if self.mode == "refuse":
            d: Deferred[Any] = Deferred()
            d.errback(ConnectionRefusedError("111: Connection refused"))
            return d
        if self.mode == "hang":
            def cancel(_: Deferred[Any]) -> None:
                self.cancelled += 1
            return Deferred(cancel)
        proto = factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 15150))
        t = _Transport()
        t.protocol = proto
        self.transports.append(t)
        assert proto is not None
        proto.makeConnection(t)
        return succeed(proto)


class ProxyDialTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = NodeMemoryReactor()
        self.ep = ScriptedEndpoint(self.clock)
        d = tempfile.mkdtemp(prefix=f"caa-proxyunit-{os.getpid()}-")
        self.addCleanup(shutil.rmtree, d, True)
        self.factory = AgentProxyFactory(self.clock, None, volumes_dir=d,
                                         retry_policy=dial_backoff(jitter=lambda: 0.0),
                                         make_endpoint=lambda host, port, name: self.ep)
        proxy = self.factory.new("sb", os.path.join(d, "sb", "agent.ttrpc"), ())
        assert isinstance(proxy, AgentProxy)
        self.proxy = proxy

    def advance_to(self, t: float) -> None:
        while self.clock.seconds() < t - 1e-9:
            calls = [c.getTime() for c in self.clock.getDelayedCalls()]
            nxt = min([c for c in calls if c > self.clock.seconds()] + [t])
            self.clock.advance(nxt - self.clock.seconds())

    def last_error(self) -> str:
        assert self.proxy.link is not None
        return self.proxy.link.last_error

    def fails(self, d: Deferred[Any]) -> TTRPCError:
        err = self.failureResultOf(d, TTRPCError).value
        assert isinstance(err, TTRPCError)
        return err

    def test_interfaces(self) -> None:
        verifyObject(IAgentProxyFactory, self.factory)
        verifyObject(IAgentProxy, self.proxy)

    def test_backoff_policy_capped_at_one_second(self) -> None:
        p = dial_backoff(jitter=lambda: 0.0)
        self.assertEqual([round(p(n), 3) for n in range(1, 8)], [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
        noisy = dial_backoff(jitter=lambda: 0.999)
        self.assertTrue(all(noisy(n) <= 1.0 for n in range(1, 200)))
        self.assertAlmostEqual(noisy(1), 0.1999, places=4)

    def test_schedule_until_deadline(self) -> None:
        d = self.proxy.start(("10.0.0.9", 15150), "vm", 5.0)
        # the proxy binds its own socket file (mode 0600) and accepts through the reactor
        self.assertEqual(os.stat(self.proxy.socket_path).st_mode & 0o777, 0o600)
        self.assertEqual(len(self.clock.readers), 1)
        self.assertNoResult(d)
        self.advance_to(5.0)
        self.assertEqual([round(t, 3) for t in self.ep.attempts], [0.0, 0.1, 0.3, 0.7, 1.5, 2.5, 3.5, 4.5])
        err = self.fails(d)
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)
        self.assertEqual(err.message, "failed to establish agent proxy connection to 10.0.0.9:15150: "
                                      "ConnectionRefusedError: Connection was refused by other side: "
                                      "111: Connection refused.")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(len(self.ep.attempts), 8)

    def test_boot_window_schedule_and_one_retry_line_per_five_seconds(self) -> None:
        d = tempfile.mkdtemp(prefix=f"caa-proxyunit-{os.getpid()}-")
        self.addCleanup(shutil.rmtree, d, True)
        factory = AgentProxyFactory(self.clock, None, volumes_dir=d, retry_policy=dial_backoff(jitter=lambda: 0.0),
                                    make_endpoint=lambda host, port, name: self.ep,
                                    boot_window=BootWindow(length=5.98, period=0.05))  # off the 50 ms grid
        proxy = factory.new("sb2", os.path.join(d, "sb2", "agent.ttrpc"), ())
        assert isinstance(proxy, AgentProxy)
        self.proxy = proxy
        lines: list[str] = []

        @provider(ILogObserver)
        def observer(event: LogEvent) -> None:
            if event.get("log_source") is proxy:
                lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        started = proxy.start(("10.0.0.9", 15150), "vm", 300.0)
        self.advance_to(6.5)
        attempts = [round(t, 3) for t in self.ep.attempts]
        self.assertEqual([t for t in attempts if t < 6.0], [round(0.05 * n, 3) for n in range(120)])  # every 50 ms
        self.assertEqual([t for t in attempts if t >= 6.0], [6.0, 6.1, 6.3])  # then the back-off
        retries = [line for line in lines if "Retrying failed agent proxy connection" in line]
        # in the window: the first failure and one 5 s later; after it every retry is logged again
        self.assertEqual(len(retries), 2 + 3, retries)
        self.assertIn("next in 0.05s", retries[0])
        self.ep.mode = "accept"
        self.advance_to(7.0)
        self.successResultOf(started)
        self.successResultOf(proxy.stop())

    def test_stop_cancels_the_wait(self) -> None:
        d = self.proxy.start(("10.0.0.9", 15150), "vm", 300.0)
        self.advance_to(0.35)
        stopped = self.proxy.stop()
        self.successResultOf(stopped)
        err = self.fails(d)
        self.assertEqual(err.code, Code.UNAVAILABLE)
        self.assertIn("agent proxy stopped", err.message)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        n = len(self.ep.attempts)
        self.clock.advance(10)
        self.assertEqual(len(self.ep.attempts), n)
        self.successResultOf(self.proxy.stop())  # idempotent

    def test_stop_cancels_a_connect_in_progress(self) -> None:
        self.ep.mode = "hang"
        d = self.proxy.start(("10.0.0.9", 15150), "vm", 300.0)
        self.clock.advance(0.5)
        self.successResultOf(self.proxy.stop())
        self.assertEqual(self.ep.cancelled, 1)
        self.assertEqual(self.fails(d).code, Code.UNAVAILABLE)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_caller_cancel_stops_dialling(self) -> None:
        d = self.proxy.start(("10.0.0.9", 15150), "vm", 300.0)
        self.advance_to(0.2)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_attempt_timeout(self) -> None:
        self.ep.mode = "hang"
        d = self.proxy.start(("10.0.0.9", 15150), "vm", 300.0)
        self.clock.advance(2.0)  # the default attempt timeout
        self.assertEqual(self.ep.cancelled, 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.ep.attempts), 2)
        self.ep.mode = "accept"
        self.advance_to(5.0)
        self.successResultOf(d)
        self.assertIn("timed out after 2s", self.last_error())

    def test_connects_then_reconnects(self) -> None:
        d = self.proxy.start(("10.0.0.9", 15150), "vm", 300.0)
        self.advance_to(0.31)  # attempts at 0, 0.1, 0.3
        self.ep.mode = "accept"
        self.advance_to(0.71)
        self.successResultOf(d)
        self.assertAlmostEqual(self.ep.attempts[-1], 0.7)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        client = self.proxy._get_client()
        before = metrics.PROXY_RECONNECTS._value.get()
        self.clock.advance(6.0)  # a stable link
        # the link drops: a call arriving now waits for the new link
        self.ep.mode = "refuse"
        self.ep.transports[-1].abortConnection()
        waiting = self.proxy._get_client()
        assert isinstance(waiting, Deferred)
        self.assertNoResult(waiting)
        self.clock.advance(0)
        self.assertAlmostEqual(self.ep.attempts[-1], 6.71)  # redialled at once (on the next reactor turn)
        self.advance_to(6.75)  # refused at once, then 0.1 s back-off
        self.ep.mode = "accept"
        self.advance_to(7.0)
        self.assertAlmostEqual(self.ep.attempts[-1], 6.81)
        fresh = self.successResultOf(waiting)
        self.assertIsNot(fresh, client)
        self.assertEqual(self.proxy.connections, 2)
        self.assertEqual(metrics.PROXY_RECONNECTS._value.get(), before + 1)
        self.successResultOf(self.proxy.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        with self.assertRaises(TTRPCError):
            self.proxy._get_client()

    def test_short_lived_links_back_off(self) -> None:
        """A peer that accepts and drops at once (e.g. refuses our certificate) is not redialled in a loop."""
        self.ep.mode = "accept"
        d = self.proxy.start(("10.0.0.9", 15150), "vm", 300.0)
        self.clock.advance(0)  # the link is handed out on the reactor turn after ClientService records it
        self.successResultOf(d)
        delays = []
        for _ in range(6):
            dropped = self.clock.seconds()
            self.ep.transports[-1].abortConnection()
            self.advance_to(dropped + 1.5)
            delays.append(round(self.ep.attempts[-1] - dropped, 3))
        self.assertEqual(delays, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
        self.assertIn("link dropped after", self.last_error())
        self.successResultOf(self.proxy.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waiting_call_gives_up_at_its_deadline(self) -> None:
        d = self.proxy.start(("10.0.0.9", 15150), "vm", 300.0)
        self.ep.mode = "accept"
        self.advance_to(0.1)
        self.successResultOf(d)
        self.ep.mode = "refuse"
        self.ep.transports[-1].abortConnection()
        w = self.proxy._get_client()
        assert isinstance(w, Deferred)
        w.cancel()  # what the server does at the call's deadline
        self.failureResultOf(w, CancelledError)
        assert self.proxy.link is not None
        self.assertEqual(len(self.proxy.link._waiters), 0)
        self.successResultOf(self.proxy.stop())

    def test_stop_from_the_start_callback(self) -> None:
        """A caller may stop the proxy as soon as start() fires (ClientService refuses re-entry: the link is
        handed out outside its state machine)."""
        self.ep.mode = "accept"
        stopped: list[object] = []
        d = self.proxy.start(("10.0.0.9", 15150), "vm", 300.0)
        d.addCallback(lambda _: self.proxy.stop().addCallback(stopped.append))
        self.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(stopped, [None])
        self.assertEqual(self.ep.transports[-1].protocol, None)  # the link is closed
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_link_lost_before_ready_is_a_failed_attempt(self) -> None:
        """A link the peer drops before it is ready (e.g. during the TLS 1.3 settle) is one failed attempt."""
        proxy = AgentProxy(self.clock, "tls", os.path.join(os.path.dirname(self.proxy.socket_path), "t.sock"),
                           lambda host, port, name: self.ep, True, dial_backoff(jitter=lambda: 0.0), 2.0, {})
        self.ep.mode = "accept"
        d = proxy.start(("10.0.0.9", 15150), "vm", 300.0)
        self.ep.transports[-1].abortConnection()  # no handshake ever completes
        self.assertNoResult(d)
        assert proxy.link is not None
        self.assertIn("ConnectionRefusedError", proxy.link.last_error)
        self.clock.advance(0.1)
        self.assertEqual(len(self.ep.attempts), 2)
        self.successResultOf(proxy.stop())
        self.assertEqual(self.fails(d).code, Code.UNAVAILABLE)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_fails_waiting_calls_unavailable(self) -> None:
        d = self.proxy.start(("10.0.0.9", 15150), "vm", 300.0)
        w = self.proxy._get_client()
        assert isinstance(w, Deferred)
        self.successResultOf(self.proxy.stop())
        self.assertEqual(self.fails(w).code, Code.UNAVAILABLE)
        self.fails(d)

    def test_stop_before_start(self) -> None:
        self.successResultOf(self.proxy.stop())
        err = self.fails(self.proxy.start(("10.0.0.9", 15150), "vm", 300.0))
        self.assertEqual(err.code, Code.UNAVAILABLE)
        self.assertEqual(self.ep.attempts, [])

    def test_metrics_observed(self) -> None:
        ctx = CallContext(clock=self.clock, service="grpc.AgentService", method="ListRoutes", stream_id=1)
        calls = metrics.PROXY_CALLS.labels(method="grpc.AgentService/ListRoutes", code="OK")
        bytes_in = metrics.PROXY_BYTES.labels(method="grpc.AgentService/ListRoutes", direction="to_agent")
        c0, b0 = calls._value.get(), bytes_in._value.get()
        self.proxy._observe(ctx, 10, 20, Code.OK)
        self.assertEqual(calls._value.get(), c0 + 1)
        self.assertEqual(bytes_in._value.get(), b0 + 10)
