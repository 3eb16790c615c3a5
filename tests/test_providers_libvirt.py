"""
libvirt provider tests: pure XML/config units; the provider against libvirt's in-process `test:///default`
driver (API calls, rollback, reuse, reconnect); and the provider contract against a real libvirtd with
QEMU under TCG booting the tiny image of tests/vmimage.py (run, IP, user data read back, delete, nothing
left in the pool).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from typing import Any

import libvirt
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from caa.providers.cidata import build_cidata_iso, read_cidata_iso
from caa.providers.interfaces import ErrorKind, InstanceSpec, InvalidConfig, ProviderError, TransientError
from caa.providers.libvirt import LibvirtProviderFactory
from caa.providers.libvirt.config import LibvirtConfig, LibvirtOptions
from caa.providers.libvirt.dhcp import dhcp_hosts
from caa.providers.libvirt.domainxml import (
    GIB,
    METADATA_NS,
    DataDisk,
    DomainParams,
    HostCapabilities,
    LaunchSecurity,
    SevParameters,
    build_domain_xml,
    file_disk_paths,
    parse_sev_parameters,
    resolve_launch_security,
    root_volume_xml,
    valid_cpuset,
    volume_capacity_bytes,
)
from caa.providers.libvirt.provider import LibvirtProvider, map_libvirt_error
from caa.reactors import as_node_reactor
from tests.reactors import NodeMemoryReactor
from tests.test_providers_contract import ProviderContractMixin, unique_pod

CAPS = """<capabilities><host><cpu><arch>{arch}</arch></cpu></host>
<guest><os_type>hvm</os_type><arch name='aarch64'><emulator>/usr/bin/qemu-system-aarch64</emulator>
<machine canonical='virt-7.2'>virt</machine><machine>virt-7.2</machine></arch></guest>
<guest><os_type>hvm</os_type><arch name='s390x'><emulator>/usr/bin/qemu-system-s390x</emulator>
<machine canonical='s390-ccw-virtio-7.2'>s390-ccw-virtio</machine></arch></guest>
<guest><os_type>hvm</os_type><arch name='x86_64'><emulator>/usr/bin/qemu-system-x86_64</emulator>
<machine canonical='pc-i440fx-7.2'>pc</machine><machine canonical='pc-q35-7.2'>q35</machine></arch></guest>
</capabilities>"""


def _params(**kw: Any) -> DomainParams:
    values: dict[str, Any] = dict(
        name="podvm-nginx-3f2a9c81",
        vcpus=2,
        memory_mib=8192,
        root_path="/p/podvm-nginx-3f2a9c81-root.qcow2",
        iso_path="/p/podvm-nginx-3f2a9c81-cloudinit.iso",
        network="default",
        pod_name="nginx",
        sandbox_id="3f2a9c81" * 8,
    )
    values.update(kw)
    return DomainParams(**values)


def _caps(arch: str = "x86_64") -> HostCapabilities:
    return HostCapabilities.parse(CAPS.format(arch=arch))


class DomainXMLTests(SynchronousTestCase):
    def test_x86_64_efi(self) -> None:
        root = ET.fromstring(build_domain_xml(_params(firmware="/usr/share/OVMF/OVMF_CODE_4M.fd"), _caps()))
        self.assertEqual(root.get("type"), "kvm")
        self.assertEqual(root.findtext("name"), "podvm-nginx-3f2a9c81")
        self.assertEqual(root.findtext("description"), "This Virtual Machine is the peer-pod VM")
        memory = root.find("memory")
        assert memory is not None
        self.assertEqual((memory.text, memory.get("unit"), memory.get("dumpCore")), ("8192", "MiB", "on"))
        self.assertEqual(root.findtext("vcpu"), "2")
        self.assertIsNone(root.find("vcpu").get("cpuset"))  # type: ignore[union-attr]
        self.assertEqual(root.find("os").get("firmware"), "efi")  # type: ignore[union-attr]
        self.assertEqual(root.findtext("os/loader"), "/usr/share/OVMF/OVMF_CODE_4M.fd")
        self.assertEqual(root.find("cpu").get("mode"), "host-model")  # type: ignore[union-attr]
        disks = root.findall("devices/disk")
        self.assertEqual([d.find("target").get("dev") for d in disks], ["vda", "sdb"])  # type: ignore[union-attr]
        # the root disk is virtio: the pod VM image's cloud kernel has no AHCI driver for a SATA root
        self.assertEqual(disks[0].find("target").get("bus"), "virtio")  # type: ignore[union-attr]
        self.assertIsNone(disks[0].find("driver").get("iommu"))  # type: ignore[union-attr]
        self.assertEqual(disks[1].get("device"), "cdrom")
        self.assertEqual(disks[1].find("target").get("bus"), "sata")  # type: ignore[union-attr]
        self.assertEqual(disks[0].find("boot").get("order"), "1")  # type: ignore[union-attr]
        self.assertEqual(root.find("devices/interface/source").get("network"), "default")  # type: ignore[union-attr]
        self.assertEqual(root.find(f"metadata/{{{METADATA_NS}}}instance").get("sandbox"), "3f2a9c81" * 8)  # type: ignore[union-attr]
        self.assertIsNone(root.find("launchSecurity"))
        self.assertEqual(
            file_disk_paths(ET.tostring(root, encoding="unicode")),
            ["/p/podvm-nginx-3f2a9c81-root.qcow2", "/p/podvm-nginx-3f2a9c81-cloudinit.iso"],
        )

    def test_x86_64_bios_ide_cdrom_tcg_cpuset(self) -> None:
        root = ET.fromstring(build_domain_xml(_params(domain_type="qemu", cpuset="0-1,3"), _caps()))
        self.assertEqual(root.get("type"), "qemu")
        self.assertIsNone(root.find("os").get("firmware"))  # type: ignore[union-attr]
        self.assertIsNone(root.find("os/loader"))
        self.assertIsNone(root.find("cpu"))
        self.assertEqual(root.find("vcpu").get("cpuset"), "0-1,3")  # type: ignore[union-attr]
        disk, cdrom = root.findall("devices/disk")
        self.assertEqual((disk.find("target").get("dev"), disk.find("target").get("bus")), ("vda", "virtio"))  # type: ignore[union-attr]
        self.assertEqual(disk.find("boot").get("order"), "1")  # type: ignore[union-attr]
        self.assertEqual((cdrom.find("target").get("dev"), cdrom.find("target").get("bus")), ("hda", "ide"))  # type: ignore[union-attr]

    def test_csi_data_disks(self) -> None:
        disks = (DataDisk("/pool/pv-a.img", "caa-lun-0"), DataDisk("/dev/vg/pv-b", "caa-lun-1", "block", "raw"),
                 DataDisk("/pool/pv-c.qcow2", "caa-lun-2", "file", "qcow2"))
        for arch, first in (("x86_64", "vdb"), ("aarch64", "vdb"), ("s390x", "vdc")):
            xml = build_domain_xml(_params(data_disks=disks), _caps(arch))
            data = [d for d in ET.fromstring(xml).findall("devices/disk") if d.find("serial") is not None]
            self.assertEqual([d.findtext("serial") for d in data], ["caa-lun-0", "caa-lun-1", "caa-lun-2"], arch)
            self.assertEqual({d.find("target").get("bus") for d in data}, {"virtio"})  # type: ignore[union-attr]
            self.assertEqual(data[0].find("target").get("dev"), first)  # type: ignore[union-attr]
            self.assertEqual((data[1].get("type"), data[1].find("source").get("dev")),  # type: ignore[union-attr]
                             ("block", "/dev/vg/pv-b"))
            self.assertEqual(data[2].find("driver").get("type"), "qcow2")  # type: ignore[union-attr]
            # the domain's own disks are deleted with it; the CSI volumes never are
            self.assertNotIn("/pool/pv-a.img", file_disk_paths(xml))
            self.assertNotIn("/pool/pv-c.qcow2", file_disk_paths(xml))
            self.assertIn("/p/podvm-nginx-3f2a9c81-root.qcow2", file_disk_paths(xml))
        many = tuple(DataDisk(f"/p/{i}", f"caa-lun-{i}") for i in range(28))
        xml = build_domain_xml(_params(data_disks=many), _caps())
        targets = [d.find("target").get("dev") for d in ET.fromstring(xml).findall("devices/disk")  # type: ignore[union-attr]
                   if d.find("serial") is not None]
        self.assertEqual(targets[23:], ["vdy", "vdz", "vdaa", "vdab", "vdac"])

    def test_bad_cpuset(self) -> None:
        self.assertRaises(InvalidConfig, build_domain_xml, _params(cpuset="1,,2"), _caps())
        for good in ("", "0", "0-3", "0-3,6,8-9"):
            self.assertTrue(valid_cpuset(good), good)
        for bad in ("a", "0-", ",1", "1;2"):
            self.assertFalse(valid_cpuset(bad), bad)

    def test_aarch64(self) -> None:
        root = ET.fromstring(build_domain_xml(_params(), _caps("aarch64")))
        self.assertEqual(root.find("os/type").get("machine"), "virt-7.2")  # type: ignore[union-attr]
        self.assertEqual(root.find("os").get("firmware"), "efi")  # type: ignore[union-attr]
        self.assertEqual(root.find("cpu").get("mode"), "host-passthrough")  # type: ignore[union-attr]
        self.assertEqual(root.findtext("devices/emulator"), "/usr/bin/qemu-system-aarch64")
        self.assertEqual(root.find("devices/disk/driver").get("iommu"), "on")  # type: ignore[union-attr]
        self.assertEqual(root.find("devices/controller").get("model"), "virtio-scsi")  # type: ignore[union-attr]
        self.assertEqual(root.find("devices/interface/driver").get("iommu"), "on")  # type: ignore[union-attr]

    def test_s390x(self) -> None:
        root = ET.fromstring(build_domain_xml(_params(launch_security=LaunchSecurity.S390_PV), _caps("s390x")))
        self.assertEqual(root.find("os/type").get("machine"), "s390-ccw-virtio-7.2")  # type: ignore[union-attr]
        self.assertEqual(root.findtext("currentMemory"), "8192")
        self.assertEqual(root.find("devices/console/target").get("type"), "sclp")  # type: ignore[union-attr]
        self.assertEqual([d.get("device") for d in root.findall("devices/disk")], ["disk", "disk"])
        self.assertEqual(root.findtext("devices/rng/backend"), "/dev/urandom")

    def test_machine_lookup(self) -> None:
        caps = _caps()
        self.assertEqual(caps.canonical_machine("x86_64", "q35"), "pc-q35-7.2")
        self.assertEqual(caps.canonical_machine("aarch64", "virt-7.2"), "virt-7.2")
        self.assertRaises(InvalidConfig, caps.canonical_machine, "riscv64", "virt")
        self.assertRaises(InvalidConfig, caps.canonical_machine, "x86_64", "nope")

    def test_launch_security(self) -> None:
        self.assertIs(resolve_launch_security(True, "sev", "x86_64"), LaunchSecurity.NONE)
        self.assertIs(resolve_launch_security(False, "", "s390x"), LaunchSecurity.S390_PV)
        self.assertIs(resolve_launch_security(False, "", "x86_64"), LaunchSecurity.NONE)
        self.assertIs(resolve_launch_security(False, "tdx", "x86_64"), LaunchSecurity.TDX)
        error = self.assertRaises(InvalidConfig, resolve_launch_security, False, "magic", "x86_64")
        self.assertEqual(str(error), "[magic] is not a known launch security setting")
        self.assertRaises(InvalidConfig, build_domain_xml, _params(launch_security=LaunchSecurity.S390_PV), _caps())

    def test_sev_snp_tdx_xml(self) -> None:
        sev = SevParameters(47, 1)
        for kind, policy in ((LaunchSecurity.SEV, "0x0003"), (LaunchSecurity.SEV_SNP, "0x00030000")):
            root = ET.fromstring(build_domain_xml(_params(launch_security=kind, sev=sev, firmware="/f.fd"), _caps()))
            element = root.find("launchSecurity")
            assert element is not None
            self.assertEqual(element.get("type"), kind.value)
            self.assertEqual((element.findtext("cbitpos"), element.findtext("reducedPhysBits")), ("47", "1"))
            self.assertEqual(element.findtext("policy"), policy)
            self.assertEqual(root.find("os/type").get("machine"), "q35")  # type: ignore[union-attr]
            self.assertEqual(root.find("os/loader").get("stateless"), "yes")  # type: ignore[union-attr]
            self.assertEqual(root.find("devices/interface/driver").get("iommu"), "on")  # type: ignore[union-attr]
            # a confidential guest's virtio root disk goes through the IOMMU (bounce buffers) like its NIC
            self.assertEqual(root.find("devices/disk/driver").get("iommu"), "on")  # type: ignore[union-attr]
            self.assertEqual(root.find("devices/disk/target").get("bus"), "virtio")  # type: ignore[union-attr]
            self.assertIsNotNone(root.find("memoryBacking/locked"))
        root = ET.fromstring(build_domain_xml(_params(launch_security=LaunchSecurity.TDX), _caps()))
        self.assertEqual(root.find("launchSecurity").get("type"), "tdx")  # type: ignore[union-attr]
        self.assertRaises(InvalidConfig, build_domain_xml, _params(launch_security=LaunchSecurity.SEV), _caps())
        domcaps = "<domainCapabilities><features><sev supported='yes'><cbitpos>51</cbitpos>" \
            "<reducedPhysBits>1</reducedPhysBits></sev></features></domainCapabilities>"
        self.assertEqual(parse_sev_parameters(domcaps), SevParameters(51, 1))
        self.assertIsNone(parse_sev_parameters("<domainCapabilities><features/></domainCapabilities>"))

    def test_volume_capacity(self) -> None:
        self.assertEqual(volume_capacity_bytes(0, 0), 10 * GIB)
        self.assertEqual(volume_capacity_bytes(6, 5 * GIB), 6 * GIB)
        self.assertEqual(volume_capacity_bytes(6, 20 * GIB), 20 * GIB)
        error = self.assertRaises(InvalidConfig, volume_capacity_bytes, 1 << 34, 0)
        self.assertIn("overflows uint64", str(error))
        volume = ET.fromstring(root_volume_xml("v-root.qcow2", 123, "/p/base.qcow2", "qcow2"))
        self.assertEqual(volume.findtext("backingStore/path"), "/p/base.qcow2")
        self.assertEqual(volume.findtext("target/permissions/mode"), "0644")

    def test_cidata(self) -> None:
        files = read_cidata_iso(build_cidata_iso(b"#cloud-config\nx: 1\n", "podvm-a-b"))
        self.assertEqual(files["user-data"], b"#cloud-config\nx: 1\n")
        self.assertEqual(files["meta-data"], b"local-hostname: podvm-a-b\n")
        self.assertEqual(files["vendor-data"], b"")


class OptionsTests(SynchronousTestCase):
    def test_defaults_are_upstreams(self) -> None:
        options = LibvirtOptions(environ={})
        options.parseOptions([])
        config = LibvirtConfig.from_options(options)
        self.assertEqual(config.uri, "qemu+ssh://root@192.168.122.1/system?no_verify=1")
        self.assertEqual(
            (config.pool_name, config.network_name, config.vol_name), ("default", "default", "podvm-base.qcow2")
        )
        self.assertEqual((config.cpu, config.memory, config.root_disk_size), (2, 8192, 10))
        self.assertEqual(config.firmware, "/usr/share/OVMF/OVMF_CODE_4M.fd")
        self.assertTrue(config.disable_cvm)
        self.assertTrue(config.ip_reservation)

    def test_env_names(self) -> None:
        env = {
            "LIBVIRT_URI": "qemu:///system", "LIBVIRT_POOL": "p", "LIBVIRT_NET": "n", "LIBVIRT_VOL_NAME": "v",
            "LIBVIRT_LAUNCH_SECURITY": "s390-pv", "LIBVIRT_EFI_FIRMWARE": "", "LIBVIRT_CPU": "4",
            "LIBVIRT_MEMORY": "512", "LIBVIRT_CPUSET": "0-1", "LIBVIRT_ROOT_DISK_SIZE": "20", "DISABLECVM": "false",
            "LIBVIRT_DOMAIN_TYPE": "qemu", "LIBVIRT_IP_TIMEOUT": "30s", "LIBVIRT_IP_RESERVATION": "false",
        }
        options = LibvirtOptions(environ=env)
        options.parseOptions(["--memory", "1024", "--firmware="])
        config = LibvirtConfig.from_options(options)
        self.assertEqual(
            (config.uri, config.pool_name, config.network_name, config.vol_name, config.launch_security),
            ("qemu:///system", "p", "n", "v", "s390-pv"),
        )
        self.assertEqual((config.cpu, config.memory, config.cpuset, config.root_disk_size), (4, 1024, "0-1", 20))
        self.assertEqual(
            (config.disable_cvm, config.domain_type, config.ip_timeout, config.firmware), (False, "qemu", 30.0, "")
        )
        self.assertFalse(config.ip_reservation)

    def test_bad_values_fail_at_start(self) -> None:
        for argv in (["--cpu=0"], ["--cpuset=x"], ["--launch-security=magic"], ["--pool-name="], ["--domain-type=xen"],
                     ["--ip-reservation=maybe"]):
            self.assertRaises(usage.UsageError, LibvirtOptions(environ={}).parseOptions, argv)

    def test_redacted_uri(self) -> None:
        config = LibvirtConfig(uri="qemu+tcp://admin:hunter2@host/system")
        self.assertNotIn("hunter2", repr(config.redacted()))
        self.assertEqual(LibvirtConfig(uri="qemu:///system").redacted()["uri"], "qemu:///system")

    def test_factory(self) -> None:
        factory = LibvirtProviderFactory()
        options = factory.options()
        options.parseOptions(["--uri", "test:///default"])
        provider = factory.create(as_node_reactor(global_reactor), options)
        self.assertIsInstance(provider, LibvirtProvider)

    def test_error_mapping(self) -> None:
        def error(code: int, message: str) -> libvirt.libvirtError:
            e = libvirt.libvirtError(message)
            e.err = (code, 0, message, 0, "", None, None, 0, 0)
            return e

        self.assertIs(map_libvirt_error(error(libvirt.VIR_ERR_XML_ERROR, "bad"), "x").kind, ErrorKind.INVALID_CONFIG)
        self.assertIs(map_libvirt_error(error(libvirt.VIR_ERR_RPC, "gone"), "x").kind, ErrorKind.TRANSIENT)
        quota = map_libvirt_error(error(libvirt.VIR_ERR_INTERNAL_ERROR, "Cannot allocate memory"), "start")
        self.assertIs(quota.kind, ErrorKind.QUOTA)
        self.assertEqual(str(quota), "start: Cannot allocate memory")


class _ScriptedOwner:
    """Stands in for the connection's owner thread: answers `run` synchronously from a script."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def run(self, function: Any, *args: Any) -> Deferred[Any]:
        self.calls.append(function.__name__)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def close(self) -> Deferred[None]:
        return succeed(None)


