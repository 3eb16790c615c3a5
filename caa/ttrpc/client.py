"""A ttrpc client on Twisted: one connection, many multiplexed unary calls.

Stream ids are odd and increasing. A per-call timeout is sent as `timeout_nano` and enforced locally
(DeadlineExceeded); a lost connection fails every pending call with Unavailable.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import envelope
from .framing import (
    HEADER,
    MAX_MESSAGE_LENGTH,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    FrameDecoder,
    OversizedFrame,
)
from .status import Code, TTRPCError

M = TypeVar("M", bound=Message)


class _Pending:
    __slots__ = ("deferred", "timer")

    def __init__(self, deferred: Deferred[bytes], timer: IDelayedCall | None) -> None:
        self.deferred = deferred
        self.timer = timer


class TTRPCClient(Protocol):
    """The client end of one ttrpc connection (also its Protocol)."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, name: str = "ttrpc") -> None:
        self._clock = clock
        self.name = name
        self._decoder = FrameDecoder()
        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        self._closed_waiters: list[Deferred[None]] = []
        self.connected = False
        self._lost = False
        self.close_reason: str | None = None

    # -- connection lifecycle
    def connectionMade(self) -> None:
        self.connected = True
        set_keepalive = getattr(self.transport, "setTcpKeepAlive", None)
        if set_keepalive is not None:  # notice a vanished peer (Go's dialer default)
            try:
                set_keepalive(1)
            except OSError:
                pass

    def connectionLost(self, reason: Failure = Failure(Exception("closed"))) -> None:  # noqa: B008
        self.connected = False
        self._lost = True
        why = self.close_reason or reason.getErrorMessage()
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if p.timer is not None and p.timer.active():
                p.timer.cancel()
            p.deferred.errback(TTRPCError(Code.UNAVAILABLE, f"ttrpc: closed: {why}"))
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)

    def when_closed(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._lost:
            d.callback(None)
        else:
            self._closed_waiters.append(d)
        return d

    def close(self) -> None:
        if self.transport is not None and not self._lost:
            self.close_reason = "closed by client"
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.transport is not None and not self._lost:
            self.close_reason = "aborted by client"
            abort = getattr(self.transport, "abortConnection", None)
            (abort or self.transport.loseConnection)()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- calls
    def call_raw(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout: float | None = None,
        metadata: Iterable[tuple[str, str]] | None = None,
    ) -> Deferred[bytes]:
        """Call service/method with an already serialized payload; fire with the response payload bytes."""
        if not self.connected or self.transport is None:
            return _failed(TTRPCError(Code.UNAVAILABLE, "ttrpc: closed"))
        if timeout is not None and timeout <= 0:
            return _failed(TTRPCError(Code.DEADLINE_EXCEEDED, "context deadline exceeded"))
        timeout_nano = int(timeout * 1e9) if timeout is not None else 0
        data = envelope.encode_request(service, method, payload, timeout_nano, metadata or ())
        if len(data) > MAX_MESSAGE_LENGTH:
            return _failed(TTRPCError(
                Code.RESOURCE_EXHAUSTED,
                f"message length {len(data)} exceed maximum message size of {MAX_MESSAGE_LENGTH}",
            ))
        sid = self._next_id
        self._next_id += 2
        d: Deferred[bytes] = Deferred(lambda _: self._drop(sid))
        timer = self._clock.callLater(timeout, self._expire, sid) if timeout is not None else None
        self._pending[sid] = _Pending(d, timer)
        self.transport.writeSequence([HEADER.pack(len(data), sid, TYPE_REQUEST, 0), data])
        return d

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        timeout: float | None = None,
        metadata: Iterable[tuple[str, str]] | None = None,
    ) -> M:
        payload = await self.call_raw(service, method, request.SerializeToString(), timeout, metadata)
        try:
            return response_type.FromString(payload)
        except DecodeError as e:
            raise TTRPCError(Code.INTERNAL, f"ttrpc: error unmarshalling response payload: {e}") from e

    def _drop(self, sid: int) -> None:
        p = self._pending.pop(sid, None)
        if p is not None and p.timer is not None and p.timer.active():
            p.timer.cancel()

    def _expire(self, sid: int) -> None:
        p = self._pending.pop(sid, None)
        if p is not None:
            p.deferred.errback(TTRPCError(Code.DEADLINE_EXCEEDED, "context deadline exceeded"))

    # -- input
    def dataReceived(self, data: bytes) -> None:
        for frame in self._decoder.feed(data):
            if isinstance(frame, OversizedFrame) or frame.type != TYPE_RESPONSE:
                self._malformed(frame)
                return
            p = self._pending.pop(frame.stream_id, None)
            if p is None:
                self._log.debug("{name}: response for unknown stream {sid} ignored",
                                name=self.name, sid=frame.stream_id)
                continue
            if p.timer is not None and p.timer.active():
                p.timer.cancel()
            try:
                payload = envelope.decode_response(frame.data)
            except TTRPCError as e:
                p.deferred.errback(e)
            except DecodeError as e:
                p.deferred.errback(TTRPCError(Code.INTERNAL, f"ttrpc: bad response envelope: {e}"))
            else:
                p.deferred.callback(payload)

    def _malformed(self, frame: object) -> None:
        self._log.warn("{name}: closing connection: malformed ttrpc stream from server ({frame!r})",
                       name=self.name, frame=frame)
        self.close_reason = "malformed ttrpc stream from server"
        if self.transport is not None:
            self.transport.loseConnection()


def _failed(err: Exception) -> Deferred[bytes]:
    d: Deferred[bytes] = Deferred()
    d.errback(err)
    return d


def client_factory(clock: IReactorTime, name: str = "ttrpc") -> Factory:
    return Factory.forProtocol(lambda: TTRPCClient(clock, name))


def connect(endpoint: IStreamClientEndpoint, clock: IReactorTime, name: str = "ttrpc") -> Deferred[TTRPCClient]:
    """Connect to a ttrpc server through `endpoint`."""
    d: Deferred[TTRPCClient] = endpoint.connect(client_factory(clock, name))  # type: ignore[assignment]
    return d
