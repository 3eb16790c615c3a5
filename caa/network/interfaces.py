"""Contracts of caa.network: the ``pod-network`` value, the node-side and pod-VM-side tunnel
interfaces, the VNI allocator and the error classes.

Other packages (adaptor, forwarder, providers/local) code against this module only.

* :class:`PodNetworkConfig` is the ``pod-network`` object of ``apf.json`` (spec-adaptor §5.5),
  key for key: ``PodNetworkConfig.from_json(d).to_json() == d`` for every document CAA writes.
* :class:`INodeNetwork` is the worker-node half (spec-adaptor §6): ``inspect`` at CreateVM,
  ``setup`` at StartVM, ``teardown`` at StopVM, ``sweep`` for the adaptor's recovery.
* :class:`IVniAllocator` hands out VNIs (``--vxlan-min-id`` upwards) and persists them through a
  :class:`IVniStore` that the adaptor's journal provides (or :class:`caa.network.vni.JsonFileVniStore`).
* :class:`IPodNetwork` is the pod-VM half (spec-podvm §1.8), run by the forwarder before serving.

All methods that touch the kernel return Deferreds; the blocking netlink and iptables work runs in
a thread pool that the implementation is given.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from caa.podvm_api.gojson import fold_keys

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class NetworkError(Exception):
    """Base class of every error raised (or failed with) by caa.network. The message names what
    failed and where (netns path, interface, VNI)."""


class ConfigError(NetworkError, ValueError):
    """A ``pod-network`` document (or a flag value) is malformed: bad prefix, address, MAC or enum."""


class NetnsNotFoundError(NetworkError):
    """The named network namespace (path or name) does not exist."""


class NoDefaultRouteError(NetworkError):
    """A namespace has no IPv4 default route, so its primary interface cannot be found."""


class InterfaceNotFoundError(NetworkError):
    """An interface the operation needs is missing (e.g. vanished mid-setup)."""


class AddressError(NetworkError):
    """An interface has no IPv4 address, or more than one where exactly one is required."""


class VniExhaustedError(NetworkError):
    """Every VNI in [min_id, max_id] is allocated."""


class TunnelError(NetworkError):
    """A tunnel setup step failed (after the rollback of the steps already done)."""


class IptablesError(NetworkError):
    """The iptables/nft binary failed; the message holds its arguments and stderr."""


class TeardownError(NetworkError):
    """One or more teardown steps failed; every step was still attempted.

    ``errors`` holds ``(step, exception)`` pairs.
    """

    def __init__(self, what: str, errors: Sequence[tuple[str, BaseException]]) -> None:
        self.errors = list(errors)
        detail = "; ".join(f"{step}: {err}" for step, err in self.errors)
        super().__init__(f"{what}: {len(self.errors)} step(s) failed: {detail}")


# --------------------------------------------------------------------------------------------
# Values: routes, neighbours, the pod-network object
# --------------------------------------------------------------------------------------------

ROUTE_PROTOCOLS = ("kernel", "boot", "static", "dhcp")
ROUTE_SCOPES = ("universe", "site", "link", "host", "nowhere")
NEIGH_STATES = ("none", "incomplete", "reachable", "stale", "delay", "probe", "failed", "noarp", "permanent")


def _lower_keys(d: object, what: str) -> dict[str, Any]:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{what}: expected a JSON object, got {type(d).__name__}")
    return fold_keys(d)


def _str(d: Mapping[str, Any], key: str, what: str) -> str:
    v = d.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ConfigError(f"{what}: {key!r} must be a string, got {v!r}")
    return v


def _int(d: Mapping[str, Any], key: str, what: str) -> int:
    v = d.get(key)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{what}: {key!r} must be an integer, got {v!r}")
    return v


def _bool(d: Mapping[str, Any], key: str, what: str) -> bool:
    v = d.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ConfigError(f"{what}: {key!r} must be a boolean, got {v!r}")
    return v


def _check_prefix(value: str, what: str) -> None:
    try:
        ipaddress.IPv4Interface(value)
    except ValueError as e:
        raise ConfigError(f"{what}: invalid IPv4 prefix {value!r}") from e
    if "/" not in value:
        raise ConfigError(f"{what}: prefix {value!r} lacks a /length")


def _check_addr(value: str, what: str) -> None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError as e:
        raise ConfigError(f"{what}: invalid IPv4 address {value!r}") from e


def _check_mac(value: str, what: str) -> None:
    parts = value.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
        raise ConfigError(f"{what}: invalid MAC address {value!r}")


@attrs.frozen
class Route:
    """One route of the pod netns. ``dst`` is a prefix (``"0.0.0.0/0"`` for the default route;
    ``""`` read from JSON also means default), ``gw`` an address or ``""``, ``protocol`` one of
    :data:`ROUTE_PROTOCOLS` or ``""`` (unspec), ``scope`` one of :data:`ROUTE_SCOPES` or ``""``
    (universe)."""

    dst: str
    gw: str = ""
    dev: str = ""
    protocol: str = ""
    scope: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dst": self.dst, "gw": self.gw}
        if self.dev:
            out["dev"] = self.dev
        if self.protocol:
            out["protocol"] = self.protocol
        if self.scope and self.scope != "universe":
            out["scope"] = self.scope
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Route:
        what = "route"
        d = _lower_keys(data, what)
        dst = _str(d, "dst", what)
        gw = _str(d, "gw", what)
        protocol = _str(d, "protocol", what)
        scope = _str(d, "scope", what)
        if dst:
            try:
                ipaddress.IPv4Network(dst, strict=False)
            except ValueError as e:
                raise ConfigError(f"route: invalid destination prefix {dst!r}") from e
        if gw:
            _check_addr(gw, "route gw")
        if protocol and protocol not in ROUTE_PROTOCOLS:
            raise ConfigError(f"route: unknown protocol {protocol!r} (expected one of {', '.join(ROUTE_PROTOCOLS)})")
        if scope and scope not in ROUTE_SCOPES:
            raise ConfigError(f"route: unknown scope {scope!r} (expected one of {', '.join(ROUTE_SCOPES)})")
        return cls(dst=dst, gw=gw, dev=_str(d, "dev", what), protocol=protocol,
                   scope="" if scope == "universe" else scope)

    @property
    def is_default(self) -> bool:
        return self.dst in ("", "0.0.0.0/0")


@attrs.frozen
class Neighbor:
    """A static ARP entry of the pod interface (e.g. Calico's ``169.254.1.1``)."""

    ip: str
    hw_addr: str = ""
    dev: str = ""
    state: str = "permanent"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ip": self.ip}
        if self.hw_addr:
            out["hw-addr"] = self.hw_addr
        if self.dev:
            out["dev"] = self.dev
        out["state"] = self.state
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Neighbor:
        what = "neighbor"
        d = _lower_keys(data, what)
        ip = _str(d, "ip", what)
        _check_addr(ip, "neighbor ip")
        hw = _str(d, "hw-addr", what)
        if hw:
            _check_mac(hw, "neighbor hw-addr")
        state = _str(d, "state", what)
        if state and state not in NEIGH_STATES:
            raise ConfigError(f"neighbor: unknown state {state!r}")
        return cls(ip=ip, hw_addr=hw, dev=_str(d, "dev", what), state=state or "none")


@attrs.frozen
class PodNetworkConfig:
    """The ``pod-network`` object of apf.json (spec-adaptor §5.5), IPv4 only.

    ``pod_ip`` and ``worker_node_ip`` are ``"a.b.c.d/len"``; ``routes``/``neighbors`` empty
    tuples serialise as JSON ``null`` (as Go's nil slices do)."""

    pod_ip: str
    pod_hw_addr: str
    interface: str
    worker_node_ip: str
    mtu: int
    vxlan_id: int
    vxlan_port: int = 4789
    tunnel_type: str = "vxlan"
    routes: tuple[Route, ...] = attrs.field(default=())
    neighbors: tuple[Neighbor, ...] = attrs.field(default=())
    index: int = 0
    dedicated: bool = False
    external_net_via_pod_vm: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "podip": self.pod_ip,
            "pod-hw-addr": self.pod_hw_addr,
            "interface": self.interface,
            "worker-node-ip": self.worker_node_ip,
            "tunnel-type": self.tunnel_type,
            "routes": [r.to_json() for r in self.routes] if self.routes else None,
            "neighbors": [n.to_json() for n in self.neighbors] if self.neighbors else None,
            "mtu": self.mtu,
            "index": self.index,
        }
        if self.vxlan_port:
            out["vxlan-port"] = self.vxlan_port
        if self.vxlan_id:
            out["vxlan-id"] = self.vxlan_id
        out["dedicated"] = self.dedicated
        out["external-net-via-pod-vm"] = self.external_net_via_pod_vm
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PodNetworkConfig:
        """Parse with Go encoding/json rules: keys case-insensitive, unknown keys ignored, null ->
        zero value. Invalid prefixes, addresses, MACs and enums raise :class:`ConfigError`."""
        what = "pod-network"
        d = _lower_keys(data, what)
        pod_ip = _str(d, "podip", what)
        if pod_ip:
            _check_prefix(pod_ip, "pod-network podip")
        wn = _str(d, "worker-node-ip", what)
        if wn:
            _check_prefix(wn, "pod-network worker-node-ip")
        mac = _str(d, "pod-hw-addr", what)
        if mac:
            _check_mac(mac, "pod-network pod-hw-addr")
        routes_raw = d.get("routes") or []
        neigh_raw = d.get("neighbors") or []
        if not isinstance(routes_raw, list) or not isinstance(neigh_raw, list):
            raise ConfigError("pod-network: routes and neighbors must be arrays or null")
        return cls(
            pod_ip=pod_ip,
            pod_hw_addr=mac,
            interface=_str(d, "interface", what),
            worker_node_ip=wn,
            tunnel_type=_str(d, "tunnel-type", what),
            routes=tuple(Route.from_json(r) for r in routes_raw),
            neighbors=tuple(Neighbor.from_json(n) for n in neigh_raw),
            mtu=_int(d, "mtu", what),
            index=_int(d, "index", what),
            vxlan_port=_int(d, "vxlan-port", what),
            vxlan_id=_int(d, "vxlan-id", what),
            dedicated=_bool(d, "dedicated", what),
            external_net_via_pod_vm=_bool(d, "external-net-via-pod-vm", what),
        )

    @property
    def pod_address(self) -> str:
        """The pod IPv4 address without its prefix length."""
        return self.pod_ip.split("/", 1)[0]

    @property
    def worker_node_address(self) -> str:
        """The worker node IPv4 address without its prefix length."""
        return self.worker_node_ip.split("/", 1)[0]


