"""libvirt provider options and the frozen configuration built from them."""

from __future__ import annotations

import attrs
from attrs import frozen
from twisted.python import usage

from caa.providers.interfaces import InvalidConfig
from caa.providers.libvirt.domainxml import LaunchSecurity, valid_cpuset
from caa.providers.options import ProviderOptions, parse_bool, parse_duration, parse_uint


class LibvirtOptions(ProviderOptions):
    optParameters = [
        ["uri", None, "qemu+ssh://root@192.168.122.1/system?no_verify=1", "libvirt connection URI."],
        ["pool-name", None, "default", "Storage pool holding the base volume and the per-VM volumes."],
        ["network-name", None, "default", "libvirt network of the VM NIC (its DHCP gives the IP)."],
        ["vol-name", None, "podvm-base.qcow2", "Base volume (the pod VM image) in the pool."],
        ["launch-security", None, "", "Confidential VM type: s390-pv, sev, sev-snp, tdx; empty = autodetect."],
        ["firmware", None, "/usr/share/OVMF/OVMF_CODE_4M.fd", "x86_64 UEFI code path; empty = legacy BIOS."],
        ["cpu", None, 2, "vCPUs when the pod asks for none.", parse_uint],
        ["memory", None, 8192, "Memory in MiB when the pod asks for none.", parse_uint],
        ["cpuset", None, "", "Host CPUs for the vCPUs (<vcpu cpuset=...>)."],
        ["root-disk-size", None, 10, "Root disk size in GiB (never smaller than the base volume).", parse_uint],
        ["data-dir", None, "/var/lib/libvirt/images", "Accepted for compatibility; unused."],
        ["disable-cvm", None, True, "true: no launch security at all.", parse_bool],
        ["domain-type", None, "kvm", "Domain type: kvm, or qemu for software emulation (TCG)."],
        ["ip-timeout", None, 180.0, "Deadline for the VM to get an IP (Go duration).", parse_duration],
        ["ip-reservation", None, True,
         "true: reserve the VM's address on the network's DHCP up front and return without waiting for the lease.",
         parse_bool],
    ]
    envVars = {
        "uri": "LIBVIRT_URI",
        "pool-name": "LIBVIRT_POOL",
        "network-name": "LIBVIRT_NET",
        "vol-name": "LIBVIRT_VOL_NAME",
        "launch-security": "LIBVIRT_LAUNCH_SECURITY",
        "firmware": "LIBVIRT_EFI_FIRMWARE",
        "cpu": "LIBVIRT_CPU",
        "memory": "LIBVIRT_MEMORY",
        "cpuset": "LIBVIRT_CPUSET",
        "root-disk-size": "LIBVIRT_ROOT_DISK_SIZE",
        "disable-cvm": "DISABLECVM",
        "domain-type": "LIBVIRT_DOMAIN_TYPE",
        "ip-timeout": "LIBVIRT_IP_TIMEOUT",
        "ip-reservation": "LIBVIRT_IP_RESERVATION",
    }



@frozen
class LibvirtConfig:
    uri: str = "qemu:///system"
    pool_name: str = "default"
    network_name: str = "default"
    vol_name: str = "podvm-base.qcow2"
    launch_security: str = ""
    firmware: str = ""
    cpu: int = 2
    memory: int = 8192
    cpuset: str = ""
    root_disk_size: int = 10
    data_dir: str = "/var/lib/libvirt/images"
    disable_cvm: bool = True
    domain_type: str = "kvm"
    ip_timeout: float = 180.0
    ip_reservation: bool = True

    @classmethod
    def from_options(cls, options: usage.Options) -> LibvirtConfig:
        return cls(
            uri=options["uri"],
            pool_name=options["pool-name"],
            network_name=options["network-name"],
            vol_name=options["vol-name"],
            launch_security=options["launch-security"],
            firmware=options["firmware"],
            cpu=int(options["cpu"]),
            memory=int(options["memory"]),
            cpuset=options["cpuset"],
            root_disk_size=int(options["root-disk-size"]),
            data_dir=options["data-dir"],
            disable_cvm=bool(options["disable-cvm"]),
            domain_type=options["domain-type"],
            ip_timeout=float(options["ip-timeout"]),
            ip_reservation=bool(options["ip-reservation"]),
        )

    def check(self) -> None:
        """upstream's ConfigVerifier, plus the values we add: raises InvalidConfig with one line."""
        for label, value in (
            ("uri", self.uri),
            ("pool-name", self.pool_name),
            ("network-name", self.network_name),
            ("vol-name", self.vol_name),
        ):
            if not value:
                raise InvalidConfig(f"libvirt: --{label} must not be empty")
        if self.cpu <= 0:
            raise InvalidConfig("libvirt: --cpu must be greater than 0")
        if self.memory <= 0:
            raise InvalidConfig("libvirt: --memory must be greater than 0")
        if not valid_cpuset(self.cpuset):
            raise InvalidConfig(f"libvirt: --cpuset {self.cpuset!r} is not a list of CPUs such as 0-3,6")
        if self.domain_type not in ("kvm", "qemu"):
            raise InvalidConfig(f"libvirt: --domain-type {self.domain_type!r} is not kvm or qemu")
        if self.launch_security:
            try:
                LaunchSecurity(self.launch_security)
            except ValueError:
                raise InvalidConfig(f"[{self.launch_security}] is not a known launch security setting") from None
        if self.ip_timeout <= 0:
            raise InvalidConfig("libvirt: --ip-timeout must be positive")

    def redacted(self) -> dict[str, object]:
        # The URI may hold a password (qemu+tcp://user:pass@host); keep scheme and host only.
        fields: dict[str, object] = {a.name: getattr(self, a.name) for a in attrs.fields(type(self))}
        if "@" in self.uri and ":" in self.uri.split("@", 1)[0].split("//", 1)[-1]:
            scheme, rest = self.uri.split("//", 1) if "//" in self.uri else ("", self.uri)
            fields["uri"] = f"{scheme}//**********@{rest.split('@', 1)[1]}"
        return fields


LibvirtOptions.config_type = LibvirtConfig
