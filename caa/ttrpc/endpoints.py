"""Endpoints for ttrpc listeners and dialers: unix sockets with an explicit mode, TCP, and TLS."""

from __future__ import annotations

import os
import stat

from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    UNIXClientEndpoint,
    UNIXServerEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IReactorSSL,
    IReactorTCP,
    IReactorUNIX,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)


def prepare_unix_path(path: str, dir_mode: int = 0o755) -> None:
    """Create the socket's directory and remove a stale socket file (takeover, as upstream does)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=dir_mode, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path} is a directory, not a socket")
    os.unlink(path)


def unix_server_endpoint(
    reactor: IReactorUNIX, path: str, mode: int = 0o600, backlog: int = 128
) -> IStreamServerEndpoint:
    prepare_unix_path(path)
    return UNIXServerEndpoint(reactor, path, backlog=backlog, mode=mode, wantPID=False)


def unix_client_endpoint(reactor: IReactorUNIX, path: str, timeout: float = 10) -> IStreamClientEndpoint:
    return UNIXClientEndpoint(reactor, path, timeout=timeout)


def tcp_server_endpoint(
    reactor: IReactorTCP, port: int, interface: str = "0.0.0.0", backlog: int = 128
) -> IStreamServerEndpoint:
    return TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=interface)


def tcp_client_endpoint(reactor: IReactorTCP, host: str, port: int, timeout: float = 10) -> IStreamClientEndpoint:
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


def tls_server_endpoint(
    reactor: IReactorSSL, port: int, interface: str, context_factory: IOpenSSLContextFactory, backlog: int = 128
) -> IStreamServerEndpoint:
    return SSL4ServerEndpoint(reactor, port, context_factory, backlog=backlog, interface=interface)


def tls_client_endpoint(
    reactor: IReactorTCP, host: str, port: int, creator: IOpenSSLClientConnectionCreator, timeout: float = 10
) -> IStreamClientEndpoint:
    return wrapClientTLS(creator, TCP4ClientEndpoint(reactor, host, port, timeout=timeout))
