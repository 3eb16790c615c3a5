"""containerd's ttrpc protocol on Twisted, wire-compatible with github.com/containerd/ttrpc (see docs/ttrpc-api.md)."""

from .client import TTRPCClient, client_factory, connect
from .context import CallContext
from .relay import Interceptor, Relay
from .server import Handler, RawHandler, Server, ServerProtocol
from .status import Code, TTRPCError

__all__ = [
    "CallContext",
    "Code",
    "Handler",
    "Interceptor",
    "RawHandler",
    "Relay",
    "Server",
    "ServerProtocol",
    "TTRPCClient",
    "TTRPCError",
    "client_factory",
    "connect",
]
