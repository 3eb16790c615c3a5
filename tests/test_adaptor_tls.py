"""The adaptor's TLS wiring: auto CA persisted in --tls-dir, per-VM certificates in apf.json that the proxy's
trust settings accept, manual-CA mode."""

from __future__ import annotations

import os
import stat

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from caa.adaptor.daemon import build_tls
from caa.adaptor.options import AdaptorOptions


def options(argv: list[str]) -> AdaptorOptions:
    o = AdaptorOptions({"CLOUD_PROVIDER": "tests.fakes.provider:FakeProviderFactory"})
    o.parseOptions(argv)
    return o


class BuildTLSTests(SynchronousTestCase):
    def test_auto_persisted(self) -> None:
        d = os.path.abspath(self.mktemp())
        proxy_tls, issuer = build_tls(options(["--tls-dir", d, "--tls-min-version", "VersionTLS13"]))
        assert proxy_tls is not None and issuer is not None
        self.assertEqual(proxy_tls.server_name_override, "")
        self.assertEqual(proxy_tls.min_version, "VersionTLS13")
        cert_pem, key_pem = issuer.server_credentials("podvm-web-12345678")
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        ca = x509.load_pem_x509_certificate(proxy_tls.ca_pem)
        self.assertEqual(cert.issuer, ca.subject)
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "podvm-web-12345678")
        self.assertIn("PRIVATE KEY", key_pem)
        self.assertEqual(issuer.client_ca_pem().encode(), proxy_tls.cert_pem)
        for name in os.listdir(d):
            if name.endswith(".key"):
                self.assertEqual(stat.S_IMODE(os.stat(os.path.join(d, name)).st_mode), 0o600)
        again, _ = build_tls(options(["--tls-dir", d]))
        assert again is not None
        self.assertEqual((again.ca_pem, again.cert_pem), (proxy_tls.ca_pem, proxy_tls.cert_pem))  # persisted

    def test_manual_ca_and_disabled(self) -> None:
        d = os.path.abspath(self.mktemp())
        auto, _ = build_tls(options(["--tls-dir", d]))
        assert auto is not None
        ca_file = os.path.join(d, "ca.crt")
        proxy_tls, issuer = build_tls(options(["--tls-dir", d, "--ca-cert-file", ca_file]))
        assert proxy_tls is not None and issuer is not None
        self.assertEqual(proxy_tls.server_name_override, "podvm-server")
        self.assertEqual(issuer.server_credentials("x"), ("", ""))
        self.assertEqual(issuer.client_ca_pem(), "")
        self.assertEqual(build_tls(options(["--disable-tls"])), (None, None))