class IPWaitTests(SynchronousTestCase):
    """The IP wait on a Clock: back-off 0.1 s doubling to 1 s, one deadline, no sleeps."""

    def test_polls_with_backoff_until_an_address(self) -> None:
        clock = NodeMemoryReactor()
        owner = _ScriptedOwner([(), (), (), (), (), ("192.168.122.9",)])
        provider = LibvirtProvider(clock, LibvirtConfig(), owner=owner)
        d = Deferred.fromCoroutine(provider._wait_for_ips("u", clock.seconds() + 10))
        for step in (0.1, 0.2, 0.4, 0.8):
            self.assertNoResult(d)
            clock.advance(step)
        self.assertNoResult(d)
        clock.advance(1.0)
        self.assertEqual(self.successResultOf(d), ("192.168.122.9",))
        self.assertEqual(len(owner.calls), 6)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_deadline(self) -> None:
        clock = NodeMemoryReactor()
        owner = _ScriptedOwner([()] * 100)
        provider = LibvirtProvider(clock, LibvirtConfig(), owner=owner)
        d = Deferred.fromCoroutine(provider._wait_for_ips("u", 3.0))
        clock.pump([0.1] * 40)
        failure = self.failureResultOf(d, TransientError)
        self.assertEqual(str(failure.value), "Domain (uuid=u) IP addresses not found")
        self.assertLessEqual(len(owner.calls), 10)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_dead_domain_stops_at_once(self) -> None:
        clock = NodeMemoryReactor()
        owner = _ScriptedOwner([(), InvalidConfig("Domain (uuid=u) stopped before it got an IP")])
        provider = LibvirtProvider(clock, LibvirtConfig(), owner=owner)
        d = Deferred.fromCoroutine(provider._wait_for_ips("u", 100.0))
        clock.advance(0.1)
        self.failureResultOf(d, InvalidConfig)
        self.assertEqual(clock.getDelayedCalls(), [])


