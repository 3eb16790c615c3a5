"""AgentConnection: waits are bounded and cancellable; every waiter gets the client; reconnect after loss."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from caa.forwarder.agent import AgentConnection
from caa.ttrpc import Code, TTRPCError
from tests.fakes.dialing import PendingEndpoint


class AgentConnectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ep = PendingEndpoint()
        self.conn = AgentConnection(self.ep, self.clock, wait_timeout=10)
        self.conn.startService()

    def tearDown(self) -> None:
        self.successResultOf(self.conn.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def connected(self) -> Any:
        proto = self.ep.accept()
        self.clock.advance(0)  # handed out on the next reactor turn
        return proto

    def test_waiters_share_one_connection(self) -> None:
        a, b = self.conn.get(), self.conn.get()
        proto = self.connected()
        self.assertIs(self.successResultOf(a), self.successResultOf(b))
        self.assertIs(self.successResultOf(self.conn.get()), proto)
        self.assertEqual(self.conn.connections, 1)

    def test_wait_timeout(self) -> None:
        d = self.conn.get()
        self.clock.advance(10)
        f = self.failureResultOf(d, TTRPCError)
        self.assertEqual(f.value.code, Code.UNAVAILABLE)
        self.assertEqual(str(f.value.message), "agent connection is not established: no connection within 10s")

    def test_cancel_only_stops_this_wait(self) -> None:
        a, b = self.conn.get(), self.conn.get()
        a.cancel()
        self.failureResultOf(a, CancelledError)
        self.connected()
        self.successResultOf(b)

    def test_back_off_while_the_agent_is_missing(self) -> None:
        d = self.conn.get()
        times = []
        for _ in range(6):
            times.append(self.clock.seconds())
            self.ep.refuse("agent not there yet")
            self.clock.advance(min(c.getTime() for c in self.clock.getDelayedCalls()) - self.clock.seconds())
        self.assertEqual([round(t, 3) for t in times], [0.0, 0.1, 0.3, 0.7, 1.2, 1.7])  # 0.1 doubling, cap 0.5
        self.assertNoResult(d)
        self.connected()
        self.successResultOf(d)

    def test_reconnect_after_loss(self) -> None:
        self.conn.get()
        proto = self.connected()
        proto.connectionLost(Failure(ConnectionError("agent restarted")))
        d = self.conn.get()
        self.assertNoResult(d)
        self.clock.advance(0.1)  # a short link: back-off
        self.connected()
        self.successResultOf(d)
        self.assertEqual(self.conn.connections, 2)

    def test_stable_link_redialled_at_once(self) -> None:
        proto = self.connected()
        self.clock.advance(60)
        proto.connectionLost(Failure(ConnectionError("agent restarted")))
        self.clock.advance(0)
        self.assertEqual(len(self.ep.pending), 2)

    def test_stop_fails_waiters(self) -> None:
        d = self.conn.get()
        self.successResultOf(self.conn.stopService())
        f = self.failureResultOf(d, TTRPCError)
        self.assertEqual(f.value.code, Code.UNAVAILABLE)
        self.assertEqual(self.ep.pending[-1][0].called, True)  # the dial in progress was cancelled
        self.failureResultOf(self.conn.get(), TTRPCError)
