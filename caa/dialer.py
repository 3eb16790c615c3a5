"""One way to keep a client link up: `Link`, a `ClientService` that dials with back-off and heals.

Both long-lived links of the project use it: the agent proxy's link to the pod VM's forwarder
(caa/adaptor/proxy.py) and the forwarder's link to kata-agent (caa/forwarder/agent.py).

What `Link` adds to `ClientService`:

- a ready gate: the endpoint `ClientService` dials only answers once the client says it is usable (e.g. TLS 1.3
  settled), within `attempt_timeout`. `ClientService` itself never sees a half-made link: a connection lost
  during its `prepareConnection` raises `NoTransition` from its state machine;
- back-off that remembers short links: a link that drops before `stable_after` seconds counts as one more failed
  attempt (a peer that accepts and drops at once is not redialled in a loop); after a stable link the first
  redial is immediate;
- `current` (the live client or None) and `wait()` (a cancellable Deferred for the next one), handed out on the
  reactor turn after `ClientService` has recorded the connection, because its state machine refuses re-entry
  (a waiter that stops the link from its callback would otherwise fail);
- `stopService()` aborts the live client at once instead of a graceful close, and fails waiters with
  `LinkStopped`;
- an optional boot window (`BootWindow`): until the first link is up and for `length` seconds after
  `startService()` (the peer is a VM that is expected to be booting), a failed attempt is retried every
  `period` seconds instead of backing off, and the TCP connect of each attempt is bounded by the window's short
  `connect_timeout` (an unanswered SYN, the guest's NIC not up yet, must not hold the next attempt back for
  seconds); the client's ready wait (e.g. the TLS handshake) keeps the rest of `attempt_timeout`. After the
  window the back-off starts from its first delay; once a link has been up the window no longer applies.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import ILogObserver, LogEvent, Logger, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer, provider

from caa.notifier import Notifier
from caa.ttrpc import TTRPCClient

__all__ = ["BootPacer", "BootWindow", "DialTimeout", "Link", "LinkStopped", "STABLE_LINK", "describe_error",
           "dial_backoff"]

#: A link that lived this long resets the back-off; a shorter one counts as a failed attempt.
STABLE_LINK = 5.0

C = TypeVar("C", bound=TTRPCClient)


def dial_backoff(
    initial: float = 0.1, cap: float = 1.0, factor: float = 2.0, jitter: Callable[[], float] = random.random
) -> Callable[[int], float]:
    """Delay before retry number `attempt` (1, 2, ...): initial * factor**(attempt-1) plus up to `initial` of
    jitter, never more than `cap` seconds (Twisted's `backoffPolicy` caps before the jitter; we cap after)."""
    base = backoffPolicy(initialDelay=initial / factor, maxDelay=cap, factor=factor,
                         jitter=lambda: initial * jitter())
    return lambda attempt: min(cap, base(attempt))


@dataclass(frozen=True)
class BootWindow:
    """Fast dialling while the peer is expected to be booting (see the module docstring).

    The defaults: 120 s covers a cloud VM's boot; 50 ms keeps the lag after the peer starts listening at
    ~25 ms on average, at ~20 attempts a second (a refused connect is one SYN and one RST); 250 ms is far
    above a SYN-ACK's round trip inside a cloud network or to a local guest, even under TCG. `max_rate` is
    what all the links sharing one `BootPacer` may dial together per second (an attempt costs the node's
    reactor ~0.3-0.8 ms of CPU): with more links in their window than `max_rate * period`, each one's period
    grows (200/s: 10 booting VMs, the default per-node limit, at 50 ms; 100 at 0.5 s).
    """

    length: float = 120.0
    period: float = 0.05
    connect_timeout: float = 0.25
    max_rate: float = 200.0

    def __post_init__(self) -> None:
        for name in ("length", "period", "connect_timeout", "max_rate"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"boot window: {name} must be positive, got {value!r}")


class BootPacer:
    """Shares `BootWindow.max_rate` among the links in their boot window (one per node: the agent proxy
    factory's): each one's period is at least (links in their window) / max_rate."""

    def __init__(self, max_rate: float) -> None:
        self.max_rate = max_rate
        self.booting: set[object] = set()

    def period(self, base: float) -> float:
        return max(base, len(self.booting) / self.max_rate)


class DialTimeout(Exception):
    """One dial attempt (connect plus the client's ready wait) took longer than the attempt timeout, or its
    connect longer than the boot window's connect timeout."""


class LinkStopped(Exception):
    """The link was stopped while the caller waited for a connection."""


def describe_error(failure: Failure | BaseException) -> str:
    """'Type: message' of an error, for logs and the deadline messages."""
    err = failure.value if isinstance(failure, Failure) else failure
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class _Handle(Protocol):
    """What `ClientService` holds for one ready link: it shares the client's transport (so the service's own
    close reaches the link) and is told by `Link` when the client's connection is lost."""

    def __init__(self, client: TTRPCClient) -> None:
        self.client = client


class _HandleFactory(Factory):
    """Builds the `_Handle` of the client the gate has just made ready (`whenConnected()` yields the handle;
    callers of a `Link` use `current` and `wait()` instead)."""

    def __init__(self) -> None:
        self.ready: TTRPCClient | None = None

    def buildProtocol(self, addr: IAddress | None) -> _Handle | None:
        client, self.ready = self.ready, None
        return None if client is None else _Handle(client)


@implementer(IStreamClientEndpoint)
class _ReadyGate:
    """The endpoint `ClientService` dials: one attempt of its `Link`."""

    def __init__(self, link: Link[Any]) -> None:
        self._link = link

    def __repr__(self) -> str:
        return f"<ready gate of {self._link._endpoint!r}>"

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._link._attempt(protocolFactory))


