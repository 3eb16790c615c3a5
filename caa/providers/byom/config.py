"""BYOM provider options (upstream's flags and env vars, spec-adaptor §7.3, spec-providers §9.1) and the frozen
configuration built from them.

`--vm-pool-ips` is kept as text by the option parser and expanded only in `ByomConfig.from_options`, when every
option is known: upstream expands it while flags are still being registered, so `MAX_RANGE_IPS` from the
environment is not yet applied and every range expands to nothing (spec-providers §16.2 #19).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Mapping
from typing import Any

import attrs
from attrs import field, frozen
from twisted.python import usage

from caa.providers.interfaces import InvalidConfig
from caa.providers.options import ProviderOptions, parse_uint

DEFAULT_NAMESPACE = "confidential-containers-system"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
NODE_NAME_FILES = ("/etc/podinfo/nodename", "/etc/hostname")


def _pool_text(text: str) -> str:
    parse_pool(text, max_range_ips=1)  # syntax check only; expanded once --max-range-ips is known
    return text


_pool_text.coerceDoc = "Comma-separated IPs and ranges a-b."  # type: ignore[attr-defined]


def parse_pool(text: str, max_range_ips: int) -> tuple[str, ...]:
    """`10.0.0.5,10.0.0.10-10.0.0.12` -> the addresses in order, duplicates dropped; at most `max_range_ips`
    addresses are taken from each range. ValueError naming the bad item (an address that is not IPv4/IPv6, a
    range whose start is not below its end or that mixes families)."""
    seen: dict[str, None] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        first, sep, last = item.partition("-")
        try:
            start = ipaddress.ip_address(first.strip())
            end = ipaddress.ip_address(last.strip()) if sep else start
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or a range a-b") from None
        if sep:
            if start.version != end.version or int(start) >= int(end):
                raise ValueError(f"range {item!r}: the start must be below the end (same address family)")
            count = min(int(end) - int(start) + 1, max_range_ips)
            for offset in range(count):
                seen.setdefault(str(start + offset), None)
        else:
            seen.setdefault(str(start), None)
    return tuple(seen)


class ByomOptions(ProviderOptions):
    optParameters = [
        ["vm-pool-ips", None, "", "Pool of pre-created VM IPs: IPs and ranges a-b, comma-separated (required).",
         _pool_text],
        ["ssh-username", None, "peerpod", "SSH user on the pool VMs."],
        ["ssh-pub-key", None, "/root/.ssh/id_rsa.pub", "SSH public key file."],
        ["ssh-priv-key", None, "/root/.ssh/id_rsa", "SSH private key file."],
        ["ssh-timeout", None, 30, "SSH dial and push timeout in seconds.", parse_uint],
        ["ssh-host-key-allowlist-dir", None, "",
         "Directory of *.pub host keys the VMs may present (unset: accept any key and log its fingerprint)."],
        ["pool-namespace", None, "", "Namespace of the pool ConfigMap (unset: the service account's, "
         "POD_NAMESPACE, else confidential-containers-system)."],
        ["pool-configmap-name", None, "byom-ip-pool-state", "Name of the pool state ConfigMap."],
        ["max-range-ips", None, 100, "At most this many addresses are taken from each range.", parse_uint],
    ]
    envVars = {
        "vm-pool-ips": "VM_POOL_IPS",
        "ssh-username": "SSH_USERNAME",
        "ssh-pub-key": "SSH_PUB_KEY_PATH",
        "ssh-priv-key": "SSH_PRIV_KEY_PATH",
        "ssh-timeout": "SSH_TIMEOUT",
        "ssh-host-key-allowlist-dir": "SSH_HOST_KEY_ALLOWLIST_DIR",
        "pool-namespace": "POOL_NAMESPACE",
        "pool-configmap-name": "POOL_CONFIGMAP_NAME",
        "max-range-ips": "MAX_RANGE_IPS",
    }


def default_namespace(environ: Mapping[str, str], sa_file: str = SA_NAMESPACE_FILE) -> str:
    """The service account's namespace, else POD_NAMESPACE, else confidential-containers-system."""
    with contextlib.suppress(OSError), open(sa_file) as f:
        namespace = f.read().strip()
        if namespace:
            return namespace
    return environ.get("POD_NAMESPACE") or DEFAULT_NAMESPACE


