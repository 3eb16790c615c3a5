"""The pure DHCP reservation helpers of the libvirt provider: range parsing, address choice, host entries."""

from __future__ import annotations

import random
import re
import xml.etree.ElementTree as ET

from twisted.trial.unittest import SynchronousTestCase

from caa.providers.libvirt.dhcp import (
    DhcpHost,
    choose_address,
    dhcp_hosts,
    dhcp_scope,
    free_addresses,
    hosts_of,
    random_mac,
    reserved_ips,
)
from caa.providers.libvirt.domainxml import DomainParams, HostCapabilities, build_domain_xml, interface_macs

NETWORK = """<network>
  <name>n</name>
  <ip family='ipv6' address='fd00::1' prefix='64'><dhcp><range start='fd00::10' end='fd00::20'/></dhcp></ip>
  <ip address='192.168.150.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='192.168.150.100' end='192.168.150.104'/>
      <range start='192.168.150.1' end='192.168.150.2'/>
      <host mac='52:54:00:AA:BB:CC' name='podvm-a' ip='192.168.150.101'/>
      <host mac='52:54:00:00:00:01' ip='192.168.150.103'/>
    </dhcp>
  </ip>
</network>"""

NO_RANGE = """<network><name>iso</name><ip address='10.9.0.1' netmask='255.255.255.0'/></network>"""
HOSTS_ONLY = """<network><name>h</name><ip address='10.9.0.1' netmask='255.255.255.0'><dhcp>
<host mac='52:54:00:12:34:56' name='podvm-b' ip='10.9.0.7'/></dhcp></ip></network>"""


class ScopeTests(SynchronousTestCase):
    def test_ipv4_scope_with_ranges_and_hosts(self) -> None:
        scope = dhcp_scope(NETWORK)
        assert scope is not None
        self.assertEqual(str(scope.gateway), "192.168.150.1")
        self.assertEqual([(str(a), str(b)) for a, b in scope.ranges],
                         [("192.168.150.100", "192.168.150.104"), ("192.168.150.1", "192.168.150.2")])
        # MACs compare in lower case (libvirt accepts either)
        self.assertEqual(scope.hosts, (DhcpHost("52:54:00:aa:bb:cc", "podvm-a", "192.168.150.101"),
                                       DhcpHost("52:54:00:00:00:01", "", "192.168.150.103")))

    def test_no_range_no_scope(self) -> None:
        self.assertIsNone(dhcp_scope(NO_RANGE))
        self.assertIsNone(dhcp_scope(HOSTS_ONLY))  # host entries alone: nothing we may hand out
        self.assertEqual(dhcp_hosts(HOSTS_ONLY), (DhcpHost("52:54:00:12:34:56", "podvm-b", "10.9.0.7"),))

    def test_free_addresses_skip_hosts_leases_gateway_and_tried(self) -> None:
        scope = dhcp_scope(NETWORK)
        assert scope is not None
        self.assertEqual(free_addresses(scope, []), ["192.168.150.100", "192.168.150.102", "192.168.150.104",
                                                     "192.168.150.2"])
        self.assertEqual(free_addresses(scope, ["192.168.150.100"], ["192.168.150.2"]),
                         ["192.168.150.102", "192.168.150.104"])

    def test_choose_address(self) -> None:
        scope = dhcp_scope(NETWORK)
        assert scope is not None
        rng = random.Random(7)
        picks = {choose_address(scope, ["192.168.150.104"], rng=rng) for _ in range(200)}
        self.assertEqual(picks, {"192.168.150.100", "192.168.150.102", "192.168.150.2"})
        self.assertIsNone(choose_address(scope, ["192.168.150.100", "192.168.150.102"],
                                         ["192.168.150.104", "192.168.150.2"]))

    def test_choose_address_in_a_huge_range(self) -> None:
        huge = """<network><ip address='10.0.0.1' netmask='255.0.0.0'><dhcp>
        <range start='10.0.0.2' end='10.255.255.254'/><host mac='52:54:00:00:00:02' ip='10.0.0.9'/></dhcp></ip>
        </network>"""
        scope = dhcp_scope(huge)
        assert scope is not None
        address = choose_address(scope, ["10.0.0.3"], rng=random.Random(1))
        assert address is not None
        self.assertRegex(address, r"^10\.\d+\.\d+\.\d+$")
        self.assertNotIn(address, ("10.0.0.1", "10.0.0.3", "10.0.0.9"))

    def test_host_entries_of_a_domain(self) -> None:
        self.assertEqual(hosts_of(NETWORK, "podvm-a"), [DhcpHost("52:54:00:aa:bb:cc", "podvm-a", "192.168.150.101")])
        self.assertEqual(hosts_of(NETWORK, "podvm-x", ["52:54:00:00:00:01"]),
                         [DhcpHost("52:54:00:00:00:01", "", "192.168.150.103")])
        self.assertEqual(hosts_of(NETWORK, "podvm-x"), [])
        self.assertEqual(reserved_ips(NETWORK, ["52:54:00:AA:BB:CC"]), ["192.168.150.101"])
        self.assertEqual(reserved_ips(NETWORK, ["52:54:00:99:99:99"]), [])

    def test_host_xml_names_only_what_is_set(self) -> None:
        self.assertEqual(ET.fromstring(DhcpHost("52:54:00:aa:bb:cc", "vm", "10.0.0.5").xml()).attrib,
                         {"mac": "52:54:00:aa:bb:cc", "name": "vm", "ip": "10.0.0.5"})
        self.assertEqual(ET.fromstring(DhcpHost("52:54:00:aa:bb:cc", "", "10.0.0.5").xml()).attrib,
                         {"mac": "52:54:00:aa:bb:cc", "ip": "10.0.0.5"})

    def test_random_mac(self) -> None:
        macs = {random_mac() for _ in range(50)}
        self.assertGreater(len(macs), 45)
        for mac in macs:
            self.assertRegex(mac, re.compile(r"^52:54:00(:[0-9a-f]{2}){3}$"))


class DomainMacTests(SynchronousTestCase):
    caps = HostCapabilities("x86_64", {("x86_64", "pc"): "pc"}, {"x86_64": "/usr/bin/qemu-system-x86_64"})

    def params(self, mac: str | None) -> DomainParams:
        return DomainParams("vm", 1, 256, "/p/vm-root.qcow2", "/p/vm-cloudinit.iso", "net", mac=mac)

    def test_mac_in_the_interface(self) -> None:
        xml = build_domain_xml(self.params("52:54:00:01:02:03"), self.caps)
        self.assertEqual(interface_macs(xml), ["52:54:00:01:02:03"])
        source = ET.fromstring(xml).find("devices/interface/source")
        assert source is not None
        self.assertEqual(source.get("network"), "net")

    def test_without_mac_the_xml_is_unchanged(self) -> None:
        without = build_domain_xml(self.params(None), self.caps)
        self.assertEqual(interface_macs(without), [])
        with_mac = build_domain_xml(self.params("52:54:00:01:02:03"), self.caps)
        self.assertEqual(with_mac.replace("<mac address=\"52:54:00:01:02:03\" />", ""), without)
