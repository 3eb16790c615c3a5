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

    def _connected(self, client: Any) -> None:
        self.connections += 1
        self._log.info("connected to {name} (connection #{n})", name=client.name, n=self.connections)
        client.when_closed().addCallback(
            lambda _: self._log.info("{name} connection lost: {why}", name=client.name,
                                     why=client.close_reason or "closed by peer"))

    def get(self) -> Deferred[TTRPCClient]:
        """The live client, or the next one. Cancelling the returned Deferred only stops this wait."""
        inner = self.whenConnected()
        timer: Any = None

        def cancel(d: Deferred[TTRPCClient]) -> None:
            if timer is not None and timer.active():
                timer.cancel()

        outer: Deferred[TTRPCClient] = Deferred(cancel)

        def done(client: TTRPCClient) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            if not outer.called:
                outer.callback(client)

        def failed(f: Any) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            if not outer.called:
                outer.errback(TTRPCError(Code.UNAVAILABLE,
                                         f"agent connection is not established: {f.getErrorMessage()}"))

        def expire() -> None:
            if not outer.called:
                outer.errback(TTRPCError(
                    Code.UNAVAILABLE,
                    f"agent connection is not established: no connection within {self.wait_timeout:.0f}s"))

        inner.addCallbacks(done, failed)
        if not outer.called:
            timer = self._clock.callLater(self.wait_timeout, expire)
        return outer
