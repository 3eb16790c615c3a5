"""The node daemon's listening sockets as services. A listen that fails in `startService` raises there, so
twistd aborts start-up with exit status 1 (`strports.service` would only log it, unless one sets its private
`_raiseSynchronously`).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorFDSet,
    IReactorSocket,
    IReadDescriptor,
)
from twisted.internet.protocol import Factory, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from caa.ttrpc.endpoints import prepare_unix_path

__all__ = ["ListenError", "ListeningService", "UnixSocketService", "listen_reuseport", "socket_identity"]


class ListenError(Exception):
    """A listener could not start; the message is the one line the operator sees."""


def socket_identity(path: str) -> tuple[int, int, int]:
    """Who made the file at `path`: inode numbers are reused at once, so the change time is part of it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_ctime_ns


class ListeningService(Service):
    """Listens through `listen` (an endpoint's `listen(factory)`, or an adopted socket) when started, stops
    listening when stopped. A listen that has already failed by the time `listen` returns (TCP endpoints and
    adopted sockets answer at once) raises `ListenError`; one that fails later is logged."""

    _log = Logger()

    def __init__(self, what: str, listen: Callable[[], Deferred[IListeningPort]]) -> None:
        self.what = what
        self._listen = listen
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        try:
            d = self._listen()
        except Exception as e:
            self.running = False
            raise ListenError(f"cannot listen on {self.what}: {e}") from e
        at_once: list[Failure] = []
        answering = True

        def failed(f: Failure) -> None:
            if answering:
                at_once.append(f)
            else:  # an endpoint that answered later: start-up is over, so log it
                self._log.failure("cannot listen on {what}", f, what=self.what)

        d.addCallbacks(self._listening, failed)
        answering = False
        if at_once:
            self.running = False
            raise ListenError(f"cannot listen on {self.what}: {at_once[0].getErrorMessage()}")

    def _listening(self, port: IListeningPort) -> None:
        self.port = port

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return Deferred.fromCoroutine(_stop_listening(port))


async def _stop_listening(port: IListeningPort) -> None:
    stopping = port.stopListening()
    if stopping is not None:
        await stopping


def _server_factory(factory: Factory[Any]) -> ServerFactory:
    """IReactorSocket's methods are annotated with ServerFactory; any protocol factory serves."""
    return cast(ServerFactory, factory)


def listen_reuseport(reactor: IReactorSocket, host: str, port: int, factory: Factory[Any],
                     backlog: int = 16) -> Deferred[IListeningPort]:
    """Listen on TCP host:port with SO_REUSEPORT, so the old and the new adaptor of a rolling update can both
    hold the probe port (TCP endpoints have no such option, hence a socket of our own, adopted)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        s.listen(backlog)
        s.setblocking(False)
        return succeed(reactor.adoptStreamPort(s.fileno(), socket.AF_INET, _server_factory(factory)))
    finally:
        s.close()  # the reactor holds its own duplicate


# Accepts per readable event, as Twisted's own ports bound theirs: a burst of connections cannot starve the loop.
_ACCEPTS_PER_READ = 100
_ACCEPT_LATER = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO}


@implementer(IReadDescriptor)
class UnixSocketService(Service):
    """A unix stream socket at `path` that the daemon binds and owns itself; each accepted connection is handed
    to the reactor (`adoptStreamConnection`).

    Why not `listenUNIX` or `adoptStreamPort`: a Twisted unix port unlinks the path it is bound to when it stops
    listening. In a rolling update a newer adaptor removes our socket file and binds its own at the same path;
    our later stop would then delete the newer adaptor's socket. Here Twisted never learns the path: on stop we
    unlink it ourselves, and only while its identity (device, inode, change time) is still the one we bound.
    """

    _log = Logger()

    def __init__(self, reactor: IReactorFDSet, sockets: IReactorSocket, path: str,
                 factory: Factory[Any], mode: int = 0o600, backlog: int = 128) -> None:
        self._fdset = reactor
        self._sockets = sockets
        self.path = path
        self._factory = factory
        self._mode = mode
        self._backlog = backlog
        self._sock: socket.socket | None = None
        self._identity: tuple[int, int, int] | None = None

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def startService(self) -> None:
        super().startService()
        try:
            prepare_unix_path(self.path)  # takeover: a socket file left at the path is removed, as upstream does
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.bind(self.path)
                os.chmod(self.path, self._mode)
                s.listen(self._backlog)
                s.setblocking(False)
                identity = socket_identity(self.path)
            except BaseException:
                s.close()
                raise
        except OSError as e:
            self.running = False
            raise ListenError(f"cannot listen on {self.path}: {e}") from e
        self._sock, self._identity = s, identity
        self._fdset.addReader(self)

    def stopService(self) -> None:
        super().stopService()
        self._close()
        identity, self._identity = self._identity, None
        if identity is None:
            return
        try:
            if socket_identity(self.path) != identity:
                self._log.info("{path} belongs to a newer adaptor now: left in place", path=self.path)
                return
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self._log.warn("cannot remove {path}: {error}", path=self.path, error=str(e))

    def _close(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            self._fdset.removeReader(self)
            s.close()

    # IReadDescriptor

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def logPrefix(self) -> str:
        return f"UnixSocketService({self.path})"

    def doRead(self) -> None:
        for _ in range(_ACCEPTS_PER_READ):
            if self._sock is None:
                return
            try:
                conn, _addr = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in _ACCEPT_LATER:
                    self._log.warn("accept on {path}: {error}", path=self.path, error=str(e))
                    return
                raise
            with conn:  # the reactor keeps its own duplicate of the descriptor
                conn.setblocking(False)
                try:
                    self._sockets.adoptStreamConnection(conn.fileno(), socket.AF_UNIX, _server_factory(self._factory))
                except Exception:
                    self._log.failure("cannot serve a connection on {path}", path=self.path)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor gave up on the listening descriptor (it only does so on an error)."""
        if self._sock is not None:
            self._log.error("listening socket {path} lost: {reason}", path=self.path, reason=reason.getErrorMessage())
            self._close()
