"""caa.ttrpc over real unix and TCP sockets with the real reactor."""

from __future__ import annotations

import os
import socket
import stat

from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from caa.proto import ttrpc_pb2
from caa.reactors import as_node_reactor
from caa.ttrpc import CallContext, Code, Server, TTRPCError, connect
from caa.ttrpc.endpoints import (
    tcp_client_endpoint,
    tcp_server_endpoint,
    unix_client_endpoint,
    unix_server_endpoint,
)

reactor = as_node_reactor(_reactor)

KV = ttrpc_pb2.KeyValue


def tcp_port(port: IListeningPort) -> int:
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


def echo_server() -> Server:
    server = Server(reactor, name="sockets-test")

    async def echo(ctx: CallContext, req: ttrpc_pb2.KeyValue) -> ttrpc_pb2.KeyValue:
        if req.key == "sleep":
            await deferLater(reactor, float(req.value))
        return KV(key=req.value, value=req.key)

    server.register("test.Echo", {"Echo": (KV, echo)})
    return server


class UnixSocketTests(TestCase):
    async def _listen(self, mode: int = 0o600) -> str:
        path = os.path.join(self.mktemp(), "sub", "test.sock")
        self.server = echo_server()
        port = await unix_server_endpoint(reactor, path, mode=mode).listen(self.server.factory())
        self.addCleanup(port.stopListening)
        self.addCleanup(self.server.abort)
        return path

    async def test_mode_and_round_trip(self) -> None:
        path = await self._listen(mode=0o600)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        client = await connect(unix_client_endpoint(reactor, path), reactor)
        self.addCleanup(client.close)
        replies = await gatherResults([
            Deferred.fromCoroutine(client.call("test.Echo", "Echo", KV(key=str(i), value="v"), KV))
            for i in range(50)
        ])
        self.assertEqual([r.value for r in replies], [str(i) for i in range(50)])

    async def test_stale_socket_is_replaced(self) -> None:
        path = os.path.join(self.mktemp(), "stale.sock")
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            f.write("stale")
        self.server = echo_server()
        port = await unix_server_endpoint(reactor, path).listen(self.server.factory())
        self.addCleanup(port.stopListening)
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode))

    async def test_garbage_connection_does_not_hurt_others(self) -> None:
        path = await self._listen()
        good = await connect(unix_client_endpoint(reactor, path), reactor)
        self.addCleanup(good.close)
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(bad.close)
        bad.connect(path)
        bad.sendall(b"\x00\x00\x00\x05\x00\x00\x00\x01\x09\x00" + os.urandom(64))  # frame type 9
        bad.settimeout(5)
        await deferLater(reactor, 0.2)
        # The server closed the garbage connection ...
        self.assertEqual(await deferToThreadRecv(bad), b"")
        # ... and keeps serving the other one.
        reply = await good.call("test.Echo", "Echo", KV(key="still", value="here"), KV)
        self.assertEqual(reply.value, "still")

    async def test_deadline_over_socket(self) -> None:
        path = await self._listen()
        client = await connect(unix_client_endpoint(reactor, path), reactor)
        self.addCleanup(client.close)
        with self.assertRaises(TTRPCError) as cm:
            await client.call("test.Echo", "Echo", KV(key="sleep", value="5"), KV, timeout=0.2)
        self.assertEqual(cm.exception.code, Code.DEADLINE_EXCEEDED)


async def deferToThreadRecv(sock: socket.socket) -> bytes:
    from twisted.internet.threads import deferToThread

    def recv_all() -> bytes:
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data
            data += chunk

    return await deferToThread(recv_all)


class TCPTests(TestCase):
    async def test_tcp_round_trip_large(self) -> None:
        server = echo_server()
        port = await tcp_server_endpoint(reactor, 0, interface="127.0.0.1").listen(server.factory())
        self.addCleanup(port.stopListening)
        self.addCleanup(server.abort)
        client = await connect(tcp_client_endpoint(reactor, "127.0.0.1", tcp_port(port)), reactor)
        self.addCleanup(client.close)
        big = "x" * (1 << 20)
        reply = await client.call("test.Echo", "Echo", KV(key=big, value="k"), KV)
        self.assertEqual(reply.value, big)
        with self.assertRaises(TTRPCError) as cm:
            await client.call("test.Echo", "Echo", KV(key="y" * (5 << 20)), KV)
        self.assertEqual(cm.exception.code, Code.RESOURCE_EXHAUSTED)


class MutualTLSTests(TestCase):
    """ttrpc inside mutual TLS with certificates from caa.tls, as the adaptor and forwarder use it."""

    async def test_mtls_round_trip_and_refusal(self) -> None:
        from caa import tls
        from caa.ttrpc.endpoints import tls_client_endpoint, tls_server_endpoint

        ca = tls.CertificateAuthority.create()
        server_pair = ca.issue_server_certificate("podvm-test-12345678")
        client_pair = tls.make_client_certificate()
        server = echo_server()
        factory = tls.server_context_factory(server_pair.cert_pem, server_pair.key_pem,
                                             client_ca_pem=client_pair.cert_pem, min_version="VersionTLS13")
        port = await tls_server_endpoint(reactor, 0, "127.0.0.1", factory).listen(server.factory())
        self.addCleanup(port.stopListening)
        self.addCleanup(server.abort)
        portno = tcp_port(port)

        creator = tls.client_creator(ca.cert_pem, client_pair.cert_pem, client_pair.key_pem, "podvm-test-12345678")
        client = await connect(tls_client_endpoint(reactor, "127.0.0.1", portno, creator), reactor)
        self.addCleanup(client.close)
        reply = await client.call("test.Echo", "Echo", KV(key="over", value="tls"), KV, timeout=5)
        self.assertEqual(reply.value, "over")

        # Without a client certificate the server refuses the handshake: the call cannot succeed.
        anonymous = tls.client_creator(ca.cert_pem, None, None, "podvm-test-12345678")
        other = await connect(tls_client_endpoint(reactor, "127.0.0.1", portno, anonymous), reactor)
        self.addCleanup(other.close)
        with self.assertRaises(TTRPCError) as cm:
            await other.call("test.Echo", "Echo", KV(key="no", value="cert"), KV, timeout=5)
        self.assertIn(cm.exception.code, (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED))
        self.flushLoggedErrors()
