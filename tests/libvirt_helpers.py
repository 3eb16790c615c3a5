"""
Real libvirtd + QEMU (TCG) for integration tests: daemons, a NAT network with DHCP, the pod VM image,
per-test domains. Everything here blocks; call it from a thread (`deferToThread`) in a running test.

Machine-wide objects (the daemons, the network ``caa-test``, the image cache) are made once and shared:
each helper is idempotent and takes a file lock, so `trial -j2` workers and several test files can call
them at the same time. Per-test objects (domains, overlays, ISOs) get unique names from
:func:`unique_name` and are removed by :meth:`PodVM.destroy`, which tests register with `addCleanup`.
Recipes: /work/shared/specs/real-vm-recipes.md (tested on this machine kind).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from caa.devtools import libvirt_env
from caa.devtools.libvirt_env import file_lock

LIBVIRT_URI = "qemu:///system"
TEST_NETWORK = "caa-test"
TEST_BRIDGE = "virbr-caatest"
TEST_NETWORK_GATEWAY = "192.168.150.1"
TEST_NETWORK_PREFIX = 24
REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "podvm" / "build.sh"
DISK_CMDLINE_SCRIPT = REPO / "podvm" / "disk-cmdline.sh"

_counter = itertools.count(1)


def unique_name(prefix: str = "caa-t") -> str:
    """A libvirt-safe name unique across trial workers and calls."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def missing_tools() -> list[str]:
    """The host tools the real-VM tests need and do not find (empty: all there)."""
    tools = ["libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "qemu-img", "dnsmasq", "debootstrap"]
    missing = [t for t in tools if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    try:
        import libvirt  # noqa: F401
    except ImportError:
        missing.append("libvirt-python")
    return missing


def skip_reason() -> str | None:
    """Why a real-VM test cannot run here, or None. In CI (CI set) never a reason: the test must run."""
    if os.environ.get("CI"):
        return None
    if os.geteuid() != 0:
        return "needs root (libvirtd, QEMU, image build)"
    missing = missing_tools()
    if missing:
        return "missing: " + ", ".join(missing)
    return None


def ensure_libvirtd(timeout: float = 30.0) -> None:
    """Start virtlogd and libvirtd (no systemd here) unless qemu:///system already answers."""
    libvirt_env.ensure_daemons(timeout)


def open_connection() -> Any:
    import libvirt

    # errors arrive as exceptions; without a handler libvirt also prints each one to stderr
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt.open(LIBVIRT_URI)


def network_xml(name: str = TEST_NETWORK, bridge: str = TEST_BRIDGE, gateway: str = TEST_NETWORK_GATEWAY) -> str:
    """A NAT network with DHCP: 2-minute leases (each test VM gets a new MAC) and no ping before an offer."""
    return libvirt_env.network_xml(name, bridge, gateway)


@dataclass(frozen=True)
class TestNetwork:
    name: str
    bridge: str
    gateway: str
    prefix: int


def ensure_network(name: str = TEST_NETWORK) -> TestNetwork:
    """Define and start the shared NAT network `caa-test` (192.168.150.0/24) unless it is running."""
    import libvirt

    ensure_libvirtd()
    with file_lock("caa-test-network"):
        conn = open_connection()
        try:
            try:
                net = conn.networkLookupByName(name)
            except libvirt.libvirtError:
                net = conn.networkDefineXML(network_xml(name))
            if not net.isActive():
                net.create()
        finally:
            conn.close()
    return TestNetwork(name, TEST_BRIDGE, TEST_NETWORK_GATEWAY, TEST_NETWORK_PREFIX)


@dataclass(frozen=True)
class PodVMImage:
    """One build of podvm/build.sh (see its manifest.json)."""

    directory: Path
    root_disk: Path  # ext4 root, booted with kernel + initrd (the fast boot)
    bios_disk: Path  # BIOS-bootable disk (MBR + syslinux/kernel/stage-1 partition + ext4 root partition)
    kernel: Path
    initrd: Path
    cmdline: str
    variant: str
    manifest: dict[str, Any]
    seconds: float  # what this call took: a build, or only the cache check


def podvm_image(kata_agent: str | None = None) -> PodVMImage:
    """Build the pod VM image, or reuse the cached build of the same recipe and caa sources."""
    env = dict(os.environ)
    if kata_agent:
        env["KATA_AGENT"] = kata_agent
    t0 = time.monotonic()
    r = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"podvm/build.sh failed ({r.returncode}):\n{r.stderr[-4000:]}")
    out = Path(r.stdout.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    return PodVMImage(out, out / manifest["root_qcow2"], out / manifest["qcow2"], out / manifest["kernel"],
                      out / manifest["initrd"],
                      manifest["kernel_cmdline"], manifest["variant"], manifest, time.monotonic() - t0)


def domain_xml(name: str, image: PodVMImage, disk: Path, cidata: Path, serial_log: Path,
               network: str = TEST_NETWORK, memory_mib: int = 256, extra_cmdline: str = "") -> str:
    """
    The fast-boot domain: direct kernel boot (kernel + stage-1 initramfs) of the image's root on a
    per-VM overlay, cidata as an IDE CD-ROM (what the cloud kernel can read), one vCPU under TCG, serial
    console to a file. A panicking or powered-off guest ends its domain.
    """
    cmdline = f"{image.cmdline} {extra_cmdline}".strip()
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <description>caa test pod VM</description>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{escape(str(disk))}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='{escape(str(cidata))}'/>
      <target dev='hda' bus='ide'/>
      <readonly/>
    </disk>
    <interface type='network'><source network='{escape(network)}'/><model type='virtio'/></interface>
    <serial type='file'><source path='{escape(str(serial_log))}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def firmware_domain_xml(name: str, disk: Path, cidata: Path, serial_log: Path, network: str = TEST_NETWORK,
                        memory_mib: int = 256) -> str:
    """
    The libvirt provider's own x86_64 domain XML (BIOS: no firmware path, domain type qemu) for a BIOS disk
    overlay, with one change for tests: the serial console goes to a file instead of a pty, so the test reads
    the guest's markers. A panicking or powered-off guest ends its domain.
    """
    import xml.etree.ElementTree as ET

    from caa.providers.libvirt.domainxml import DomainParams, HostCapabilities, build_domain_xml

    params = DomainParams(name=name, vcpus=1, memory_mib=memory_mib, root_path=str(disk), iso_path=str(cidata),
                          network=network, domain_type="qemu")
    domain = ET.fromstring(build_domain_xml(params, HostCapabilities(arch="x86_64", machines={}, emulators={})))
    devices = domain.find("devices")
    assert devices is not None
    for console in devices.findall("console"):
        devices.remove(console)
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(serial_log))
    ET.SubElement(serial, "target", port="0")
    for event in ("on_poweroff", "on_crash"):
        ET.SubElement(domain, event).text = "destroy"
    reboot = domain.find("on_reboot")
    if reboot is not None:
        reboot.text = "destroy"
    return ET.tostring(domain, encoding="unicode")