class _StreamlessLibvirtProvider(LibvirtProvider):
    """The provider with volume upload skipped: `test:///default` has no virStorageVolUpload."""

    def _upload(self, conn: Any, volume: Any, data: bytes) -> None:
        self.uploaded = data


class _TestDriver:
    """A base volume of its own in test:///default's `default-pool` (state shared in the process)."""

    case: TestCase

    def setup_test_driver(self) -> None:
        self.conn = libvirt.open("test:///default")
        self.pool = self.conn.storagePoolLookupByName("default-pool")
        self.base = f"base-{os.getpid()}-{id(self)}.qcow2"
        self.pool.createXML(
            f"<volume><name>{self.base}</name><capacity unit='MiB'>64</capacity>"
            "<target><format type='qcow2'/></target></volume>",
            0,
        )

        def cleanup() -> None:
            self.pool.storageVolLookupByName(self.base).delete(0)
            self.conn.close()

        self.case.addCleanup(cleanup)

    def config(self, **kw: Any) -> LibvirtConfig:
        values: dict[str, Any] = dict(
            uri="test:///default", pool_name="default-pool", network_name="default", vol_name=self.base,
            firmware="", memory=256, cpu=1, ip_timeout=5.0, root_disk_size=1,
        )
        values.update(kw)
        return LibvirtConfig(**values)

    def provider(self, cls: type[LibvirtProvider] = _StreamlessLibvirtProvider, **kw: Any) -> LibvirtProvider:
        provider = cls(as_node_reactor(global_reactor), self.config(**kw))
        self.case.addCleanup(provider.teardown)
        return provider

    def left(self, names: list[str]) -> list[str]:
        volumes = [v for v in self.pool.listVolumes() if any(v.startswith(n + "-") for n in names)]
        domains = [d.name() for d in self.conn.listAllDomains() if d.name() in names]
        # the DHCP reservations (host entries named after the domain) of the network the VMs were on
        hosts = [f"DHCP host {h.name} {h.ip}" for h in dhcp_hosts(self.conn.networkLookupByName("default").XMLDesc(0))
                 if h.name in names]
        return volumes + domains + hosts


