"""AgentConnection: waits are bounded and cancellable; every waiter gets the client; reconnect after loss."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from caa.forwarder.agent import AgentConnection
from caa.ttrpc import Code, TTRPCError


class FakeEndpoint:
    """Stands in for the agent's UNIXClientEndpoint: each connect() waits until the test answers it."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Deferred[Any], Any]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.attempts.append((d, factory))
        return d

    def succeed(self) -> Any:
        d, factory = self.attempts[-1]
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        d.callback(proto)
        return proto


class AgentConnectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ep = FakeEndpoint()
        self.conn = AgentConnection(self.ep, self.clock, wait_timeout=10)  # type: ignore[arg-type]
        self.conn.startService()

    def tearDown(self) -> None:
        self.conn.stopService()

    def test_waiters_share_one_connection(self) -> None:
        a, b = self.conn.get(), self.conn.get()
        proto = self.ep.succeed()
        self.assertIs(self.successResultOf(a), self.successResultOf(b))
        self.assertIs(self.successResultOf(self.conn.get()), proto._protocol)
        self.assertEqual(self.conn.connections, 1)

    def test_wait_timeout(self) -> None:
        d = self.conn.get()
        self.clock.advance(10)
        f = self.failureResultOf(d, TTRPCError)
        self.assertEqual(f.value.code, Code.UNAVAILABLE)
        self.assertIn("agent connection is not established", str(f.value))

    def test_cancel_only_stops_this_wait(self) -> None:
        a, b = self.conn.get(), self.conn.get()
        a.cancel()
        self.failureResultOf(a, CancelledError)
        self.ep.succeed()
        self.successResultOf(b)

    def test_reconnect_after_loss(self) -> None:
        self.conn.get()
        proto = self.ep.succeed()
        proto.connectionLost(Failure(ConnectionError("agent restarted")))
        d = self.conn.get()
        self.assertNoResult(d)
        self.clock.advance(0.2)  # back-off
        self.ep.succeed()
        self.successResultOf(d)
        self.assertEqual(self.conn.connections, 2)
