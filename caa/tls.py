"""Certificates and TLS options for the adaptor <-> forwarder link (mutual TLS by default).

The model is upstream's "auto" mode (docs/tls.md):

- the adaptor holds a certificate authority (`CertificateAuthority`, persisted in a directory, key 0600) and
  issues one server certificate per pod VM whose CN and SAN DNS are the VM instance name;
- the adaptor has a self-signed *client* certificate (`make_client_certificate`, O=cloud-api-adaptor,
  EKU clientAuth, not a CA); its PEM is sent to the VM as `tls-client-ca` and the forwarder uses that
  certificate itself as the only trust anchor for client verification;
- `server_context_factory` builds the forwarder's listener options (client certificate required when a CA is
  given), `client_creator` the adaptor's dial options (verifies the server name against the CA).

Keys are ECDSA P-256, PEM "PRIVATE KEY" (PKCS#8), like upstream, so an unmodified Go peer accepts them.
"""

from __future__ import annotations

import datetime
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from zope.interface import implementer

__all__ = [
    "CLIENT_ORGANIZATION",
    "SERVER_ORGANIZATION",
    "MANUAL_SERVER_NAME",
    "CertKeyPair",
    "CertificateAuthority",
    "TLSConfigError",
    "make_client_certificate",
    "load_or_create_client_certificate",
    "parse_min_version",
    "openssl_cipher_string",
    "server_context_factory",
    "ServerTLSOptions",
    "SwitchableServerTLS",
    "X509_VERIFY_ERRORS",
    "x509_verify_error",
    "client_creator",
    "certificate_expiry",
]

CLIENT_ORGANIZATION = "cloud-api-adaptor"
SERVER_ORGANIZATION = "agent-protocol-forwarder"
#: The server name the adaptor verifies when it uses a manual CA (upstream's fixed name).
MANUAL_SERVER_NAME = "podvm-server"

_VALIDITY = datetime.timedelta(days=730)
_BACKDATE = datetime.timedelta(minutes=5)


class TLSConfigError(ValueError):
    """A TLS setting (version, cipher suite, certificate or key) is invalid."""


@attrs.frozen(repr=False)
class CertKeyPair:
    """A PEM certificate and its PEM PKCS#8 private key. The repr never shows the key."""

    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        return f"CertKeyPair(cert_pem=<{len(self.cert_pem)} bytes>, key_pem=<redacted>)"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _serial() -> int:
    # Random and below 2**128, like upstream; never zero.
    return secrets.randbelow(2**128 - 1) + 1


