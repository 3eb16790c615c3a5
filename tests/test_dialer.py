"""caa.dialer.Link: the ClientService-based link both the agent proxy and the forwarder use (Clock-driven)."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from caa.dialer import Link, LinkStopped, dial_backoff
from caa.ttrpc import TTRPCClient


class _Transport(StringTransport):
    """Delivers connectionLost at once when closed."""

    def __init__(self, protocol: Any) -> None:
        super().__init__()
        self.protocol = protocol

    def loseConnection(self) -> None:
        self.abortConnection()

    def abortConnection(self) -> None:
        p, self.protocol = self.protocol, None
        if p is not None:
            p.connectionLost(Failure(ConnectionError("closed")))


@implementer(IStreamClientEndpoint)
class Endpoint:
    """Each connect() waits for the test: `accept()` or `refuse()`."""

    def __init__(self) -> None:
        self.pending: list[tuple[Deferred[Any], IProtocolFactory]] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((d, factory))
        return d

    def accept(self) -> TTRPCClient:
        d, factory = self.pending[-1]
        # the factory is the dialer's; its protocol is always a TTRPCClient
        proto = cast(TTRPCClient, factory.buildProtocol(None))  # type: ignore[arg-type]
        proto.makeConnection(_Transport(proto))
        d.callback(proto)
        return proto

    def refuse(self) -> None:
        self.pending[-1][0].errback(ConnectionRefusedError("refused"))


class LinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ep = Endpoint()
        self.retries: list[tuple[str, int, float]] = []
        self.ready: Deferred[None] | None = None
        self.link: Link[TTRPCClient] = Link(
            self.ep, lambda at: TTRPCClient(self.clock), self.clock, dial_backoff(jitter=lambda: 0.0),
            attempt_timeout=2.0, client_ready=lambda c: self.ready if self.ready is not None else succeed(None),
            on_retry=lambda *a: self.retries.append(a))
        self.link.startService()

    def tearDown(self) -> None:
        self.successResultOf(self.link.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_backoff_formula(self) -> None:
        p = dial_backoff(jitter=lambda: 0.5)
        self.assertEqual([round(p(n), 3) for n in range(1, 7)], [0.15, 0.25, 0.45, 0.85, 1.0, 1.0])

    def test_failures_reported_with_delay(self) -> None:
        self.ep.refuse()
        self.assertEqual(self.retries, [("ConnectionRefusedError: refused", 1, 0.1)])
        self.assertEqual(self.link.last_error, "ConnectionRefusedError: refused")

    def test_attempt_timeout_covers_the_ready_wait(self) -> None:
        self.ready = Deferred()
        d = self.link.wait()
        client = self.ep.accept()
        self.clock.advance(2.0)
        self.assertFalse(client.connected)  # aborted
        self.assertEqual(self.link.last_error, "DialTimeout: dial timed out after 2s")
        self.assertNoResult(d)
        self.ready = None
        self.clock.advance(0.1)
        self.ep.accept()
        self.clock.advance(0)
        self.successResultOf(d)

    def test_stop_before_hand_out(self) -> None:
        d = self.link.wait()
        self.ep.accept()  # handed out on the next reactor turn, which never comes
        self.successResultOf(self.link.stopService())
        self.failureResultOf(d, LinkStopped)
        self.assertIsNone(self.link.current)
        self.link.startService()  # tearDown stops it again

    def test_drop_before_hand_out_redials(self) -> None:
        d = self.link.wait()
        client = self.ep.accept()
        client.transport.abortConnection()  # type: ignore[union-attr]
        self.clock.advance(0)
        self.assertNoResult(d)
        self.assertEqual(self.link.connections, 0)
        self.assertIn("link dropped after 0.000s", self.link.last_error)
        self.clock.advance(0.1)
        fresh = self.ep.accept()
        self.clock.advance(0)
        self.assertIs(self.successResultOf(d), fresh)
        self.assertIs(self.link.current, fresh)
