"""Network-namespace helpers for integration tests (root only), built on pyroute2.

Reusable by every engineer's tests. All names are unique per process (pid + counter), so tests
can run in parallel (``trial -j2``); :class:`Netns` objects remove themselves when registered with
``testcase.addCleanup`` (done by :func:`make_netns`).

Functions and classes:

``need_root(testcase)``
    Skip the test when not root / tools missing, unless ``CI`` is set (then the test runs and fails).
``unique(prefix, width=15) -> str``
    A name unique in this process, at most ``width`` characters (interface names: 15).
``make_netns(testcase, prefix="t") -> Netns``
    Create a named netns under /run/netns and register its removal (with everything in it).
``Netns``
    ``.name``, ``.path``; ``.ipr()`` (context manager: an IPRoute in it); ``.run(argv, **kw)``
    (subprocess under ``nsenter --net=<path>``, returns CompletedProcess); ``.popen(argv, **kw)``;
    ``.remove()``.
``veth(a, name_a, b, name_b, mtu=None)``
    Create a veth pair with one end in each namespace (never touches the root netns).
``bridge(ns, name, cidr=None, mtu=None)``
    Create a bridge in ``ns``, optionally with an address, and set it up.
``set_up(ns, ifname)``, ``add_addr(ns, ifname, cidr)``, ``add_route(ns, dst, gateway=None, dev=None)``
``underlay(testcase, a, b, net="192.168.77.0/24", mtu=1500) -> (ip_a, ip_b)``
    Join two namespaces with a veth underlay (``ul<a>``/``ul<b>``), addresses .1 and .2, default routes
    towards each other (so each has a primary interface).
``cni_pod(testcase, worker, bridge_name, ip_cidr, gateway, ifname="eth0", mtu=1450, mac=None,
          neighbors=((ip, mac),), extra_routes=()) -> Netns``
    A pod netns wired like a bridge CNI: veth ``ifname`` in the pod, peer on ``bridge_name`` in
    ``worker``, the address, a default route via ``gateway``, permanent neighbours.
``snapshot(ns) -> dict``
    Links (name, kind, mtu, mac, master), addresses, routes, permanent neighbours, qdiscs, tc
    filters, ``iptables -S`` of the raw, filter and nat tables and caa's nft table ``ip caa_peerpod``: diff two
    snapshots to prove a clean teardown.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute
from twisted.trial.unittest import SynchronousTestCase

from caa.network import _netns

_counter = itertools.count()
NETNS_DIR = "/run/netns"


def need_root(testcase: SynchronousTestCase, tools: Sequence[str] = ("iptables", "nsenter")) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    reason = ""
    if os.geteuid() != 0:
        reason = "needs root (network namespaces)"
    elif missing:
        reason = f"needs {', '.join(missing)}"
    if reason and not os.environ.get("CI"):
        testcase.skipTest(reason)


def unique(prefix: str, width: int = 15) -> str:
    n = next(_counter)
    tail = f"{os.getpid() % 100000:x}{n:x}"
    return (prefix[: max(1, width - len(tail))] + tail)[:width]


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name
        self.path = os.path.join(NETNS_DIR, name)
        _netns.create(self.path)

    @contextmanager
    def ipr(self) -> Iterator[IPRoute]:
        with _netns.entered(self.path):
            ipr = IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()

    def run(self, argv: Sequence[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 120)
        return subprocess.run(["nsenter", f"--net={self.path}", *argv], check=check, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["nsenter", f"--net={self.path}", *argv], **kw)

    def remove(self) -> None:
        if os.path.exists(self.path):
            _netns.remove(self.path)

    def __repr__(self) -> str:
        return f"Netns({self.name})"


def make_netns(testcase: SynchronousTestCase, prefix: str = "t") -> Netns:
    ns = Netns(unique(prefix, 30))
    testcase.addCleanup(ns.remove)
    return ns


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise LookupError(name)
    return int(found[0])


def veth(a: Netns, name_a: str, b: Netns, name_b: str, mtu: int | None = None) -> None:
    with a.ipr() as ipr:
        fd = os.open(b.path, os.O_RDONLY)
        try:
            ipr.link("add", ifname=name_a, kind="veth", peer={"ifname": name_b, "net_ns_fd": fd})
        finally:
            os.close(fd)
        if mtu:
            ipr.link("set", index=_index(ipr, name_a), mtu=mtu)
        ipr.link("set", index=_index(ipr, name_a), state="up")
    with b.ipr() as ipr:
        if mtu:
            ipr.link("set", index=_index(ipr, name_b), mtu=mtu)
        ipr.link("set", index=_index(ipr, name_b), state="up")


def set_up(ns: Netns, ifname: str) -> None:
    with ns.ipr() as ipr:
        ipr.link("set", index=_index(ipr, ifname), state="up")


def add_addr(ns: Netns, ifname: str, cidr: str) -> None:
    addr, plen = cidr.split("/")
    with ns.ipr() as ipr:
        ipr.addr("add", index=_index(ipr, ifname), address=addr, prefixlen=int(plen))


def add_route(ns: Netns, dst: str, gateway: str | None = None, dev: str | None = None) -> None:
    spec: dict[str, Any] = {}
    if dst in ("default", "0.0.0.0/0"):
        spec.update(dst="0.0.0.0", dst_len=0)
    else:
        a, plen = dst.split("/")
        spec.update(dst=a, dst_len=int(plen))
    with ns.ipr() as ipr:
        if gateway:
            spec["gateway"] = gateway
        if dev:
            spec["oif"] = _index(ipr, dev)
        ipr.route("add", **spec)


def bridge(ns: Netns, name: str, cidr: str | None = None, mtu: int | None = None) -> None:
    with ns.ipr() as ipr:
        ipr.link("add", ifname=name, kind="bridge")
        idx = _index(ipr, name)
        if mtu:
            ipr.link("set", index=idx, mtu=mtu)
        ipr.link("set", index=idx, state="up")
    if cidr:
        add_addr(ns, name, cidr)


def underlay(testcase: SynchronousTestCase, a: Netns, b: Netns, net: str = "192.168.77.0/24",
             mtu: int = 1500) -> tuple[str, str]:
    base = net.split("/")[0].rsplit(".", 1)[0]
    plen = net.split("/")[1]
    ip_a, ip_b = f"{base}.1", f"{base}.2"
    veth(a, "ula", b, "ulb", mtu=mtu)
    add_addr(a, "ula", f"{ip_a}/{plen}")
    add_addr(b, "ulb", f"{ip_b}/{plen}")
    add_route(a, "default", gateway=ip_b, dev="ula")
    add_route(b, "default", gateway=ip_a, dev="ulb")
    return ip_a, ip_b


def cni_pod(testcase: SynchronousTestCase, worker: Netns, bridge_name: str, ip_cidr: str, gateway: str,
            ifname: str = "eth0", mtu: int = 1450, mac: str | None = None,
            neighbors: Sequence[tuple[str, str]] = (), extra_routes: Sequence[tuple[str, str | None]] = ()) -> Netns:
    pod = make_netns(testcase, "pod")
    peer = unique("vp")
    veth(pod, ifname, worker, peer, mtu=mtu)
    with worker.ipr() as ipr:
        ipr.link("set", index=_index(ipr, peer), master=_index(ipr, bridge_name))
    with pod.ipr() as ipr:
        idx = _index(ipr, ifname)
        if mac:
            ipr.link("set", index=idx, address=mac)
        lo = _index(ipr, "lo")
        ipr.link("set", index=lo, state="up")
    add_addr(pod, ifname, ip_cidr)
    add_route(pod, "default", gateway=gateway, dev=ifname)
    for dst, gw in extra_routes:
        add_route(pod, dst, gateway=gw, dev=ifname)
    with pod.ipr() as ipr:
        idx = _index(ipr, ifname)
        for ip, lladdr in neighbors:
            ipr.neigh("add", dst=ip, lladdr=lladdr, ifindex=idx, state=0x80)
    return pod


def snapshot(ns: Netns) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with ns.ipr() as ipr:
        names = {}
        links = []
        for link in ipr.link("dump"):
            names[link["index"]] = link.get_attr("IFLA_IFNAME")
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            links.append((link.get_attr("IFLA_IFNAME"), kind, link.get_attr("IFLA_MTU"),
                          link.get_attr("IFLA_ADDRESS"), link.get_attr("IFLA_MASTER")))
        out["links"] = sorted(links, key=str)
        out["addrs"] = sorted(((names.get(a["index"]), a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                               for a in ipr.addr("dump")), key=str)
        out["routes"] = sorted((
            (r.get_attr("RTA_TABLE"), r.get_attr("RTA_DST"), r["dst_len"], r.get_attr("RTA_GATEWAY"),
             names.get(r.get_attr("RTA_OIF")), r["proto"], r["scope"], r["family"])
            for r in ipr.route("dump") if r.get_attr("RTA_TABLE") != 255
        ), key=str)
        out["neigh"] = sorted(((names.get(n["ifindex"]), n.get_attr("NDA_DST"), n.get_attr("NDA_LLADDR"))
                               for n in ipr.neigh("dump") if n["state"] & 0x80), key=str)
        qdiscs = []
        filters = []
        for idx, name in names.items():
            for q in ipr.tc("dump", index=idx) or []:
                if q["index"] == idx:
                    qdiscs.append((name, q.get_attr("TCA_KIND"), q["handle"], q["parent"]))
            # the sync wrapper of pyroute2 0.9 does not collect "dump-filter"; drive the async core
            for f in ipr._generate_with_cleanup(ipr.asyncore.tc, "dump-filter", index=idx, parent=0xFFFF0000):
                if f["index"] == idx:
                    filters.append((name, f.get_attr("TCA_KIND"), f["parent"]))
        out["qdiscs"] = sorted(qdiscs, key=str)
        out["filters"] = sorted(filters, key=str)
    for table in ("raw", "filter", "nat"):
        proc = ns.run(["iptables", "--wait", "-t", table, "-S"], check=False)
        out[f"iptables-{table}"] = proc.stdout.splitlines()
    if shutil.which("nft"):
        # caa's own nft table (used where iptables is absent); iptables-nft's tables show in iptables -S
        out["nft-caa"] = ns.run(["nft", "list", "table", "ip", "caa_peerpod"], check=False).stdout.splitlines()
    return out
