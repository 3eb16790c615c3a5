"""The worker-node half of the pod tunnel (spec-adaptor §6): :class:`NodeNetwork`."""

from __future__ import annotations

import errno
import ipaddress
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import attrs
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from caa.network import _netlink as nl
from caa.network import iptables
from caa.network.interfaces import (
    AddressError,
    ConfigError,
    INodeNetwork,
    InterfaceNotFoundError,
    IVniAllocator,
    Neighbor,
    NetworkError,
    PodNetworkConfig,
    Route,
    TeardownError,
    TunnelError,
)

T = TypeVar("T")

POD_TUNNEL_NAME = "vxlan1"
TEMP_PREFIX = "ppvxlan"
ETH_P_ALL = 0x0003
INGRESS_HANDLE = 0xFFFF0000


def _list_netns_dir(directory: str = nl.NETNS_DIR) -> list[str]:
    try:
        return [os.path.join(directory, n) for n in sorted(os.listdir(directory))]
    except FileNotFoundError:
        return []


@implementer(INodeNetwork)
class NodeNetwork:
    """Node side of the VXLAN tunnel. ``host_netns`` None = the adaptor's own netns.

    ``netns_lister`` returns the namespace paths :meth:`present_vnis`/:meth:`sweep` look into
    (default: every entry of /run/netns)."""

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        allocator: IVniAllocator,
        host_netns: str | None = None,
        host_interface: str = "",
        vxlan_port: int = 4789,
        pod_subnet_cidrs: Sequence[str] = (),
        external_net_via_pod_vm: bool = False,
        tunnel_type: str = "vxlan",
        netns_lister: Callable[[], list[str]] = _list_netns_dir,
    ) -> None:
        if tunnel_type != "vxlan":
            raise ConfigError(f"unknown tunnel type {tunnel_type!r} (only 'vxlan' exists)")
        self._reactor = reactor
        self._pool = threadpool
        self.allocator = allocator
        self.host_netns = host_netns
        self.host_interface = host_interface
        self.vxlan_port = vxlan_port
        self.external_net_via_pod_vm = external_net_via_pod_vm
        self.tunnel_type = tunnel_type
        self._netns_lister = netns_lister
        self.pod_subnet_cidrs: list[str] = []
        for cidr in pod_subnet_cidrs:
            try:
                self.pod_subnet_cidrs.append(str(ipaddress.IPv4Network(cidr.strip(), strict=False)))
            except ValueError:
                self._log.warn("ignoring unparsable pod subnet CIDR {cidr!r}", cidr=cidr)
        self._index = 0
        self._index_lock = threading.Lock()

    def _run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    # ---------------------------------------------------------------- inspect

    def inspect(self, netns_path: str, owner: str = "") -> Deferred[PodNetworkConfig]:
        with self._index_lock:
            index = self._index
            self._index += 1

        def allocate(cfg: PodNetworkConfig) -> PodNetworkConfig:
            vni = self.allocator.allocate(owner or netns_path)
            return attrs.evolve(cfg, vxlan_id=vni)

        d = self._run(self._inspect_sync, netns_path, index)
        d.addCallback(allocate)
        return d

    def _inspect_sync(self, netns_path: str, index: int) -> PodNetworkConfig:
        with nl.ipr_in(self.host_netns) as host:
            primary, primary_idx, _gw = nl.primary_interface(host, self.host_netns)
            host_if = self.host_interface or primary
            dedicated = bool(self.host_interface) and self.host_interface != primary
            host_idx = nl.require_index(host, host_if, self.host_netns)
            addrs = nl.ipv4_addresses(host, host_idx)
            if not addrs:
                raise AddressError(f"host interface {host_if} in {nl.where(self.host_netns)} has no IPv4 address")
            if len(addrs) > 1:
                self._log.warn("host interface {ifname} has several IPv4 addresses; using {addr}",
                               ifname=host_if, addr=addrs[0])
            worker_ip = addrs[0]
        with nl.ipr_in(netns_path) as pod:
            pod_if, pod_idx, pod_gw = nl.primary_interface(pod, netns_path)
            pod_ip = nl.single_ipv4(pod, pod_idx, pod_if, netns_path)
            link = pod.link("get", index=pod_idx)[0]
            mac = str(link.get_attr("IFLA_ADDRESS"))
            mtu = int(link.get_attr("IFLA_MTU"))
            routes = self._pod_routes(pod)
            neighbors = [
                Neighbor(ip=str(n.get_attr("NDA_DST")), hw_addr=str(n.get_attr("NDA_LLADDR") or ""),
                         dev=pod_if, state="permanent")
                for n in pod.neigh("dump", family=2, ifindex=pod_idx)
                if n["ifindex"] == pod_idx and n["state"] & nl.NUD_PERMANENT and n.get_attr("NDA_DST")
            ]
        for cidr in self.pod_subnet_cidrs:
            routes.append(Route(dst=cidr, gw=pod_gw, dev=pod_if))
        return PodNetworkConfig(
            pod_ip=pod_ip, pod_hw_addr=mac, interface=pod_if, worker_node_ip=worker_ip,
            tunnel_type=self.tunnel_type, routes=tuple(routes), neighbors=tuple(neighbors), mtu=mtu,
            index=index, vxlan_port=self.vxlan_port, vxlan_id=0, dedicated=dedicated,
            external_net_via_pod_vm=self.external_net_via_pod_vm,
        )

    @staticmethod
    def _pod_routes(pod: IPRoute) -> list[Route]:
        found = []
        names: dict[int, str] = {}
        for r in pod.route("dump", family=2):
            if r.get_attr("RTA_TABLE", r.get("table")) != nl.RT_TABLE_MAIN or r.get("type") != nl.RTN_UNICAST:
                continue
            proto = nl.RT_PROTOS.get(r.get("proto"))
            if proto is None:
                continue
            dst = r.get_attr("RTA_DST") or "0.0.0.0"
            plen = int(r.get("dst_len"))
            oif = r.get_attr("RTA_OIF")
            if oif is not None and oif not in names:
                names[oif] = nl.link_name(pod, oif)
            scope = nl.RT_SCOPES.get(r.get("scope"), "")
            route = Route(dst=f"{dst}/{plen}", gw=str(r.get_attr("RTA_GATEWAY") or ""),
                          dev=names.get(oif, "") if oif is not None else "", protocol=proto,
                          scope="" if scope == "universe" else scope)
            found.append((int(ipaddress.IPv4Address(dst)), plen, r.get_attr("RTA_PRIORITY") or 0, route))
        found.sort(key=lambda t: t[:3])
        return [t[3] for t in found]

    def release(self, vni: int) -> None:
        self.allocator.release(vni)

    # ---------------------------------------------------------------- setup

    def setup(self, netns_path: str, vm_ips: Sequence[str], config: PodNetworkConfig) -> Deferred[None]:
        if config.dedicated:
            if len(vm_ips) < 2:
                return _fail(TunnelError("dedicated tunnel missing destination address"))
            dst = vm_ips[1]
        else:
            if not vm_ips:
                return _fail(TunnelError("pod VM has no IP address for the tunnel"))
            dst = vm_ips[0]
        return self._run(self._setup_sync, netns_path, dst, config)

    def _setup_sync(self, netns_path: str, dst: str, config: PodNetworkConfig) -> None:
        vni, port = config.vxlan_id, config.vxlan_port or 4789
        if not vni:
            raise ConfigError("pod-network config has no vxlan-id")
        try:
            ipaddress.IPv4Address(dst)
        except ValueError as e:
            raise TunnelError(f"pod VM address {dst!r} is not an IPv4 address") from e
        done_rules = False
        try:
            with nl.ipr_in(netns_path) as pod:  # checks the netns first: nothing done if it is missing
                pod_idx = nl.require_index(pod, config.interface, netns_path)
                nl.delete_link(pod, POD_TUNNEL_NAME)  # stale end of an earlier attempt
                iptables.add_notrack(self.host_netns, vni, dst, port)
                done_rules = True
                temp = f"{TEMP_PREFIX}{vni}"[:15]
                with nl.ipr_in(self.host_netns) as host:
                    nl.delete_link(host, temp)
                    host.link("add", ifname=temp, kind="vxlan", vxlan_id=vni, vxlan_group=dst,
                              vxlan_port=port, vxlan_learning=0, vxlan_ttl=0, vxlan_tos=0,
                              vxlan_proxy=0, vxlan_rsc=0, vxlan_l2miss=0, vxlan_l3miss=0)
                    tidx = nl.require_index(host, temp, self.host_netns)
                    try:
                        fd = os.open(nl.netns_path(netns_path), os.O_RDONLY)
                        try:
                            host.link("set", index=tidx, net_ns_fd=fd)
                        finally:
                            os.close(fd)
                    except BaseException:
                        nl.delete_link(host, temp)
                        raise
                vidx = nl.require_index(pod, temp, netns_path)
                pod.link("set", index=vidx, ifname=POD_TUNNEL_NAME)
                pod.link("set", index=vidx, state="up")
                for src, dst_idx in ((pod_idx, vidx), (vidx, pod_idx)):
                    pod.tc("add", "ingress", index=src)
                    pod.tc("add-filter", "u32", index=src, parent=INGRESS_HANDLE, protocol=ETH_P_ALL,
                           keys=["0x0/0x0+0"], target=0,
                           action={"kind": "mirred", "direction": "egress", "action": "redirect",
                                   "ifindex": dst_idx})
        except BaseException as e:
            self._log.warn("tunnel setup in {netns} (VNI {vni}) failed, rolling back: {err}",
                           netns=netns_path, vni=vni, err=e)
            self._rollback(netns_path, config, done_rules)
            if isinstance(e, NetworkError):
                raise
            if isinstance(e, NetlinkError) and e.code == errno.ENODEV:
                raise InterfaceNotFoundError(
                    f"setting up tunnel VNI {vni} in {netns_path}: an interface vanished: {e}") from e
            raise TunnelError(f"setting up tunnel VNI {vni} in {netns_path}: {e}") from e
        self._log.info("tunnel VNI {vni} up: {netns} <-> {dst}:{port}", vni=vni, netns=netns_path, dst=dst, port=port)

    def _rollback(self, netns_path: str, config: PodNetworkConfig, rules: bool) -> None:
        errors = self._teardown_steps(netns_path, config, rules)
        for step, err in errors:
            self._log.warn("rollback step {step} failed: {err}", step=step, err=err)

    # ---------------------------------------------------------------- teardown

    def teardown(self, netns_path: str, config: PodNetworkConfig) -> Deferred[None]:
        def release(_: None) -> None:
            if config.vxlan_id:
                self.allocator.release(config.vxlan_id)

        d = self._run(self._teardown_sync, netns_path, config)
        d.addCallback(release)
        return d

    def _teardown_sync(self, netns_path: str, config: PodNetworkConfig) -> None:
        errors = self._teardown_steps(netns_path, config, True)
        if errors:
            raise TeardownError(f"tearing down tunnel VNI {config.vxlan_id} in {netns_path}", errors)
        self._log.info("tunnel VNI {vni} down ({netns})", vni=config.vxlan_id, netns=netns_path)

    def _teardown_steps(
        self, netns_path: str, config: PodNetworkConfig, rules: bool
    ) -> list[tuple[str, BaseException]]:
        errors: list[tuple[str, BaseException]] = []
        vni = config.vxlan_id
        pod: IPRoute | None = None
        try:
            pod_cm = nl.ipr_in(netns_path)
            pod = pod_cm.__enter__()
        except NetworkError:
            pod = None  # the pod netns is gone: its devices went with it
        except BaseException as e:
            errors.append(("open pod netns", e))
        if pod is not None:
            try:
                pod_if = config.interface
                if not pod_if:  # sweep: the pod interface is the netns' primary one
                    try:
                        pod_if = nl.primary_interface(pod, netns_path)[0]
                    except NetworkError:
                        pod_if = ""
                for ifname in (pod_if, POD_TUNNEL_NAME):
                    idx = nl.link_index(pod, ifname) if ifname else None
                    if idx is None:
                        continue
                    if ifname == POD_TUNNEL_NAME:
                        info = nl.vxlan_info(pod.link("get", index=idx)[0])
                        if info is None or (info["id"] is not None and vni and info["id"] != vni):
                            continue  # not our tunnel
                    try:
                        pod.tc("del", "ingress", index=idx)
                    except BaseException as e:
                        if not nl.ignore_missing(e):
                            errors.append((f"delete ingress qdisc of {ifname}", e))
                try:
                    idx = nl.link_index(pod, POD_TUNNEL_NAME)
                    if idx is not None:
                        info = nl.vxlan_info(pod.link("get", index=idx)[0])
                        if info is not None and (not vni or info["id"] in (None, vni)):
                            pod.link("del", index=idx)
                except BaseException as e:
                    if not nl.ignore_missing(e):
                        errors.append((f"delete {POD_TUNNEL_NAME}", e))
            finally:
                pod.close()
        if vni:
            try:
                with nl.ipr_in(self.host_netns) as host:
                    nl.delete_link(host, f"{TEMP_PREFIX}{vni}"[:15])
            except BaseException as e:
                errors.append(("delete temporary VXLAN device", e))
            if rules:
                try:
                    iptables.remove_notrack(self.host_netns, vni)
                except BaseException as e:
                    errors.append(("remove NOTRACK rules", e))
        return errors

    # ---------------------------------------------------------------- recovery

    def present_vnis(self) -> Deferred[set[int]]:
        return self._run(lambda: {v for v, _ in self._present_sync()})

    def _present_sync(self) -> list[tuple[int, str | None]]:
        """(VNI, pod netns path or None for host-only traces)."""
        found: list[tuple[int, str | None]] = []
        for vni in iptables.list_vnis(self.host_netns):
            found.append((vni, None))
        with nl.ipr_in(self.host_netns) as host:
            for name, _idx, vni in nl.vxlan_links(host):
                if name.startswith(TEMP_PREFIX):
                    found.append((vni, None))
        for path in self._netns_lister():
            try:
                with nl.ipr_in(path) as ipr:
                    for name, _idx, vni in nl.vxlan_links(ipr):
                        if name == POD_TUNNEL_NAME:
                            found.append((vni, path))
            except (NetworkError, OSError):
                continue
        return found

    def sweep(self, live_vnis: Iterable[int]) -> Deferred[list[int]]:
        live = set(live_vnis)

        def release(removed: list[int]) -> list[int]:
            for vni in removed:
                self.allocator.release(vni)
            return removed

        d = self._run(self._sweep_sync, live)
        d.addCallback(release)
        return d

    def _sweep_sync(self, live: set[int]) -> list[int]:
        removed: set[int] = set()
        for vni, path in self._present_sync():
            if vni in live:
                continue
            cfg = PodNetworkConfig(pod_ip="", pod_hw_addr="", interface="", worker_node_ip="", mtu=0, vxlan_id=vni)
            errors = self._teardown_steps(path or "/nonexistent/netns", cfg, True)
            for step, err in errors:
                self._log.warn("sweep of VNI {vni}: {step} failed: {err}", vni=vni, step=step, err=err)
            removed.add(vni)
            self._log.info("swept orphan tunnel VNI {vni} ({netns})", vni=vni, netns=path or "host")
        return sorted(removed)


def _fail(err: Exception) -> Deferred[None]:
    from twisted.internet.defer import fail

    return fail(err)
