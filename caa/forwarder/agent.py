"""The forwarder's one upstream connection to kata-agent's unix socket, healed when the agent restarts.

A `caa.dialer.Link` (the `ClientService` the agent proxy uses too) keeps (re)dialling with back-off (0.1 s
doubling to 0.5 s: with `--provision-user-data` the init starts kata-agent at the same time as the forwarder, so
the first dials find no socket; a refused unix dial costs next to nothing, and the agent is found at most 0.5 s
after it listens); `get()` hands out the live client or waits for the next one, at most `wait_timeout` seconds
and only as long as the caller (a relay call cancelled at its deadline stops waiting). Upstream dials once and
is useless after one failure.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from caa.dialer import Link, LinkStopped, dial_backoff
from caa.ttrpc import Code, TTRPCClient, TTRPCError

__all__ = ["AgentConnection", "AGENT_DIAL_CAP", "DEFAULT_WAIT"]

#: The longest pause between two dials of the agent socket.
AGENT_DIAL_CAP = 0.5
#: How long a call waits for the agent socket before failing UNAVAILABLE (upstream: 150 s dial bound).
DEFAULT_WAIT = 150.0


class AgentConnection(Link[TTRPCClient]):
    _log = Logger()

    def __init__(
        self, endpoint: IStreamClientEndpoint, clock: IReactorTime, wait_timeout: float = DEFAULT_WAIT,
        name: str = "kata-agent",
    ) -> None:
        super().__init__(endpoint, lambda dialled_at: TTRPCClient(clock, name), clock,
                         dial_backoff(initial=0.1, cap=AGENT_DIAL_CAP, jitter=lambda: 0.0),
                         on_link=self._connected, on_drop=self._lost)
        self.wait_timeout = wait_timeout

    def _connected(self, client: TTRPCClient) -> None:
        self._log.info("connected to {name} (connection #{n})", name=client.name, n=self.connections)

    def _lost(self, client: TTRPCClient, lived: float) -> None:
        self._log.info("{name} connection lost: {why}", name=client.name, why=client.close_reason or "closed by peer")

    def get(self) -> Deferred[TTRPCClient]:
        """The live client, or the next one within `wait_timeout`. Cancelling the returned Deferred only stops
        this wait."""
        d = self.wait()
        if not d.called:
            d.addTimeout(self.wait_timeout, self._clock, onTimeoutCancel=self._timed_out)
        return d.addErrback(self._not_established)

    def _timed_out(self, result: object, timeout: float) -> object:
        raise TTRPCError(Code.UNAVAILABLE,
                         f"agent connection is not established: no connection within {timeout:.0f}s")

    @staticmethod
    def _not_established(failure: Failure) -> TTRPCClient:
        failure.trap(LinkStopped)
        raise TTRPCError(Code.UNAVAILABLE, "agent connection is not established: forwarder stopping")
