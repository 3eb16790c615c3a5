"""
Pure builders of libvirt XML for pod VMs (spec-providers §2.4, §2.6): domain XML per host architecture,
root overlay and ISO volume XML, host capabilities parsing. No libvirt import: unit-testable as is.
"""

from __future__ import annotations

import enum
import re
import xml.etree.ElementTree as ET

from attrs import frozen

from caa.podvm_api.volumes import DATA_DISK_SERIAL_PREFIX
from caa.providers.interfaces import InvalidConfig

DESCRIPTION = "This Virtual Machine is the peer-pod VM"
METADATA_NS = "https://github.com/confidential-containers/cloud-api-adaptor/caa"
GIB = 1 << 30
_CPUSET = re.compile(r"^(\d+(-\d+)?)(,\d+(-\d+)?)*$")


class LaunchSecurity(enum.Enum):
    """Confidential VM technology asked for with --launch-security (DISABLECVM=false)."""

    NONE = ""
    S390_PV = "s390-pv"
    SEV = "sev"
    SEV_SNP = "sev-snp"
    TDX = "tdx"


def resolve_launch_security(disable_cvm: bool, requested: str, host_arch: str) -> LaunchSecurity:
    """upstream §2.3 step 5, extended with sev/sev-snp/tdx."""
    if disable_cvm:
        return LaunchSecurity.NONE
    if requested:
        try:
            return LaunchSecurity(requested)
        except ValueError:
            raise InvalidConfig(f"[{requested}] is not a known launch security setting") from None
    if host_arch == "s390x":
        return LaunchSecurity.S390_PV
    return LaunchSecurity.NONE


def valid_cpuset(cpuset: str) -> bool:
    return cpuset == "" or _CPUSET.match(cpuset) is not None


def volume_capacity_bytes(root_disk_size_gib: int, base_capacity: int) -> int:
    """Overlay size: the configured size (0 -> 10 GiB), never smaller than the base volume."""
    size = (root_disk_size_gib or 10) * GIB
    if size >= 1 << 64:
        raise InvalidConfig(f"root-disk-size {root_disk_size_gib} GiB overflows uint64 when converted to bytes")
    return max(size, base_capacity)


def root_volume_xml(name: str, capacity: int, base_path: str, base_format: str) -> str:
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="bytes").text = str(capacity)
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", type="qcow2")
    ET.SubElement(ET.SubElement(target, "permissions"), "mode").text = "0644"
    backing = ET.SubElement(volume, "backingStore")
    ET.SubElement(backing, "path").text = base_path
    ET.SubElement(backing, "format", type=base_format or "qcow2")
    return ET.tostring(volume, encoding="unicode")


def iso_volume_xml(name: str, size: int) -> str:
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="B").text = str(size)
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", type="raw")
    ET.SubElement(ET.SubElement(target, "permissions"), "mode").text = "0644"
    return ET.tostring(volume, encoding="unicode")


def volume_format(volume_xml: str) -> str:
    element = ET.fromstring(volume_xml).find("target/format")
    return (element.get("type") if element is not None else None) or "raw"


@frozen
class HostCapabilities:
    """What the provider needs from `virConnectGetCapabilities`."""

    arch: str
    #: (arch, machine name) -> canonical machine name
    machines: dict[tuple[str, str], str]
    #: arch -> emulator path
    emulators: dict[str, str]

    @classmethod
    def parse(cls, capabilities_xml: str, host_arch: str = "") -> HostCapabilities:
        root = ET.fromstring(capabilities_xml)
        arch = host_arch or (root.findtext("host/cpu/arch") or "x86_64")
        machines: dict[tuple[str, str], str] = {}
        emulators: dict[str, str] = {}
        for guest in root.findall("guest"):
            if guest.findtext("os_type") != "hvm":
                continue
            arch_element = guest.find("arch")
            if arch_element is None:
                continue
            guest_arch = arch_element.get("name", "")
            emulator = arch_element.findtext("emulator")
            if emulator and guest_arch not in emulators:
                emulators[guest_arch] = emulator
            for machine in [*arch_element.findall("machine"), *arch_element.findall("domain/machine")]:
                name = (machine.text or "").strip()
                if name:
                    machines.setdefault((guest_arch, name), machine.get("canonical") or name)
        return cls(arch=arch, machines=machines, emulators=emulators)

    def canonical_machine(self, arch: str, machine: str) -> str:
        if not any(key[0] == arch for key in self.machines) and arch not in self.emulators:
            raise InvalidConfig(f"could not find any guests for architecture type hvm/{arch}")
        try:
            return self.machines[(arch, machine)]
        except KeyError:
            raise InvalidConfig(f"cannot find machine type {machine} for architecture {arch}") from None