def bios_disk_with_cmdline(disk: Path, out: Path, *args: str) -> Path:
    """A copy of a BIOS disk whose kernel command line has `args` appended (podvm/disk-cmdline.sh)."""
    subprocess.run([str(DISK_CMDLINE_SCRIPT), str(disk), str(out), *args], check=True, capture_output=True,
                   timeout=300)
    return out


@dataclass
class PodVM:
    """One test domain and its files. `destroy()` is idempotent; register it with addCleanup."""

    name: str
    workdir: Path
    disk: Path
    cidata: Path
    serial_log: Path
    started_at: float = 0.0
    _destroyed: bool = field(default=False, repr=False)

    def serial(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def markers(self) -> dict[str, float]:
        """Guest uptime (s) of each `CAA-INIT <phase> uptime=<s>` line on the console (first one wins)."""
        seen: dict[str, float] = {}
        for m in re.finditer(r"CAA-INIT (\S+) uptime=([0-9.]+)", self.serial()):
            seen.setdefault(m.group(1), float(m.group(2)))
        return seen

    def wait_for_marker(self, marker: str, timeout: float) -> float:
        """Seconds since start when `CAA-INIT <marker>` appeared on the console."""
        deadline = time.monotonic() + timeout
        while marker not in self.markers():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no '{marker}' on the console within {timeout:.0f}s; "
                                   f"console tail:\n{self.serial()[-3000:]}")
            if not self.is_active():
                raise RuntimeError(f"{self.name}: domain ended before '{marker}'; console:\n{self.serial()[-3000:]}")
            time.sleep(0.1)
        return time.monotonic() - self.started_at

    def is_active(self) -> bool:
        import libvirt

        conn = open_connection()
        try:
            return bool(conn.lookupByName(self.name).isActive())
        except libvirt.libvirtError:
            return False
        finally:
            conn.close()

    def wait_for_lease(self, timeout: float = 120.0) -> str:
        """The guest's IPv4 address from the network's DHCP leases (libvirt's LEASE source)."""
        import libvirt

        deadline = time.monotonic() + timeout
        conn = open_connection()
        try:
            dom = conn.lookupByName(self.name)
            while True:
                if not dom.isActive():
                    raise RuntimeError(f"{self.name}: domain ended before DHCP; console:\n{self.serial()[-3000:]}")
                addrs = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE)
                for iface in addrs.values():
                    for a in iface.get("addrs") or []:
                        if a.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                            return str(a["addr"])
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: no DHCP lease within {timeout:.0f}s; "
                                       f"console:\n{self.serial()[-3000:]}")
                time.sleep(0.2)
        finally:
            conn.close()

    def destroy(self) -> None:
        """Destroy and undefine the domain, remove its overlay, ISO and console log."""
        import libvirt

        if self._destroyed:
            return
        conn = open_connection()
        try:
            try:
                dom = conn.lookupByName(self.name)
            except libvirt.libvirtError:
                dom = None
            if dom is not None:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        finally:
            conn.close()
        for p in (self.disk, self.cidata, self.serial_log):
            p.unlink(missing_ok=True)
        self._destroyed = True

    def leftovers(self) -> list[str]:
        """What of this VM still exists after destroy() (empty: nothing)."""
        import libvirt

        left = []
        conn = open_connection()
        try:
            try:
                conn.lookupByName(self.name)
                left.append(f"domain {self.name}")
            except libvirt.libvirtError:
                pass
        finally:
            conn.close()
        left += [f"file {p}" for p in (self.disk, self.cidata, self.serial_log) if p.exists()]
        r = subprocess.run(["pgrep", "-f", f"guest={self.name},"], capture_output=True, text=True)
        if r.stdout.strip():
            left.append(f"qemu process {r.stdout.split()}")
        return left


