"""Property tests for the ttrpc framer and for a real server fed garbage (hypothesis).

- FrameDecoder: any byte stream, split anywhere, decodes to the same frames as fed in one piece.
- Frames round-trip through encode_frame / FrameDecoder.
- A real caa.ttrpc.Server on a unix socket: random garbage or a hostile header on one connection closes only
  that connection (with exactly one log line when it is malformed), while a second connection keeps being
  served. The hypothesis loop runs in a thread with blocking sockets; the server runs in the reactor.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import provider

from caa.proto import ttrpc_pb2
from caa.reactors import as_node_reactor
from caa.ttrpc import CallContext, Server
from caa.ttrpc.endpoints import unix_server_endpoint
from caa.ttrpc.framing import (
    HEADER,
    MAX_MESSAGE_LENGTH,
    TYPE_DATA,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    OversizedFrame,
    encode_frame,
)

reactor = as_node_reactor(_reactor)

FAST = settings(max_examples=150, deadline=None)
SOCKET = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

frames = st.builds(
    Frame,
    stream_id=st.integers(0, 2**32 - 1),
    type=st.integers(0, 255),
    flags=st.integers(0, 255),
    data=st.binary(max_size=300),
)


def _decode_in_pieces(data: bytes, cuts: list[int], max_length: int = MAX_MESSAGE_LENGTH) -> tuple[list[Any], int]:
    decoder = FrameDecoder(max_length)
    out: list[Any] = []
    start = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        out.extend(decoder.feed(data[start:cut]))
        start = cut
    return out, decoder.buffered


class FrameDecoderProperties(SynchronousTestCase):
    @FAST
    @given(st.lists(frames, max_size=8), st.lists(st.integers(0, 10_000), max_size=20))
    def test_any_split_gives_the_same_frames(self, items: list[Frame], cuts: list[int]) -> None:
        data = b"".join(encode_frame(f.stream_id, f.type, f.flags, f.data) for f in items)
        whole, rest = _decode_in_pieces(data, [])
        self.assertEqual(whole, items)
        self.assertEqual(rest, 0)
        split, rest = _decode_in_pieces(data, cuts)
        self.assertEqual(split, items)
        self.assertEqual(rest, 0)

    @FAST
    @given(st.binary(max_size=600), st.lists(st.integers(0, 10_000), max_size=20))
    def test_garbage_split_anywhere_decodes_the_same(self, data: bytes, cuts: list[int]) -> None:
        """Arbitrary bytes (a small limit makes oversized frames common): same frames, markers and leftover."""
        whole = _decode_in_pieces(data, [], max_length=64)
        split = _decode_in_pieces(data, cuts, max_length=64)
        self.assertEqual(split, whole)
        for item in whole[0]:
            if isinstance(item, Frame):
                self.assertLessEqual(len(item.data), 64)
            else:
                self.assertIsInstance(item, OversizedFrame)
                self.assertGreater(item.length, 64)

    @FAST
    @given(frames)
    def test_round_trip(self, frame: Frame) -> None:
        wire = encode_frame(frame.stream_id, frame.type, frame.flags, frame.data)
        self.assertEqual(len(wire), 10 + len(frame.data))
        self.assertEqual(HEADER.unpack_from(wire), (len(frame.data), frame.stream_id, frame.type, frame.flags))
        self.assertEqual(list(FrameDecoder().feed(wire)), [frame])

    def test_oversized_frame_is_refused_on_send_and_skipped_on_receive(self) -> None:
        self.assertRaises(FrameTooLarge, encode_frame, 1, TYPE_REQUEST, 0, b"x" * (MAX_MESSAGE_LENGTH + 1))
        decoder = FrameDecoder()
        big = HEADER.pack(MAX_MESSAGE_LENGTH + 1, 7, TYPE_REQUEST, 0)
        self.assertEqual(list(decoder.feed(big)), [OversizedFrame(7, TYPE_REQUEST, 0, MAX_MESSAGE_LENGTH + 1)])
        self.assertEqual(list(decoder.feed(b"\0" * MAX_MESSAGE_LENGTH)), [])
        self.assertEqual(list(decoder.feed(b"\0" + encode_frame(9, TYPE_REQUEST, 0, b"ok"))),
                         [Frame(9, TYPE_REQUEST, 0, b"ok")])
        self.assertEqual(decoder.buffered, 0)


# ---- a real server fed garbage

def _request(stream_id: int, payload: bytes) -> bytes:
    body = ttrpc_pb2.Request(service="fuzz.Echo", method="Echo", payload=payload).SerializeToString()
    return encode_frame(stream_id, TYPE_REQUEST, 0, body)


def _read_frame(sock: socket.socket) -> tuple[int, int, int, bytes]:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    length, sid, type_, flags = HEADER.unpack(exactly(10))
    return sid, type_, flags, exactly(length)


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


# Frames the server must treat as a broken stream: unknown type, stream 0, a Response or stray Data sent to a
# server (all complete, so the server sees them whole), or just a header with an absurd length.
def _whole(sid: int, type_: int, flags: int, data: bytes) -> bytes:
    return HEADER.pack(len(data), sid, type_, flags) + data


_sids = st.integers(1, 2**32 - 1)
_data = st.binary(max_size=64)
hostile_frames = st.one_of(
    st.builds(_whole, _sids, st.integers(4, 255), st.integers(0, 255), _data),
    st.builds(_whole, st.just(0), st.sampled_from([TYPE_REQUEST, TYPE_RESPONSE, TYPE_DATA]), st.just(0), _data),
    st.builds(_whole, _sids, st.just(TYPE_RESPONSE), st.integers(0, 255), _data),
    st.builds(_whole, _sids, st.just(TYPE_DATA), st.integers(0, 255), _data),
    st.builds(lambda n, s: HEADER.pack(n, s, TYPE_REQUEST, 0), st.integers(16 * MAX_MESSAGE_LENGTH + 1, 2**32 - 1),
              _sids),
)


class HostileInputOnRealServerTests(TestCase):
    async def _serve(self) -> str:
        server = Server(reactor, name="fuzz")

        async def echo(ctx: CallContext, service: str, method: str, payload: bytes) -> bytes:
            return payload

        server.register_fallback(echo)
        base = f"/tmp/caa-fuzz-{os.getpid()}-{id(self)}"
        path = os.path.join(base, "s.sock")
        port = await unix_server_endpoint(reactor, path).listen(server.factory())

        def remove() -> None:
            if os.path.exists(path):
                os.unlink(path)
            if os.path.isdir(base):
                os.rmdir(base)

        self.addCleanup(remove)
        self.addCleanup(port.stopListening)
        self.addCleanup(server.abort)
        self.malformed: list[LogEvent] = []
        lock = threading.Lock()

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if event.get("server") == "fuzz" and "malformed" in event.get("log_format", ""):
                with lock:
                    self.malformed.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return path

    def _connect(self, path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(path)
        return sock

    def _good_client_survives(self, path: str, attack: Any) -> None:
        """Run `attack(bad_socket)` for each example while one good connection keeps making calls."""
        good = self._connect(path)
        counter = iter(range(1, 2**31, 2))
        try:
            def call(payload: bytes) -> None:
                sid = next(counter)
                good.sendall(_request(sid, payload))
                self.assertEqual(_read_frame(good)[:3], (sid, TYPE_RESPONSE, 0))

            call(b"before")
            attack(call)
        finally:
            good.close()

    async def test_hostile_frame_closes_only_that_connection_with_one_log_line(self) -> None:
        path = await self._serve()
        examples = []

        def attack(call: Any) -> None:
            @SOCKET
            @given(hostile_frames)
            def one(frame: bytes) -> None:
                examples.append(frame)
                before = len(self.malformed)
                bad = self._connect(path)
                try:
                    bad.sendall(frame)
                    _read_until_closed(bad)  # the server closes it; no half-close from us
                finally:
                    bad.close()
                self.assertEqual(len(self.malformed), before + 1)
                call(b"after " + frame[:10])

            one()

        await deferToThread(self._good_client_survives, path, attack)
        self.assertGreater(len(examples), 10)
        self.assertEqual(len(self.malformed), len(examples))
        self.assertIn("why", self.malformed[0])

    async def test_random_garbage_never_hurts_the_other_connection(self) -> None:
        """Whatever the bytes, the bad connection ends (closed by the server or by our half-close after
        possibly some responses), with at most one log line, and the good one is served throughout."""
        path = await self._serve()

        def attack(call: Any) -> None:
            @SOCKET
            @given(st.binary(min_size=1, max_size=400))
            def one(garbage: bytes) -> None:
                before = len(self.malformed)
                bad = self._connect(path)
                try:
                    bad.sendall(garbage)
                    try:
                        bad.shutdown(socket.SHUT_WR)
                    except OSError:  # already closed by the server
                        pass
                    _read_until_closed(bad)
                except (ConnectionResetError, BrokenPipeError):
                    pass
                finally:
                    bad.close()
                self.assertLessEqual(len(self.malformed), before + 1)
                call(b"after garbage")

            one()

        await deferToThread(self._good_client_survives, path, attack)

    async def test_oversized_request_is_answered_and_the_connection_stays(self) -> None:
        """4 MiB < length <= 64 MiB: the payload is discarded and that stream gets ResourceExhausted."""
        path = await self._serve()

        def run() -> tuple[Any, ...]:
            sock = self._connect(path)
            try:
                length = MAX_MESSAGE_LENGTH + 5
                sock.sendall(HEADER.pack(length, 1, TYPE_REQUEST, 0) + b"\0" * length)
                sid, type_, _, body = _read_frame(sock)
                resp = ttrpc_pb2.Response.FromString(body)
                sock.sendall(_request(3, b"next"))
                after = _read_frame(sock)
                return sid, type_, resp.status.code, resp.status.message, after[0], \
                    ttrpc_pb2.Response.FromString(after[3]).payload
            finally:
                sock.close()

        sid, type_, code, message, next_sid, payload = await deferToThread(run)
        self.assertEqual((sid, type_, code), (1, TYPE_RESPONSE, 8))
        self.assertEqual(message, f"message length {MAX_MESSAGE_LENGTH + 5} exceed maximum message size of "
                                  f"{MAX_MESSAGE_LENGTH}")
        self.assertEqual((next_sid, payload), (3, b"next"))
        self.assertEqual(self.malformed, [])

