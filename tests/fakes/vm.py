"""A fake pod VM for process-level adaptor tests: `python -m tests.fakes.vm IP PORT [BOOT_DELAY]`.

Stands for a pod VM's agent-protocol-forwarder + kata-agent: a TCP ttrpc server on IP:PORT
(mutual TLS with the per-VM certificate when the user data's apf.json carries one) answering grpc.Health/Check
(SERVING) and grpc.Health/Version, and echoing every other method's payload.
Deliberately dependency-free (asyncio, hand-coded protobuf) so fifty of them start quickly; the frame and
envelope layout is containerd ttrpc's (10-byte header; Request{service=1, method=2, payload=3},
Response{status=1, payload=2}; protos/ttrpc.proto).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import struct
import sys
import time

REQUEST, RESPONSE = 1, 2


def _varint(b: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        c = b[i]
        i += 1
        result |= (c & 0x7F) << shift
        if not c & 0x80:
            return result, i
        shift += 7


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        c = n & 0x7F
        n >>= 7
        if n:
            out.append(c | 0x80)
        else:
            out.append(c)
            return bytes(out)


def _fields(b: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            _, i = _varint(b, i)
        elif wt == 2:
            n, i = _varint(b, i)
            out[num] = b[i:i + n]
            i += n
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        else:
            raise ValueError("bad wire type")
    return out


def _bytes_field(num: int, value: bytes) -> bytes:
    return _enc_varint(num << 3 | 2) + _enc_varint(len(value)) + value


RESPONSE_PAYLOAD_FIELD = 2  # ttrpc.Response: Status status = 1; bytes payload = 2


def answer(service: str, method: str, payload: bytes) -> bytes:
    if (service, method) == ("grpc.Health", "Check"):
        return b"\x08\x01"  # HealthCheckResponse{status: SERVING}
    if (service, method) == ("grpc.Health", "Version"):
        return _bytes_field(1, b"fake") + _bytes_field(2, b"fake-vm")
    return payload


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            header = await reader.readexactly(10)
            length, stream_id, mtype, _flags = struct.unpack(">IIBB", header)
            data = await reader.readexactly(length)
            if mtype != REQUEST:
                continue
            f = _fields(data)
            out = answer(f.get(1, b"").decode(), f.get(2, b"").decode(), f.get(3, b""))
            body = _bytes_field(RESPONSE_PAYLOAD_FIELD, out) if out else b""
            writer.write(struct.pack(">IIBB", len(body), stream_id, RESPONSE, 0) + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


def apf_from_user_data(path: str) -> dict[str, object]:
    """The apf.json document from the cloud-config the adaptor wrote (as process-user-data would)."""
    import json

    lines = open(path).read().split("\n")
    start = lines.index("  - path: /run/peerpod/apf.json") + 2
    body = []
    for line in lines[start:]:
        if not line.startswith("      "):
            break
        body.append(line[6:])
    return json.loads("\n".join(body))  # type: ignore[no-any-return]


def tls_context(apf: dict[str, object]) -> ssl.SSLContext | None:
    """mTLS like the forwarder: the per-VM certificate, client certificates verified against tls-client-ca."""
    if not apf.get("tls-server-cert"):
        return None
    import tempfile

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as d:
        cert, key = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
        open(cert, "w").write(str(apf["tls-server-cert"]))
        open(key, "w").write(str(apf["tls-server-key"]))
        ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cadata=str(apf["tls-client-ca"]))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def main(ip: str, port: int, ctx: ssl.SSLContext | None = None) -> None:
    server = await asyncio.start_server(serve, ip, port, reuse_address=True, ssl=ctx)
    print(f"fake vm listening on {ip}:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) > 3 and float(sys.argv[3]):
        time.sleep(float(sys.argv[3]))  # the "VM" boots: nothing listens yet
    context = tls_context(apf_from_user_data(sys.argv[4])) if len(sys.argv) > 4 else None
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), context))