# --------------------------------------------------------------------------------------------
# VNI allocation
# --------------------------------------------------------------------------------------------

VXLAN_MIN_ID = 555000
VXLAN_MAX_ID = 0xFFFFFF


class IVniStore(Interface):
    """Persistence of the VNI allocator: the adaptor's journal, or a JSON file
    (:class:`caa.network.vni.JsonFileVniStore`). Called from whatever thread calls the allocator;
    ``save`` must be durable when it returns (write + rename)."""

    def load() -> Mapping[int, str]:
        """Return the persisted allocation: VNI -> owner (a sandbox id; ``""`` = unknown owner)."""

    def save(allocation: Mapping[int, str]) -> None:
        """Persist the whole allocation (VNI -> owner)."""


class IVniAllocator(Interface):
    """VNIs from ``min_id`` up; a released VNI may be handed out again later, never while in use.
    Synchronous (a small file write); state survives restarts through the :class:`IVniStore`."""

    min_id = Attribute("lowest VNI handed out (--vxlan-min-id, default 555000)")
    max_id = Attribute("highest VNI handed out (default 2**24 - 1)")

    def allocate(owner: str) -> int:
        """Reserve and persist the lowest free VNI for ``owner``; :class:`VniExhaustedError` when none."""

    def release(vni: int) -> None:
        """Free ``vni`` (no error if it was not allocated)."""

    def reconcile(present: Iterable[int]) -> None:
        """Mark VNIs found on the system (VXLAN devices, ``peerpod [vni:N]`` iptables rules) as
        in use so a restart never hands them out; those not already owned get owner ``""``."""

    def allocated() -> Mapping[int, str]:
        """A copy of the current allocation: VNI -> owner."""


