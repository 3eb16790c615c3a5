"""The reactor our daemons are written against, as one declared interface instead of `Any`.

Library code takes an `INodeReactor` (or one of Twisted's narrower interfaces when that is all it needs);
only the twistd edge (`makeService`) hands in the global reactor, through `as_node_reactor`. Tests use
`MemoryReactorClock` subclasses that declare the interface (tests/reactors.py).
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorProcess,
    IReactorSocket,
    IReactorSSL,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUNIX,
)


class INodeReactor(IReactorCore, IReactorTime, IReactorTCP, IReactorUNIX, IReactorSSL, IReactorSocket,
                   IReactorThreads, IReactorProcess):
    """What the adaptor, the forwarder and the providers use of a reactor: time, TCP/unix/TLS
    listeners and dialers, adopted sockets, system event triggers, its thread pool, calls from worker
    threads and child processes."""


def as_node_reactor(reactor: object) -> INodeReactor:
    """The global reactor as an INodeReactor: Twisted's reactors provide each part but do not declare the sum."""
    for part in (IReactorCore, IReactorTime, IReactorTCP, IReactorUNIX, IReactorSSL, IReactorThreads, IReactorProcess):
        if not part.providedBy(reactor):
            raise TypeError(f"{reactor!r} does not provide {part.__name__}")
    return cast(INodeReactor, reactor)


__all__ = ["INodeReactor", "as_node_reactor"]