@frozen
class SevParameters:
    """From the domain capabilities' <sev> feature."""

    cbitpos: int
    reduced_phys_bits: int


@frozen
class DataDisk:
    """A CSI block volume attached to the VM: a pool volume (`kind` file or block) as a virtio disk whose serial
    (caa.podvm_api.volumes.data_disk_serial of its place) the pod VM looks for."""

    source: str
    serial: str
    kind: str = "file"
    format: str = "raw"


@frozen
class DomainParams:
    name: str
    vcpus: int
    memory_mib: int
    root_path: str
    iso_path: str
    network: str
    cpuset: str = ""
    firmware: str = ""
    domain_type: str = "kvm"
    launch_security: LaunchSecurity = LaunchSecurity.NONE
    sev: SevParameters | None = None
    pod_name: str = ""
    sandbox_id: str = ""
    data_disks: tuple[DataDisk, ...] = ()
    #: the NIC's MAC (None: libvirt generates one); set when a DHCP reservation holds the VM's address
    mac: str | None = None


def _interface(devices: ET.Element, params: DomainParams) -> ET.Element:
    interface = ET.SubElement(devices, "interface", type="network")
    if params.mac:
        ET.SubElement(interface, "mac", address=params.mac)
    ET.SubElement(interface, "source", network=params.network)
    ET.SubElement(interface, "model", type="virtio")
    return interface


def _metadata(domain: ET.Element, params: DomainParams) -> None:
    metadata = ET.SubElement(domain, "metadata")
    ET.SubElement(
        metadata,
        f"{{{METADATA_NS}}}instance",
        {"pod": params.pod_name, "sandbox": params.sandbox_id},
    )


def _common_head(params: DomainParams, memory_attrs: dict[str, str]) -> ET.Element:
    domain = ET.Element("domain", type=params.domain_type)
    ET.SubElement(domain, "name").text = params.name
    ET.SubElement(domain, "description").text = DESCRIPTION
    _metadata(domain, params)
    ET.SubElement(domain, "memory", {"unit": "MiB", **memory_attrs}).text = str(params.memory_mib)
    vcpu = ET.SubElement(domain, "vcpu")
    if params.cpuset:
        vcpu.set("cpuset", params.cpuset)
    vcpu.text = str(params.vcpus)
    return domain


def _disk(devices: ET.Element, device: str, driver: dict[str, str], path: str, target: dict[str, str]) -> ET.Element:
    disk = ET.SubElement(devices, "disk", type="file", device=device)
    ET.SubElement(disk, "driver", driver)
    ET.SubElement(disk, "source", file=path)
    ET.SubElement(disk, "target", target)
    return disk


def _data_disks(devices: ET.Element, params: DomainParams, first: str, iommu: bool) -> None:
    """The CSI volumes, in attach order, as virtio disks from target `vd<first>` on (the guest's names may
    differ; the serial is what it goes by)."""
    for i, data in enumerate(params.data_disks):
        disk = ET.SubElement(devices, "disk", type=data.kind, device="disk")
        driver = {"name": "qemu", "type": data.format, "cache": "none"}
        if iommu:
            driver["iommu"] = "on"
        ET.SubElement(disk, "driver", driver)
        ET.SubElement(disk, "source", {"file" if data.kind == "file" else "dev": data.source})
        ET.SubElement(disk, "target", dev=f"vd{_letters(ord(first) - ord('a') + i)}", bus="virtio")
        ET.SubElement(disk, "serial").text = data.serial


