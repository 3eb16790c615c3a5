"""The webhook's serving certificate, reloaded when cert-manager rotates it.

cert-manager renews the `webhook-server-cert` Secret and the kubelet swaps the mounted files (a new
`..data` symlink target): the inode, size or mtime of `tls.crt`/`tls.key` change. Each new connection
stats both files (two `stat` calls, cheap next to a handshake) and, when they changed, builds new TLS
options from them; connections already open keep the certificate they started with. A pair caught half
written (certificate and key not matching) is skipped with one log line and retried on the next change,
the previous certificate serving meanwhile.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from caa.tls import ServerTLSOptions, TLSConfigError, certificate_expiry, server_context_factory

__all__ = ["DEFAULT_CERT_DIR", "CERT_NAME", "KEY_NAME", "ReloadingServerTLS"]

#: controller-runtime's default, where upstream's chart mounts the Secret.
DEFAULT_CERT_DIR = "/tmp/k8s-webhook-server/serving-certs"
CERT_NAME = "tls.crt"
KEY_NAME = "tls.key"

_Stamp = tuple[tuple[int, int, int, int], ...]


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingServerTLS:
    """Server TLS options over `cert_dir/tls.crt` + `tls.key` that follow the files.

    Raises `TLSConfigError` at construction when the files are missing or invalid (the process must not
    start without a certificate) or when the TLS profile is invalid.
    """

    _log = Logger()

    def __init__(self, cert_dir: str | os.PathLike[str], min_version: str = "",
                 cipher_suites: Sequence[str] = (), cert_name: str = CERT_NAME, key_name: str = KEY_NAME) -> None:
        self.cert_path = Path(cert_dir) / cert_name
        self.key_path = Path(cert_dir) / key_name
        self._min_version = min_version
        self._cipher_suites = tuple(cipher_suites)
        self._loaded: _Stamp | None = None
        self._failed: _Stamp | None = None
        stamp = self._stamp()
        if stamp is None:
            raise TLSConfigError(f"no serving certificate: {self.cert_path} and {self.key_path} must exist")
        self._options: ServerTLSOptions = self._load(stamp)
        self._loaded = stamp
        self.reloads = 0

    def _stamp(self) -> _Stamp | None:
        try:
            stats = [os.stat(p) for p in (self.cert_path, self.key_path)]
        except OSError:
            return None
        return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def _load(self, stamp: _Stamp) -> ServerTLSOptions:
        cert_pem = self.cert_path.read_bytes()
        key_pem = self.key_path.read_bytes()
        options = server_context_factory(cert_pem, key_pem, min_version=self._min_version,
                                         cipher_suites=self._cipher_suites)
        options.getContext()  # build the SSL context now: a bad pair fails here, not in a handshake
        self._log.info("serving certificate loaded from {path} (expires {expiry})", path=str(self.cert_path),
                       expiry=certificate_expiry(cert_pem).isoformat())
        return options

    def check(self) -> bool:
        """Reload the files if they changed since the last load; whether new options are in use."""
        stamp = self._stamp()
        if stamp is None or stamp == self._loaded or stamp == self._failed:
            return False
        try:
            options = self._load(stamp)
        except (OSError, TLSConfigError, SSL.Error) as e:
            self._failed = stamp
            self._log.warn("serving certificate in {dir} not reloaded, keeping the previous one: {error}",
                           dir=str(self.cert_path.parent), error=str(e))
            return False
        self._options, self._loaded, self._failed = options, stamp, None
        self.reloads += 1
        return True

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        self.check()
        connection: SSL.Connection = self._options.serverConnectionForTLS(tlsProtocol)
        return connection