def _expire_after_io(clock: IReactorTime, d: Deferred[Any], seconds: float) -> list[bool]:
    """Cancel `d` if it has not fired `seconds` from now, but only after one more reactor turn: the reactor
    runs due timers before it polls, so a starved reactor (a busy node) would otherwise cancel connects whose
    answer has already arrived. The returned list holds True once `d` was cancelled by this bound."""
    expired: list[bool] = []
    timer: list[IDelayedCall] = []

    def expire() -> None:
        timer.clear()
        if not d.called:
            expired.append(True)
            d.cancel()

    def after_io() -> None:
        timer[:] = [clock.callLater(0, expire)]

    def done(result: object) -> object:
        for call in timer:
            if call.active():
                call.cancel()
        timer.clear()
        return result

    timer.append(clock.callLater(seconds, after_io))
    d.addBoth(done)
    return expired


@provider(ILogObserver)
def _quiet_in_boot_window(event: LogEvent) -> None:
    """The observer of `Link`'s logger (which `ClientService` logs through too): `ClientService` logs each
    scheduled retry; while a boot window retries every 50 ms those lines are dropped (the link's owner reports
    retries through `on_retry`, e.g. the agent proxy's throttled "Retrying failed agent proxy connection")."""
    source = event.get("log_source")
    if (isinstance(source, Link) and source.in_boot_window()
            and str(event.get("log_format", "")).startswith("Scheduling retry")):
        return
    globalLogPublisher(event)


