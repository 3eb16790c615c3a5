"""A minimal stand-in for caa.adaptor.proxy (the agent proxy), used by the process tests only while the
real proxy is absent: listens on the agent socket, dials the forwarder (plain TCP) with 0.1-1 s back-off
until the deadline, and relays every call with caa.ttrpc.Relay. No reconnect, no TLS."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from zope.interface import implementer

from caa.adaptor.interfaces import IAgentProxy, IAgentProxyFactory
from caa.reactors import INodeReactor
from caa.ttrpc import Code, Relay, Server, TTRPCClient, TTRPCError, connect
from caa.ttrpc.endpoints import tcp_client_endpoint, unix_server_endpoint


@implementer(IAgentProxy)
class RelayProxy:
    def __init__(self, reactor: INodeReactor, sandbox_id: str, socket_path: str) -> None:
        self.reactor = reactor
        self.sandbox_id = sandbox_id
        self.socket_path = socket_path
        self.client: TTRPCClient | None = None
        self.port: Any = None
        self.server = Server(clock=reactor, name="agent-proxy")
        self.server.register_fallback(Relay(self._client, clock=reactor).handle)
        self._stopped = False
        self._run: Deferred[None] | None = None

    def _client(self) -> TTRPCClient:
        if self.client is None or not self.client.connected:
            raise TTRPCError(Code.UNAVAILABLE, "agent connection is not established")
        return self.client

    def start(self, address: tuple[str, int], server_name: str, deadline: float) -> Deferred[None]:
        self._run = Deferred.fromCoroutine(self._start(address, deadline))
        return self._run

    async def _start(self, address: tuple[str, int], deadline: float) -> None:
        self.port = await unix_server_endpoint(self.reactor, self.socket_path).listen(self.server.factory())
        delay, last = 0.1, "no attempt"
        while not self._stopped:
            try:
                self.client = await connect(tcp_client_endpoint(self.reactor, address[0], address[1], timeout=2),
                                            clock=self.reactor)
                return
            except CancelledError:
                raise
            except Exception as e:
                last = str(e)
            if self.reactor.seconds() + delay >= deadline:
                break
            await deferLater(self.reactor, delay)
            delay = min(1.0, delay * 2)
        raise TTRPCError(Code.DEADLINE_EXCEEDED,
                         f"failed to establish agent proxy connection to {address[0]}:{address[1]}: {last}")

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    def drain(self, timeout: float) -> Deferred[None]:
        return self.stop()  # no drain in the stand-in: it closes at once

    async def _stop(self) -> None:
        self._stopped = True
        if self._run is not None and not self._run.called:
            self._run.cancel()
        if self.port is not None:
            await self.port.stopListening()
            self.port = None
        self.server.abort()
        if self.client is not None:
            self.client.close()


@implementer(IAgentProxyFactory)
class AgentProxyFactory:
    def __init__(self, reactor: INodeReactor, tls: Any) -> None:
        self.reactor = reactor

    def new(self, sandbox_id: str, socket_path: str, volumes: tuple[str, ...]) -> IAgentProxy:
        return RelayProxy(self.reactor, sandbox_id, socket_path)