def _key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def make_client_certificate(
    now: datetime.datetime | None = None, validity: datetime.timedelta = _VALIDITY
) -> CertKeyPair:
    """The adaptor's self-signed client certificate, as upstream makes it (spec-adaptor §5.4).

    Subject O=cloud-api-adaptor without CN, EKU clientAuth, BasicConstraints CA:FALSE, KeyUsage
    certSign+digitalSignature (certSign lets OpenSSL treat it as its own issuer: it is the trust anchor).
    """
    key, cert = _self_signed(CLIENT_ORGANIZATION, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                             now=now or _now(), validity=validity)
    return CertKeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _self_signed(
    organization: str, ca: bool, usage: x509.ObjectIdentifier, now: datetime.datetime, validity: datetime.timedelta
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh key and a self-signed certificate naming only O=<organization> (the CA and the client cert)."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 from the first byte on (atomic rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _load_pair(directory: Path, cert_name: str, key_name: str) -> CertKeyPair | None:
    cert_path, key_path = directory / cert_name, directory / key_name
    if not (cert_path.exists() and key_path.exists()):
        return None
    if key_path.stat().st_mode & 0o077:
        os.chmod(key_path, 0o600)
    pair = CertKeyPair(cert_path.read_bytes(), key_path.read_bytes())
    _check_pair(pair.cert_pem, pair.key_pem)
    return pair


def _check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as e:
        raise TLSConfigError(f"invalid certificate or key PEM: {e}") from None
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise TLSConfigError("certificate and private key do not match")


def load_or_create_client_certificate(directory: str | os.PathLike[str]) -> CertKeyPair:
    """Load `client.crt`/`client.key` from `directory`, or make and store them (key 0600, dir 0700)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    pair = _load_pair(d, "client.crt", "client.key")
    if pair is None:
        pair = make_client_certificate()
        _write_private(d / "client.key", pair.key_pem)
        _write_public(d / "client.crt", pair.cert_pem)
    return pair


class CertificateAuthority:
    """A CA that issues per-VM server certificates (CN = SAN DNS = instance name)."""

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        _check_pair(cert_pem, key_pem)
        self._cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TLSConfigError("the CA key must be an ECDSA key")
        self._key = key
        self.cert_pem = cert_pem

    @classmethod
    def create(
        cls, now: datetime.datetime | None = None, validity: datetime.timedelta = _VALIDITY
    ) -> CertificateAuthority:
        """A fresh self-signed CA (O=agent-protocol-forwarder, like upstream's)."""
        key, cert = _self_signed(SERVER_ORGANIZATION, ca=True, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                                 now=now or _now(), validity=validity)
        return cls(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        """Load `ca.crt`/`ca.key` from `directory`, or create them there (key 0600, directory 0700).

        A CA whose certificate has expired, or expires within 30 days, is replaced by a new one.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        pair = _load_pair(d, "ca.crt", "ca.key")
        if pair is not None:
            ca = cls(pair.cert_pem, pair.key_pem)
            if ca.not_valid_after - _now() > datetime.timedelta(days=30):
                return ca
        ca = cls.create()
        _write_private(d / "ca.key", _key_pem(ca._key))
        _write_public(d / "ca.crt", ca.cert_pem)
        return ca

    @property
    def not_valid_after(self) -> datetime.datetime:
        return self._cert.not_valid_after_utc

    def issue_server_certificate(
        self,
        server_name: str,
        now: datetime.datetime | None = None,
        validity: datetime.timedelta = _VALIDITY,
    ) -> CertKeyPair:
        """A server certificate for `server_name` (CN and SAN DNS), EKU serverAuth, clipped to the CA's
        validity window."""
        if not server_name or len(server_name) > 253:
            raise TLSConfigError(f"invalid server name {server_name!r}")
        now = now or _now()
        key = _new_key()
        not_before = max(now - _BACKDATE, self._cert.not_valid_before_utc)
        not_after = min(now + validity, self._cert.not_valid_after_utc)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, SERVER_ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, server_name[:64]),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        return CertKeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def certificate_expiry(cert_pem: bytes) -> datetime.datetime:
    """The notAfter time of a PEM certificate (UTC)."""
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


# --- TLS profile: versions and cipher suites -------------------------------------------------------------

_VERSIONS = {
    "VersionTLS12": tssl.TLSVersion.TLSv1_2,
    "VersionTLS13": tssl.TLSVersion.TLSv1_3,
}

#: IANA (Go / Kubernetes `cliflag`) cipher suite names -> OpenSSL names, TLS 1.2 suites.
IANA_TO_OPENSSL: dict[str, str] = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA": "ECDHE-RSA-DES-CBC3-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": "DES-CBC3-SHA",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA": "ECDHE-ECDSA-RC4-SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA": "ECDHE-RSA-RC4-SHA",
    "TLS_RSA_WITH_RC4_128_SHA": "RC4-SHA",
}
#: TLS 1.3 suites are always on in OpenSSL; Go's table knows their names, so accept and ignore them.
_TLS13_SUITES = frozenset({"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"})


def parse_min_version(value: str | Any | None) -> Any:
    """`"VersionTLS12"`/`"VersionTLS13"` (upstream's names), `""`/None = TLS 1.2; anything else is an error."""
    if value is None or value == "":
        return tssl.TLSVersion.TLSv1_2
    if value in (tssl.TLSVersion.TLSv1_2, tssl.TLSVersion.TLSv1_3):
        return value
    if not isinstance(value, str):
        raise TLSConfigError(f"invalid TLS profile: minimum version {value!r} is not allowed")
    try:
        return _VERSIONS[value]
    except KeyError:
        raise TLSConfigError(
            f"invalid TLS profile: unknown TLS version {value!r} (use VersionTLS12 or VersionTLS13)"
        ) from None


def openssl_cipher_string(
    cipher_suites: Iterable[str] | None, min_version: str | Any | None = None
) -> str | None:
    """Map IANA suite names to an OpenSSL cipher string (None = OpenSSL's/Twisted's defaults).

    Names are trimmed and empty entries dropped; an unknown name, or any suite with a TLS 1.3 floor, is a
    `TLSConfigError` (upstream's rules).
    """
    names = [n.strip() for n in (cipher_suites or ()) if n.strip()]
    if not names:
        return None
    if parse_min_version(min_version) == tssl.TLSVersion.TLSv1_3:
        raise TLSConfigError("invalid TLS profile: cipher suites cannot be configured with VersionTLS13")
    out: list[str] = []
    for n in names:
        if n in _TLS13_SUITES:
            continue
        try:
            out.append(IANA_TO_OPENSSL[n])
        except KeyError:
            raise TLSConfigError(f"invalid TLS profile: unknown cipher suite {n!r}") from None
    if not out:
        return None
    return ":".join(dict.fromkeys(out))


def _ciphers(cipher_suites: Iterable[str] | None, min_version: Any) -> Any:
    s = openssl_cipher_string(cipher_suites, min_version)
    if s is None:
        return None
    ciphers = tssl.AcceptableCiphers.fromOpenSSLCipherString(s)
    # Reject a list that OpenSSL cannot use at all (e.g. RC4 on modern OpenSSL) at configuration time.
    probe = SSL.Context(SSL.TLS_METHOD)
    try:
        probe.set_cipher_list(s.encode("ascii"))
    except SSL.Error:
        raise TLSConfigError(f"invalid TLS profile: no usable cipher suite in {s!r}") from None
    return ciphers


def _load_certs(pem: bytes) -> list[tssl.Certificate]:
    """Every certificate in a PEM bundle (at least one)."""
    certs: list[tssl.Certificate] = []
    marker = b"-----END CERTIFICATE-----"
    for chunk in pem.split(marker):
        if b"-----BEGIN CERTIFICATE-----" in chunk:
            try:
                certs.append(tssl.Certificate.loadPEM(chunk + marker + b"\n"))
            except Exception as e:
                raise TLSConfigError(f"invalid CA certificate PEM: {e}") from None
    if not certs:
        raise TLSConfigError("the CA bundle holds no certificate")
    return certs


def _private_cert(cert_pem: bytes, key_pem: bytes) -> tssl.PrivateCertificate:
    _check_pair(cert_pem, key_pem)
    pair: tssl.PrivateCertificate = tssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    return pair


# TLS alert descriptions worth naming in a log line (RFC 8446 §6).
_ALERTS = {
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    48: "unknown_ca",
    70: "protocol_version",
    116: "certificate_required",
}

#: X509_V_ERR_* numbers a refused client certificate can carry, with OpenSSL 3.0's text
#: (crypto/x509/x509_txt.c; later releases append hints to a few). pyOpenSSL has no public call for
#: X509_verify_cert_error_string, so the table is ours; tests check it against the messages of
#: `OpenSSL.crypto.X509StoreContextError`.
X509_VERIFY_ERRORS: dict[int, str] = {
    2: "unable to get issuer certificate",
    4: "unable to decrypt certificate's signature",
    6: "unable to decode issuer public key",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    13: "format error in certificate's notBefore field",
    14: "format error in certificate's notAfter field",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    23: "certificate revoked",
    24: "invalid CA certificate",
    25: "path length constraint exceeded",
    26: "unsupported certificate purpose",
    27: "certificate not trusted",
    28: "certificate rejected",
    32: "key usage does not include certificate signing",
    62: "hostname mismatch",
}


def x509_verify_error(errno: int) -> str:
    """OpenSSL's text for an X509_V_ERR_* number (the number itself for one we do not name)."""
    return X509_VERIFY_ERRORS.get(errno, f"certificate verify error {errno}")


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ServerTLSOptions:
    """The forwarder's TLS server side: `CertificateOptions` (built from public arguments: key, certificate,
    trust, versions, ciphers) plus two callbacks on its context that log why a client was refused
    (certificate verification errors and the fatal alerts we send).

    Provides `IOpenSSLServerConnectionCreator` (what `TLSMemoryBIOFactory` and `SSL4ServerEndpoint` use) and
    `IOpenSSLContextFactory` (`getContext`).
    """

    _log = Logger()

    def __init__(self, options: tssl.CertificateOptions, verify: bool, require_certificate: bool) -> None:
        self.options = options
        # Named like CertificateOptions' attributes, which callers read to tell mTLS from server-only TLS.
        self.verify = verify
        self.requireCertificate = require_certificate
        self._context = options.getContext()
        if verify:
            # Replaces CertificateOptions' own callback (which only passes OpenSSL's verdict on) with one that
            # also says why; the verdict is still OpenSSL's.
            flags = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if require_certificate else 0)
            self._context.set_verify(flags, self._verify_callback)
        self._context.set_info_callback(self._info_callback)

    def getContext(self) -> SSL.Context:
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)  # the callbacks name the peer through it
        return connection

    @staticmethod
    def _peer(conn: SSL.Connection) -> str:
        proto = conn.get_app_data()
        try:
            p = proto.transport.getPeer()
            return f"{p.host}:{p.port}"
        except AttributeError:
            return "?"

    def _verify_callback(self, conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            subject = cert.to_cryptography().subject.rfc4514_string() if cert is not None else "?"
            self._log.warn(
                "TLS: refused client certificate from {peer} ({subject}, depth {depth}): {reason}",
                peer=self._peer(conn),
                subject=subject,
                depth=depth,
                reason=x509_verify_error(errno),
                errno=errno,
            )
        return bool(ok)

    def _info_callback(self, conn: SSL.Connection, where: int, ret: int) -> None:
        if where & SSL.SSL_CB_ALERT and where & SSL.SSL_CB_WRITE:
            alert = ret & 0xFF
            level = ret >> 8
            if level == 2:  # fatal
                self._log.warn(
                    "TLS: handshake with {peer} refused: sent alert {alert}",
                    peer=self._peer(conn),
                    alert=_ALERTS.get(alert, str(alert)),
                )


@implementer(IOpenSSLServerConnectionCreator)
class SwitchableServerTLS:
    """Server TLS whose certificate can be replaced while the port keeps listening: connections accepted
    after `switch` handshake with the new options (a claimed pool VM moves from its pool certificate to the
    pod's); connections already up keep theirs."""

    def __init__(self, options: IOpenSSLServerConnectionCreator) -> None:
        self.current = options

    def switch(self, options: IOpenSSLServerConnectionCreator) -> None:
        self.current = options

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self.current.serverConnectionForTLS(tlsProtocol)


def server_context_factory(
    cert_pem: bytes,
    key_pem: bytes,
    client_ca_pem: bytes | None = None,
    min_version: str | Any | None = None,
    cipher_suites: Sequence[str] | None = None,
) -> ServerTLSOptions:
    """The forwarder's TLS server options (usable with `SSL4ServerEndpoint` and `wrapServerTLS`).

    With `client_ca_pem` (a PEM bundle, e.g. the adaptor's self-signed client certificate), clients must
    present a certificate that verifies against exactly that bundle (no system roots); without it the
    server does not ask for one. Minimum version TLS 1.2 unless "VersionTLS13".
    """
    version = parse_min_version(min_version)
    ciphers = _ciphers(cipher_suites, version)
    pc = _private_cert(cert_pem, key_pem)
    kwargs: dict[str, Any] = {}
    if ciphers is not None:
        kwargs["acceptableCiphers"] = ciphers
    if client_ca_pem:
        kwargs.update(
            verify=True,
            caCerts=[c.original for c in _load_certs(client_ca_pem)],
            requireCertificate=True,
        )
    options = tssl.CertificateOptions(
        privateKey=pc.privateKey.original,
        certificate=pc.original,
        raiseMinimumTo=version,
        enableSessions=False,
        **kwargs,
    )
    return ServerTLSOptions(options, verify=bool(client_ca_pem), require_certificate=bool(client_ca_pem))


def client_creator(
    ca_pem: bytes,
    client_cert_pem: bytes | None,
    client_key_pem: bytes | None,
    server_name: str,
    min_version: str | Any | None = None,
    cipher_suites: Sequence[str] | None = None,
) -> IOpenSSLClientConnectionCreator:
    """The adaptor's TLS client options for `wrapClientTLS` / `SSL4ClientEndpoint`-style dialling.

    Trusts only `ca_pem`, verifies the server's SAN against `server_name` (the VM instance name in auto
    mode, `MANUAL_SERVER_NAME` with a manual CA), and presents the client certificate when given.
    """
    version = parse_min_version(min_version)
    ciphers = _ciphers(cipher_suites, version)
    extra: dict[str, Any] = {"raiseMinimumTo": version}
    if ciphers is not None:
        extra["acceptableCiphers"] = ciphers
    client_cert = None
    if client_cert_pem and client_key_pem:
        client_cert = _private_cert(client_cert_pem, client_key_pem)
    elif client_cert_pem or client_key_pem:
        raise TLSConfigError("a client certificate needs both the certificate and the key")
    trust = tssl.trustRootFromCertificates(_load_certs(ca_pem))
    creator: IOpenSSLClientConnectionCreator = tssl.optionsForClientTLS(
        server_name, trustRoot=trust, clientCertificate=client_cert, extraCertificateOptions=extra
    )
    return creator
