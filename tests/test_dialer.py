"""caa.dialer.Link: the ClientService-based link both the agent proxy and the forwarder use (Clock-driven)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caa.dialer import Link, LinkStopped, dial_backoff
from caa.ttrpc import TTRPCClient
from tests.fakes.dialing import PendingEndpoint


class LinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ep = PendingEndpoint()
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
        client.transport.abortConnection()
        self.clock.advance(0)
        self.assertNoResult(d)
        self.assertEqual(self.link.connections, 0)
        self.assertIn("link dropped after 0.000s", self.link.last_error)
        self.clock.advance(0.1)
        fresh = self.ep.accept()
        self.clock.advance(0)
        self.assertIs(self.successResultOf(d), fresh)
        self.assertIs(self.link.current, fresh)
