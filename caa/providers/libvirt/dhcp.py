"""
DHCP host reservations on a libvirt network (pure helpers, no libvirt import): what the provider needs to give a
pod VM its address before it boots. It picks a MAC and a free IPv4 address in the network's DHCP range and adds
`<host mac=... name=<domain> ip=.../>` to the network, so dnsmasq hands exactly that address to the guest and the
provider can return it at once instead of waiting for the lease.
"""

from __future__ import annotations

import ipaddress
import random
import xml.etree.ElementTree as ET
from collections.abc import Iterable

from attrs import frozen

#: libvirt's (QEMU's) locally administered prefix for generated NIC addresses.
LIBVIRT_MAC_PREFIX = "52:54:00"


@frozen
class DhcpHost:
    """One `<host>` entry of a network's `<dhcp>`."""

    mac: str
    name: str
    ip: str

    def xml(self) -> str:
        """The entry as virNetworkUpdate takes it (only the attributes that are set: DELETE matches on them)."""
        attrs = {key: value for key, value in (("mac", self.mac), ("name", self.name), ("ip", self.ip)) if value}
        return ET.tostring(ET.Element("host", attrs), encoding="unicode")


@frozen
class DhcpScope:
    """The IPv4 `<ip>` of a network that has a DHCP range: its ranges, host entries and own address."""

    gateway: ipaddress.IPv4Address
    ranges: tuple[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address], ...]
    hosts: tuple[DhcpHost, ...]


def _is_ipv4(ip: ET.Element) -> bool:
    family = ip.get("family")
    if family:
        return family == "ipv4"
    try:
        return isinstance(ipaddress.ip_address(ip.get("address", "")), ipaddress.IPv4Address)
    except ValueError:
        return False


def _hosts(dhcp: ET.Element) -> tuple[DhcpHost, ...]:
    return tuple(
        DhcpHost((host.get("mac") or "").lower(), host.get("name") or "", host.get("ip") or "")
        for host in dhcp.findall("host")
    )


def dhcp_scope(network_xml: str) -> DhcpScope | None:
    """The first IPv4 `<ip>` with a `<dhcp><range>` (the one libvirt updates for parent index -1), or None."""
    for ip in ET.fromstring(network_xml).findall("ip"):
        dhcp = ip.find("dhcp")
        if not _is_ipv4(ip) or dhcp is None:
            continue
        ranges = []
        for element in dhcp.findall("range"):
            try:
                start = ipaddress.IPv4Address(element.get("start", ""))
                end = ipaddress.IPv4Address(element.get("end", ""))
            except ValueError:
                continue
            if start <= end:
                ranges.append((start, end))
        if ranges:
            return DhcpScope(ipaddress.IPv4Address(ip.get("address", "0.0.0.0")), tuple(ranges), _hosts(dhcp))
    return None


def dhcp_hosts(network_xml: str) -> tuple[DhcpHost, ...]:
    """Every `<host>` entry of the network's IPv4 `<dhcp>` elements (with or without a range)."""
    hosts: list[DhcpHost] = []
    for ip in ET.fromstring(network_xml).findall("ip"):
        dhcp = ip.find("dhcp")
        if _is_ipv4(ip) and dhcp is not None:
            hosts.extend(_hosts(dhcp))
    return tuple(hosts)


def hosts_of(network_xml: str, name: str, macs: Iterable[str] = ()) -> list[DhcpHost]:
    """The host entries of one domain: named after it, or for one of its MACs."""
    wanted = {mac.lower() for mac in macs}
    return [host for host in dhcp_hosts(network_xml) if (name and host.name == name) or host.mac in wanted]


def reserved_ips(network_xml: str, macs: Iterable[str]) -> list[str]:
    """The addresses reserved for these MACs, in the network's order."""
    wanted = {mac.lower() for mac in macs}
    return [host.ip for host in dhcp_hosts(network_xml) if host.ip and host.mac in wanted]


def _taken(scope: DhcpScope, leased: Iterable[str], avoid: Iterable[str]) -> set[str]:
    return {host.ip for host in scope.hosts} | set(leased) | set(avoid) | {str(scope.gateway)}


def free_addresses(scope: DhcpScope, leased: Iterable[str], avoid: Iterable[str] = ()) -> list[str]:
    """The range addresses not reserved by a host entry, not leased, not the network's own, not in `avoid`."""
    taken = _taken(scope, leased, avoid)
    free: dict[str, None] = {}
    for start, end in scope.ranges:
        for value in range(int(start), int(end) + 1):
            address = str(ipaddress.IPv4Address(value))
            if address not in taken:
                free[address] = None
    return list(free)


#: Ranges up to this size are listed in full; larger ones are probed at random.
_LISTED_RANGE = 1 << 16
_PROBES = 4096


def choose_address(
    scope: DhcpScope, leased: Iterable[str], avoid: Iterable[str] = (), rng: random.Random | None = None
) -> str | None:
    """A free address of the DHCP range, picked at random (adaptors sharing the network rarely pick the same one
    at the same time); None when the range is full (or, for a huge range, when random probes find nothing)."""
    chooser = rng or random.SystemRandom()
    size = sum(int(end) - int(start) + 1 for start, end in scope.ranges)
    if size <= _LISTED_RANGE:
        free = free_addresses(scope, leased, avoid)
        return chooser.choice(free) if free else None
    taken = _taken(scope, leased, avoid)
    for _ in range(_PROBES):
        index = chooser.randrange(size)
        for start, end in scope.ranges:
            width = int(end) - int(start) + 1
            if index < width:
                address = str(ipaddress.IPv4Address(int(start) + index))
                if address not in taken:
                    return address
                break
            index -= width
    return None


def random_mac(rng: random.Random | None = None) -> str:
    """A random MAC under libvirt's 52:54:00 prefix."""
    chooser = rng or random.SystemRandom()
    return LIBVIRT_MAC_PREFIX + "".join(f":{chooser.randrange(256):02x}" for _ in range(3))