# --------------------------------------------------------------------------------------------
# Node side (worker node, spec-adaptor §6)
# --------------------------------------------------------------------------------------------


class INodeNetwork(Interface):
    """The worker-node half of the pod tunnel (upstream ``WorkerNode``).

    The implementation (:class:`caa.network.node.NodeNetwork`) is built with the adaptor flags:
    ``host_netns`` (None = the current netns), ``host_interface`` (``--host-interface``),
    ``vxlan_port``, ``pod_subnet_cidrs``, ``external_net_via_pod_vm`` and an :class:`IVniAllocator`.
    """

    def inspect(netns_path: str, owner: str = "") -> Deferred[PodNetworkConfig]:
        """Read the host and the pod netns (spec-adaptor §6.2), allocate a VNI for ``owner`` (the
        sandbox id) and return the ``pod-network`` config. Fails with :class:`NetnsNotFoundError`,
        :class:`NoDefaultRouteError`, :class:`AddressError`; allocates nothing on failure."""

    def setup(netns_path: str, vm_ips: Sequence[str], config: PodNetworkConfig) -> Deferred[None]:
        """NOTRACK rules, VXLAN device moved into the pod netns as ``vxlan1``, tc redirect both
        ways (§6.3). Remote = ``vm_ips[1]`` if ``config.dedicated`` else ``vm_ips[0]``.
        Safe to run concurrently; on failure the steps done are rolled back."""

    def teardown(netns_path: str, config: PodNetworkConfig) -> Deferred[None]:
        """Reverse of setup (§6.4): every step runs even if one fails (then :class:`TeardownError`),
        idempotent (a second call succeeds), empty chains removed, the VNI released.
        A pod netns that no longer exists is not an error (the rules are still removed)."""

    def release(vni: int) -> None:
        """Release a VNI from ``inspect`` whose setup never happened (CreateVM failed)."""

    def present_vnis() -> Deferred[set[int]]:
        """VNIs in use on this node: ``peerpod [vni:N]`` rules in the host netns and VXLAN devices
        in the host netns and in every netns under the netns directory (default ``/run/netns``)."""

    def sweep(live_vnis: Iterable[int]) -> Deferred[list[int]]:
        """Remove every tunnel (``vxlan1`` + tc in its netns, leftover ``ppvxlanN``) and NOTRACK rule
        whose VNI is not in ``live_vnis``; release those VNIs; return them sorted."""


# --------------------------------------------------------------------------------------------
# Pod VM side (spec-podvm §1.8)
# --------------------------------------------------------------------------------------------


class IPodNetwork(Interface):
    """The pod-VM half (upstream ``PodNode``), run by the forwarder before it serves.

    The implementation (:class:`caa.network.podvm.PodNetwork`) is built with ``host_netns`` (the
    VM's underlay netns; None = current), ``host_interface`` (``-host-interface``) and a thread pool.
    ``pod_netns`` is a netns name (``podns``, under /run/netns) or a path (``/run/netns/podns``).
    """

    def setup(config: PodNetworkConfig, pod_netns: str) -> Deferred[None]:
        """Create the VM end of the tunnel in ``pod_netns``: VXLAN device named ``config.interface``
        with the pod MAC, IP, MTU min(mtu, 1450), remote = worker node IP; NOTRACK rules; routes
        (gateway-less first) and neighbours; external network (§6.5) when asked. Stale state from
        an earlier run is removed first; a failure rolls back what was done."""

    def teardown(config: PodNetworkConfig, pod_netns: str) -> Deferred[None]:
        """Remove the device and the NOTRACK rules; every step attempted; idempotent."""
