"""caa.tls: certificate properties (upstream's auto mode), CA persistence, TLS profile parsing."""

from __future__ import annotations

import datetime
import os
import stat
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from caa import tls


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


class ClientCertificateTests(SynchronousTestCase):
    def test_properties(self) -> None:
        pair = tls.make_client_certificate()
        cert = _cert(pair.cert_pem)
        self.assertEqual(cert.subject, cert.issuer)
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value,
                         "cloud-api-adaptor")
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME), [])
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertEqual(list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value),
                         [ExtendedKeyUsageOID.CLIENT_AUTH])
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(ku.key_cert_sign and ku.digital_signature)
        self.assertIsInstance(cert.public_key(), ec.EllipticCurvePublicKey)
        self.assertTrue(pair.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----"))
        self.assertLess(cert.serial_number, 2**128)
        span = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertEqual(span, datetime.timedelta(days=730, minutes=5))

    def test_repr_hides_key(self) -> None:
        pair = tls.make_client_certificate()
        self.assertNotIn("PRIVATE", repr(pair))

    def test_load_or_create_persists_0600(self) -> None:
        d = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(d))
        a = tls.load_or_create_client_certificate(d)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(d, "client.key")).st_mode), 0o600)
        b = tls.load_or_create_client_certificate(d)
        self.assertEqual(a, b)


class CertificateAuthorityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir))

    def test_persisted_with_0600_key_and_reloaded(self) -> None:
        d = os.path.join(self.dir, "ca")
        ca = tls.CertificateAuthority.load_or_create(d)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(d, "ca.key")).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(d).st_mode), 0o700)
        again = tls.CertificateAuthority.load_or_create(d)
        self.assertEqual(ca.cert_pem, again.cert_pem)
        cert = _cert(ca.cert_pem)
        self.assertTrue(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value,
                         "agent-protocol-forwarder")

    def test_loose_key_mode_is_tightened(self) -> None:
        tls.CertificateAuthority.load_or_create(self.dir)
        key = os.path.join(self.dir, "ca.key")
        os.chmod(key, 0o644)
        tls.CertificateAuthority.load_or_create(self.dir)
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)

    def test_mismatched_pair_rejected(self) -> None:
        a = tls.CertificateAuthority.create()
        b = tls.CertificateAuthority.create()
        with open(os.path.join(self.dir, "ca.crt"), "wb") as f:
            f.write(a.cert_pem)
        with open(os.path.join(self.dir, "ca.key"), "wb") as f:
            f.write(tls.make_client_certificate().key_pem)
        self.assertRaises(tls.TLSConfigError, tls.CertificateAuthority.load_or_create, self.dir)
        del b

    def test_expiring_ca_replaced(self) -> None:
        old = tls.CertificateAuthority.create(
            now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=729))
        with open(os.path.join(self.dir, "ca.crt"), "wb") as f:
            f.write(old.cert_pem)
        fd = os.open(os.path.join(self.dir, "ca.key"), os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, old._key.private_bytes(  # noqa: SLF001
            tls.serialization.Encoding.PEM, tls.serialization.PrivateFormat.PKCS8,
            tls.serialization.NoEncryption()))
        os.close(fd)
        new = tls.CertificateAuthority.load_or_create(self.dir)
        self.assertNotEqual(new.cert_pem, old.cert_pem)

    def test_server_certificate(self) -> None:
        ca = tls.CertificateAuthority.create()
        pair = ca.issue_server_certificate("podvm-nginx-7d9f-0a1b2c3d")
        cert = _cert(pair.cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["podvm-nginx-7d9f-0a1b2c3d"])
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
                         "podvm-nginx-7d9f-0a1b2c3d")
        self.assertEqual(cert.issuer, _cert(ca.cert_pem).subject)
        self.assertEqual(list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value),
                         [ExtendedKeyUsageOID.SERVER_AUTH])
        # signed by the CA
        ca_key = _cert(ca.cert_pem).public_key()
        assert isinstance(ca_key, ec.EllipticCurvePublicKey)
        cert.verify_directly_issued_by(_cert(ca.cert_pem))

    def test_server_certificate_clipped_to_ca(self) -> None:
        ca = tls.CertificateAuthority.create(validity=datetime.timedelta(days=10))
        cert = _cert(ca.issue_server_certificate("vm").cert_pem)
        self.assertLessEqual(cert.not_valid_after_utc, _cert(ca.cert_pem).not_valid_after_utc)

    def test_bad_server_name(self) -> None:
        ca = tls.CertificateAuthority.create()
        self.assertRaises(tls.TLSConfigError, ca.issue_server_certificate, "")


