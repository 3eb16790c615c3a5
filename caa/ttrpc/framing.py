"""ttrpc framing: a 10-byte big-endian header (length, stream id, type, flags) and its payload.

The decoder is incremental and never buffers more than one frame's payload: an oversized frame's payload
is skipped as it arrives, and the caller learns its stream id so it can answer ResourceExhausted there.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import attrs

HEADER = struct.Struct(">IIBB")
HEADER_LENGTH = HEADER.size  # 10
MAX_MESSAGE_LENGTH = 4 << 20

TYPE_REQUEST = 0x01
TYPE_RESPONSE = 0x02
TYPE_DATA = 0x03

FLAG_REMOTE_CLOSED = 0x01
FLAG_REMOTE_OPEN = 0x02
FLAG_NO_DATA = 0x04


@attrs.frozen
class Frame:
    stream_id: int
    type: int
    flags: int
    data: bytes


@attrs.frozen
class OversizedFrame:
    """A frame whose declared length exceeds the limit; its payload was discarded."""

    stream_id: int
    type: int
    flags: int
    length: int


class FrameTooLarge(ValueError):
    pass


def encode_frame(stream_id: int, type_: int, flags: int, data: bytes) -> bytes:
    if len(data) > MAX_MESSAGE_LENGTH:
        raise FrameTooLarge(
            f"message length {len(data)} exceed maximum message size of {MAX_MESSAGE_LENGTH}"
        )
    return HEADER.pack(len(data), stream_id, type_, flags) + data


class FrameDecoder:
    """Feed bytes in any split; iterate complete frames (or OversizedFrame markers) out."""

    def __init__(self, max_length: int = MAX_MESSAGE_LENGTH) -> None:
        self._max = max_length
        self._buf = bytearray()
        self._skip = 0  # payload bytes of an oversized frame still to discard

    def feed(self, data: bytes) -> Iterator[Frame | OversizedFrame]:
        # With nothing buffered, parse straight out of `data` (one copy per frame); keep only the tail.
        if self._buf:
            self._buf += data
            buf: bytes | bytearray = self._buf
        else:
            buf = data
        pos = 0
        end = len(buf)
        try:
            while True:
                if self._skip:
                    n = min(self._skip, end - pos)
                    pos += n
                    self._skip -= n
                    if self._skip:
                        return
                if end - pos < HEADER_LENGTH:
                    return
                length, stream_id, type_, flags = HEADER.unpack_from(buf, pos)
                if length > self._max:
                    pos += HEADER_LENGTH
                    self._skip = length
                    yield OversizedFrame(stream_id, type_, flags, length)
                    continue
                if end - pos - HEADER_LENGTH < length:
                    return
                start = pos + HEADER_LENGTH
                pos = start + length
                if buf is data:
                    payload = data[start:pos]
                else:
                    with memoryview(buf) as view:
                        payload = bytes(view[start:pos])
                yield Frame(stream_id, type_, flags, payload)
        finally:
            if buf is data:
                self._buf = bytearray(data[pos:]) if pos < end else bytearray()
            else:
                del self._buf[:pos]

    @property
    def buffered(self) -> int:
        return len(self._buf)
