"""Blocking pyroute2 helpers shared by the node side and the pod-VM side (call from threads).

Namespaces are referred to by path (``/run/netns/x``, ``/proc/<pid>/ns/net``) or by name
(resolved under ``/run/netns``); ``None`` means the namespace of the calling process.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from caa.network import _netns
from caa.network.interfaces import (
    AddressError,
    InterfaceNotFoundError,
    NetnsNotFoundError,
    NoDefaultRouteError,
)

NETNS_DIR = "/run/netns"

RT_PROTOS = {2: "kernel", 3: "boot", 4: "static", 16: "dhcp"}
RT_PROTO_IDS = {v: k for k, v in RT_PROTOS.items()}
RT_SCOPES = {0: "universe", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
RT_SCOPE_IDS = {v: k for k, v in RT_SCOPES.items()}
NUD_STATES = {0: "none", 0x01: "incomplete", 0x02: "reachable", 0x04: "stale", 0x08: "delay",
              0x10: "probe", 0x20: "failed", 0x40: "noarp", 0x80: "permanent"}
NUD_IDS = {v: k for k, v in NUD_STATES.items()}
NUD_PERMANENT = 0x80
RTN_UNICAST = 1
RT_TABLE_MAIN = 254


def netns_path(ref: str) -> str:
    """A netns path for a name or a path."""
    return ref if "/" in ref else os.path.join(NETNS_DIR, ref)


@contextmanager
def ipr_in(netns: str | None) -> Iterator[IPRoute]:
    """An IPRoute socket in ``netns`` (never creates the namespace)."""
    if netns is None:
        ipr = IPRoute()
    else:
        path = netns_path(netns)
        if not os.path.exists(path):
            raise NetnsNotFoundError(f"network namespace {path} does not exist")
        try:
            with _netns.entered(path):
                ipr = IPRoute()
        except OSError as e:
            raise NetnsNotFoundError(f"cannot enter network namespace {path}: {e}") from e
    try:
        yield ipr
    finally:
        ipr.close()


def where(netns: str | None) -> str:
    return "the current netns" if netns is None else f"netns {netns_path(netns)}"


def link_index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def require_index(ipr: IPRoute, ifname: str, netns: str | None) -> int:
    idx = link_index(ipr, ifname)
    if idx is None:
        raise InterfaceNotFoundError(f"interface {ifname} not found in {where(netns)}")
    return idx


def link_name(ipr: IPRoute, index: int) -> str:
    links = ipr.link("get", index=index)
    return str(links[0].get_attr("IFLA_IFNAME"))


def _name_key(name: str) -> tuple[str, float]:
    m = re.match(r"^([^0-9]*)(.*)$", name)
    assert m is not None
    prefix, rest = m.group(1), m.group(2)
    try:
        num: float = int(rest)
    except ValueError:
        num = float("inf")
    return prefix, num


def primary_interface(ipr: IPRoute, netns: str | None) -> tuple[str, int, str]:
    """(name, index, gateway) of the primary interface: spec-adaptor §6.2 step 2."""
    defaults = []
    for r in ipr.route("dump", family=2):
        if r.get("dst_len") != 0 or r.get_attr("RTA_TABLE", r.get("table")) != RT_TABLE_MAIN:
            continue
        if r.get("type") != RTN_UNICAST or r.get_attr("RTA_OIF") is None:
            continue
        defaults.append(r)
    if not defaults:
        raise NoDefaultRouteError(f"no IPv4 default route in {where(netns)}: cannot find its primary interface")
    defaults.sort(key=lambda r: r.get_attr("RTA_PRIORITY") or 0)
    best = defaults[0]
    best_name = link_name(ipr, best.get_attr("RTA_OIF"))
    for r in defaults[1:]:
        name = link_name(ipr, r.get_attr("RTA_OIF"))
        bp, bn = _name_key(best_name)
        p, n = _name_key(name)
        if p == bp and n < bn:
            best, best_name = r, name
    return best_name, int(best.get_attr("RTA_OIF")), str(best.get_attr("RTA_GATEWAY") or "")


def ipv4_addresses(ipr: IPRoute, index: int) -> list[str]:
    """IPv4 addresses of an interface as ``a.b.c.d/len``, in kernel order."""
    return [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.addr("dump", family=2, index=index)
            if a["index"] == index]


def single_ipv4(ipr: IPRoute, index: int, ifname: str, netns: str | None) -> str:
    addrs = ipv4_addresses(ipr, index)
    if len(addrs) != 1:
        raise AddressError(f"interface {ifname} in {where(netns)} has {len(addrs)} IPv4 addresses "
                           f"({', '.join(addrs) or 'none'}); exactly one is required")
    return addrs[0]


def ignore_missing(exc: BaseException) -> bool:
    """True for netlink/OS errors that mean 'already gone'."""
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    return isinstance(exc, NetlinkError | OSError) and code in (errno.ENOENT, errno.ENODEV, errno.EINVAL,
                                                               errno.ESRCH, errno.EADDRNOTAVAIL)


def vxlan_info(link: Any) -> dict[str, Any] | None:
    """VXLAN attributes (id, group, port) of a link message, or None if it is not a VXLAN link."""
    info = link.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
        return None
    data = info.get_attr("IFLA_INFO_DATA")
    if data is None:
        return {"id": None, "group": None, "port": None}
    return {"id": data.get_attr("IFLA_VXLAN_ID"), "group": data.get_attr("IFLA_VXLAN_GROUP"),
            "port": data.get_attr("IFLA_VXLAN_PORT")}


def vxlan_links(ipr: IPRoute) -> list[tuple[str, int, int]]:
    """(name, index, VNI) of every VXLAN device in the namespace."""
    out = []
    for link in ipr.link("dump"):
        info = vxlan_info(link)
        if info is not None and info["id"] is not None:
            out.append((str(link.get_attr("IFLA_IFNAME")), int(link["index"]), int(info["id"])))
    return out


def delete_link(ipr: IPRoute, ifname: str) -> bool:
    """Delete a link by name; False if it was not there."""
    idx = link_index(ipr, ifname)
    if idx is None:
        return False
    try:
        ipr.link("del", index=idx)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return False
        raise
    return True


def network_of(prefix: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Interface(prefix).network