def _letters(index: int) -> str:
    """0 -> a, 25 -> z, 26 -> aa (the kernel's disk naming)."""
    out = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        out = chr(ord("a") + rest) + out
    return out


def _x86_64(params: DomainParams, caps: HostCapabilities) -> ET.Element:
    confidential = params.launch_security in (LaunchSecurity.SEV, LaunchSecurity.SEV_SNP, LaunchSecurity.TDX)
    if params.launch_security is LaunchSecurity.S390_PV:
        raise InvalidConfig(f"launch Security type is not supported for this domain: {params.launch_security.value}")
    domain = _common_head(params, {"dumpCore": "off" if confidential else "on"})
    os_element = ET.SubElement(domain, "os")
    type_element = ET.SubElement(os_element, "type", arch="x86_64")
    type_element.text = "hvm"
    if confidential:
        type_element.set("machine", "q35")
    if params.firmware:
        os_element.set("firmware", "efi")
        loader = ET.SubElement(os_element, "loader", readonly="yes", type="pflash")
        if confidential:
            loader.set("stateless", "yes")
        loader.text = params.firmware
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(features, "vmport", state="off")
    if params.domain_type == "kvm":
        # (TCG, domain type "qemu", cannot model the host CPU; libvirt's default model is used there.)
        ET.SubElement(domain, "cpu", mode="host-model")
    ET.SubElement(domain, "on_reboot").text = "restart"
    if confidential:
        ET.SubElement(ET.SubElement(domain, "memoryBacking"), "locked")
    devices = ET.SubElement(domain, "devices")
    # The root disk is virtio (upstream: SATA sda). The pod VM image's kernel (Debian's cloud kernel) has no
    # AHCI driver, so it could not read a SATA root; SeaBIOS and OVMF boot virtio-blk. Listed first, so it
    # gets the lowest PCI slot and is the guest's vda (the image also finds its root by filesystem UUID).
    root_driver = {"name": "qemu", "type": "qcow2"}
    if confidential:
        root_driver["iommu"] = "on"
    root = _disk(devices, "disk", root_driver, params.root_path, {"dev": "vda", "bus": "virtio"})
    ET.SubElement(root, "boot", order="1")
    if params.firmware or confidential:
        iso = _disk(devices, "cdrom", {"name": "qemu", "type": "raw"}, params.iso_path, {"dev": "sdb", "bus": "sata"})
        ET.SubElement(iso, "readonly")
        ET.SubElement(iso, "address", type="drive", controller="0", bus="0", target="0", unit="1")
    else:
        iso = _disk(devices, "cdrom", {"name": "qemu", "type": "raw"}, params.iso_path, {"dev": "hda", "bus": "ide"})
        ET.SubElement(iso, "readonly")
        ET.SubElement(iso, "address", type="drive", controller="0", bus="0", target="0", unit="0")
    _data_disks(devices, params, "b", confidential)
    interface = _interface(devices, params)
    if confidential:
        ET.SubElement(interface, "driver", iommu="on")
        ET.SubElement(interface, "rom", enabled="no")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial")
    if confidential:
        ET.SubElement(devices, "memballoon", model="none")
        domain.append(_launch_security_element(params))
    return domain


def _launch_security_element(params: DomainParams) -> ET.Element:
    kind = params.launch_security
    element = ET.Element("launchSecurity", type=kind.value)
    if kind in (LaunchSecurity.SEV, LaunchSecurity.SEV_SNP):
        if params.sev is None:
            raise InvalidConfig(f"launch security {kind.value} asked for but the host reports no SEV support")
        ET.SubElement(element, "cbitpos").text = str(params.sev.cbitpos)
        ET.SubElement(element, "reducedPhysBits").text = str(params.sev.reduced_phys_bits)
        # SEV: no debug, no key sharing (0x0003); SNP: SMT allowed, reserved bit 17 set (0x30000).
        ET.SubElement(element, "policy").text = "0x0003" if kind is LaunchSecurity.SEV else "0x00030000"
    elif kind is LaunchSecurity.TDX:
        ET.SubElement(element, "policy").text = "0x10000000"  # SEPT_VE_DISABLE
    return element


