"""The forwarder's one upstream connection to kata-agent's unix socket, healed when the agent restarts.

A `ClientService` keeps (re)dialling with back-off (0.1 s doubling to 2 s); `get()` hands out the live client
or waits for the next one, at most `wait_timeout` seconds and only as long as the caller (a relay call
cancelled at its deadline stops waiting). Upstream dials once and is useless after one failure.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger

from caa.ttrpc import Code, TTRPCClient, TTRPCError, client_factory

__all__ = ["AgentConnection", "DEFAULT_WAIT"]

#: How long a call waits for the agent socket before failing UNAVAILABLE (upstream: 150 s dial bound).
DEFAULT_WAIT = 150.0


class AgentConnection(ClientService):
    _log = Logger()

    def __init__(
        self, endpoint: IStreamClientEndpoint, clock: IReactorTime, wait_timeout: float = DEFAULT_WAIT,
        name: str = "kata-agent",
    ) -> None:
        super().__init__(
            endpoint,
            client_factory(clock, name),
            retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=2.0, factor=2.0, jitter=lambda: 0.0),
            clock=clock,
            prepareConnection=self._connected,
        )
        self._clock = clock
        self.wait_timeout = wait_timeout
        self.connections = 0
        self._timers: dict[Deferred[TTRPCClient], Any] = {}
        self._pending: Deferred[Any] | None = None

    def _connected(self, client: Any) -> None:
        self.connections += 1
        self._log.info("connected to {name} (connection #{n})", name=client.name, n=self.connections)
        client.when_closed().addCallback(
            lambda _: self._log.info("{name} connection lost: {why}", name=client.name,
                                     why=client.close_reason or "closed by peer"))

    def get(self) -> Deferred[TTRPCClient]:
        """The live client, or the next one. Cancelling the returned Deferred only stops this wait; all
        waiters share one pending `whenConnected` (ClientService's waits cannot be cancelled)."""
        outer: Deferred[TTRPCClient] = Deferred(self._forget)
        self._timers[outer] = self._clock.callLater(self.wait_timeout, self._expire, outer)
        if self._pending is None:
            self._pending = self.whenConnected()
            self._pending.addCallbacks(self._fire, self._fail)
        return outer

    def _forget(self, d: Deferred[TTRPCClient]) -> None:
        timer = self._timers.pop(d, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _expire(self, d: Deferred[TTRPCClient]) -> None:
        self._timers.pop(d, None)
        d.errback(TTRPCError(
            Code.UNAVAILABLE,
            f"agent connection is not established: no connection within {self.wait_timeout:.0f}s"))

    def _settle(self) -> list[Deferred[TTRPCClient]]:
        self._pending = None
        waiters = list(self._timers)
        for d in waiters:
            self._forget(d)
        return waiters

    def _fire(self, client: TTRPCClient) -> None:
        for d in self._settle():
            d.callback(client)

    def _fail(self, f: Any) -> None:
        err = TTRPCError(Code.UNAVAILABLE, f"agent connection is not established: {f.getErrorMessage()}")
        for d in self._settle():
            d.errback(err)
