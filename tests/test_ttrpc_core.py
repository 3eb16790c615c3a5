"""Unit tests of caa.ttrpc: framing, server semantics and client semantics, driven in memory with a Clock."""

from __future__ import annotations

from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import Clock, EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from caa.proto import ttrpc_pb2
from caa.proto.google.rpc import status_pb2
from caa.ttrpc import CallContext, Code, Relay, Server, TTRPCClient, TTRPCError
from caa.ttrpc.framing import HEADER, MAX_MESSAGE_LENGTH, Frame, FrameDecoder, OversizedFrame, encode_frame
from caa.ttrpc.server import ServerProtocol

KV = ttrpc_pb2.KeyValue


def request_frame(sid: int, service: str, method: str, payload: bytes = b"", timeout_nano: int = 0,
                  metadata: list[tuple[str, str]] | None = None) -> bytes:
    req = ttrpc_pb2.Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano)
    for k, v in metadata or []:
        req.metadata.add(key=k, value=v)
    return encode_frame(sid, 1, 0, req.SerializeToString())


def server_protocol(server: Server) -> ServerProtocol:
    proto = server.factory().buildProtocol(None)
    assert isinstance(proto, ServerProtocol)
    return proto


def responses(data: bytes) -> dict[int, ttrpc_pb2.Response]:
    out = {}
    for frame in FrameDecoder().feed(data):
        assert isinstance(frame, Frame) and frame.type == 2
        out[frame.stream_id] = ttrpc_pb2.Response.FromString(frame.data)
    return out


class FramingTests(SynchronousTestCase):
    def test_header_layout(self) -> None:
        frame = encode_frame(0x01020304, 1, 0x02, b"abc")
        self.assertEqual(frame[:10], b"\x00\x00\x00\x03\x01\x02\x03\x04\x01\x02")
        self.assertEqual(frame[10:], b"abc")

    def test_byte_by_byte(self) -> None:
        data = encode_frame(1, 1, 0, b"hello") + encode_frame(3, 2, 0, b"") + encode_frame(5, 3, 1, b"x" * 300)
        dec = FrameDecoder()
        frames = [f for b in data for f in dec.feed(bytes([b]))]
        self.assertEqual(frames, [Frame(1, 1, 0, b"hello"), Frame(3, 2, 0, b""), Frame(5, 3, 1, b"x" * 300)])
        self.assertEqual(dec.buffered, 0)

    def test_oversized_is_skipped_without_buffering(self) -> None:
        dec = FrameDecoder(max_length=8)
        out = list(dec.feed(HEADER.pack(20, 7, 1, 0) + b"y" * 5))
        self.assertEqual(out, [OversizedFrame(7, 1, 0, 20)])
        self.assertEqual(dec.buffered, 0)
        out = list(dec.feed(b"y" * 15 + encode_frame(9, 1, 0, b"ok")))
        self.assertEqual(out, [Frame(9, 1, 0, b"ok")])

    def test_encode_refuses_oversized(self) -> None:
        self.assertRaises(ValueError, encode_frame, 1, 1, 0, b"\0" * (MAX_MESSAGE_LENGTH + 1))


class EchoServerMixin:
    clock: Clock

    def make_server(self) -> Server:
        self.clock = Clock()
        self.seen: list[CallContext] = []
        self.pending: dict[str, Deferred[None]] = {}
        self.cancelled: list[str] = []
        server = Server(self.clock, name="test")

        async def echo(ctx: CallContext, req: ttrpc_pb2.KeyValue) -> ttrpc_pb2.KeyValue:
            self.seen.append(ctx)
            if req.key == "wait":
                d: Deferred[None] = Deferred()
                self.pending[req.value] = d
                try:
                    await d
                except BaseException:
                    self.cancelled.append(req.value)
                    raise
            if req.key == "fail":
                raise TTRPCError(Code.NOT_FOUND, f"no {req.value}")
            if req.key == "crash":
                raise RuntimeError("boom")
            return KV(key=req.value, value=req.key)

        async def nothing(ctx: CallContext, req: ttrpc_pb2.KeyValue) -> ttrpc_pb2.KeyValue:
            return None  # type: ignore[return-value]

        server.register("test.Echo", {"Echo": (KV, echo), "Nil": (KV, nothing)})
        return server


