"""The node daemon's listening sockets as services. A listen that fails in `startService` raises there, so
twistd aborts start-up with exit status 1 (`strports.service` would only log it, unless one sets its private
`_raiseSynchronously`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import stat
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

__all__ = ["ListenError", "ListeningService", "OwnedUnixSocket", "UnixSocketService", "listen_reuseport",
           "socket_identity"]


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


_temp_names = itertools.count()


def _temporary_path(path: str) -> str | None:
    """A fresh name beside `path` to bind before the rename, or None when it would not fit a unix socket
    address (then we bind `path` itself)."""
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".{os.getpid()}.{next(_temp_names)}")
    return tmp if len(os.fsencode(tmp)) <= len(os.fsencode(path)) else None


@implementer(IReadDescriptor)
class OwnedUnixSocket:
    """A unix stream socket at `path` that we bind and own ourselves; each accepted connection is handed to the
    reactor (`adoptStreamConnection`). Used for the hypervisor socket and every agent proxy socket.

    Why not `listenUNIX` or `adoptStreamPort`: a Twisted unix port unlinks the path it is bound to when it stops
    listening. In a rolling update a newer adaptor replaces our socket file with its own at the same path; our
    later stop would then delete the newer adaptor's socket. Here Twisted never learns the path: on close we
    unlink it ourselves, and only while its identity (device, inode, change time) is still the one we published.

    The path never goes missing: `bind` listens on a temporary name in the same directory and `publish` renames it
    over `path` (atomic), so a client connecting meanwhile reaches the old socket or the new one, never nothing.
    """

    _log = Logger()

    def __init__(self, reactor: IReactorFDSet, sockets: IReactorSocket, path: str,
                 factory: Factory[Any], mode: int = 0o600, backlog: int = 128, dir_mode: int = 0o755) -> None:
        self._fdset = reactor
        self._sockets = sockets
        self.path = path
        self._factory = factory
        self._mode = mode
        self._backlog = backlog
        self._dir_mode = dir_mode
        self._sock: socket.socket | None = None
        self._temp: str | None = None  # bound but not yet published under `path`
        self._identity: tuple[int, int, int] | None = None

    @property
    def listening(self) -> bool:
        return self._sock is not None

    @property
    def published(self) -> bool:
        return self._identity is not None

    def bind(self) -> None:
        """Bind and listen (on a temporary name beside `path`), accepting through the reactor. Raises OSError."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=self._dir_mode, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.lstat(self.path).st_mode):
                raise OSError(errno.EISDIR, f"{self.path} is a directory, not a socket")
        temp = _temporary_path(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if temp is None:  # no room for a temporary name: the old file goes first (a short gap)
                prepare_unix_path(self.path, self._dir_mode)
                s.bind(self.path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                s.bind(temp)
            os.chmod(temp or self.path, self._mode)
            s.listen(self._backlog)
            s.setblocking(False)
        except BaseException:
            s.close()
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            raise
        self._sock = s
        self._temp = temp
        if temp is None:
            self._identity = socket_identity(self.path)
        self._fdset.addReader(self)

    def publish(self) -> None:
        """Put the bound socket at `path`, replacing whatever file is there (a socket left by an older adaptor)
        in one rename. Raises OSError."""
        if self._sock is None or self.published:
            return
        assert self._temp is not None
        os.rename(self._temp, self.path)
        self._temp = None
        # after the rename: a rename changes the file's change time
        self._identity = socket_identity(self.path)

    def ours(self) -> bool:
        """Whether `path` is still the socket we published (False once a newer adaptor replaced it)."""
        if self._identity is None:
            return False
        try:
            return socket_identity(self.path) == self._identity
        except OSError:
            return False

    def close(self) -> None:
        """Stop accepting; remove the file only while it is still ours (or our unpublished temporary name)."""
        s, self._sock = self._sock, None
        if s is not None:
            self._fdset.removeReader(self)
            s.close()
        temp, self._temp = self._temp, None
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)
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

    # IReadDescriptor

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def logPrefix(self) -> str:
        return f"OwnedUnixSocket({self.path})"

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
        s, self._sock = self._sock, None
        if s is not None:
            self._log.error("listening socket {path} lost: {reason}", path=self.path, reason=reason.getErrorMessage())
            self._fdset.removeReader(self)
            s.close()


class UnixSocketService(Service):
    """The hypervisor socket as a service (an `OwnedUnixSocket`): bound at start (a failure raises
    `ListenError`), published at start unless `publish_at_start` is False (the daemon first asks the adaptor
    it replaces to hand over), closed at stop without touching a newer adaptor's file."""

    def __init__(self, reactor: IReactorFDSet, sockets: IReactorSocket, path: str,
                 factory: Factory[Any], mode: int = 0o600, backlog: int = 128, publish_at_start: bool = True) -> None:
        self.path = path
        self.socket = OwnedUnixSocket(reactor, sockets, path, factory, mode=mode, backlog=backlog)
        self._publish_at_start = publish_at_start

    @property
    def listening(self) -> bool:
        return self.socket.listening

    def startService(self) -> None:
        super().startService()
        try:
            self.socket.bind()
            if self._publish_at_start:
                self.socket.publish()
        except OSError as e:
            self.running = False
            self.socket.close()
            raise ListenError(f"cannot listen on {self.path}: {e}") from e

    def publish(self) -> None:
        """Replace the file at the path with our socket (raises OSError)."""
        self.socket.publish()

    def ours(self) -> bool:
        return self.socket.ours()

    def stopService(self) -> None:
        super().stopService()
        self.socket.close()
