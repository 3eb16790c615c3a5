"""`twistd caa-adaptor` options: upstream's common flags (spec-adaptor §7.2) with their env vars, plus the
chosen provider's own flags (spec-adaptor §7.3), all in one command line.

Precedence everywhere: default < environment variable (set and non-empty) < flag. Durations use Go
syntax (`90s`, `5m`). A bad value raises `UsageError` naming the flag or variable.
"""

from __future__ import annotations

import getopt
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from twisted.python import usage

from caa.dialer import BootWindow
from caa.providers.interfaces import IProviderFactory
from caa.providers.options import ProviderOptions, parse_duration
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

TLS_VERSIONS = ("", "VersionTLS12", "VersionTLS13")
#: A shorter --dial-boot-period would flood a booting VM (and the node's reactor) with connects.
MIN_BOOT_PERIOD = 0.01


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
        ["dial-boot-window", None, 120.0, "How long after the provider returned the agent proxy's first dial "
         "retries every --dial-boot-period (the VM is booting; 0: off, back-off only; not upstream).",
         parse_duration],
        ["dial-boot-period", None, 0.05, "Retry period of the first dial during --dial-boot-window (Go "
         "duration, at least 10ms).", parse_duration],
        ["dial-boot-rate", None, 200.0, "Dial attempts per second all first dials in their boot window may make "
         "together; more booting VMs than rate x period lengthen each one's period.", float],
        ["drain-timeout", None, 20.0, "After a rolling update handed the sandboxes to a newer adaptor: how long "
         "agent connections already open keep relaying once this one is stopped (Go duration; 0: none).",
         parse_duration],
        ["tunnel-type", None, "vxlan", "vxlan, or none (no pod network plumbing; development/tests)."],
        ["vxlan-port", None, 4789, "VXLAN UDP port.", _port],
        ["vxlan-min-id", None, 555000, "Lowest VNI.", _int],
        ["host-interface", None, "", "Worker node interface for tunnel traffic."],
        ["netns-dir", None, "/run/netns", "Where pod network namespaces are (swept for stale tunnels at start)."],
        ["initdata", None, "", "Default initdata (gzip+base64 TOML) for pods without the annotation."],
        ["peerpods-limit-per-node", None, 10, "Capacity of kata.peerpods.io/vm; < 0: don't advertise.", _int],
        ["kubeconfig", None, "", "Kubeconfig of the cluster (not upstream: it is in-cluster only); unset: in-cluster."],
        ["pod-subnet-cidrs", None, "", "Comma-separated CIDRs routed via the tunnel (experimental)."],
        ["probe-port", None, 8000, "Startup probe port on 127.0.0.1 (0: off).", _port],
        ["metrics-port", None, 0, "Prometheus /metrics port (0: off).", _port],
        ["metrics-interface", None, "127.0.0.1", "Address the metrics port listens on."],
        ["pool-size", None, 0, "Warm pool: pre-booted pod VMs kept ready for pods without size, image or "
         "initdata annotations (0: off; not upstream). Needs TLS with the auto CA.", _int],
        ["pools", None, "", "Warm pools per key with a min and a max: ';'-separated entries of ','-separated "
         "min=N,max=N[,instance-type=T][,vcpus=N][,memory=MiB][,image=I] (not upstream; docs/configuration.md)."],
        ["pool-ttl", None, 3600.0, "Warm pool: an idle pool VM is deleted and replaced after this long (Go "
         "duration).", parse_duration],
        ["direct-volumes-dir", None, "/run/kata-containers/shared/direct-volumes",
         "Where CSI drivers leave the pods' direct volumes (mountInfo.json); not upstream: fixed there."],
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
        "drain-timeout": "DRAIN_TIMEOUT",
        "tunnel-type": "TUNNEL_TYPE",
        "vxlan-port": "VXLAN_PORT",
        "initdata": "INITDATA",
        "cloud-config-verify": "CLOUD_CONFIG_VERIFY",
        "peerpods-limit-per-node": "PEERPODS_LIMIT_PER_NODE",
        "kubeconfig": "KUBECONFIG",
        "enable-scratch-space": "ENABLE_SCRATCH_SPACE",
        "ext-network-via-podvm": "EXTERNAL_NETWORK_VIA_PODVM",
        "pod-subnet-cidrs": "POD_SUBNET_CIDRS",
        "probe-port": "PROBE_PORT",
        "pool-size": "POOL_SIZE",
        "pool-ttl": "POOL_TTL",
        "pools": "POOLS",
    }
    secretOptions: ClassVar[frozenset[str]] = frozenset({"initdata"})

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(environ)
        self.provider_factory: IProviderFactory | None = None
        self.provider_options: usage.Options | None = None
        self._provider_error: usage.UsageError | None = None
        self._provider_argv: list[str] = []

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Two passes over one command line: find the provider (`--provider` or CLOUD_PROVIDER) and make its
        parser, split the arguments between the two parsers with getopt, then let each parse its share (the
        provider's in `postOptions`, after the common options are valid)."""
        argv = sys.argv[1:] if options is None else list(options)
        self._load_provider(_provider_named(argv) or str(self["provider"] or ""))
        mine, self._provider_argv = self._split(argv)
        super().parseOptions(mine)

    def _load_provider(self, name: str) -> None:
        self.provider_factory, self.provider_options, self._provider_error = None, None, None
        if not name:
            self._provider_error = usage.UsageError(
                f"no cloud provider: set --provider or CLOUD_PROVIDER (one of {', '.join(provider_names())})")
            return
        try:
            self.provider_factory = load_provider_factory(name)
        except UnknownProvider as e:
            self._provider_error = usage.UsageError(str(e))
            return
        except (ImportError, AttributeError) as e:
            self._provider_error = usage.UsageError(f"Unsupported cloud provider: {name!r} ({e})")
            return
        self.provider_options = self.provider_factory.options()

    def _split(self, argv: Sequence[str]) -> tuple[list[str], list[str]]:
        """(common arguments, provider arguments), each option with its value; the common options win a
        name both declare (--help, --version)."""
        provider = self.provider_options
        shorts = self.shortOpt + (provider.shortOpt if provider is not None else "")
        longs = self.longOpt + (provider.longOpt if provider is not None else [])
        try:
            pairs, rest = getopt.getopt(list(argv), shorts, longs)
        except getopt.GetoptError as e:
            if self._provider_error is not None:
                raise self._provider_error from None  # the provider's flags are unknown without it
            raise usage.UsageError(str(e)) from None
        own = set(self.synonyms.values())
        mine: list[str] = []
        theirs: list[str] = []
        for option, value in pairs:
            target = mine if provider is None or self.long_name(option) in own else theirs
            target.append(option)
            if _takes_value(option, shorts, longs):
                target.append(value)
        theirs.extend(rest)
        return mine, theirs

    def getUsage(self, width: int | None = None) -> str:
        """The common options, then the chosen provider's (with their environment variables)."""
        text = super().getUsage(width)
        provider = self.provider_options
        if not isinstance(provider, ProviderOptions) or self.provider_factory is None:
            return text
        rows = provider.usage_rows()
        if not rows:
            return text
        chunks = usage.docMakeChunks(rows, width or int(os.environ.get("COLUMNS", "80")))
        return f"{text}\nOptions of provider {self.provider_factory.name}:\n{''.join(chunks)}"

    def postOptions(self) -> None:
        super().postOptions()
        if self._provider_error is not None:
            raise self._provider_error
        assert self.provider_factory is not None and self.provider_options is not None
        try:
            self.provider_options.parseOptions(self._provider_argv)
        except usage.UsageError as e:
            raise usage.UsageError(f"provider {self.provider_factory.name}: {e}") from e
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
        if self["dial-boot-window"] < 0:
            raise usage.UsageError("--dial-boot-window must not be negative")
        if self["dial-boot-period"] < MIN_BOOT_PERIOD:
            raise usage.UsageError(f"--dial-boot-period must be at least 10ms, got {self['dial-boot-period']:g}s")
        if not self["dial-boot-rate"] > 0:
            raise usage.UsageError(f"--dial-boot-rate must be positive, got {self['dial-boot-rate']:g}")
        if self["drain-timeout"] < 0:
            raise usage.UsageError("--drain-timeout must not be negative")
        if self["pool-size"] < 0:
            raise usage.UsageError(f"--pool-size must be 0 or more, got {self['pool-size']}")
        if self["pool-ttl"] <= 0:
            raise usage.UsageError("--pool-ttl must be positive")
        from caa.adaptor.poolspec import PoolSpecError, parse_pools

        try:
            pools = parse_pools(self["pools"], self["pool-size"])
        except PoolSpecError as e:
            raise usage.UsageError(f"--pools: {e}") from e
        if any(e.size.max for e in pools) and (self["disable-tls"] or self["ca-cert-file"] or self["tls-skip-verify"]):
            raise usage.UsageError("--pool-size and --pools need TLS with the auto CA (a pool VM proves its name "
                                   "with a certificate from it): not with --disable-tls, --ca-cert-file or "
                                   "--tls-skip-verify")
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
    def boot_window(self) -> BootWindow | None:
        """The agent proxy's boot window (`caa.dialer.BootWindow`), None when --dial-boot-window is 0."""
        if not self["dial-boot-window"]:
            return None
        return BootWindow(length=self["dial-boot-window"], period=self["dial-boot-period"],
                          max_rate=self["dial-boot-rate"])

    @property
    def pod_subnet_cidrs(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in str(self["pod-subnet-cidrs"]).split(",") if s.strip())


def _provider_named(argv: Sequence[str]) -> str:
    """The last `--provider NAME` / `--provider=NAME` on a command line ("" if none): the provider must be
    known before the arguments can be split, because its flags are only known then."""
    name = ""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--provider" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--provider="):
            name = arg.split("=", 1)[1]
    return name


def _takes_value(option: str, shorts: str, longs: Sequence[str]) -> bool:
    """Whether getopt gave `option` (a full `--name` or `-x`) a value."""
    if option.startswith("--"):
        return f"{option[2:]}=" in longs
    position = shorts.find(option[1])
    return position >= 0 and shorts[position + 1:position + 2] == ":"