class ServerTests(EchoServerMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.server = self.make_server()
        self.proto = server_protocol(self.server)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> dict[int, ttrpc_pb2.Response]:
        self.transport.clear()
        self.proto.dataReceived(data)
        return responses(self.transport.value())

    def test_unary_ok_with_metadata(self) -> None:
        out = self.send(request_frame(1, "test.Echo", "Echo", KV(key="a", value="b").SerializeToString(),
                                      metadata=[("x", "1")]))
        self.assertFalse(out[1].HasField("status"))
        self.assertEqual(KV.FromString(out[1].payload), KV(key="b", value="a"))
        self.assertEqual(self.seen[0].metadata, [("x", "1")])
        self.assertIsNone(self.seen[0].deadline)

    def test_error_status(self) -> None:
        out = self.send(request_frame(1, "test.Echo", "Echo", KV(key="fail", value="thing").SerializeToString()))
        self.assertEqual((out[1].status.code, out[1].status.message), (Code.NOT_FOUND, "no thing"))
        self.assertEqual(out[1].payload, b"")

    def test_exception_is_unknown(self) -> None:
        out = self.send(request_frame(1, "test.Echo", "Echo", KV(key="crash").SerializeToString()))
        self.assertEqual((out[1].status.code, out[1].status.message), (Code.UNKNOWN, "boom"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_nil_response(self) -> None:
        out = self.send(request_frame(1, "test.Echo", "Nil"))
        self.assertEqual(out[1].status.code, Code.UNKNOWN)
        self.assertIn("nil", out[1].status.message)

    def test_unknown_service_and_method(self) -> None:
        out = self.send(request_frame(1, "no.Such", "X") + request_frame(3, "test.Echo", "Nope"))
        self.assertEqual((out[1].status.code, out[1].status.message), (Code.UNIMPLEMENTED, "service no.Such"))
        self.assertEqual((out[3].status.code, out[3].status.message), (Code.UNIMPLEMENTED, "method Nope"))

    def test_bad_envelope_and_payload(self) -> None:
        out = self.send(encode_frame(1, 1, 0, b"\xff\xff\xff"))
        self.assertEqual(out[1].status.code, Code.INVALID_ARGUMENT)
        out = self.send(request_frame(3, "test.Echo", "Echo", b"\x0a\xff"))
        self.assertEqual(out[3].status.code, Code.INTERNAL)
        self.assertIn("unmarshalling payload", out[3].status.message)

    def test_stream_ids(self) -> None:
        out = self.send(request_frame(2, "test.Echo", "Echo"))
        self.assertEqual(out[2].status.code, Code.INVALID_ARGUMENT)
        self.send(request_frame(5, "test.Echo", "Echo"))
        out = self.send(request_frame(3, "test.Echo", "Echo"))
        self.assertEqual(out[3].status.code, Code.INVALID_ARGUMENT)
        self.assertIn("re-used", out[3].status.message)

    def test_oversized_request(self) -> None:
        self.transport.clear()
        self.proto.dataReceived(HEADER.pack(MAX_MESSAGE_LENGTH + 1, 1, 1, 0))
        self.proto.dataReceived(b"\0" * (MAX_MESSAGE_LENGTH + 1))
        out = self.send(request_frame(3, "test.Echo", "Echo", KV(key="k").SerializeToString()))
        self.assertEqual(len(out), 1)  # the second call is still served
        self.assertFalse(self.transport.disconnecting)

    def test_oversized_answer(self) -> None:
        self.proto.dataReceived(HEADER.pack(MAX_MESSAGE_LENGTH + 1, 1, 1, 0))
        out = responses(self.transport.value())
        self.assertEqual(out[1].status.code, Code.RESOURCE_EXHAUSTED)

    def test_completion_order(self) -> None:
        self.send(request_frame(1, "test.Echo", "Echo", KV(key="wait", value="A").SerializeToString())
                  + request_frame(3, "test.Echo", "Echo", KV(key="wait", value="B").SerializeToString()))
        self.assertEqual(self.server.in_flight, 2)
        self.transport.clear()
        self.pending["B"].callback(None)
        self.pending["A"].callback(None)
        frames = list(FrameDecoder().feed(self.transport.value()))
        self.assertEqual([f.stream_id for f in frames if isinstance(f, Frame)], [3, 1])

    def test_deadline_cancels_handler(self) -> None:
        self.send(request_frame(1, "test.Echo", "Echo", KV(key="wait", value="A").SerializeToString(),
                                timeout_nano=2_000_000_000))
        self.assertEqual(self.seen[0].deadline, 2.0)
        self.assertEqual(self.seen[0].remaining(), 2.0)
        self.transport.clear()
        self.clock.advance(1.9)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(0.2)
        out = responses(self.transport.value())
        self.assertEqual(out[1].status.code, Code.DEADLINE_EXCEEDED)
        self.assertEqual(self.cancelled, ["A"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_lost_cancels(self) -> None:
        self.send(request_frame(1, "test.Echo", "Echo", KV(key="wait", value="A").SerializeToString(),
                                timeout_nano=10**9))
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.cancelled, ["A"])
        self.assertEqual(self.server.in_flight, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_garbage_closes_connection_with_log(self) -> None:
        logs = EventLoggingObserver()
        globalLogPublisher.addObserver(logs)
        self.addCleanup(globalLogPublisher.removeObserver, logs)
        self.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len([e for e in logs if "malformed" in e.get("log_format", "")]), 1)

    def test_graceful_stop_waits_for_in_flight(self) -> None:
        self.send(request_frame(1, "test.Echo", "Echo", KV(key="wait", value="A").SerializeToString()))
        stopped = Deferred.fromCoroutine(self.server.stop(timeout=5))
        self.assertNoResult(stopped)
        self.pending["A"].callback(None)
        self.successResultOf(stopped)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(responses(self.transport.value())[1].payload, KV(key="A", value="wait").SerializeToString())

    def test_graceful_stop_bounded(self) -> None:
        self.send(request_frame(1, "test.Echo", "Echo", KV(key="wait", value="A").SerializeToString()))
        stopped = Deferred.fromCoroutine(self.server.stop(timeout=5))
        self.clock.advance(5)
        self.successResultOf(stopped)
        self.assertEqual(self.cancelled, ["A"])


class ClientServerTests(EchoServerMixin, SynchronousTestCase):
    def setUp(self) -> None:
        server = self.make_server()
        self.server = server

        self.client, self.sproto, self.pump = connectedServerAndClient(
            lambda: server.factory().buildProtocol(None), lambda: TTRPCClient(self.clock))

    def call(self, key: str, value: str = "", timeout: float | None = None) -> Deferred[KV]:
        return Deferred.fromCoroutine(self.client.call("test.Echo", "Echo", KV(key=key, value=value), KV,
                                                       timeout=timeout, metadata=[("m", "v")]))

    def test_round_trip(self) -> None:
        d = self.call("a", "b")
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), KV(key="b", value="a"))
        self.assertEqual(self.seen[0].metadata, [("m", "v")])

    def test_multiplexed_ids(self) -> None:
        ds = [self.call("wait", str(i)) for i in range(5)]
        self.pump.flush()
        self.assertEqual([c.stream_id for c in self.seen], [1, 3, 5, 7, 9])
        for i in reversed(range(5)):
            self.pending[str(i)].callback(None)
        self.pump.flush()
        self.assertEqual([self.successResultOf(d).key for d in ds], [str(i) for i in range(5)])

    def test_status_error(self) -> None:
        d = self.call("fail", "x")
        self.pump.flush()
        err = self.failureResultOf(d, TTRPCError).value
        self.assertEqual((err.code, err.message), (Code.NOT_FOUND, "no x"))

    def test_deadline_local_and_sent(self) -> None:
        d = self.call("wait", "slow", timeout=3)
        self.pump.flush()
        self.assertEqual(self.seen[0].deadline, 3.0)
        self.clock.advance(3)
        self.pump.flush()
        self.assertEqual(self.failureResultOf(d, TTRPCError).value.code, Code.DEADLINE_EXCEEDED)
        self.assertEqual(self.client.in_flight, 0)

    def test_connection_lost_fails_pending(self) -> None:
        d = self.call("wait", "x")
        self.pump.flush()
        closed = self.client.when_closed()
        sproto = cast(ServerProtocol, self.sproto)
        assert sproto.transport is not None
        sproto.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(self.failureResultOf(d, TTRPCError).value.code, Code.UNAVAILABLE)
        self.successResultOf(closed)
        later = self.call("a")
        self.assertEqual(self.failureResultOf(later, TTRPCError).value.code, Code.UNAVAILABLE)

    def test_raw_call_and_relay(self) -> None:
        # A second server relays everything to the first through this client.
        front = Server(self.clock, name="front")
        observed: list[tuple[str, int]] = []

        async def intercept(ctx: CallContext, payload: bytes) -> bytes:
            req = KV.FromString(payload)
            return KV(key=req.key, value=req.value.upper()).SerializeToString()

        relay = Relay(lambda: self.client, self.clock,
                      interceptors={("test.Echo", "Echo"): intercept},
                      observer=lambda ctx, i, o, code: observed.append((ctx.method, code)))
        front.register_fallback(relay.handle)
        proto = server_protocol(front)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(request_frame(1, "test.Echo", "Echo", KV(key="k", value="abc").SerializeToString(),
                                         timeout_nano=5 * 10**9, metadata=[("trace", "1")]))
        self.pump.flush()
        self.assertEqual(self.seen[0].metadata, [("trace", "1")])
        self.assertEqual(self.seen[0].deadline, 5.0)
        out = responses(transport.value())
        self.assertEqual(KV.FromString(out[1].payload), KV(key="ABC", value="k"))
        proto.dataReceived(request_frame(3, "test.Echo", "Echo", KV(key="fail", value="z").SerializeToString()))
        self.pump.flush()
        out = responses(transport.value())
        self.assertEqual((out[3].status.code, out[3].status.message), (Code.NOT_FOUND, "no Z"))
        proto.dataReceived(request_frame(5, "other.Svc", "Any"))
        self.pump.flush()
        self.assertEqual(responses(transport.value())[5].status.code, Code.UNIMPLEMENTED)
        self.assertEqual(observed, [("Echo", Code.OK), ("Echo", Code.NOT_FOUND), ("Any", Code.UNIMPLEMENTED)])

    def test_status_message_proto(self) -> None:
        # google.rpc.Status field numbers: code=1, message=2.
        self.assertEqual(status_pb2.Status(code=5, message="x").SerializeToString(), b"\x08\x05\x12\x01x")
