"""Stands in for a stream client endpoint and its connections in synchronous dialer tests.

`PendingEndpoint.connect()` waits until the test answers it: `accept()` builds the factory's protocol on a
`ClosingTransport` (whose close reaches the protocol at once, as a unix socket's soon would) and fires the
connect; `refuse()` fails it as a refused TCP or unix connect does.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer


class ClosingTransport(StringTransport):
    """A StringTransport that delivers connectionLost to its protocol as soon as it is closed."""

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
class PendingEndpoint:
    """Each connect() waits for the test: `accept()` or `refuse()` answers the newest one."""

    def __init__(self) -> None:
        self.pending: list[tuple[Deferred[Any], IProtocolFactory]] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((d, factory))
        return d

    def accept(self) -> Any:
        d, factory = self.pending[-1]
        proto = factory.buildProtocol(None)  # type: ignore[arg-type]
        assert proto is not None
        proto.makeConnection(ClosingTransport(proto))
        d.callback(proto)
        return proto

    def refuse(self, why: str = "refused") -> None:
        self.pending[-1][0].errback(ConnectionRefusedError(why))


__all__ = ["ClosingTransport", "PendingEndpoint"]
