"""`twistd caa-adaptor` options: upstream's common flags (spec-adaptor §7.2) with their env vars, plus the
chosen provider's own flags (spec-adaptor §7.3), all in one command line.

Precedence everywhere: default < environment variable (set and non-empty) < flag. Durations use Go
syntax (`90s`, `5m`). A bad value raises `UsageError` naming the flag or variable.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from twisted.python import usage

from caa.providers.interfaces import IProviderFactory
from caa.providers.options import ProviderOptions, parse_bool, parse_duration
from caa.providers.registry import UnknownProvider, get_factory, provider_names


def _port(value: str) -> int:
    n = int(value.strip(), 10)
    if not 0 <= n <= 65535:
        raise ValueError(f"{value!r} is not a port number")
    return n


_port.coerceDoc = "A TCP port (0-65535)."  # type: ignore[attr-defined]


def _int(value: str) -> int:
    return int(value.strip(), 10)


def _mode(value: str) -> int:
    return int(value.strip(), 8)


_mode.coerceDoc = "An octal file mode such as 0600."  # type: ignore[attr-defined]

def _named_coerce(name: str, coerce: Any) -> Any:
    def named(value: str) -> Any:
        try:
            return coerce(value)
        except ValueError as e:
            raise ValueError(f"--{name}: {e}") from e

    named._named = True  # type: ignore[attr-defined]
    named.coerceDoc = getattr(coerce, "coerceDoc", None)  # type: ignore[attr-defined]
    return named


TLS_VERSIONS = ("", "VersionTLS12", "VersionTLS13")


def load_provider_factory(name: str) -> IProviderFactory:
    """A provider factory by registry name, or by `module:Attribute` (tests, out-of-tree providers)."""
    if ":" in name:
        module, _, attr = name.partition(":")
        target: Any = importlib.import_module(module)
        for part in attr.split("."):
            target = getattr(target, part)
        factory: IProviderFactory = target() if isinstance(target, type) else target
        return factory
    return get_factory(name)


class AdaptorOptions(ProviderOptions):
    """Common options; `provider_options` holds the selected provider's parsed options."""

    synopsis = "[options] (provider options are accepted too, e.g. --uri for libvirt)"

    optParameters: ClassVar[list[list[Any]]] = [
        ["provider", None, "", "Cloud provider name (libvirt, aws, ...) or module:Factory."],
        ["socket", None, "/run/peerpod/hypervisor.sock", "Hypervisor + PodVMInfo ttrpc socket."],
        ["socket-mode", None, 0o600, "Mode of the hypervisor socket.", _mode],
        ["pods-dir", None, "/run/peerpod/pods", "Base directory of <sid>/agent.ttrpc, apf.json, journal."],
        ["tls-dir", None, "/run/peerpod/tls", "Directory of the persisted auto CA and client certificate."],
        ["pause-image", None, "", "Accepted for compatibility; unused."],
        ["forwarder-port", None, 15150, "Forwarder (agent-protocol-forwarder) port in the pod VM.", _port],
        ["ca-cert-file", None, "", "CA verifying forwarder certificates (manual TLS); unset: auto CA."],
        ["cert-file", None, "", "Client certificate (manual TLS), with --cert-key."],
        ["cert-key", None, "", "Client key (manual TLS)."],
        ["tls-min-version", None, "", "VersionTLS12 or VersionTLS13 (default TLS 1.2)."],
        ["tls-cipher-suites", None, "", "Comma-separated IANA cipher suite names (TLS 1.2 only)."],
        ["proxy-timeout", None, 300.0, "Max time to reach the forwarder (Go duration).", parse_duration],
        ["tunnel-type", None, "vxlan", "vxlan, or none (no pod network plumbing; development/tests)."],
        ["vxlan-port", None, 4789, "VXLAN UDP port.", _port],
        ["vxlan-min-id", None, 555000, "Lowest VNI.", _int],
        ["host-interface", None, "", "Worker node interface for tunnel traffic."],
        ["netns-dir", None, "/run/netns", "Where pod network namespaces are (swept for stale tunnels at start)."],
        ["initdata", None, "", "Default initdata (gzip+base64 TOML) for pods without the annotation."],
        ["peerpods-limit-per-node", None, 10, "Capacity of kata.peerpods.io/vm; < 0: don't advertise.", _int],
        ["pod-subnet-cidrs", None, "", "Comma-separated CIDRs routed via the tunnel (experimental)."],
        ["probe-port", None, 8000, "Startup probe port on 127.0.0.1 (0: off).", _port],
        ["metrics-port", None, 0, "Prometheus /metrics port (0: off).", _port],
        ["metrics-interface", None, "127.0.0.1", "Address the metrics port listens on."],
    ]
    optFlags: ClassVar[list[list[str | None]]] = [
        ["disable-tls", None, "Plain TCP to the forwarder."],
        ["tls-skip-verify", None, "Do not verify forwarder certificates (testing only)."],
        ["cloud-config-verify", None, "Check the provider's configuration at start."],
        ["enable-scratch-space", None, "Add the scratch-space marker to user data."],
        ["ext-network-via-podvm", None, "External network via the pod VM (experimental)."],
    ]
    envVars: ClassVar[Mapping[str, str]] = {
        "provider": "CLOUD_PROVIDER",
        "socket": "REMOTE_HYPERVISOR_ENDPOINT",
        "pods-dir": "PODS_DIR",
        "pause-image": "PAUSE_IMAGE",
        "forwarder-port": "FORWARDER_PORT",
        "ca-cert-file": "CACERT_FILE",
        "cert-file": "CERT_FILE",
        "cert-key": "CERT_KEY",
        "tls-skip-verify": "TLS_SKIP_VERIFY",
        "tls-min-version": "TLS_MIN_VERSION",
        "tls-cipher-suites": "TLS_CIPHER_SUITES",
        "proxy-timeout": "PROXY_TIMEOUT",
        "tunnel-type": "TUNNEL_TYPE",
        "vxlan-port": "VXLAN_PORT",
        "initdata": "INITDATA",
        "cloud-config-verify": "CLOUD_CONFIG_VERIFY",
        "peerpods-limit-per-node": "PEERPODS_LIMIT_PER_NODE",
        "enable-scratch-space": "ENABLE_SCRATCH_SPACE",
        "ext-network-via-podvm": "EXTERNAL_NETWORK_VIA_PODVM",
        "pod-subnet-cidrs": "POD_SUBNET_CIDRS",
        "probe-port": "PROBE_PORT",
    }
    secretOptions: ClassVar[frozenset[str]] = frozenset({"initdata"})

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        super().__init__(self.environ)
        flags = {f[0] for f in self.optFlags}
        for name, var in self.envVars.items():
            if name in flags:
                raw = self.environ.get(var, "")
                self._envErrors.pop(name, None)
                if raw:
                    try:
                        self.opts[name] = parse_bool(raw)
                    except ValueError as e:
                        self._envErrors[name] = f"environment variable {var}={raw!r}: {e}"
                else:
                    self.opts[name] = False
        for name, dispatcher in self._dispatch.items():
            coerce = getattr(dispatcher, "coerce", None)
            if coerce is not None and not getattr(coerce, "_named", False):
                dispatcher.coerce = _named_coerce(name, coerce)
        self.provider_factory: IProviderFactory | None = None
        self.provider_options: usage.Options | None = None

    def _own(self) -> tuple[set[str], set[str]]:
        params = {p[0] for p in self.optParameters}
        flags = {str(f[0]) for f in self.optFlags} | {"help", "version"}
        return params, flags

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = list(options or [])
        params, flags = self._own()
        mine: list[str] = []
        theirs: list[str] = []
        i = 0
        while i < len(argv):
            arg = argv[i]
            if not arg.startswith("-") or arg == "-":
                theirs.extend(argv[i:])
                break
            name = arg.lstrip("-").split("=", 1)[0]
            target = mine if (name in params or name in flags or name == "h") else theirs
            target.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                takes_value = name in params if target is mine else self._provider_takes_value(argv, name)
                if takes_value:
                    target.append(argv[i + 1])
                    i += 1
            i += 1
        self._provider_argv = theirs
        super().parseOptions(mine)

    def _provider_takes_value(self, argv: Sequence[str], name: str) -> bool:
        factory = self._factory_from(argv)
        if factory is None:
            return True
        opts = factory.options()
        flag_names = {f[0] for f in getattr(opts, "optFlags", [])}
        return name not in flag_names

    def _factory_from(self, argv: Sequence[str]) -> IProviderFactory | None:
        name = str(self.opts.get("provider") or "")
        for j, a in enumerate(argv):
            if a in ("--provider", "-provider") and j + 1 < len(argv):
                name = argv[j + 1]
            elif a.startswith(("--provider=", "-provider=")):
                name = a.split("=", 1)[1]
        if not name:
            return None
        try:
            return load_provider_factory(name)
        except Exception:
            return None

    def postOptions(self) -> None:
        super().postOptions()
        name = self["provider"]
        if not name:
            raise usage.UsageError(
                f"no cloud provider: set --provider or CLOUD_PROVIDER (one of {', '.join(provider_names())})")
        try:
            self.provider_factory = load_provider_factory(name)
        except UnknownProvider as e:
            raise usage.UsageError(str(e)) from e
        except (ImportError, AttributeError) as e:
            raise usage.UsageError(f"Unsupported cloud provider: {name!r} ({e})") from e
        popts = self.provider_factory.options()
        try:
            popts.parseOptions(self._provider_argv)
        except usage.UsageError as e:
            raise usage.UsageError(f"provider {name}: {e}") from e
        self.provider_options = popts
        if self["tls-min-version"] not in TLS_VERSIONS:
            raise usage.UsageError(
                f"--tls-min-version: {self['tls-min-version']!r} is not VersionTLS12 or VersionTLS13")
        if self["tls-cipher-suites"] and self["tls-min-version"] == "VersionTLS13":
            raise usage.UsageError("--tls-cipher-suites cannot be set with TLS 1.3")
        if self["tunnel-type"] not in ("vxlan", "none"):
            raise usage.UsageError(f"--tunnel-type: unknown tunnel type {self['tunnel-type']!r} (vxlan or none)")
        if bool(self["cert-file"]) != bool(self["cert-key"]):
            raise usage.UsageError("--cert-file and --cert-key must be given together")
        if self["proxy-timeout"] <= 0:
            raise usage.UsageError("--proxy-timeout must be positive")
        if self["initdata"]:
            from caa.adaptor.userdata import validate_initdata

            try:
                validate_initdata(self["initdata"])
            except ValueError as e:
                raise usage.UsageError(f"--initdata: {e}") from e

    @property
    def cipher_suites(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in str(self["tls-cipher-suites"]).split(",") if s.strip())

    @property
    def pod_subnet_cidrs(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in str(self["pod-subnet-cidrs"]).split(",") if s.strip())