class ProfileTests(SynchronousTestCase):
    def test_versions(self) -> None:
        self.assertEqual(tls.parse_min_version(None), tssl.TLSVersion.TLSv1_2)
        self.assertEqual(tls.parse_min_version(""), tssl.TLSVersion.TLSv1_2)
        self.assertEqual(tls.parse_min_version("VersionTLS12"), tssl.TLSVersion.TLSv1_2)
        self.assertEqual(tls.parse_min_version("VersionTLS13"), tssl.TLSVersion.TLSv1_3)
        for bad in ("VersionTLS11", "VersionTLS10", "TLS13", "bogus"):
            self.assertRaises(tls.TLSConfigError, tls.parse_min_version, bad)

    def test_cipher_names(self) -> None:
        self.assertEqual(
            tls.openssl_cipher_string([" TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 ", "",
                                       "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"]),
            "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384")
        self.assertIsNone(tls.openssl_cipher_string([]))
        self.assertIsNone(tls.openssl_cipher_string(["  "]))
        self.assertRaises(tls.TLSConfigError, tls.openssl_cipher_string, ["TLS_BOGUS"])
        self.assertRaises(tls.TLSConfigError, tls.openssl_cipher_string,
                          ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"], "VersionTLS13")

    def test_unusable_ciphers_rejected_at_configuration(self) -> None:
        ca = tls.CertificateAuthority.create()
        pair = ca.issue_server_certificate("vm")
        self.assertRaises(tls.TLSConfigError, tls.server_context_factory, pair.cert_pem, pair.key_pem,
                          None, "VersionTLS12", ["TLS_RSA_WITH_RC4_128_SHA"])

    def test_server_requires_matching_pair(self) -> None:
        ca = tls.CertificateAuthority.create()
        a = ca.issue_server_certificate("a")
        b = ca.issue_server_certificate("b")
        self.assertRaises(tls.TLSConfigError, tls.server_context_factory, a.cert_pem, b.key_pem)

    def test_client_needs_cert_and_key(self) -> None:
        ca = tls.CertificateAuthority.create()
        c = tls.make_client_certificate()
        self.assertRaises(tls.TLSConfigError, tls.client_creator, ca.cert_pem, c.cert_pem, None, "vm")


def _verify_error(cert_pem: bytes, trusted: list[bytes], at: datetime.datetime | None = None) -> tuple[int, str]:
    """(X509 error number, OpenSSL's message) of verifying cert_pem against `trusted` with pyOpenSSL."""
    store = crypto.X509Store()
    for pem in trusted:
        store.add_cert(crypto.X509.from_cryptography(_cert(pem)))
    if at is not None:
        store.set_time(at)
    context = crypto.X509StoreContext(store, crypto.X509.from_cryptography(_cert(cert_pem)))
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as e:
        return int(e.errors[0]), str(e.errors[2])
    raise AssertionError("the certificate verified")


class VerifyErrorTests(SynchronousTestCase):
    def test_texts_match_openssl(self) -> None:
        """Our table gives OpenSSL's own text (newer OpenSSL releases may append a hint) for the errors a
        refused client certificate carries."""
        ca = tls.CertificateAuthority.create()
        server = ca.issue_server_certificate("vm")
        client = tls.make_client_certificate()
        now = datetime.datetime.now(datetime.UTC)
        cases = [
            _verify_error(server.cert_pem, []),  # 20: unknown issuer
            _verify_error(client.cert_pem, [tls.make_client_certificate().cert_pem]),  # 18: another self-signed
            _verify_error(server.cert_pem, [ca.cert_pem], now + datetime.timedelta(days=3000)),  # 10: expired
            _verify_error(server.cert_pem, [ca.cert_pem], now - datetime.timedelta(days=1)),  # 9: not yet valid
        ]
        self.assertEqual(sorted(errno for errno, _ in cases), [9, 10, 18, 20])
        for errno, message in cases:
            self.assertTrue(message.startswith(tls.x509_verify_error(errno)), (errno, message))

    def test_unknown_number(self) -> None:
        self.assertEqual(tls.x509_verify_error(9999), "certificate verify error 9999")


class ServerOptionsTests(SynchronousTestCase):
    def test_interfaces_and_modes(self) -> None:
        ca = tls.CertificateAuthority.create()
        pair = ca.issue_server_certificate("vm")
        mutual = tls.server_context_factory(pair.cert_pem, pair.key_pem, tls.make_client_certificate().cert_pem)
        verifyObject(IOpenSSLServerConnectionCreator, mutual)
        verifyObject(IOpenSSLContextFactory, mutual)
        self.assertTrue(mutual.verify and mutual.requireCertificate)
        self.assertEqual(mutual.getContext().get_verify_mode(), SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        plain = tls.server_context_factory(pair.cert_pem, pair.key_pem)
        self.assertFalse(plain.verify)
        self.assertEqual(plain.getContext().get_verify_mode(), SSL.VERIFY_NONE)
        marker = object()
        connection = mutual.serverConnectionForTLS(marker)
        self.assertIs(connection.get_app_data(), marker)
        self.assertIs(connection.get_context(), mutual.getContext())
