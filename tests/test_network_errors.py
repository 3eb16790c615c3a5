"""Bad input for the node and pod-VM tunnel ends (real namespaces, root): clear errors, nothing left."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from caa.network import iptables
from caa.network.interfaces import (
    AddressError,
    ConfigError,
    InterfaceNotFoundError,
    NetnsNotFoundError,
    NoDefaultRouteError,
    PodNetworkConfig,
    Route,
    TeardownError,
    TunnelError,
)
from caa.network.node import NodeNetwork
from caa.network.podvm import PodNetwork
from caa.network.vni import MemoryVniStore, VniAllocator
from caa.reactors import as_node_reactor
from tests import netns_helpers as h

reactor = as_node_reactor(_reactor)


class NodeErrorTests(TestCase):
    timeout = 120
    maxDiff = None

    def setUp(self) -> None:
        h.need_root(self)
        self.worker = h.make_netns(self, "ew")
        self.vm = h.make_netns(self, "ev")
        self.worker_ip, self.vm_ip = h.underlay(self, self.worker, self.vm)
        h.bridge(self.worker, "cbr0", "10.88.0.1/24")
        self.store = MemoryVniStore()
        self.node = self._node()

    def _node(self, **kw: Any) -> NodeNetwork:
        return NodeNetwork(reactor, reactor.getThreadPool(), VniAllocator(self.store),
                           host_netns=self.worker.path, **kw)

    def _pod(self) -> h.Netns:
        return h.cni_pod(self, self.worker, "cbr0", "10.88.0.10/24", "10.88.0.1")

    async def _fails(self, d: Deferred[Any], exc: type[Exception], *needles: str) -> Exception:
        try:
            await d
        except exc as e:
            for needle in needles:
                self.assertIn(needle, str(e))
            self.assertEqual(self.store.data, {})  # no VNI allocated/kept
            return e
        self.fail(f"expected {exc.__name__}")

    def test_missing_netns(self) -> Deferred[Exception]:
        return ensureDeferred(self._fails(self.node.inspect("/run/netns/does-not-exist-caa"),
                                          NetnsNotFoundError, "/run/netns/does-not-exist-caa"))

    def test_two_ipv4_addresses(self) -> Deferred[Exception]:
        pod = self._pod()
        h.add_addr(pod, "eth0", "10.88.0.99/24")
        return ensureDeferred(self._fails(self.node.inspect(pod.path), AddressError, "eth0", "2 IPv4"))

    def test_no_default_route(self) -> Deferred[Exception]:
        pod = h.make_netns(self, "nr")
        h.veth(pod, "eth0", self.worker, h.unique("vq"))
        h.add_addr(pod, "eth0", "10.88.0.10/24")
        return ensureDeferred(self._fails(self.node.inspect(pod.path), NoDefaultRouteError, pod.path))

    def test_host_interface_without_ipv4(self) -> Deferred[Exception]:
        other = h.make_netns(self, "eo")
        h.veth(self.worker, "ens9", other, "x0")
        node = self._node(host_interface="ens9")
        return ensureDeferred(self._fails(node.inspect(self._pod().path), AddressError, "ens9", "no IPv4"))

    def test_dedicated_needs_second_ip(self) -> Deferred[None]:
        return ensureDeferred(self._dedicated())

    async def _dedicated(self) -> None:
        other = h.make_netns(self, "eo")
        h.veth(self.worker, "ula9", other, "x0")
        h.add_addr(self.worker, "ula9", "172.16.0.1/24")
        node = self._node(host_interface="ula9")
        pod = self._pod()
        cfg = await node.inspect(pod.path)
        self.assertTrue(cfg.dedicated)
        self.assertEqual(cfg.worker_node_ip, "172.16.0.1/24")
        with self.assertRaises(TunnelError) as ctx:
            await node.setup(pod.path, [self.vm_ip], cfg)
        self.assertIn("dedicated tunnel missing destination address", str(ctx.exception))
        node.release(cfg.vxlan_id)

    def test_primary_interface_rule(self) -> Deferred[None]:
        return ensureDeferred(self._primary())

    async def _primary(self) -> None:
        # eth1 (metric 100) is replaced by eth0 (metric 200): same prefix, smaller number.
        w = h.make_netns(self, "pw")
        o = h.make_netns(self, "po")
        h.veth(w, "eth1", o, "a1")
        h.veth(w, "eth0", o, "a0")
        h.add_addr(w, "eth1", "172.16.1.1/24")
        h.add_addr(w, "eth0", "172.16.0.1/24")
        with w.ipr() as ipr:
            ipr.route("add", dst="0.0.0.0", dst_len=0, gateway="172.16.1.254", priority=100)
            ipr.route("add", dst="0.0.0.0", dst_len=0, gateway="172.16.0.254", priority=200)
        node = NodeNetwork(reactor, reactor.getThreadPool(), VniAllocator(self.store), host_netns=w.path)
        cfg = await node.inspect(self._pod().path)
        self.assertEqual(cfg.worker_node_ip, "172.16.0.1/24")
        node.release(cfg.vxlan_id)

    def test_interface_vanishes_mid_setup(self) -> Deferred[None]:
        return ensureDeferred(self._vanish())

    async def _vanish(self) -> None:
        pod = self._pod()
        cfg = await self.node.inspect(pod.path)
        before = await deferToThread(lambda: (h.snapshot(self.worker), h.snapshot(pod)))
        real = iptables.add_notrack

        def add_and_pull_the_cable(netns: str | None, vni: int, peer: str, port: int) -> None:
            real(netns, vni, peer, port)
            with pod.ipr() as ipr:
                ipr.link("del", index=ipr.link_lookup(ifname="eth0")[0])

        self.patch(iptables, "add_notrack", add_and_pull_the_cable)
        with self.assertRaises((InterfaceNotFoundError, TunnelError)) as ctx:
            await self.node.setup(pod.path, [self.vm_ip], cfg)
        self.assertIn("555000", str(ctx.exception))
        worker_after, pod_after = await deferToThread(lambda: (h.snapshot(self.worker), h.snapshot(pod)))
        self.assertEqual(worker_after["iptables-raw"], before[0]["iptables-raw"])
        self.assertEqual([lk for lk in worker_after["links"] if "ppvxlan" in lk[0]], [])
        self.assertEqual([lk[0] for lk in pod_after["links"]], ["lo"])
        await self.node.teardown(pod.path, cfg)  # still fine afterwards

    def test_setup_missing_netns_leaves_nothing(self) -> Deferred[None]:
        return ensureDeferred(self._setup_missing())

    async def _setup_missing(self) -> None:
        pod = self._pod()
        cfg = await self.node.inspect(pod.path)
        before = await deferToThread(h.snapshot, self.worker)
        with self.assertRaises(NetnsNotFoundError):
            await self.node.setup("/run/netns/caa-gone-xyz", [self.vm_ip], cfg)
        self.assertEqual(await deferToThread(h.snapshot, self.worker), before)
        # Teardown of a pod whose netns is gone succeeds and releases the VNI.
        await self.node.teardown("/run/netns/caa-gone-xyz", cfg)
        self.assertEqual(self.store.data, {})


    def test_teardown_runs_every_step(self) -> Deferred[None]:
        return ensureDeferred(self._every_step())

    async def _every_step(self) -> None:
        pod = self._pod()
        before = await deferToThread(lambda: (h.snapshot(self.worker), h.snapshot(pod)))
        cfg = await self.node.inspect(pod.path)
        await self.node.setup(pod.path, [self.vm_ip], cfg)

        def broken(netns: str | None, vni: int) -> None:
            raise iptables.IptablesError("iptables is broken today")

        real = iptables.remove_notrack
        self.patch(iptables, "remove_notrack", broken)
        with self.assertRaises(TeardownError) as ctx:
            await self.node.teardown(pod.path, cfg)
        self.assertIn("iptables is broken today", str(ctx.exception))
        # The other steps still ran: no tunnel device, no tc in the pod netns.
        self.assertEqual(await deferToThread(h.snapshot, pod), before[1])
        self.patch(iptables, "remove_notrack", real)
        await self.node.teardown(pod.path, cfg)
        self.assertEqual(await deferToThread(h.snapshot, self.worker), before[0])


class PodVmErrorTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        h.need_root(self)
        self.vm = h.make_netns(self, "xv")
        other = h.make_netns(self, "xw")
        h.underlay(self, other, self.vm)
        self.podvm = PodNetwork(reactor, reactor.getThreadPool(), host_netns=self.vm.path)
        self.cfg = PodNetworkConfig(pod_ip="10.88.0.10/24", pod_hw_addr="02:00:00:00:00:10", interface="eth0",
                                    worker_node_ip="192.168.77.1/24", mtu=1500, vxlan_id=555000)

    async def _fails(self, cfg: PodNetworkConfig, pod_netns: str, exc: type[Exception], needle: str) -> None:
        before = await deferToThread(h.snapshot, self.vm)
        with self.assertRaises(exc) as ctx:
            await self.podvm.setup(cfg, pod_netns)
        self.assertIn(needle, str(ctx.exception))
        self.assertEqual(await deferToThread(h.snapshot, self.vm), before)

    def test_missing_pod_netns(self) -> Deferred[None]:
        return ensureDeferred(self._fails(self.cfg, "caa-no-such-podns", NetnsNotFoundError, "caa-no-such-podns"))

    def test_missing_fields(self) -> Deferred[None]:
        pod = h.make_netns(self, "xp")
        cfg = PodNetworkConfig.from_json({"podip": "10.0.0.2/24", "tunnel-type": "vxlan"})
        return ensureDeferred(self._fails(cfg, pod.name, ConfigError, "interface"))

    def test_unknown_tunnel_type(self) -> Deferred[None]:
        pod = h.make_netns(self, "xp")
        cfg = attrs.evolve(self.cfg, tunnel_type="geneve")
        return ensureDeferred(self._fails(cfg, pod.name, ConfigError, "geneve"))

    def test_mtu_capped(self) -> Deferred[None]:
        return ensureDeferred(self._mtu())

    async def _mtu(self) -> None:
        pod = h.make_netns(self, "xp")
        await self.podvm.setup(self.cfg, pod.name)  # mtu 1500 in the config
        state = await deferToThread(h.snapshot, pod)
        self.assertIn(("eth0", "vxlan", 1450, "02:00:00:00:00:10", None), state["links"])
        await self.podvm.teardown(self.cfg, pod.name)
        state = await deferToThread(h.snapshot, pod)
        self.assertEqual([lk[0] for lk in state["links"]], ["lo"])

    def test_external_network_via_pod_vm(self) -> Deferred[None]:
        return ensureDeferred(self._external())

    async def _external(self) -> None:
        # The VM's second NIC (ens5, own default route, metric 200) moves into the pod netns and
        # carries the pod's default route; the primary (underlay) keeps the tunnel.
        ext = h.make_netns(self, "xe")
        h.veth(self.vm, "ens5", ext, "up0")
        h.add_addr(self.vm, "ens5", "172.20.0.2/24")
        h.add_addr(ext, "up0", "172.20.0.1/24")
        with self.vm.ipr() as ipr:
            ipr.route("add", dst="0.0.0.0", dst_len=0, gateway="172.20.0.1", priority=200)
        pod = h.make_netns(self, "xp")
        cfg = attrs.evolve(self.cfg, external_net_via_pod_vm=True, routes=(
            Route(dst="0.0.0.0/0", gw="10.88.0.1", dev="eth0"), Route(dst="10.88.0.0/24", dev="eth0")))
        await self.podvm.setup(cfg, pod.name)
        state = await deferToThread(h.snapshot, pod)
        self.assertIn(("ens5", "172.20.0.2", 24), state["addrs"])
        defaults = [r for r in state["routes"] if r[1] is None and r[-1] == 2]
        self.assertEqual([(r[3], r[4]) for r in defaults], [("172.20.0.1", "ens5")])
        ping = await deferToThread(lambda: pod.run(["ping", "-c", "1", "-W", "2", "172.20.0.1"], check=False))
        self.assertEqual(ping.returncode, 0, ping.stdout)
        await self.podvm.teardown(cfg, pod.name)


class PodVmRouteWaitTests(TestCase):
    """The forwarder may start while the VM's DHCP still runs: set-up waits (bounded) for the default route."""

    timeout = 60

    def setUp(self) -> None:
        h.need_root(self)
        self.vm = h.make_netns(self, "rv")
        other = h.make_netns(self, "rw")
        h.veth(other, "ula", self.vm, "ulb")
        h.add_addr(other, "ula", "192.168.78.1/24")
        h.add_addr(self.vm, "ulb", "192.168.78.2/24")  # an address, but no default route yet (no lease)
        self.cfg = PodNetworkConfig(pod_ip="10.88.0.10/24", pod_hw_addr="02:00:00:00:00:10", interface="eth0",
                                    worker_node_ip="192.168.78.1/24", mtu=1500, vxlan_id=555001)

    async def test_waits_for_the_route_then_builds(self) -> None:
        podvm = PodNetwork(reactor, reactor.getThreadPool(), host_netns=self.vm.path, route_wait=30.0)
        pod = h.make_netns(self, "rp")
        setup = podvm.setup(self.cfg, pod.name)
        await deferLater(reactor, 0.5, lambda: None)
        self.assertNoResult(setup)  # still waiting: nothing to build the tunnel on
        self.assertEqual([lk[0] for lk in (await deferToThread(h.snapshot, pod))["links"]], ["lo"])
        h.add_route(self.vm, "default", gateway="192.168.78.1", dev="ulb")  # the lease arrives
        await setup
        self.assertIn("eth0", [lk[0] for lk in (await deferToThread(h.snapshot, pod))["links"]])
        await podvm.teardown(self.cfg, pod.name)

    async def test_no_route_within_the_wait_is_a_clear_error(self) -> None:
        podvm = PodNetwork(reactor, reactor.getThreadPool(), host_netns=self.vm.path, route_wait=0.3)
        pod = h.make_netns(self, "rp")
        with self.assertRaises(NoDefaultRouteError) as ctx:
            await podvm.setup(self.cfg, pod.name)
        self.assertIn("no IPv4 default route", str(ctx.exception))
        self.assertEqual([lk[0] for lk in (await deferToThread(h.snapshot, pod))["links"]], ["lo"])