def boot_podvm(image: PodVMImage, user_data: bytes, workdir: Path, name: str | None = None,
               network: str = TEST_NETWORK, extra_cmdline: str = "", memory_mib: int = 256,
               bios_disk: Path | None = None) -> PodVM:
    """
    Create the overlay and cidata ISO, define and start the domain. The caller must `destroy()` it.
    Without `bios_disk`: the fast boot (kernel + initrd + overlay of the root disk, `extra_cmdline` added).
    With it: a firmware (SeaBIOS) boot of an overlay of that disk through the provider's domain XML; its kernel
    command line is the disk's own (`bios_disk_with_cmdline` makes a copy with more).
    """
    if bios_disk is not None and extra_cmdline:
        raise ValueError("a BIOS disk boots with its own command line; use bios_disk_with_cmdline")
    from caa.providers.cidata import build_cidata_iso

    name = name or unique_name()
    workdir.mkdir(parents=True, exist_ok=True)
    vm = PodVM(name, workdir, workdir / f"{name}-root.qcow2", workdir / f"{name}-cidata.iso",
               workdir / f"{name}-serial.log")
    base = image.root_disk if bios_disk is None else bios_disk
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(vm.disk)],
                   check=True, timeout=60)
    vm.cidata.write_bytes(build_cidata_iso(user_data, name))
    if bios_disk is None:
        xml = domain_xml(name, image, vm.disk, vm.cidata, vm.serial_log, network, memory_mib, extra_cmdline)
    else:
        xml = firmware_domain_xml(name, vm.disk, vm.cidata, vm.serial_log, network, memory_mib)
    conn = open_connection()
    try:
        dom = conn.defineXML(xml)
        vm.started_at = time.monotonic()
        try:
            dom.create()
        except Exception:
            dom.undefine()
            raise
    finally:
        conn.close()
    return vm


@dataclass
class TestPool:
    """A directory storage pool of one test, holding a copy of the pod VM image as its base volume."""

    name: str
    path: Path
    base_volume: str

    def volumes(self) -> list[str]:
        conn = open_connection()
        try:
            pool = conn.storagePoolLookupByName(self.name)
            pool.refresh(0)
            return sorted(pool.listVolumes())
        finally:
            conn.close()

    def remove(self) -> None:
        import libvirt

        conn = open_connection()
        try:
            try:
                pool = conn.storagePoolLookupByName(self.name)
            except libvirt.libvirtError:
                pool = None
            if pool is not None:
                if pool.isActive():
                    pool.destroy()
                pool.undefine()
        finally:
            conn.close()
        shutil.rmtree(self.path, ignore_errors=True)


def make_pool(base_image: Path, directory: Path, name: str | None = None,
              base_volume: str = "podvm-base.qcow2") -> TestPool:
    """Define and start a dir pool at `directory` whose base volume is a copy of `base_image`."""
    ensure_libvirtd()
    name = name or unique_name("caa-pool")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base_image, directory / base_volume)
    xml = (f"<pool type='dir'><name>{escape(name)}</name>"
           f"<target><path>{escape(str(directory))}</path></target></pool>")
    conn = open_connection()
    try:
        pool = conn.storagePoolDefineXML(xml, 0)
        pool.create(0)
        pool.refresh(0)
    finally:
        conn.close()
    return TestPool(name, directory, base_volume)


def domains_named(prefix: str) -> list[str]:
    """Names of the defined domains that start with `prefix`."""
    conn = open_connection()
    try:
        return sorted(d.name() for d in conn.listAllDomains(0) if d.name().startswith(prefix))
    finally:
        conn.close()


def destroy_domain(name: str) -> None:
    """Destroy (if running) and undefine a domain; nothing if it does not exist."""
    import libvirt

    conn = open_connection()
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    finally:
        conn.close()
