"""
The libvirt provider's up-front address (DHCP host reservation) against a real libvirtd: the shared NAT network
caa-test (DHCP .100-.250) and a pool whose base volume is an empty qcow2. SeaBIOS finds nothing to boot on it, so
the guest never asks for a lease: whatever IP create returns came from the reservation, and the tests boot nothing
heavy.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import libvirt
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from caa.providers.interfaces import InstanceSpec, ProviderError, TransientError
from caa.providers.libvirt.config import LibvirtConfig
from caa.providers.libvirt.dhcp import DhcpHost, dhcp_hosts, random_mac
from caa.providers.libvirt.domainxml import interface_macs
from caa.providers.libvirt.provider import LibvirtProvider
from caa.reactors import as_node_reactor
from tests import libvirt_helpers as lh
from tests.test_providers_contract import unique_pod
from tests.test_providers_libvirt import _StreamlessLibvirtProvider, _TestDriver

DHCP_FIRST = ipaddress.IPv4Address("192.168.150.100")
DHCP_LAST = ipaddress.IPv4Address("192.168.150.250")


def empty_base_image(directory: Path) -> Path:
    """A 16 MiB qcow2 with nothing on it: a guest that never boots an OS (and so never asks for DHCP)."""
    path = directory / "empty.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True, timeout=60)
    return path


def network_hosts(network: str) -> list[DhcpHost]:
    """The network's DHCP host entries, live and persistent (each once)."""
    conn = lh.open_connection()
    try:
        net = conn.networkLookupByName(network)
        hosts = list(dhcp_hosts(net.XMLDesc(0)))
        for host in dhcp_hosts(net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)):
            if host not in hosts:
                hosts.append(host)
        return hosts
    finally:
        conn.close()


def leases_for(network: str, mac: str) -> list[str]:
    conn = lh.open_connection()
    try:
        return [str(lease["ipaddr"]) for lease in conn.networkLookupByName(network).DHCPLeases()
                if str(lease.get("mac", "")).lower() == mac]
    finally:
        conn.close()


def domain_macs(name: str) -> list[str]:
    conn = lh.open_connection()
    try:
        return interface_macs(conn.lookupByName(name).XMLDesc(0))
    finally:
        conn.close()


def remove_hosts_named(network: str, prefix: str) -> None:
    """Test cleanup: host entries a failed test may have left behind (only names of this test)."""
    conn = lh.open_connection()
    try:
        net = conn.networkLookupByName(network)
        for flags, xml in ((libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE, net.XMLDesc(0)),
                           (libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG, net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE))):
            for host in dhcp_hosts(xml):
                if host.name.startswith(prefix):
                    net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST,
                               -1, host.xml(), flags)
    finally:
        conn.close()