class TestDriverContractTests(ProviderContractMixin, _TestDriver, TestCase):
    """The contract, against libvirt's test driver."""

    def setUp(self) -> None:
        self.case = self
        self.setup_test_driver()

    async def make_provider(self) -> LibvirtProvider:
        return self.provider()

    def impossible_spec(self) -> tuple[InstanceSpec, ErrorKind]:
        return InstanceSpec(image="non-existing-image"), ErrorKind.INVALID_CONFIG

    async def leftovers(self, names: list[str]) -> list[str]:
        return self.left(names)


class TestDriverTests(_TestDriver, TestCase):
    def setUp(self) -> None:
        self.case = self
        self.setup_test_driver()

    def test_create_makes_overlay_iso_and_domain(self) -> Deferred[None]:
        async def run() -> None:
            provider = self.provider()
            pod, sid = unique_pod("td")
            spec = InstanceSpec(vcpus=3, memory_mib=300)
            instance = await provider.create_instance(pod, sid, b"#cloud-config\n", spec)
            self.addCleanup(provider.delete_instance, instance.id)
            name = instance.name
            root = ET.fromstring(self.pool.storageVolLookupByName(f"{name}-root.qcow2").XMLDesc(0))
            self.assertTrue(root.findtext("backingStore/path", "").endswith(self.base))
            self.assertEqual(root.findtext("capacity"), str(GIB))
            iso = self.pool.storageVolLookupByName(f"{name}-cloudinit.iso")
            self.assertEqual(iso.info()[1], len(provider.uploaded))  # type: ignore[attr-defined]
            self.assertEqual(read_cidata_iso(provider.uploaded)["user-data"], b"#cloud-config\n")  # type: ignore[attr-defined]
            domain = self.conn.lookupByName(name)
            self.assertEqual(domain.UUIDString(), instance.id)
            self.assertTrue(domain.isActive())
            xml = ET.fromstring(domain.XMLDesc(0))
            self.assertEqual(xml.findtext("vcpu"), "3")
            self.assertEqual(xml.find("memory").text, str(300 * 1024))  # type: ignore[union-attr]
            self.assertEqual(file_disk_paths(domain.XMLDesc(0)), [root.findtext("target/path"), iso.path()])

        return Deferred.fromCoroutine(run())

    def data_volume(self, name: str) -> Any:
        volume = self.pool.createXML(
            f"<volume><name>{name}</name><capacity unit='MiB'>8</capacity><target><format type='raw'/></target>"
            "</volume>", 0)

        def remove() -> None:
            try:
                self.pool.storageVolLookupByName(name).delete(0)
            except libvirt.libvirtError:
                pass

        self.addCleanup(remove)
        return volume

    def test_csi_volumes_attached_by_name_or_path_and_kept_at_delete(self) -> Deferred[None]:
        async def run() -> None:
            provider = self.provider()
            tag = f"{os.getpid()}-{id(self)}"
            by_name = self.data_volume(f"pv-a-{tag}.img")
            by_path = self.data_volume(f"pv-b-{tag}.img")
            pod, sid = unique_pod("csi")
            spec = InstanceSpec(volumes=(by_name.name(), by_path.path()))
            instance = await provider.create_instance(pod, sid, b"#cloud-config\n", spec)
            self.addCleanup(provider.delete_instance, instance.id)
            xml = ET.fromstring(self.conn.lookupByName(instance.name).XMLDesc(0))
            data = {d.findtext("serial"): d.find("source").get("file")  # type: ignore[union-attr]
                    for d in xml.findall("devices/disk") if d.find("serial") is not None}
            self.assertEqual(data, {"caa-lun-0": by_name.path(), "caa-lun-1": by_path.path()})
            await provider.delete_instance(instance.id)
            self.assertEqual(self.left([instance.name]), [])
            # detached with the domain, never deleted
            names = self.pool.listVolumes()
            self.assertIn(by_name.name(), names)
            self.assertIn(by_path.name(), names)
            await provider.delete_instance(instance.id)  # again (a restarted adaptor): still there
            self.assertIn(by_name.name(), self.pool.listVolumes())

        return Deferred.fromCoroutine(run())

    def test_missing_csi_volume_makes_nothing(self) -> Deferred[None]:
        async def run() -> None:
            provider = self.provider()
            pod, sid = unique_pod("csi")
            try:
                await provider.create_instance(pod, sid, b"", InstanceSpec(volumes=("no-such-pv.img",)))
            except ProviderError as e:
                self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
                self.assertIn("CSI volume no-such-pv.img: no such volume", str(e))
            else:
                self.fail("created a VM without its volume")
            self.assertEqual(self.left([provider.instance_name(pod, sid)]), [])

        return Deferred.fromCoroutine(run())

    def test_logs_image_choice_and_creation(self) -> Deferred[None]:
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        async def run() -> None:
            provider = self.provider()
            pod, sid = unique_pod("td")
            instance = await provider.create_instance(pod, sid, b"", InstanceSpec())
            await provider.delete_instance(instance.id)
            events = [e for e in observer if e.get("log_source") is provider]
            texts = [formatEvent(e) for e in events]
            self.assertIn(f"{sid}: Choosing {self.base} as libvirt volume for the PodVM image", texts)
            created = [e for e in events if e.get("instance_id") == instance.id and "created" in e["log_format"]]
            self.assertEqual(len(created), 1)
            self.assertEqual(created[0]["sandbox_id"], sid)

        return Deferred.fromCoroutine(run())

    def test_failed_upload_rolls_back(self) -> Deferred[None]:
        async def run() -> None:
            provider = self.provider(cls=LibvirtProvider)  # the real upload: unsupported by the test driver
            pod, sid = unique_pod("td")
            with self.assertRaises(ProviderError) as caught:
                await provider.create_instance(pod, sid, b"#cloud-config\n", InstanceSpec())
            self.assertIn("Error in uploading iso volume", str(caught.exception))
            self.assertIsNone(caught.exception.instance_id)
            self.assertEqual(self.left([provider.instance_name(pod, sid)]), [])

        return Deferred.fromCoroutine(run())

    def test_missing_image_message(self) -> Deferred[None]:
        async def run() -> None:
            provider = self.provider()
            pod, sid = unique_pod("td")
            with self.assertRaises(InvalidConfig) as caught:
                await provider.create_instance(pod, sid, b"", InstanceSpec(image="non-existing-image"))
            message = "Error in creating volume: Can't retrieve volume non-existing-image"
            self.assertEqual(str(caught.exception), message)

        return Deferred.fromCoroutine(run())

    def test_start_failure_rolls_back_defined_domain(self) -> Deferred[None]:
        class Failing(_StreamlessLibvirtProvider):
            def _t_define_and_start(self, conn: Any, xml: str, vcpus: int, memory: int, made: Any) -> str:
                conn.defineXML(xml)
                made.domain_defined = True
                raise TransientError("start failed")

        async def run() -> None:
            provider = self.provider(cls=Failing)
            pod, sid = unique_pod("td")
            with self.assertRaises(TransientError):
                await provider.create_instance(pod, sid, b"", InstanceSpec())
            self.assertEqual(self.left([provider.instance_name(pod, sid)]), [])

        return Deferred.fromCoroutine(run())

    def test_existing_domain_is_reused_and_leftover_volumes_replaced(self) -> Deferred[None]:
        async def run() -> None:
            provider = self.provider()
            pod, sid = unique_pod("td")
            first = await provider.create_instance(pod, sid, b"", InstanceSpec())
            self.addCleanup(provider.delete_instance, first.id)
            again = await provider.create_instance(pod, sid, b"", InstanceSpec())
            self.assertEqual(again, first)
            # another sandbox whose (truncated) name clashes must not take it over
            with self.assertRaises(InvalidConfig):
                await provider.create_instance(pod, sid[:8] + "f" * 56, b"", InstanceSpec())

            # leftovers of an interrupted create (volumes, no domain) do not block a new create
            pod2, sid2 = unique_pod("td")
            name2 = provider.instance_name(pod2, sid2)
            self.pool.createXML(f"<volume><name>{name2}-root.qcow2</name><capacity>1</capacity></volume>", 0)
            second = await provider.create_instance(pod2, sid2, b"", InstanceSpec())
            await provider.delete_instance(second.id)
            self.assertEqual(self.left([name2]), [])

        return Deferred.fromCoroutine(run())

    def test_reconnects_after_connection_loss(self) -> Deferred[None]:
        async def run() -> None:
            provider = self.provider()
            await provider.verify_config()
            owner = provider._owner
            await owner.run(lambda conn: conn.close())  # the daemon went away under us
            pod, sid = unique_pod("td")
            self.assertIsNone(await provider.find_instance(provider.instance_name(pod, sid)))

        return Deferred.fromCoroutine(run())

    def test_verify_config(self) -> Deferred[None]:
        async def run() -> None:
            await self.provider().verify_config()
            with self.assertRaises(InvalidConfig) as caught:
                await self.provider(pool_name="nope").verify_config()
            self.assertIn('can\'t find storage pool "nope"', str(caught.exception))
            with self.assertRaises(InvalidConfig):
                await self.provider(network_name="nope").verify_config()
            with self.assertRaises(TransientError):
                await self.provider(uri="qemu+unix:///system?socket=/nonexistent").verify_config()

        return Deferred.fromCoroutine(run())

    def test_ip_deadline(self) -> Deferred[None]:
        class NoLease(_StreamlessLibvirtProvider):
            def _addresses(self, conn: Any, domain: Any) -> tuple[str, ...]:
                return ()

        async def run() -> None:
            provider = self.provider(cls=NoLease, ip_timeout=0.5, ip_reservation=False)
            pod, sid = unique_pod("td")
            started = time.monotonic()
            with self.assertRaises(TransientError) as caught:
                await provider.create_instance(pod, sid, b"", InstanceSpec())
            self.assertLess(time.monotonic() - started, 5)
            self.assertIn("IP addresses not found", str(caught.exception))
            self.assertEqual(self.left([provider.instance_name(pod, sid)]), [])

        return Deferred.fromCoroutine(run())

    def test_cancel_rolls_back(self) -> Deferred[None]:
        class NoLease(_StreamlessLibvirtProvider):
            def _addresses(self, conn: Any, domain: Any) -> tuple[str, ...]:
                return ()

        async def run() -> None:
            provider = self.provider(cls=NoLease, ip_timeout=60.0, ip_reservation=False)
            pod, sid = unique_pod("td")
            name = provider.instance_name(pod, sid)
            creating = provider.create_instance(pod, sid, b"", InstanceSpec())
            while name not in [d.name() for d in self.conn.listAllDomains()]:
                await deferLater(global_reactor, 0.05, lambda: None)
            creating.cancel()
            with self.assertRaises(CancelledError):
                await creating
            # the rollback runs on the owner thread after the cancelled step
            await provider._owner.run(lambda conn: None)
            self.assertEqual(self.left([name]), [])

        return Deferred.fromCoroutine(run())

    def test_delete_empty_id(self) -> Deferred[None]:
        async def run() -> None:
            with self.assertRaises(InvalidConfig):
                await self.provider().delete_instance("")

        return Deferred.fromCoroutine(run())