def _virtio_arch(params: DomainParams, caps: HostCapabilities, arch: str) -> ET.Element:
    s390 = arch == "s390x"
    domain = _common_head(params, {})
    if s390:
        ET.SubElement(domain, "currentMemory", unit="MiB").text = str(params.memory_mib)
    os_element = ET.SubElement(domain, "os")
    machine = caps.canonical_machine(arch, "s390-ccw-virtio" if s390 else "virt")
    type_element = ET.SubElement(os_element, "type", arch=arch, machine=machine)
    type_element.text = "hvm"
    if not s390:
        os_element.set("firmware", "efi")
    ET.SubElement(domain, "cpu", mode="host-model" if s390 else "host-passthrough")
    if s390:
        ET.SubElement(domain, "clock", offset="utc")
    devices = ET.SubElement(domain, "devices")
    emulator = caps.emulators.get(arch)
    if emulator:
        ET.SubElement(devices, "emulator").text = emulator
    root_driver = {"name": "qemu", "type": "qcow2", "iommu": "on"}
    root = _disk(devices, "disk", root_driver, params.root_path, {"dev": "vda", "bus": "virtio"})
    ET.SubElement(root, "boot", order="1")
    if s390:
        iso_driver = {"name": "qemu", "type": "raw", "iommu": "on"}
        _disk(devices, "disk", iso_driver, params.iso_path, {"dev": "vdb", "bus": "virtio"})
    else:
        iso = _disk(devices, "cdrom", {"name": "qemu", "type": "raw"}, params.iso_path, {"dev": "sda", "bus": "scsi"})
        ET.SubElement(iso, "readonly")
        ET.SubElement(devices, "controller", type="scsi", model="virtio-scsi")
    _data_disks(devices, params, "c" if s390 else "b", True)
    interface = _interface(devices, params)
    ET.SubElement(interface, "driver", iommu="on")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="sclp" if s390 else "serial")
    balloon = ET.SubElement(devices, "memballoon", model="virtio")
    ET.SubElement(balloon, "driver", iommu="on")
    if s390:
        rng = ET.SubElement(devices, "rng", model="virtio")
        ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    return domain


def build_domain_xml(params: DomainParams, caps: HostCapabilities) -> str:
    """The domain XML for the host's architecture (s390x, aarch64, anything else -> x86_64)."""
    if not valid_cpuset(params.cpuset):
        raise InvalidConfig(f"invalid cpuset {params.cpuset!r}")
    if caps.arch in ("s390x", "aarch64"):
        element = _virtio_arch(params, caps, caps.arch)
    else:
        element = _x86_64(params, caps)
    ET.register_namespace("caa", METADATA_NS)
    return ET.tostring(element, encoding="unicode")


def parse_sev_parameters(domain_capabilities_xml: str) -> SevParameters | None:
    root = ET.fromstring(domain_capabilities_xml)
    sev = root.find("features/sev")
    if sev is None or sev.get("supported") != "yes":
        return None
    return SevParameters(int(sev.findtext("cbitpos") or 0), int(sev.findtext("reducedPhysBits") or 0))


def file_disk_paths(domain_xml: str) -> list[str]:
    """Paths of the domain's own file-backed disks (root overlay, cidata ISO): never an attached CSI volume
    (known by its data-disk serial), which outlives the VM."""
    paths = []
    for disk in ET.fromstring(domain_xml).findall("devices/disk"):
        source = disk.find("source")
        if (disk.findtext("serial") or "").startswith(DATA_DISK_SERIAL_PREFIX):
            continue
        if disk.get("type") == "file" and source is not None and source.get("file"):
            paths.append(source.get("file", ""))
    return paths


def interface_macs(domain_xml: str) -> list[str]:
    macs = []
    for mac in ET.fromstring(domain_xml).findall("devices/interface/mac"):
        if mac.get("address"):
            macs.append(mac.get("address", "").lower())
    return macs