class ReservationTests(TestCase):
    timeout = 240

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on a Deferred
        reason = lh.skip_reason()
        if reason:
            raise SkipTest(reason)
        self.pods: list[tuple[str, str]] = []
        return deferToThread(self._setup)

    def _setup(self) -> None:
        self.network = lh.ensure_network().name
        self.tmp = Path(tempfile.mkdtemp(prefix="caa-ipres-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.pool = lh.make_pool(empty_base_image(self.tmp), self.tmp / "pool", base_volume="empty.qcow2")
        self.addCleanup(deferToThread, self.pool.remove)
        self.addCleanup(deferToThread, self._remove_leftovers)

    def _remove_leftovers(self) -> None:
        for pod, sid in self.pods:
            name = f"podvm-{pod}-{sid[:8]}"
            lh.destroy_domain(name)
            remove_hosts_named(self.network, name)

    def pod(self) -> tuple[str, str]:
        pod, sid = unique_pod("ipres")
        self.pods.append((pod, sid))
        return pod, sid

    def provider(self, network: str | None = None, **kw: Any) -> LibvirtProvider:
        values: dict[str, Any] = dict(
            uri=lh.LIBVIRT_URI, pool_name=self.pool.name, network_name=network or self.network,
            vol_name=self.pool.base_volume, firmware="", domain_type="qemu", cpu=1, memory=64, root_disk_size=1,
            ip_timeout=120.0,
        )
        values.update(kw)
        provider = LibvirtProvider(as_node_reactor(global_reactor), LibvirtConfig(**values))
        self.addCleanup(provider.teardown)
        return provider

    async def volumes_of(self, name: str) -> list[str]:
        return [v for v in await deferToThread(self.pool.volumes) if v.startswith(name + "-")]

    async def hosts_named(self, name: str, network: str | None = None) -> list[DhcpHost]:
        return [h for h in await deferToThread(network_hosts, network or self.network) if h.name == name]

    async def test_create_returns_the_reserved_ip_before_any_lease(self) -> None:
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        provider = self.provider()
        await provider.verify_config()
        pod, sid = self.pod()
        instance = await provider.create_instance(pod, sid, b"#cloud-config\n", InstanceSpec())
        self.addCleanup(provider.delete_instance, instance.id)
        macs = await deferToThread(domain_macs, instance.name)
        self.assertEqual(len(macs), 1)
        self.assertRegex(macs[0], r"^52:54:00(:[0-9a-f]{2}){3}$")
        self.assertEqual(await deferToThread(leases_for, self.network, macs[0]), [],
                         "the empty disk never boots: no lease")
        self.assertEqual(len(instance.ips), 1)
        ip = ipaddress.IPv4Address(instance.ips[0])
        self.assertTrue(DHCP_FIRST <= ip <= DHCP_LAST, ip)
        # in the live and the persistent definition of the network, for the domain's MAC
        self.assertEqual(await self.hosts_named(instance.name), [DhcpHost(macs[0], instance.name, str(ip))])
        conn = await deferToThread(lh.open_connection)
        self.addCleanup(conn.close)
        inactive = conn.networkLookupByName(self.network).XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)
        self.assertIn(DhcpHost(macs[0], instance.name, str(ip)), dhcp_hosts(inactive))
        texts = [formatEvent(e) for e in observer if e.get("log_source") is provider]
        self.assertIn(f"reserved {ip} for {macs[0]} on network {self.network}", texts)
        # an adaptor that restarts finds the instance with its address before any lease
        found = await provider.find_instance(instance.name)
        assert found is not None
        self.assertEqual(found.ips, (str(ip),))

        await provider.delete_instance(instance.id)
        self.assertIsNone(await provider.find_instance(instance.name))
        self.assertEqual(await self.volumes_of(instance.name), [])
        self.assertEqual(await self.hosts_named(instance.name), [])
        self.assertEqual([h for h in await deferToThread(network_hosts, self.network) if h.mac == macs[0]], [])
        await provider.delete_instance(instance.id)  # a missing instance: still fine

    async def test_failed_start_leaves_no_reservation(self) -> None:
        # libvirt accepts the definition (the cpuset is well-formed) but the host has no CPU 4095 to pin to
        provider = self.provider(cpuset="4095")
        pod, sid = self.pod()
        name = provider.instance_name(pod, sid)
        with self.assertRaises(ProviderError) as caught:
            await provider.create_instance(pod, sid, b"", InstanceSpec())
        self.assertIn("Error in starting domain", str(caught.exception))
        self.assertEqual(await deferToThread(lh.domains_named, name), [])
        self.assertEqual(await self.volumes_of(name), [])
        self.assertEqual(await self.hosts_named(name), [])

    async def test_concurrent_creates_get_different_addresses(self) -> None:
        # two providers: two adaptors sharing the network, each with its own connection thread
        first, second = self.provider(), self.provider()
        pods = [self.pod() for _ in range(4)]
        creates = [Deferred.fromCoroutine(self._create(first if i % 2 else second, pod, sid))
                   for i, (pod, sid) in enumerate(pods)]
        instances = await gatherResults(creates)
        ips = [i.ips[0] for i in instances]
        self.assertEqual(len(set(ips)), len(ips), ips)
        for instance in instances:
            hosts = await self.hosts_named(instance.name)
            self.assertEqual([h.ip for h in hosts], list(instance.ips))
            self.assertEqual([h.mac for h in hosts], await deferToThread(domain_macs, instance.name))
        await gatherResults([first.delete_instance(i.id) for i in instances])
        for instance in instances:
            self.assertEqual(await self.hosts_named(instance.name), [])

    async def _create(self, provider: LibvirtProvider, pod: str, sid: str) -> Any:
        instance = await provider.create_instance(pod, sid, b"", InstanceSpec())
        self.addCleanup(provider.delete_instance, instance.id)
        return instance

    async def test_stale_reservation_of_the_same_name_is_replaced(self) -> None:
        provider = self.provider()
        pod, sid = self.pod()
        name = provider.instance_name(pod, sid)
        # an interrupted create left its reservation (its domain is gone)
        stale = DhcpHost(random_mac(), name, "192.168.150.249")
        await deferToThread(self._add_host, stale)
        if stale.ip in await deferToThread(self._leased_ips):
            raise AssertionError("test setup: the stale address is leased")
        instance = await provider.create_instance(pod, sid, b"", InstanceSpec())
        self.addCleanup(provider.delete_instance, instance.id)
        hosts = await self.hosts_named(name)
        self.assertEqual(len(hosts), 1)
        self.assertNotEqual(hosts[0].mac, stale.mac)
        self.assertEqual(hosts[0].mac, (await deferToThread(domain_macs, name))[0])
        await provider.delete_instance(instance.id)
        # and a delete by name of a gone domain removes a reservation left under that name
        await deferToThread(self._add_host, stale)
        await provider.delete_instance(name)
        self.assertEqual(await self.hosts_named(name), [])

    def _add_host(self, host: DhcpHost) -> None:
        conn = lh.open_connection()
        try:
            conn.networkLookupByName(self.network).update(
                libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1, host.xml(),
                libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG)
        finally:
            conn.close()

    def _leased_ips(self) -> list[str]:
        conn = lh.open_connection()
        try:
            return [str(lease["ipaddr"]) for lease in conn.networkLookupByName(self.network).DHCPLeases()]
        finally:
            conn.close()

    async def test_option_off_waits_for_the_lease(self) -> None:
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        provider = self.provider(ip_reservation=False, ip_timeout=2.0)
        pod, sid = self.pod()
        name = provider.instance_name(pod, sid)
        with self.assertRaises(TransientError) as caught:
            await provider.create_instance(pod, sid, b"", InstanceSpec())
        self.assertIn("IP addresses not found", str(caught.exception))
        texts = [formatEvent(e) for e in observer if e.get("log_source") is provider]
        self.assertIn(f"--ip-reservation is off; {name} waits for its DHCP lease on network {self.network}", texts)
        self.assertEqual(await self.hosts_named(name), [])
        self.assertEqual(await deferToThread(lh.domains_named, name), [])
        self.assertEqual(await self.volumes_of(name), [])

    async def test_network_without_dhcp_range_waits_for_the_lease(self) -> None:
        network = await deferToThread(self._network_without_dhcp)
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        provider = self.provider(network=network, ip_timeout=2.0)
        await provider.verify_config()
        pod, sid = self.pod()
        name = provider.instance_name(pod, sid)
        with self.assertRaises(TransientError) as caught:
            await provider.create_instance(pod, sid, b"", InstanceSpec())
        self.assertIn("IP addresses not found", str(caught.exception))
        texts = [formatEvent(e) for e in observer if e.get("log_source") is provider]
        self.assertIn(f"network {network} has no DHCP range we can reserve in; waiting for the DHCP lease", texts)
        self.assertEqual(await self.hosts_named(name, network), [])
        self.assertEqual(await deferToThread(lh.domains_named, name), [])
        self.assertEqual(await self.volumes_of(name), [])

    async def test_refused_update_waits_for_the_lease(self) -> None:
        """libvirtd's read-only socket refuses every change (as a user without write access to the network would be
        refused): the reservation step gives way to the lease wait, and nothing is added to the network. (Creating
        the domain needs write access too, so the step is run alone on the provider's connection thread.)"""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        provider = self.provider(uri="qemu:///system?socket=/var/run/libvirt/libvirt-sock-ro")
        pod, sid = self.pod()
        name = provider.instance_name(pod, sid)
        self.assertIsNone(await provider._owner.run(provider._t_reserve, name))
        texts = [formatEvent(e) for e in observer if e.get("log_source") is provider]
        refused = [t for t in texts if t.startswith(f"network {self.network} refuses DHCP host reservations (")]
        self.assertEqual(len(refused), 1, texts)
        self.assertIn("read only access prevents virNetworkUpdate", refused[0])
        self.assertTrue(refused[0].endswith("); waiting for the DHCP lease"), refused[0])
        self.assertEqual(await self.hosts_named(name), [])

    def _network_without_dhcp(self) -> str:
        """A routed-nowhere network of this test (unique name, bridge and subnet), with an address and no DHCP."""
        name = lh.unique_name("caa-nodhcp")
        bridge = f"virbr-ipf{os.getpid() % 100000}"
        subnet = 16 + os.getpid() % 200
        xml = (f"<network><name>{name}</name><bridge name='{bridge}'/>"
               f"<ip address='172.31.{subnet}.1' netmask='255.255.255.0'/></network>")
        conn = lh.open_connection()
        try:
            net = conn.networkDefineXML(xml)
            net.create()
        finally:
            conn.close()

        def remove() -> None:
            c = lh.open_connection()
            try:
                n = c.networkLookupByName(name)
                if n.isActive():
                    n.destroy()
                n.undefine()
            finally:
                c.close()

        self.addCleanup(deferToThread, remove)
        return name


class _RacedProvider(_StreamlessLibvirtProvider):
    """The provider with another adaptor (sharing the network) stepping in between our read of the network and our
    ADD: at the first lease lookup it reserves the addresses we are about to choose from, and reports the last one
    of the range as leased so our first choice is sure to collide."""

    rival_hosts: list[DhcpHost]
    lease_first: str

    def _leased(self, network: Any) -> list[str]:
        if self.rival_hosts:
            for host in self.rival_hosts:
                network.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST,
                               -1, host.xml(), libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE)
            self.rival_hosts = []
            return [self.lease_first]
        return []