def node_name(environ: Mapping[str, str], files: tuple[str, ...] = NODE_NAME_FILES) -> str:
    """NODE_NAME, else the first non-empty file of /etc/podinfo/nodename and /etc/hostname, else ''."""
    if environ.get("NODE_NAME"):
        return environ["NODE_NAME"]
    for path in files:
        try:
            with open(path) as f:
                name = f.read().strip()
        except OSError:
            continue
        if name:
            return name
    return ""


@frozen
class ByomConfig:
    pool_ips: tuple[str, ...] = ()
    ssh_username: str = "peerpod"
    ssh_pub_key: str = "/root/.ssh/id_rsa.pub"
    ssh_priv_key: str = "/root/.ssh/id_rsa"
    ssh_timeout: float = 30.0
    host_key_allowlist_dir: str = ""
    pool_namespace: str = DEFAULT_NAMESPACE
    pool_configmap_name: str = "byom-ip-pool-state"
    node_name: str = ""
    ssh_port: int = 22  # the VMs' sshd (tests use other ports only through this field)
    allocate_timeout: float = 30.0  # upstream's per-allocation limit
    readiness_timeout: float = 2.0  # one TCP probe of <ip>:22
    user_data_path: str = "cidata/user-data"  # relative to the SFTP chroot (/media on the VM)
    reboot_path: str = "cidata/reboot"
    kubeconfig: str = field(default="", repr=False)

    @classmethod
    def from_options(cls, options: usage.Options) -> ByomConfig:
        environ: Mapping[str, str] = getattr(options, "environ", os.environ)
        try:
            pool = parse_pool(options["vm-pool-ips"], int(options["max-range-ips"]))
        except ValueError as e:
            raise InvalidConfig(f"byom: --vm-pool-ips (VM_POOL_IPS): {e}") from None
        return cls(
            pool_ips=pool,
            ssh_username=options["ssh-username"],
            ssh_pub_key=options["ssh-pub-key"],
            ssh_priv_key=options["ssh-priv-key"],
            ssh_timeout=float(options["ssh-timeout"]),
            host_key_allowlist_dir=options["ssh-host-key-allowlist-dir"],
            pool_namespace=options["pool-namespace"] or default_namespace(environ),
            pool_configmap_name=options["pool-configmap-name"],
            node_name=node_name(environ),
            kubeconfig=environ.get("KUBECONFIG", ""),
        )

    def check(self) -> None:
        """upstream's ConfigVerifier (pool, user, key) plus ours; raises InvalidConfig with one line."""
        if not self.pool_ips:
            raise InvalidConfig("byom: --vm-pool-ips (VM_POOL_IPS) is required and must name at least one IP")
        if not self.ssh_username:
            raise InvalidConfig("byom: --ssh-username (SSH_USERNAME) must not be empty")
        if not self.ssh_pub_key or not self.ssh_priv_key:
            raise InvalidConfig("byom: --ssh-pub-key and --ssh-priv-key (SSH_PUB_KEY_PATH, SSH_PRIV_KEY_PATH) "
                                "are required")
        if self.ssh_timeout <= 0:
            raise InvalidConfig("byom: --ssh-timeout (SSH_TIMEOUT) must be positive")
        if not self.pool_configmap_name:
            raise InvalidConfig("byom: --pool-configmap-name (POOL_CONFIGMAP_NAME) must not be empty")

    def redacted(self) -> dict[str, Any]:
        return {a.name: getattr(self, a.name) for a in attrs.fields(type(self)) if a.name != "kubeconfig"}


ByomOptions.config_type = ByomConfig
