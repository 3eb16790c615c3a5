"""`twistd caa-webhook`: options and service (plugin in twisted/plugins/caa_plugins.py).

Flags are upstream's (`--health-probe-bind-address`, `--metrics-bind-address`, `--leader-elect`, Go
`host:port` addresses accepted beside Twisted endpoint strings, `-flag` and `--flag=true` spellings too)
plus what upstream only takes from the environment or hard-codes; each of those also reads its variable.
Precedence: default < environment variable (set and non-empty) < flag. A bad TLS profile or a missing
certificate is one line and exit 1, as upstream.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, ClassVar

from twisted.python import usage

from caa.goflags import GoFlagOptions, endpoint_description
from caa.webhook.certs import DEFAULT_CERT_DIR
from caa.webhook.mutation import DEFAULT_EXTENDED_RESOURCE, DEFAULT_RUNTIME_CLASS

__all__ = ["Options", "makeService"]

class Options(GoFlagOptions):
    synopsis = "[options]"
    longdesc = ("Peer-pods mutating admission webhook: pods of the target runtime class get VM-size "
                "annotations, cleared resources and one kata.peerpods.io/vm.")
    optParameters: ClassVar[list[list[Any]]] = [
        ["webhook-bind-address", None, ":9443", "HTTPS address of /mutate-v1-pod (host:port or endpoint)."],
        ["cert-dir", None, DEFAULT_CERT_DIR, "Directory of tls.crt and tls.key (reloaded when they change)."],
        ["health-probe-bind-address", None, ":8081", "Plain HTTP /healthz, /readyz, /metrics (0: off)."],
        ["metrics-bind-address", None, "0", "Accepted for compatibility: metrics are on the probe address."],
        ["target-runtimeclass", None, DEFAULT_RUNTIME_CLASS, "Runtime class whose pods are mutated."],
        ["pod-vm-extended-resource", None, DEFAULT_EXTENDED_RESOURCE, "Extended resource put on the first container."],
        ["tls-min-version", None, "", "VersionTLS12 or VersionTLS13 (empty: TLS 1.2)."],
        ["tls-cipher-suites", None, "", "Comma-separated IANA cipher suite names (TLS 1.2 only)."],
    ]
    optFlags: ClassVar[list[list[str | None]]] = [
        ["leader-elect", None, "Accepted for compatibility (a webhook has nothing to elect)."],
        ["version", None, "Print the version and exit."],
    ]
    envVars: ClassVar[Mapping[str, str]] = {
        "target-runtimeclass": "TARGET_RUNTIMECLASS",
        "pod-vm-extended-resource": "POD_VM_EXTENDED_RESOURCE",
        "tls-min-version": "TLS_MIN_VERSION",
        "tls-cipher-suites": "TLS_CIPHER_SUITES",
    }

    def opt_version(self) -> None:
        from caa import __version__

        print(f"caa-webhook version {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        from caa.tls import TLSConfigError, openssl_cipher_string, parse_min_version
        from caa.webhook.mutation import MutationConfig

        self["webhook-endpoint"] = endpoint_description(self["webhook-bind-address"])
        if self["webhook-endpoint"] is None:
            raise usage.UsageError("--webhook-bind-address cannot be off")
        self["probe-endpoint"] = endpoint_description(self["health-probe-bind-address"])
        endpoint_description(self["metrics-bind-address"])  # checked, not used
        self["tls-min-version"] = self["tls-min-version"].strip()
        self["cipher-suites"] = [s.strip() for s in self["tls-cipher-suites"].split(",") if s.strip()]
        if self["tls-min-version"] in ("VersionTLS10", "VersionTLS11"):
            raise usage.UsageError(f"invalid minVersion {self['tls-min-version']!r}: TLS 1.0 and 1.1 are not "
                                   "supported, use VersionTLS12 or VersionTLS13")
        try:
            parse_min_version(self["tls-min-version"])
            openssl_cipher_string(self["cipher-suites"], self["tls-min-version"])
        except TLSConfigError as e:
            raise usage.UsageError(str(e)) from None
        self["mutation"] = MutationConfig(self["target-runtimeclass"], self["pod-vm-extended-resource"])


def makeService(options: Options) -> Any:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from caa.reactors import as_node_reactor
    from caa.tls import TLSConfigError
    from caa.webhook.certs import ReloadingServerTLS
    from caa.webhook.server import WebhookService

    node_reactor = as_node_reactor(reactor)
    try:
        tls = ReloadingServerTLS(options["cert-dir"], options["tls-min-version"], options["cipher-suites"])
    except (TLSConfigError, OSError) as e:
        raise SystemExit(f"caa-webhook: {e}") from None
    probe = options["probe-endpoint"]
    return WebhookService(
        node_reactor,
        serverFromString(node_reactor, options["webhook-endpoint"]),
        tls,
        options["mutation"],
        serverFromString(node_reactor, probe) if probe else None,
    )
