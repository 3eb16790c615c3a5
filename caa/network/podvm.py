"""The pod-VM half of the pod tunnel (spec-podvm §1.8): :class:`PodNetwork`, run by the forwarder."""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

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
    ConfigError,
    InterfaceNotFoundError,
    IPodNetwork,
    NetworkError,
    NoDefaultRouteError,
    PodNetworkConfig,
    TeardownError,
    TunnelError,
)

T = TypeVar("T")

MAX_MTU = 1450
TEMP_PREFIX = "ppvm"
_SKIP_PREFIXES = ("veth", "lo", "docker", "podman", "br-", "cni", "tunl", "tun", "tap")


@implementer(IPodNetwork)
class PodNetwork:
    """Pod-VM side. ``host_netns`` is the VM's underlay netns (None = the forwarder's own). ``route_wait``: how
    long setup waits for the VM's default route (the VM's init may start the forwarder while DHCP still runs, so
    that Python's start-up overlaps the lease; upstream orders them, After=network-online.target)."""

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        host_netns: str | None = None,
        host_interface: str = "",
        route_wait: float = 0.0,
    ) -> None:
        self._reactor = reactor
        self._pool = threadpool
        self.host_netns = host_netns
        self.host_interface = host_interface
        self.route_wait = route_wait

    def _run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def setup(self, config: PodNetworkConfig, pod_netns: str) -> Deferred[None]:
        return self._run(self._setup_sync, config, pod_netns)

    def teardown(self, config: PodNetworkConfig, pod_netns: str) -> Deferred[None]:
        return self._run(self._teardown_sync, config, pod_netns)

    # ---------------------------------------------------------------- setup

    def _validate(self, config: PodNetworkConfig) -> None:
        if config.tunnel_type != "vxlan":
            raise ConfigError(f"unknown tunnel type {config.tunnel_type!r}")
        if not config.interface:
            raise ConfigError("pod-network: 'interface' is required")
        if not config.worker_node_ip:
            raise ConfigError("pod-network: 'worker-node-ip' is required")
        if not config.pod_ip:
            raise ConfigError("pod-network: 'podip' is required")
        if not config.pod_hw_addr:
            raise ConfigError("pod-network: 'pod-hw-addr' is required")

    def _setup_sync(self, config: PodNetworkConfig, pod_netns: str) -> None:
        self._validate(config)
        with nl.ipr_in(self.host_netns) as host:
            primary = self._wait_for_primary(host)
            if config.dedicated:
                if not self.host_interface or self.host_interface == primary:
                    raise ConfigError(f"{self.host_interface or primary} is not a dedicated interface")
                idx = nl.require_index(host, self.host_interface, self.host_netns)
                if not nl.ipv4_addresses(host, idx):
                    raise TunnelError(f"dedicated interface {self.host_interface} has no IPv4 address")
        with nl.ipr_in(pod_netns):
            pass  # the pod netns must exist before anything is done
        # Leftovers of an earlier, interrupted run (upstream then fails on every restart).
        errors = self._teardown_steps(config, pod_netns)
        if errors:
            raise TeardownError(f"removing stale pod network state in {pod_netns}", errors)
        try:
            self._build(config, pod_netns)
        except BaseException as e:
            self._log.warn("pod network setup in {netns} failed, rolling back: {err}", netns=pod_netns, err=e)
            for step, err in self._teardown_steps(config, pod_netns):
                self._log.warn("rollback step {step} failed: {err}", step=step, err=err)
            if isinstance(e, NetworkError):
                raise
            raise TunnelError(f"pod network setup in {pod_netns} (VNI {config.vxlan_id}): {e}") from e
        if config.external_net_via_pod_vm:
            try:
                self._external_network(pod_netns)
            except Exception as e:  # upstream only logs these
                self._log.warn("external network via pod VM not set up: {err}", err=e)
        self._log.info("pod network up in {netns}: {ip} VNI {vni} <-> {wn}", netns=pod_netns,
                       ip=config.pod_ip, vni=config.vxlan_id, wn=config.worker_node_address)

    def _wait_for_primary(self, host: IPRoute) -> str:
        """The primary interface's name, once the default route exists (polled every 50 ms up to route_wait)."""
        deadline = time.monotonic() + self.route_wait
        waited = False
        while True:
            try:
                name = nl.primary_interface(host, self.host_netns)[0]
            except NoDefaultRouteError:
                if time.monotonic() >= deadline:
                    raise
                if not waited:
                    self._log.info("no default route yet (DHCP still running?): waiting up to {s:.0f}s",
                                   s=self.route_wait)
                    waited = True
                time.sleep(0.05)
                continue
            if waited:
                self._log.info("default route via {name} is up", name=name)
            return name

    def _build(self, config: PodNetworkConfig, pod_netns: str) -> None:
        wn = config.worker_node_address
        vni = config.vxlan_id
        iptables.add_notrack(self.host_netns, vni, wn, config.vxlan_port or 8472)
        temp = f"{TEMP_PREFIX}{vni}"[:15]
        spec: dict[str, Any] = dict(ifname=temp, kind="vxlan", vxlan_id=vni, vxlan_group=wn, vxlan_learning=0,
                                    vxlan_ttl=0, vxlan_tos=0, vxlan_proxy=0, vxlan_rsc=0, vxlan_l2miss=0,
                                    vxlan_l3miss=0)
        if config.vxlan_port:
            spec["vxlan_port"] = config.vxlan_port
        with nl.ipr_in(self.host_netns) as host:
            host.link("add", **spec)
            tidx = nl.require_index(host, temp, self.host_netns)
            fd = os.open(nl.netns_path(pod_netns), os.O_RDONLY)
            try:
                host.link("set", index=tidx, net_ns_fd=fd)
            finally:
                os.close(fd)
        iface = ipaddress.IPv4Interface(config.pod_ip)
        with nl.ipr_in(pod_netns) as pod:
            idx = nl.require_index(pod, temp, pod_netns)
            pod.link("set", index=idx, ifname=config.interface)
            pod.link("set", index=idx, address=config.pod_hw_addr,
                     mtu=min(config.mtu, MAX_MTU) if config.mtu > 0 else MAX_MTU)
            pod.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            pod.link("set", index=idx, state="up")
            if iface.network.prefixlen != 32:
                pod.route("del", dst=str(iface.network.network_address), dst_len=iface.network.prefixlen,
                          oif=idx, table=nl.RT_TABLE_MAIN, proto=nl.RT_PROTO_IDS["kernel"],
                          scope=nl.RT_SCOPE_IDS["link"])
            self._add_routes(pod, config, pod_netns)
            for n in config.neighbors:
                if not n.dev or n.state in ("", "none"):
                    raise ConfigError(f"neighbor {n.ip}: needs a device and a state")
                nidx = nl.require_index(pod, n.dev, pod_netns)
                if not n.hw_addr:
                    raise ConfigError(f"neighbor {n.ip}: needs hw-addr")
                pod.neigh("add", dst=n.ip, lladdr=n.hw_addr, ifindex=nidx, state=nl.NUD_IDS[n.state])

    def _add_routes(self, pod: IPRoute, config: PodNetworkConfig, pod_netns: str) -> None:
        ordered = [r for r in config.routes if not r.gw] + [r for r in config.routes if r.gw]
        for r in ordered:
            spec: dict[str, Any] = {"table": nl.RT_TABLE_MAIN}
            if not r.is_default:
                net = ipaddress.IPv4Network(r.dst, strict=False)
                spec.update(dst=str(net.network_address), dst_len=net.prefixlen)
            else:
                spec.update(dst="0.0.0.0", dst_len=0)
            if r.gw:
                spec["gateway"] = r.gw
            if r.dev:
                spec["oif"] = nl.require_index(pod, r.dev, pod_netns)
            if r.protocol:
                spec["proto"] = nl.RT_PROTO_IDS[r.protocol]
            scope = "link" if not r.gw else (r.scope or "universe")
            spec["scope"] = nl.RT_SCOPE_IDS[scope]
            try:
                pod.route("add", **spec)
            except NetlinkError as e:
                raise TunnelError(
                    f"adding route {r.dst} via {r.gw or '-'} dev {r.dev or '-'} in {pod_netns}: {e}") from e

    def _external_network(self, pod_netns: str) -> None:
        with nl.ipr_in(self.host_netns) as host:
            primary, pidx, pgw = nl.primary_interface(host, self.host_netns)
            paddrs = nl.ipv4_addresses(host, pidx)
            pnet = nl.network_of(paddrs[0]) if paddrs else None
            chosen: tuple[int, str, str] | None = None
            for link in host.link("dump"):
                name = str(link.get_attr("IFLA_IFNAME"))
                info = link.get_attr("IFLA_LINKINFO")
                kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                if name == primary or name.startswith(_SKIP_PREFIXES) or kind not in (None, "veth"):
                    continue  # virtual devices (a veth stands in for a NIC in tests and local VMs)
                addrs = nl.ipv4_addresses(host, link["index"])
                if not addrs:
                    continue
                gws = [r.get_attr("RTA_GATEWAY") for r in host.route("dump", family=2, oif=link["index"])
                       if r.get("dst_len") == 0 and r.get_attr("RTA_OIF") == link["index"]]
                if gws:
                    chosen = (int(link["index"]), addrs[0], str(gws[0]))
                    break
                if pnet is not None and nl.network_of(addrs[0]) == pnet:
                    chosen = (int(link["index"]), addrs[0], pgw)
                    break
            if chosen is None:
                raise InterfaceNotFoundError("no secondary interface for the external network")
            idx, addr, gw = chosen
            name = nl.link_name(host, idx)
            fd = os.open(nl.netns_path(pod_netns), os.O_RDONLY)
            try:
                host.link("set", index=idx, net_ns_fd=fd)
            finally:
                os.close(fd)
        iface = ipaddress.IPv4Interface(addr)
        with nl.ipr_in(pod_netns) as pod:
            nidx = nl.require_index(pod, name, pod_netns)
            pod.addr("add", index=nidx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            pod.link("set", index=nidx, state="up")
            for r in pod.route("dump", family=2):
                if r.get("dst_len") == 0 and r.get_attr("RTA_TABLE", r.get("table")) == nl.RT_TABLE_MAIN:
                    pod.route("del", dst="0.0.0.0", dst_len=0, table=nl.RT_TABLE_MAIN,
                              oif=r.get_attr("RTA_OIF"), gateway=r.get_attr("RTA_GATEWAY"),
                              proto=r["proto"], scope=r["scope"])
            pod.route("add", dst="0.0.0.0", dst_len=0, gateway=gw, oif=nidx)

    # ---------------------------------------------------------------- teardown

    def _teardown_sync(self, config: PodNetworkConfig, pod_netns: str) -> None:
        errors = self._teardown_steps(config, pod_netns)
        if errors:
            raise TeardownError(f"tearing down pod network in {pod_netns}", errors)
        self._log.info("pod network down in {netns} (VNI {vni})", netns=pod_netns, vni=config.vxlan_id)

    def _teardown_steps(self, config: PodNetworkConfig, pod_netns: str) -> list[tuple[str, BaseException]]:
        errors: list[tuple[str, BaseException]] = []
        try:
            with nl.ipr_in(pod_netns) as pod:
                idx = nl.link_index(pod, config.interface) if config.interface else None
                if idx is not None and nl.vxlan_info(pod.link("get", index=idx)[0]) is not None:
                    pod.link("del", index=idx)
                nl.delete_link(pod, f"{TEMP_PREFIX}{config.vxlan_id}"[:15])
        except NetworkError:
            pass  # pod netns gone
        except BaseException as e:
            if not nl.ignore_missing(e):
                errors.append((f"delete {config.interface} in {pod_netns}", e))
        try:
            with nl.ipr_in(self.host_netns) as host:
                nl.delete_link(host, f"{TEMP_PREFIX}{config.vxlan_id}"[:15])
        except BaseException as e:
            errors.append(("delete temporary VXLAN device", e))
        try:
            iptables.remove_notrack(self.host_netns, config.vxlan_id)
        except BaseException as e:
            errors.append(("remove NOTRACK rules", e))
        return errors