class Link(ClientService, Generic[C]):
    """Keeps one client link up (see the module docstring).

    `make_client(dialled_at)` builds the client protocol of an attempt started at `dialled_at` (clock time);
    `client_ready(client)`, if given, is awaited before the link counts as up. `on_link(client)` and
    `on_drop(client, lived)` are called when a link is handed out and when it drops while running,
    `on_retry(last_error, failures, delay)` when a redial is scheduled after a failure or a short link
    (`failures`: failed attempts and short links since the start or the last stable link). `boot_window` turns
    on the fast dialling of the module docstring, `boot_pacer` shares its rate with other links (see
    `BootPacer`; without one the link dials at the window's period). `attempts` counts the dial attempts
    started.
    """

    _log = Logger(observer=_quiet_in_boot_window)

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        make_client: Callable[[float], C],
        clock: IReactorTime,
        retry_policy: Callable[[int], float],
        attempt_timeout: float | None = None,
        client_ready: Callable[[C], Awaitable[object]] | None = None,
        stable_after: float = STABLE_LINK,
        on_link: Callable[[C], None] | None = None,
        on_drop: Callable[[C, float], None] | None = None,
        on_retry: Callable[[str, int, float], None] | None = None,
        boot_window: BootWindow | None = None,
        boot_pacer: BootPacer | None = None,
    ) -> None:
        self._handles = _HandleFactory()
        super().__init__(_ReadyGate(self), self._handles, retryPolicy=self._next_delay, clock=clock)
        self._endpoint = endpoint
        self._make_client = make_client
        self._clock = clock
        self._policy = retry_policy
        self._attempt_timeout = attempt_timeout
        self._client_ready = client_ready
        self._stable_after = stable_after
        self._on_link = on_link
        self._on_drop = on_drop
        self._on_retry = on_retry
        self._boot_window = boot_window
        self._pacer = boot_pacer
        self._started_at: float | None = None
        self._was_up = False  # a link has been up: the boot window no longer applies
        self._window_failures = 0
        self._waiters: Notifier[C] = Notifier()
        self._handout: IDelayedCall | None = None
        self._failures = 0  # failed attempts and short links since the last stable link
        self._after_stable_drop = False
        self.current: C | None = None
        self.connections = 0  # links handed out (1 + reconnects)
        self.attempts = 0  # dial attempts started
        self.last_error = "no connection attempt finished yet"

    # -- for callers
    def wait(self) -> Deferred[C]:
        """The live client, or the next one; fails with LinkStopped when the link stops. Cancelling it only ends
        this wait."""
        client = self.current
        if client is not None and client.connected:
            d: Deferred[C] = Deferred()
            d.callback(client)
            return d
        if not self.running:
            d = Deferred()
            d.errback(LinkStopped())
            return d
        return self._waiters.wait()

    def startService(self) -> None:
        if self._started_at is None:
            self._started_at = self._clock.seconds()
            if self._pacer is not None and self._boot_window is not None:
                self._pacer.booting.add(self)
        super().startService()

    def in_boot_window(self) -> bool:
        """Whether a failed attempt now is retried at the boot window's period."""
        window = self._boot_window
        booting = (window is not None and not self._was_up and self._started_at is not None
                   and bool(self.running) and self._clock.seconds() - self._started_at < window.length)
        if not booting and self._pacer is not None:
            self._pacer.booting.discard(self)  # its share goes to the others
        return booting

    def stopService(self) -> Deferred[None]:
        if self._pacer is not None:
            self._pacer.booting.discard(self)
        stopped = super().stopService()  # no longer running: a drop from here on is not redialled
        if self._handout is not None and self._handout.active():
            self._handout.cancel()
        self._handout = None
        client, self.current = self.current, None
        if client is not None:
            client.abort()  # at once: a graceful TLS close could wait for an unresponsive peer
        self._waiters.fail(LinkStopped())
        return stopped

    # -- the back-off
    def _next_delay(self, attempt: int) -> float:
        """`ClientService` asks once per failed attempt or dropped link; we count across links (see above)."""
        if self._after_stable_drop:
            self._after_stable_drop = False
            self._failures = self._window_failures = 0
            return 0.0
        if self.in_boot_window():
            assert self._boot_window is not None
            self._window_failures += 1
            base = self._boot_window.period
            delay = base if self._pacer is None else self._pacer.period(base)
        else:
            self._failures += 1  # the back-off after the window starts from its first delay
            delay = self._policy(self._failures)
        if self._on_retry is not None:
            self._on_retry(self.last_error, self._failures + self._window_failures, delay)
        return delay

    # -- one attempt (called through _ReadyGate)
    async def _attempt(self, factory: IProtocolFactory) -> IProtocol:
        self.attempts += 1
        attempt = Deferred.fromCoroutine(self._connect_ready())
        if self._attempt_timeout is not None:
            attempt.addTimeout(self._attempt_timeout, self._clock)
        try:
            client = await attempt
        except DeferredTimeout as e:
            timeout = DialTimeout(f"dial timed out after {self._attempt_timeout:g}s")
            self.last_error = describe_error(timeout)
            raise timeout from e
        except CancelledError:
            raise
        except Exception as e:
            self.last_error = describe_error(e)
            raise
        transport = client.transport
        assert transport is not None
        self._was_up = True
        if self._pacer is not None:
            self._pacer.booting.discard(self)
        self._handles.ready = client
        handle = factory.buildProtocol(transport.getPeer())
        assert handle is not None
        handle.makeConnection(transport)
        linked_at = self._clock.seconds()
        client.when_closed().addCallback(lambda _: self._dropped(client, handle, linked_at))
        self._handout = self._clock.callLater(0, self._hand_out, client)
        return handle

    async def _connect_ready(self) -> C:
        dialled_at = self._clock.seconds()
        made: list[C] = []

        def build() -> C:
            made.append(self._make_client(dialled_at))
            return made[-1]

        factory = Factory.forProtocol(build)
        factory.noisy = False  # no "Starting factory"/"Stopping factory" lines for every attempt
        connecting = self._endpoint.connect(factory)
        window = self._boot_window if self.in_boot_window() else None
        expired = None if window is None else _expire_after_io(self._clock, connecting, window.connect_timeout)
        try:
            client: C = await connecting  # type: ignore[assignment]
        except Exception:
            if window is None or expired is None or not expired:
                raise
            raise DialTimeout(f"connect timed out after {window.connect_timeout:g}s (boot window)") from None
        try:
            if self._client_ready is not None:
                await self._client_ready(client)
            if not client.connected:
                raise ConnectionDone(f"closed during setup: {client.close_reason or 'by peer'}")
        except BaseException:
            client.abort()
            raise
        return client

    def _hand_out(self, client: C) -> None:
        self._handout = None
        if not client.connected:
            return
        self.current = client
        self.connections += 1
        if self._on_link is not None:
            self._on_link(client)
        self._waiters.notify(client)

    def _dropped(self, client: C, handle: IProtocol, linked_at: float) -> None:
        lived = self._clock.seconds() - linked_at
        if self.current is client:
            self.current = None
        if lived >= self._stable_after:
            self._after_stable_drop = True
        else:
            self.last_error = f"link dropped after {lived:.3f}s: {client.close_reason or 'closed'}"
        if self.running and self._on_drop is not None:
            self._on_drop(client, lived)
        # now ClientService learns of it: it schedules the redial through _next_delay (or finishes stopping)
        handle.connectionLost(Failure(ConnectionDone(client.close_reason or "closed")))
