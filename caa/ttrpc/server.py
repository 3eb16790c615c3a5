"""A ttrpc server on Twisted: services registered by name, unary `async def` handlers, many calls in flight
per connection, responses in completion order.

Wire behaviour follows containerd/ttrpc: odd, increasing stream ids; unknown service or method answer
Unimplemented; an undecodable envelope answers InvalidArgument and an undecodable payload Internal; a frame over
4 MiB is discarded and answered ResourceExhausted on its stream. A byte stream that is not ttrpc at all (an
unknown frame type, a Response sent to a server) closes that one connection with one log line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

from google.protobuf.message import DecodeError, Message
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import envelope
from .context import CallContext
from .framing import (
    HEADER,
    MAX_MESSAGE_LENGTH,
    TYPE_DATA,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    Frame,
    FrameDecoder,
    OversizedFrame,
)
from .status import Code, TTRPCError

Handler = Callable[[CallContext, Any], Coroutine[Any, Any, Message]]
RawHandler = Callable[[CallContext, str, str, bytes], Awaitable[bytes]]


_KNOWN_TYPES = frozenset((TYPE_REQUEST, TYPE_RESPONSE, TYPE_DATA))
# Past this a length is not an honest mistake: close instead of discarding gigabytes.
_HOSTILE_LENGTH = 16 * MAX_MESSAGE_LENGTH


class _Method:
    __slots__ = ("request_type", "handler")

    def __init__(self, request_type: type[Message], handler: Handler) -> None:
        self.request_type = request_type
        self.handler = handler


class _Call:
    """One in-flight request; `done` means its response was written or its connection is gone."""

    __slots__ = ("deferred", "timer", "timed_out")

    def __init__(self) -> None:
        self.deferred: Deferred[bytes] | None = None
        self.timer: IDelayedCall | None = None
        self.timed_out = False


class ServerProtocol(Protocol):
    _log = Logger()

    def __init__(self, server: Server) -> None:
        self._server = server
        self._decoder = FrameDecoder()
        self._last_stream_id = 0
        self._calls: dict[int, _Call] = {}
        self._closed = False

    # -- connection lifecycle
    def connectionMade(self) -> None:
        self._server._connections.add(self)
        try:
            self._peer_address: object = self.transport.getPeer() if self.transport is not None else None
        except Exception:  # some test transports have no peer
            self._peer_address = None

    def connectionLost(self, reason: Failure = Failure(Exception("closed"))) -> None:  # noqa: B008
        self._closed = True
        self._server._connections.discard(self)
        calls = list(self._calls.values())
        self._calls.clear()
        for call in calls:
            if call.timer is not None and call.timer.active():
                call.timer.cancel()
            if call.deferred is not None:
                call.deferred.cancel()
        self._server._check_idle()

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    # -- input
    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        for frame in self._decoder.feed(data):
            if frame.type not in _KNOWN_TYPES or frame.stream_id == 0:
                self._protocol_error(f"frame type {frame.type} on stream {frame.stream_id}")
                return
            if isinstance(frame, OversizedFrame):
                if frame.length > _HOSTILE_LENGTH:
                    self._protocol_error(f"frame length {frame.length} on stream {frame.stream_id}")
                    return
                self._log.warn(
                    "{server}: stream {stream_id}: message length {length} exceeds {limit}; discarded",
                    server=self._server.name, stream_id=frame.stream_id, length=frame.length,
                    limit=MAX_MESSAGE_LENGTH,
                )
                if frame.type == TYPE_REQUEST:
                    self._respond(frame.stream_id, envelope.encode_error(
                        Code.RESOURCE_EXHAUSTED,
                        f"message length {frame.length} exceed maximum message size of {MAX_MESSAGE_LENGTH}",
                    ))
                continue
            if frame.type == TYPE_REQUEST:
                self._on_request(frame)
            elif frame.type == TYPE_DATA and frame.stream_id in self._calls:
                # Streaming data on a unary call: nothing here streams; ignore like the reference does.
                continue
            else:
                self._protocol_error(f"unexpected frame type {frame.type} on stream {frame.stream_id}")
                return
            if self.closed:  # the request just handled may have closed the connection
                return

    @property
    def closed(self) -> bool:
        """True once this connection is closing; read through a property so checks inside the frame loop
        are not narrowed away by the type checker."""
        return self._closed

    def _protocol_error(self, why: str) -> None:
        self._log.warn(
            "{server}: closing connection from {peer}: malformed ttrpc stream: {why}",
            server=self._server.name, peer=self._peer(), why=why,
        )
        self._closed = True
        if self.transport is not None:
            self.transport.loseConnection()

    def _peer(self) -> object:
        return getattr(self, "_peer_address", None)

    def _on_request(self, frame: Frame) -> None:
        sid = frame.stream_id
        if sid % 2 == 0:
            self._respond(sid, envelope.encode_error(
                Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"))
            return
        if sid <= self._last_stream_id:
            self._respond(sid, envelope.encode_error(
                Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"))
            return
        self._last_stream_id = sid
        try:
            req = envelope.decode_request(frame.data)
        except DecodeError as e:
            self._respond(sid, envelope.encode_error(Code.INVALID_ARGUMENT, f"unmarshal request error: {e}"))
            return
        server = self._server
        clock = server.clock
        ctx = CallContext(
            clock=clock, service=req.service, method=req.method, stream_id=sid,
            metadata=[(kv.key, kv.value) for kv in req.metadata],
            deadline=(clock.seconds() + req.timeout_nano / 1e9) if req.timeout_nano > 0 else None,
            peer=self._peer(),
        )
        try:
            coro = server._dispatch(ctx, req.payload)
        except TTRPCError as e:
            self._respond(sid, envelope.encode_error(e.code, e.message))
            return
        # Fast path: most handlers finish without waiting; answer them without a Deferred.
        try:
            first = coro.send(None)
        except StopIteration as done:
            self._on_result(done.value, sid, ctx)
            return
        except BaseException:
            self._on_failure(Failure(), sid, ctx)
            return
        call = _Call()
        self._calls[sid] = call
        d: Deferred[bytes] = Deferred.fromCoroutine(_resume(coro, first))
        call.deferred = d
        if req.timeout_nano > 0 and not d.called:
            call.timer = clock.callLater(req.timeout_nano / 1e9, self._expire, sid)
        d.addCallbacks(self._on_result, self._on_failure, callbackArgs=(sid, ctx), errbackArgs=(sid, ctx))

    def _expire(self, sid: int) -> None:
        call = self._calls.get(sid)
        if call is not None and call.deferred is not None:
            call.timed_out = True
            call.deferred.cancel()

    def _finish(self, sid: int) -> _Call | None:
        call = self._calls.pop(sid, None)
        if call is not None and call.timer is not None and call.timer.active():
            call.timer.cancel()
        return call

    def _on_result(self, payload: bytes, sid: int, ctx: CallContext) -> None:
        self._finish(sid)
        if self._closed:
            return
        if len(payload) > MAX_MESSAGE_LENGTH - 16:
            out = envelope.encode_error(
                Code.RESOURCE_EXHAUSTED,
                f"message length {len(payload)} exceed maximum message size of {MAX_MESSAGE_LENGTH}",
            )
        else:
            if self.transport is not None:
                prefix = envelope.ok_prefix(len(payload))
                self.transport.writeSequence([
                    HEADER.pack(len(prefix) + len(payload), sid, TYPE_RESPONSE, 0), prefix, payload])
            self._server._check_idle()
            return
        self._respond(sid, out)
        self._server._check_idle()

    def _on_failure(self, failure: Failure, sid: int, ctx: CallContext) -> None:
        call = self._finish(sid)
        if self._closed:
            return
        err = failure.value
        if isinstance(err, TTRPCError):
            code, message = err.code, err.message
        elif failure.check(CancelledError):
            if call is not None and call.timed_out:
                code, message = Code.DEADLINE_EXCEEDED, "context deadline exceeded"
            else:
                code, message = Code.CANCELLED, "context canceled"
        else:
            self._log.failure(
                "{server}: {service}/{method} failed", failure,
                server=self._server.name, service=ctx.service, method=ctx.method,
            )
            code, message = Code.UNKNOWN, str(err) or type(err).__name__
        self._respond(sid, envelope.encode_error(code, message))
        self._server._check_idle()

    def _respond(self, sid: int, data: bytes) -> None:
        if self.transport is None or self._closed:
            return
        # Header and body as a sequence: no copy of a large body into a new buffer here.
        self.transport.writeSequence([HEADER.pack(len(data), sid, TYPE_RESPONSE, 0), data])


class Server:
    """A ttrpc service registry; `factory()` makes the protocol factory to listen with."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, name: str = "ttrpc") -> None:
        self.clock = clock
        self.name = name
        self._methods: dict[tuple[str, str], _Method] = {}
        self._services: set[str] = set()
        self._fallback: RawHandler | None = None
        self._connections: set[ServerProtocol] = set()
        self._idle_waiters: list[Deferred[None]] = []
        self._closed_waiters: list[Deferred[None]] = []

    def register(self, service: str, methods: dict[str, tuple[type[Message], Handler]]) -> None:
        if service in self._services:
            raise ValueError(f"service {service} is already registered")
        self._services.add(service)
        for name, (request_type, handler) in methods.items():
            self._methods[(service, name)] = _Method(request_type, handler)

    def register_fallback(self, handler: RawHandler) -> None:
        """Serve every service/method that is not registered with `handler` (raw payload bytes in and out)."""
        self._fallback = handler

    def factory(self) -> Factory:
        return Factory.forProtocol(lambda: ServerProtocol(self))

    async def _call_typed(self, ctx: CallContext, method: _Method, payload: bytes) -> bytes:
        try:
            request = method.request_type.FromString(payload)
        except DecodeError as e:
            raise TTRPCError(Code.INTERNAL, f"ttrpc: error unmarshalling payload: {e}") from e
        response = await method.handler(ctx, request)
        if response is None:
            raise TTRPCError(Code.UNKNOWN, "ttrpc: marshal called with nil")
        return response.SerializeToString()

    def _dispatch(self, ctx: CallContext, payload: bytes) -> Coroutine[Any, Any, bytes]:
        method = self._methods.get((ctx.service, ctx.method))
        if method is not None:
            return self._call_typed(ctx, method, payload)
        if self._fallback is not None:
            return _await(self._fallback(ctx, ctx.service, ctx.method, payload))
        if ctx.service not in self._services:
            raise TTRPCError(Code.UNIMPLEMENTED, f"service {ctx.service}")
        raise TTRPCError(Code.UNIMPLEMENTED, f"method {ctx.method}")

    # -- shutdown
    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self._connections)

    @property
    def connection_count(self) -> int:
        """Client connections open now."""
        return len(self._connections)

    def _check_idle(self) -> None:
        if self._idle_waiters and self.in_flight == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)
        if self._closed_waiters and not self._connections:
            closed, self._closed_waiters = self._closed_waiters, []
            for d in closed:
                d.callback(None)

    async def drain(self, timeout: float) -> int:
        """Let the open connections go on (calls and all) until their clients close them, for at most `timeout`
        seconds; then drop the ones left. Returns how many were dropped. Stop listening first."""
        if self._connections:
            closed: Deferred[None] = Deferred()
            self._closed_waiters.append(closed)

            def give_up() -> None:
                if closed in self._closed_waiters:
                    self._closed_waiters.remove(closed)
                    closed.callback(None)

            timer = self.clock.callLater(timeout, give_up)
            try:
                await closed
            finally:
                if timer.active():
                    timer.cancel()
                if closed in self._closed_waiters:  # cancelled from outside
                    self._closed_waiters.remove(closed)
        left = len(self._connections)
        self.abort()
        return left

    def abort(self) -> None:
        """Drop every connection now; in-flight handlers are cancelled."""
        for conn in list(self._connections):
            conn._closed = True
            transport = conn.transport
            if transport is not None:
                abort = getattr(transport, "abortConnection", None)
                (abort or transport.loseConnection)()
            conn.connectionLost(Failure(ConnectionAbortedError("server aborted")))

    async def stop(self, timeout: float = 5.0) -> None:
        """Wait for in-flight calls to finish (up to `timeout` seconds), then close every connection.

        Stop listening first (that belongs to whoever called `listen`)."""
        if self.in_flight:
            idle: Deferred[None] = Deferred()
            self._idle_waiters.append(idle)
            def give_up() -> None:
                if idle in self._idle_waiters:
                    self._idle_waiters.remove(idle)
                    idle.callback(None)

            timer = self.clock.callLater(timeout, give_up)
            await idle
            if timer.active():
                timer.cancel()
            if self.in_flight:
                self._log.warn("{server}: {n} calls still in flight after {timeout}s; dropping them",
                               server=self.name, n=self.in_flight, timeout=timeout)
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.loseConnection()
        self.abort()


def _resume(coro: Coroutine[Any, Any, bytes], yielded: Any) -> Generator[Any, Any, bytes]:
    """Drive `coro`, which has already been started and yielded `yielded`, as a generator that
    Deferred.fromCoroutine accepts (results and exceptions, including cancellation, are passed on)."""
    while True:
        try:
            value = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:
            try:
                yielded = coro.throw(e)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
        else:
            try:
                yielded = coro.send(value)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]


async def _await(awaitable: Awaitable[bytes]) -> bytes:
    return await awaitable


__all__ = ["Server", "ServerProtocol", "Handler", "RawHandler"]
