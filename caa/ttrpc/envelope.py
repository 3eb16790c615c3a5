"""Encoding of the ttrpc Request/Response envelopes (caa.proto.ttrpc_pb2) and status mapping."""

from __future__ import annotations

from collections.abc import Iterable

from caa.proto import ttrpc_pb2
from caa.proto.google.rpc import status_pb2

from .status import Code, TTRPCError

Metadata = list[tuple[str, str]]


def encode_request(
    service: str, method: str, payload: bytes, timeout_nano: int, metadata: Iterable[tuple[str, str]]
) -> bytes:
    req = ttrpc_pb2.Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano)
    for key, value in metadata:
        req.metadata.add(key=key, value=value)
    return req.SerializeToString()


def decode_request(data: bytes) -> ttrpc_pb2.Request:
    req = ttrpc_pb2.Request()
    req.ParseFromString(data)
    return req


def encode_ok(payload: bytes) -> bytes:
    return ttrpc_pb2.Response(payload=payload).SerializeToString()


def ok_prefix(payload_length: int) -> bytes:
    """The bytes of an OK `Response` that precede its payload (field 2, length-delimited).

    Lets a server write a large payload without copying it into a new envelope; an empty payload is an
    empty message, as protobuf encodes it."""
    if payload_length == 0:
        return b""
    out = bytearray(b"\x12")
    n = payload_length
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_error(code: int, message: str) -> bytes:
    return ttrpc_pb2.Response(status=status_pb2.Status(code=code, message=message)).SerializeToString()


def decode_response(data: bytes) -> bytes:
    """Return the payload of an OK response, or raise the TTRPCError it carries."""
    resp = ttrpc_pb2.Response()
    resp.ParseFromString(data)
    if resp.HasField("status") and resp.status.code != Code.OK:
        raise TTRPCError(resp.status.code, resp.status.message)
    return resp.payload
