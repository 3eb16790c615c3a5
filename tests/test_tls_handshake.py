"""caa.tls over real loopback sockets: upstream's auto-mode topology (CA-issued server certificate, the
adaptor's self-signed client certificate as the forwarder's only trust anchor) and the refusals."""

from __future__ import annotations

import datetime
from typing import Any, cast

from twisted.internet import defer, endpoints, protocol
from twisted.internet import reactor as _reactor
from twisted.internet import ssl as tssl
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from caa import tls
from caa.reactors import as_node_reactor

reactor = as_node_reactor(_reactor)


class _Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class _Client(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"ping")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received == b"ping":
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.done.called:
            self.done.callback(self.received)


def _old(days: int) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days)


class HandshakeTests(TestCase):
    def setUp(self) -> None:
        self.ca = tls.CertificateAuthority.create()
        self.server = self.ca.issue_server_certificate("podvm-test-1")
        self.client = tls.make_client_certificate()
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)  # any callable of an event is a log observer
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    async def _listen(self, factory: Any) -> int:
        ep = endpoints.SSL4ServerEndpoint(reactor, 0, factory, interface="127.0.0.1")
        port = await ep.listen(protocol.Factory.forProtocol(_Echo))
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def _exchange(self, port: int, creator: Any) -> bytes:
        ep = endpoints.wrapClientTLS(creator, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        proto = _Client()
        await ep.connect(protocol.Factory.forProtocol(lambda: proto))
        return await proto.done

    def _refusals(self) -> list[str]:
        return [e.get("log_format", "") for e in self.events
                if "refused" in e.get("log_format", "")]

    async def test_auto_mode_mutual_tls(self) -> None:
        """The exact upstream topology: server trusts the client certificate itself."""
        port = await self._listen(
            tls.server_context_factory(self.server.cert_pem, self.server.key_pem, self.client.cert_pem))
        got = await self._exchange(port, tls.client_creator(
            self.ca.cert_pem, self.client.cert_pem, self.client.key_pem, "podvm-test-1"))
        self.assertEqual(got, b"ping")
        self.assertEqual(self._refusals(), [])

    async def test_tls13(self) -> None:
        port = await self._listen(tls.server_context_factory(
            self.server.cert_pem, self.server.key_pem, self.client.cert_pem, "VersionTLS13"))
        got = await self._exchange(port, tls.client_creator(
            self.ca.cert_pem, self.client.cert_pem, self.client.key_pem, "podvm-test-1", "VersionTLS13"))
        self.assertEqual(got, b"ping")

    async def test_tls12_with_cipher_suites(self) -> None:
        suites = ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"]
        port = await self._listen(tls.server_context_factory(
            self.server.cert_pem, self.server.key_pem, self.client.cert_pem, "VersionTLS12", suites))
        got = await self._exchange(port, tls.client_creator(
            self.ca.cert_pem, self.client.cert_pem, self.client.key_pem, "podvm-test-1"))
        self.assertEqual(got, b"ping")

    async def test_server_only_tls_without_ca(self) -> None:
        port = await self._listen(tls.server_context_factory(self.server.cert_pem, self.server.key_pem))
        got = await self._exchange(port, tls.client_creator(self.ca.cert_pem, None, None, "podvm-test-1"))
        self.assertEqual(got, b"ping")

    async def test_no_client_certificate_refused(self) -> None:
        port = await self._listen(
            tls.server_context_factory(self.server.cert_pem, self.server.key_pem, self.client.cert_pem))
        got = await self._exchange(port, tls.client_creator(self.ca.cert_pem, None, None, "podvm-test-1"))
        self.assertEqual(got, b"")
        self.assertTrue(self._refusals())

    async def test_wrong_client_certificate_refused(self) -> None:
        other = tls.make_client_certificate()
        port = await self._listen(
            tls.server_context_factory(self.server.cert_pem, self.server.key_pem, self.client.cert_pem))
        got = await self._exchange(port, tls.client_creator(
            self.ca.cert_pem, other.cert_pem, other.key_pem, "podvm-test-1"))
        self.assertEqual(got, b"")
        self.assertTrue(any("refused client certificate" in f for f in self._refusals()))
        # The reason is OpenSSL's verdict in words: a self-signed certificate that is not the trust anchor.
        refused = [(e["errno"], e["reason"], e["depth"]) for e in self.events if "errno" in e]
        self.assertIn((18, "self-signed certificate", 0), refused)

    async def test_expired_client_certificate_refused(self) -> None:
        expired = tls.make_client_certificate(now=_old(10), validity=datetime.timedelta(days=1))
        port = await self._listen(
            tls.server_context_factory(self.server.cert_pem, self.server.key_pem, expired.cert_pem))
        got = await self._exchange(port, tls.client_creator(
            self.ca.cert_pem, expired.cert_pem, expired.key_pem, "podvm-test-1"))
        self.assertEqual(got, b"")
        reasons = [e.get("reason", "") for e in self.events if "reason" in e]
        self.assertTrue(any("expired" in r for r in reasons), reasons)

    async def test_wrong_server_name_refused_by_client(self) -> None:
        port = await self._listen(
            tls.server_context_factory(self.server.cert_pem, self.server.key_pem, self.client.cert_pem))
        got = await self._exchange(port, tls.client_creator(
            self.ca.cert_pem, self.client.cert_pem, self.client.key_pem, "podvm-other"))
        self.assertEqual(got, b"")

    async def test_server_from_other_ca_refused_by_client(self) -> None:
        other_ca = tls.CertificateAuthority.create()
        port = await self._listen(
            tls.server_context_factory(self.server.cert_pem, self.server.key_pem, self.client.cert_pem))
        got = await self._exchange(port, tls.client_creator(
            other_ca.cert_pem, self.client.cert_pem, self.client.key_pem, "podvm-test-1"))
        self.assertEqual(got, b"")

    async def test_tls13_server_refuses_tls12_only_client(self) -> None:
        port = await self._listen(tls.server_context_factory(
            self.server.cert_pem, self.server.key_pem, self.client.cert_pem, "VersionTLS13"))
        ctx_opts = tssl.optionsForClientTLS(
            "podvm-test-1", trustRoot=tssl.Certificate.loadPEM(self.ca.cert_pem),
            clientCertificate=tssl.PrivateCertificate.loadPEM(self.client.cert_pem + self.client.key_pem),
            extraCertificateOptions={"lowerMaximumSecurityTo": tssl.TLSVersion.TLSv1_2})
        got = await self._exchange(port, ctx_opts)
        self.assertEqual(got, b"")
