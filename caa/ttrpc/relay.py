"""A generic ttrpc relay: every service and method passes through as raw bytes.

Used by the adaptor's agent proxy (shim -> pod VM) and by the forwarder (adaptor -> kata-agent). Metadata and the
caller's remaining deadline travel with each call; upstream statuses come back unchanged. Interceptors may
rewrite the payload of chosen methods before it is forwarded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .client import TTRPCClient
from .context import CallContext
from .status import Code, TTRPCError

Interceptor = Callable[[CallContext, bytes], Awaitable[bytes]]
ClientSource = Callable[[], "Deferred[TTRPCClient] | TTRPCClient"]
CallObserver = Callable[[CallContext, int, int, int], None]  # ctx, bytes in, bytes out, status code


class Relay:
    _log = Logger()

    def __init__(
        self,
        get_client: ClientSource,
        clock: IReactorTime,
        interceptors: Mapping[tuple[str, str], Interceptor] | None = None,
        observer: CallObserver | None = None,
        name: str = "relay",
    ) -> None:
        self._get_client = get_client
        self._clock = clock
        self._interceptors = dict(interceptors or {})
        self._observer = observer
        self.name = name

    async def handle(self, ctx: CallContext, service: str, method: str, payload: bytes) -> bytes:
        code = Code.OK
        out = b""
        try:
            interceptor = self._interceptors.get((service, method))
            if interceptor is not None:
                payload = await interceptor(ctx, payload)
            client = self._get_client()
            if isinstance(client, Deferred):
                client = await client
            remaining = ctx.remaining()
            if remaining is not None and remaining <= 0:
                raise TTRPCError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
            out = await client.call_raw(service, method, payload, remaining, ctx.metadata)
            return out
        except TTRPCError as e:
            code = Code(e.code) if e.code in Code._value2member_map_ else Code.UNKNOWN
            raise
        except BaseException:
            code = Code.UNKNOWN
            raise
        finally:
            if self._observer is not None:
                self._observer(ctx, len(payload), len(out), code)