class TestDriverReservationTests(_TestDriver, TestCase):
    """The reservation steps against libvirt's in-process test driver, which implements virNetworkUpdate with the
    same collision checks as the network driver (but no lease list)."""

    def setUp(self) -> None:
        self.case = self
        self.setup_test_driver()

    def tiny_network(self, first: int, last: int) -> str:
        name = f"caa-tiny-{os.getpid()}-{id(self)}"
        net = self.conn.networkCreateXML(
            f"<network><name>{name}</name><bridge name='tiny{id(self) % 100000}'/>"
            f"<ip address='10.77.0.1' netmask='255.255.255.0'><dhcp><range start='10.77.0.{first}' "
            f"end='10.77.0.{last}'/></dhcp></ip></network>")
        self.addCleanup(net.destroy)
        return name

    async def test_address_taken_meanwhile_is_retried(self) -> None:
        network = self.tiny_network(10, 12)
        provider = self.provider(cls=_RacedProvider, network_name=network)
        assert isinstance(provider, _RacedProvider)
        provider.rival_hosts = [DhcpHost("52:54:00:ee:00:10", "rival-a", "10.77.0.10"),
                                DhcpHost("52:54:00:ee:00:11", "rival-b", "10.77.0.11")]
        provider.lease_first = "10.77.0.12"
        pod, sid = unique_pod("race")
        instance = await provider.create_instance(pod, sid, b"", InstanceSpec())
        self.assertEqual(instance.ips, ("10.77.0.12",))
        xml = self.conn.networkLookupByName(network).XMLDesc(0)
        macs = interface_macs(self.conn.lookupByName(instance.name).XMLDesc(0))
        self.assertIn(DhcpHost(macs[0], instance.name, "10.77.0.12"), dhcp_hosts(xml))
        await provider.delete_instance(instance.id)
        # exactly our entry went: the rival adaptor's stay
        self.assertEqual([h.name for h in dhcp_hosts(self.conn.networkLookupByName(network).XMLDesc(0))],
                         ["rival-a", "rival-b"])
        self.assertEqual(self.left([instance.name]), [])

    async def test_full_range_waits_for_the_lease(self) -> None:
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        network = self.tiny_network(10, 10)
        self.conn.networkLookupByName(network).update(
            libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1,
            DhcpHost("52:54:00:ee:00:10", "rival-a", "10.77.0.10").xml(), libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE)
        provider = self.provider(network_name=network)
        pod, sid = unique_pod("full")
        instance = await provider.create_instance(pod, sid, b"", InstanceSpec())  # the test driver "leases" one
        self.addCleanup(provider.delete_instance, instance.id)
        texts = [formatEvent(e) for e in observer if e.get("log_source") is provider]
        self.assertIn(f"network {network} has no free address in its DHCP range; waiting for the DHCP lease", texts)
        hosts = dhcp_hosts(self.conn.networkLookupByName(network).XMLDesc(0))
        self.assertEqual([h.name for h in hosts], ["rival-a"])
