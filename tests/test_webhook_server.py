"""caa.webhook.server and certs: the resources through StubTreq (synchronous), then the real HTTPS
service on 127.0.0.1 with a real TLS client trusting the test CA, certificate rotation, the probe port."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import treq
from OpenSSL import SSL
from treq.testing import StubTreq
from twisted.internet import reactor as global_reactor
from twisted.internet import ssl as tssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString, wrapClientTLS
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IHandshakeListener, IListeningPort, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from zope.interface import implementer

from caa.tls import CertificateAuthority, TLSConfigError
from caa.webhook.certs import ReloadingServerTLS
from caa.webhook.mutation import CPU_ANNOTATION, MutationConfig
from caa.webhook.server import (
    WebhookMetrics,
    WebhookService,
    listen_webhook,
    probe_site,
    start_webhook,
    webhook_site,
)

reactor: Any = global_reactor


def review_body(runtime_class: str = "kata-remote") -> bytes:
    pod = {"metadata": {"name": "p"}, "spec": {"runtimeClassName": runtime_class, "containers": [
        {"name": "c", "resources": {"requests": {"cpu": "1500m"}}}]}}
    return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                       "request": {"uid": "uid-1", "object": pod}}).encode()


JSON_HEADERS: dict[bytes | str, list[bytes | str]] = {b"content-type": [b"application/json"]}


class ResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = WebhookMetrics.create()
        # StubTreq forwards treq's API through __getattr__, which mypy cannot see.
        self.client: Any = StubTreq(webhook_site(MutationConfig(), self.clock, self.metrics).resource)
        self.probe: Any = StubTreq(probe_site(self.metrics).resource)

    def post(self, data: bytes, headers: dict[bytes | str, list[bytes | str]] = JSON_HEADERS) -> tuple[int, Any]:
        response = self.successResultOf(self.client.post("https://x/mutate-v1-pod", data=data, headers=headers))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return response.code, self.successResultOf(response.json())

    def test_mutate(self) -> None:
        code, out = self.post(review_body())
        self.assertEqual(code, 200)
        patch = json.loads(base64.b64decode(out["response"]["patch"]))
        self.assertIn({"op": "add", "path": "/metadata/annotations", "value": {CPU_ANNOTATION: "2"}}, patch)
        self.assertEqual(out["response"]["uid"], "uid-1")

    def test_malformed_is_error_review(self) -> None:
        """controller-runtime's answer: HTTP 200 carrying allowed=false and status 400 (the API server shows
        the message); a wrong content type too."""
        code, out = self.post(b"{oops")
        self.assertEqual((code, out["response"]["allowed"], out["response"]["status"]["code"]), (200, False, 400))
        code, out = self.post(review_body(), {b"content-type": [b"text/plain"]})
        self.assertEqual(out["response"]["status"]["code"], 400)

    def test_methods_and_paths(self) -> None:
        response = self.successResultOf(self.client.get("https://x/mutate-v1-pod"))
        self.assertEqual(response.code, 405)
        response = self.successResultOf(self.client.post("https://x/mutate", data=b"{}", headers=JSON_HEADERS))
        self.assertEqual(response.code, 404)

    def test_probes_and_metrics(self) -> None:
        for path in ("healthz", "readyz"):
            response = self.successResultOf(self.probe.get(f"http://x/{path}"))
            self.assertEqual((response.code, self.successResultOf(response.content())), (200, b"ok"))
        self.post(review_body())
        self.post(review_body("runc"))
        self.post(b"")
        response = self.successResultOf(self.probe.get("http://x/metrics"))
        text = self.successResultOf(response.text())
        for outcome in ("mutated", "unchanged", "invalid"):
            self.assertIn(f'caa_webhook_admission_requests_total{{outcome="{outcome}"}} 1.0', text)
        self.assertIn("caa_webhook_admission_seconds_count 3.0", text)


def port_number(port: IListeningPort) -> int:
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


def write_pair(directory: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """Replace tls.crt/tls.key the way the kubelet does: new files (new inodes) renamed into place."""
    for name, data in (("tls.crt", cert_pem), ("tls.key", key_pem)):
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, directory / name)


@implementer(IHandshakeListener)
class _PeerCertificate(Protocol):
    """Completes the TLS handshake, reports the server's certificate (or why the handshake failed), hangs
    up and tells when the connection is gone."""

    def __init__(self) -> None:
        self.certificate: Deferred[Any] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        cert = self.transport.getPeerCertificate()  # type: ignore[union-attr]
        self.certificate.callback(cert.to_cryptography())
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.certificate.called:  # the handshake failed
            self.certificate.errback(reason)
        self.closed.callback(None)


async def peer_certificate(port: int, trust: list[bytes], maximum: Any = None) -> Any:
    root = tssl.trustRootFromCertificates([tssl.Certificate.loadPEM(pem) for pem in trust])
    extra = {"lowerMaximumSecurityTo": maximum} if maximum is not None else {}
    creator = tssl.optionsForClientTLS("localhost", trustRoot=root, extraCertificateOptions=extra)
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    protocol = _PeerCertificate()
    await endpoint.connect(Factory.forProtocol(lambda: protocol))
    await protocol.closed
    return await protocol.certificate


class HTTPSTests(TestCase):
    """The real thing on 127.0.0.1: TLS from files, a TLS client that verifies against the test CA."""

    timeout = 30

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.ca = CertificateAuthority.create()
        self.pair = self.ca.issue_server_certificate("localhost")
        write_pair(self.dir, self.pair.cert_pem, self.pair.key_pem)
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    async def start(self, **tls: Any) -> int:
        self.tls = ReloadingServerTLS(self.dir, **tls)
        clock: IReactorTime = reactor
        port = await listen_webhook(serverFromString(reactor, "tcp:0:interface=127.0.0.1"), self.tls,
                                    MutationConfig(), clock)
        self.addCleanup(port.stopListening)
        return port_number(port)

    async def test_admission_over_https(self) -> None:
        port = await self.start()
        pool = HTTPConnectionPool(reactor, persistent=False)
        policy = BrowserLikePolicyForHTTPS(trustRoot=tssl.Certificate.loadPEM(self.ca.cert_pem))
        client = treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))
        response = await client.post(f"https://localhost:{port}/mutate-v1-pod", data=review_body(),
                                     headers=JSON_HEADERS)
        out = await response.json()
        self.assertEqual((response.code, out["response"]["uid"], out["response"]["allowed"]), (200, "uid-1", True))
        patch = json.loads(base64.b64decode(out["response"]["patch"]))
        self.assertIn({"op": "add", "path": "/metadata/annotations", "value": {CPU_ANNOTATION: "2"}}, patch)
        response = await client.post(f"https://localhost:{port}/mutate-v1-pod", data=b"\x00garbage",
                                     headers=JSON_HEADERS)
        out = await response.json()
        self.assertEqual((out["response"]["allowed"], out["response"]["status"]["code"]), (False, 400))

    async def test_start_webhook(self) -> None:
        """The one-call in-process start the API-server tests use: cert directory in, listening port out."""
        port = await start_webhook(reactor, self.dir)
        self.addCleanup(port.stopListening)
        cert = await peer_certificate(port_number(port), [self.ca.cert_pem])
        self.assertEqual(cert.serial_number, _serial(self.pair.cert_pem))

    async def test_untrusted_client_refused(self) -> None:
        port = await self.start()
        other = CertificateAuthority.create()
        with self.assertRaises(SSL.Error):
            await peer_certificate(port, [other.cert_pem])

    async def test_certificate_rotation(self) -> None:
        """cert-manager rotates the files: the next connection gets the new certificate; a half-written
        pair (certificate and key not matching) is skipped and the old certificate keeps serving."""
        port = await self.start()
        ca2 = CertificateAuthority.create()
        trust = [self.ca.cert_pem, ca2.cert_pem]
        first = await peer_certificate(port, trust)
        self.assertEqual(first.serial_number, _serial(self.pair.cert_pem))

        new = ca2.issue_server_certificate("localhost")
        write_pair(self.dir, new.cert_pem, self.pair.key_pem)  # the certificate landed, the key not yet
        still = await peer_certificate(port, trust)
        self.assertEqual(still.serial_number, _serial(self.pair.cert_pem))
        warnings = [e for e in self.events if e["log_level"] == LogLevel.warn and "not reloaded" in e["log_format"]]
        self.assertEqual(len(warnings), 1)

        write_pair(self.dir, new.cert_pem, new.key_pem)
        second = await peer_certificate(port, trust)
        self.assertEqual(second.serial_number, _serial(new.cert_pem))
        self.assertEqual(self.tls.reloads, 1)
        again = await peer_certificate(port, trust)  # unchanged files: no reload
        self.assertEqual((again.serial_number, self.tls.reloads), (second.serial_number, 1))

    async def test_tls13_minimum(self) -> None:
        port = await self.start(min_version="VersionTLS13")
        await peer_certificate(port, [self.ca.cert_pem])
        with self.assertRaises(SSL.Error):
            await peer_certificate(port, [self.ca.cert_pem], maximum=tssl.TLSVersion.TLSv1_2)

    def test_missing_or_bad_files(self) -> None:
        with self.assertRaises(TLSConfigError):
            ReloadingServerTLS(self.dir / "nowhere")
        write_pair(self.dir, self.pair.cert_pem, CertificateAuthority.create().issue_server_certificate("x").key_pem)
        with self.assertRaises(TLSConfigError):
            ReloadingServerTLS(self.dir)
        with self.assertRaises(TLSConfigError):
            ReloadingServerTLS(self.dir, min_version="VersionTLS13", cipher_suites=["TLS_RSA_WITH_AES_128_GCM_SHA256"])


def _serial(cert_pem: bytes) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert_pem).serial_number


class ServiceTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        pair = CertificateAuthority.create().issue_server_certificate("localhost")
        write_pair(self.dir, pair.cert_pem, pair.key_pem)

    async def test_both_listeners(self) -> None:
        service = WebhookService(reactor, serverFromString(reactor, "tcp:0:interface=127.0.0.1"),
                                 ReloadingServerTLS(self.dir), MutationConfig(),
                                 serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
        service.privilegedStartService()
        service.startService()
        self.assertEqual(len(service.ports), 2)
        probe = port_number(service.ports[1])
        response = await treq.get(f"http://127.0.0.1:{probe}/healthz", pool=HTTPConnectionPool(reactor, False))
        self.assertEqual(await response.content(), b"ok")
        await service.stopService()
        self.assertEqual(service.ports, [])

    async def test_listen_failure_aborts_start(self) -> None:
        """A port in use fails privilegedStartService (twistd stops) and leaves nothing listening."""
        taken = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory())
        self.addCleanup(taken.stopListening)
        service = WebhookService(reactor, serverFromString(reactor, "tcp:0:interface=127.0.0.1"),
                                 ReloadingServerTLS(self.dir), MutationConfig(),
                                 serverFromString(reactor, f"tcp:{port_number(taken)}:interface=127.0.0.1"))
        with self.assertRaises(CannotListenError):
            service.privilegedStartService()
        self.assertEqual(service.ports, [])
