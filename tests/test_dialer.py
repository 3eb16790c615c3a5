"""caa.dialer.Link: the ClientService-based link both the agent proxy and the forwarder use (Clock-driven)."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import provider

from caa.dialer import BootPacer, BootWindow, Link, LinkStopped, dial_backoff
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


class BootWindowTests(SynchronousTestCase):
    """The boot window's schedule: attempt instants during and after the window, short links unchanged."""

    WINDOW = BootWindow(length=1.0, period=0.05, connect_timeout=0.25)

    def setUp(self) -> None:
        self.clock = Clock()
        self.ep = PendingEndpoint()
        self.retries: list[tuple[str, int, float]] = []
        self.ready: Deferred[None] | None = None
        self.link: Link[TTRPCClient] = Link(
            self.ep, lambda at: TTRPCClient(self.clock), self.clock, dial_backoff(jitter=lambda: 0.0),
            attempt_timeout=2.0, client_ready=lambda c: self.ready if self.ready is not None else succeed(None),
            on_retry=lambda *a: self.retries.append(a), boot_window=self.WINDOW)
        self.clock.advance(10.0)  # the window counts from startService, not from time 0
        self.link.startService()
        self.instants: list[float] = []

    def tearDown(self) -> None:
        self.successResultOf(self.link.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def _refuse_until(self, until: float) -> None:
        """Refuse every attempt up to clock time `until`, recording when each was made."""
        while True:
            if len(self.ep.pending) > len(self.instants):
                self.instants.append(round(self.clock.seconds() - 10.0, 3))
                self.ep.refuse()
                continue
            due = min(call.getTime() for call in self.clock.getDelayedCalls())
            if due > until:
                return
            self.clock.advance(due - self.clock.seconds())

    def test_window_must_be_positive(self) -> None:
        with self.assertRaises(ValueError) as e:
            BootWindow(period=0.0)
        self.assertIn("period must be positive", str(e.exception))

    def test_retries_at_the_period_during_the_window_then_backs_off(self) -> None:
        self._refuse_until(12.0)
        during = [t for t in self.instants if t < 1.0]
        self.assertEqual(during, [round(0.05 * n, 3) for n in range(20)])  # 0.00, 0.05, ... 0.95
        self.assertEqual(self.link.attempts, len(self.instants))
        # the failure at 0.95 is still in the window (retry at 1.00); from the one at 1.00 on: 0.1, 0.2, 0.4
        self.assertEqual([t for t in self.instants if t >= 1.0], [1.0, 1.1, 1.3, 1.7])
        self.assertEqual([r[2] for r in self.retries[19:24]], [0.05, 0.1, 0.2, 0.4, 0.8])
        self.assertEqual([r[1] for r in self.retries[:3]], [1, 2, 3])  # failures counted across the window

    def _run_until(self, until: float) -> None:
        """Advance the clock call by call up to `until` (one big advance would run every due call at its end)."""
        while True:
            due = min([call.getTime() for call in self.clock.getDelayedCalls()] + [until])
            self.clock.advance(max(0.0, due - self.clock.seconds()))
            if due >= until:
                return

    def test_connect_timeout_inside_the_window_only(self) -> None:
        self._run_until(10.25)  # the SYN goes unanswered: the attempt ends at the window's connect timeout
        self.assertEqual(self.link.last_error, "DialTimeout: connect timed out after 0.25s (boot window)")
        self.assertEqual(self.retries, [(self.link.last_error, 1, 0.05)])
        self._run_until(11.30)
        # attempts at 0, 0.30, 0.60, 0.90 (each 0.25 s connect + 0.05 s); the one ending at 1.15 is past the
        # window: back-off 0.1 s, and the attempt at 1.25 has the whole attempt timeout (2 s)
        self.assertEqual(self.link.attempts, 5)
        self.assertEqual([r[2] for r in self.retries], [0.05, 0.05, 0.05, 0.1])
        self._run_until(13.20)
        self.assertEqual(self.link.attempts, 5)
        self._run_until(13.30)
        self.assertEqual(self.link.last_error, "DialTimeout: dial timed out after 2s")

    def test_ready_wait_keeps_the_attempt_timeout(self) -> None:
        self.ready = Deferred()  # the TLS handshake is slow (TCG guest): connected, not ready yet
        d = self.link.wait()
        self.clock.advance(0.1)
        client = self.ep.accept()
        self.clock.advance(1.5)  # far past the connect timeout: still waiting for the handshake
        self.assertTrue(client.connected)
        self.ready.callback(None)
        self.clock.advance(0)
        self.assertIs(self.successResultOf(d), client)

    def test_short_link_after_up_backs_off_stable_link_redials_at_once(self) -> None:
        first = self.ep.accept()
        self.clock.advance(0)
        self.assertIs(self.link.current, first)
        self.assertFalse(self.link.in_boot_window())  # a link was up: the window is over for good
        first.transport.abortConnection()  # a short link: back-off as without a window
        self.assertEqual(self.retries[-1][2], 0.1)
        self.clock.advance(0.1)
        second = self.ep.accept()
        self.clock.advance(5.0)
        n = len(self.retries)
        second.transport.abortConnection()  # a stable link: redial at once, no retry reported
        self.assertEqual(len(self.retries), n)
        self.clock.advance(0)
        self.assertEqual(self.link.attempts, 3)
        self.ep.refuse()
        self.assertEqual(self.retries[-1][2], 0.1)  # and then the back-off, not the window's period

    def test_retry_lines_dropped_during_the_window_only(self) -> None:
        events: list[LogEvent] = []

        @provider(ILogObserver)
        def observer(event: LogEvent) -> None:
            events.append(event)

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self._refuse_until(10.93)
        self.assertEqual(self.link.attempts, 19)  # at 0.00, 0.05, ... 0.90
        mine = [e for e in events if e.get("log_source") is self.link]
        self.assertEqual(mine, [])  # ClientService's "Scheduling retry" line of each attempt: dropped
        self._refuse_until(11.5)
        lines = [formatEvent(e) for e in events if e.get("log_source") is self.link]
        self.assertTrue(lines and all(line.startswith("Scheduling retry") for line in lines), lines)
        self.assertEqual(len(lines), 3)  # the failures at 1.0, 1.1 and 1.3 (the window ended at 1.0)


class BootPacerTests(SynchronousTestCase):
    """Links booting together share the window's rate: each one's period grows with their number."""

    def test_period_shared_while_booting(self) -> None:
        clock = Clock()
        pacer = BootPacer(max_rate=20.0)
        window = BootWindow(length=60.0, period=0.05, max_rate=20.0)
        eps = [PendingEndpoint() for _ in range(3)]
        delays: list[list[float]] = [[], [], []]

        def recorder(i: int) -> Callable[[str, int, float], None]:
            return lambda error, failures, delay: delays[i].append(delay)

        links: list[Link[TTRPCClient]] = [
            Link(ep, lambda at: TTRPCClient(clock), clock, dial_backoff(jitter=lambda: 0.0), attempt_timeout=2.0,
                 on_retry=recorder(i), boot_window=window, boot_pacer=pacer) for i, ep in enumerate(eps)]
        for link in links:
            link.startService()
        eps[0].refuse()
        self.assertEqual(delays[0], [0.15])  # 3 booting links / 20 per second
        eps[1].accept()  # up: no longer booting
        links[2].stopService()  # gone: no longer booting
        self.assertEqual(pacer.booting, {links[0]})
        clock.advance(0.15)
        eps[0].refuse()
        self.assertEqual(delays[0], [0.15, 0.05])  # alone: the window's own period
        for link in links[:2]:
            self.successResultOf(link.stopService())
        self.assertEqual(pacer.booting, set())
        self.assertEqual(clock.getDelayedCalls(), [])