def _real_skip() -> str | None:
    from tests.libvirt_helpers import skip_reason

    return skip_reason()


class RealLibvirtContractTests(ProviderContractMixin, TestCase):
    """The contract against a real libvirtd with QEMU/TCG booting tests/vmimage.py's image."""

    timeout = 300
    concurrent_creates = int(os.environ.get("CAA_LIBVIRT_CONCURRENT", "4"))

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on a Deferred
        reason = _real_skip()
        if reason:
            raise SkipTest(reason)
        return deferToThread(self._setup)

    def _setup(self) -> None:
        from tests.libvirt_helpers import ensure_network, unique_name
        from tests.vmimage import build_image

        self.network = ensure_network().name
        image = build_image()
        self.pool_dir = tempfile.mkdtemp(prefix="caa-pool-")
        shutil.copy(image, os.path.join(self.pool_dir, "base.qcow2"))
        self.conn = libvirt.open("qemu:///system")
        self.pool_name = unique_name("caa-tpool")
        self.pool = self.conn.storagePoolCreateXML(
            f"<pool type='dir'><name>{self.pool_name}</name><target><path>{self.pool_dir}</path></target></pool>", 0
        )
        self.addCleanup(deferToThread, self._cleanup)

    def _cleanup(self) -> None:
        for volume in self.pool.listAllVolumes():
            volume.delete(0)
        self.pool.destroy()
        self.conn.close()
        shutil.rmtree(self.pool_dir, ignore_errors=True)

    async def make_provider(self) -> LibvirtProvider:
        config = LibvirtConfig(
            uri="qemu:///system", pool_name=self.pool_name, network_name=self.network, vol_name="base.qcow2",
            firmware="", domain_type="qemu", cpu=1, memory=256, root_disk_size=1, ip_timeout=120.0,
        )
        provider = LibvirtProvider(as_node_reactor(global_reactor), config)
        self.addCleanup(provider.teardown)
        await provider.verify_config()
        return provider

    def impossible_spec(self) -> tuple[InstanceSpec, ErrorKind]:
        return InstanceSpec(image="non-existing-image"), ErrorKind.INVALID_CONFIG

    async def leftovers(self, names: list[str]) -> list[str]:
        def left() -> list[str]:
            self.pool.refresh(0)
            volumes = [v for v in self.pool.listVolumes() if v != "base.qcow2"]
            domains = [d.name() for d in self.conn.listAllDomains() if d.name() in names]
            return volumes + domains + [p for p in os.listdir(self.pool_dir) if p != "base.qcow2"]

        return await deferToThread(left)

    async def check_running(self, instance: Any, user_data: bytes) -> None:
        """The guest serves its cidata CD-ROM over HTTP on the address create returned: the user data we passed came
        through, and the guest got the reserved address from DHCP. create returns before the guest boots (the
        address is reserved up front), so the wait here covers the boot."""

        def fetch() -> bytes:
            deadline = time.monotonic() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"http://{instance.ips[0]}:15150/user-data", timeout=2) as r:
                        return bytes(r.read())
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

        self.assertEqual(await deferToThread(fetch), user_data)
