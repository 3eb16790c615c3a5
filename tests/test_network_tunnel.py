"""Integration tests of the pod tunnel in real network namespaces (root; CI runs them).

Topology per test: a "worker" netns and a "VM" netns joined by a veth underlay; on the worker a
bridge ``cbr0`` (gateway 10.88.0.1) and CNI-like pod namespaces; in the VM one empty pod netns per
pod (the forwarder's ``podns``). The worker and the VM are both non-root namespaces, so the code
runs with ``host_netns`` set, as the local provider will use it.
"""

from __future__ import annotations

import random
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from caa.network import iptables
from caa.network.interfaces import INodeNetwork, IPodNetwork, PodNetworkConfig, Route
from caa.network.node import NodeNetwork
from caa.network.podvm import PodNetwork
from caa.network.vni import MemoryVniStore, VniAllocator
from caa.reactors import as_node_reactor
from tests import netns_helpers as h

reactor = as_node_reactor(_reactor)

SERVER = textwrap.dedent("""
    import hashlib, socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4)
    print("ready", flush=True)
    while True:
        c, peer = s.accept()
        h = hashlib.sha256(); n = 0
        while True:
            b = c.recv(1 << 16)
            if not b:
                break
            h.update(b); n += len(b)
        c.sendall(f"vm {n} {h.hexdigest()}".encode()); c.close()
""")

CLIENT = textwrap.dedent("""
    import hashlib, socket, sys
    size = int(sys.argv[3]); block = hashlib.sha256(b"x").digest() * 2048
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
    h = hashlib.sha256(); sent = 0
    while sent < size:
        b = block[: min(len(block), size - sent)]
        s.sendall(b); h.update(b); sent += len(b)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while True:
        r = s.recv(4096)
        if not r:
            break
        reply += r
    print(reply.decode(), h.hexdigest())
""")


class Topology:
    """Worker + VM namespaces, bridge, a client pod, and helpers to add tunnelled pods."""

    def __init__(self, tc: TestCase) -> None:
        self.tc = tc
        self.worker = h.make_netns(tc, "wk")
        self.vm = h.make_netns(tc, "vm")
        self.worker_ip, self.vm_ip = h.underlay(tc, self.worker, self.vm)
        h.bridge(self.worker, "cbr0", "10.88.0.1/24", mtu=1450)
        self.client = h.cni_pod(tc, self.worker, "cbr0", "10.88.0.2/24", "10.88.0.1")
        self.pods: list[tuple[h.Netns, h.Netns, str]] = []
        pool = reactor.getThreadPool()
        self.node = NodeNetwork(reactor, pool, VniAllocator(MemoryVniStore()), host_netns=self.worker.path,
                                pod_subnet_cidrs=["10.96.0.0/12"],
                                netns_lister=lambda: [p.path for p, _, _ in self.pods])
        self.podvm = PodNetwork(reactor, pool, host_netns=self.vm.path)

    def add_pod(self, n: int, mtu: int = 1450) -> tuple[h.Netns, h.Netns, str]:
        ip = f"10.88.0.{10 + n}"
        pod = h.cni_pod(self.tc, self.worker, "cbr0", f"{ip}/24", "10.88.0.1", mtu=mtu,
                        neighbors=[("169.254.1.1", "ee:ee:ee:ee:ee:01")])
        vmpod = h.make_netns(self.tc, "vp")
        self.pods.append((pod, vmpod, ip))
        return pod, vmpod, ip

    def snapshots(self) -> dict[str, Any]:
        out = {}
        for name, ns in [("worker", self.worker), ("vm", self.vm), ("client", self.client)]:
            out[name] = h.snapshot(ns)
        for i, (pod, vmpod, _ip) in enumerate(self.pods):
            out[f"pod{i}"] = h.snapshot(pod)
            out[f"vmpod{i}"] = h.snapshot(vmpod)
        return out

    async def bring_up(self, pod: h.Netns, vmpod: h.Netns) -> PodNetworkConfig:
        cfg = await self.node.inspect(pod.path, owner=pod.name)
        await self.node.setup(pod.path, [self.vm_ip], cfg)
        await self.podvm.setup(PodNetworkConfig.from_json(cfg.to_json()), vmpod.name)
        return cfg

    async def bring_down(self, pod: h.Netns, vmpod: h.Netns, cfg: PodNetworkConfig) -> None:
        await self.node.teardown(pod.path, cfg)
        await self.podvm.teardown(cfg, vmpod.path)


def run_thread(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return deferToThread(fn, *args)


class TunnelTests(TestCase):
    timeout = 240
    maxDiff = None

    def setUp(self) -> None:
        h.need_root(self)

    def test_interfaces(self) -> None:
        topo = Topology(self)
        self.assertTrue(verifyObject(INodeNetwork, topo.node))
        self.assertTrue(verifyObject(IPodNetwork, topo.podvm))

    def test_end_to_end(self) -> Deferred[None]:
        return ensureDeferred(self._end_to_end())

    async def _end_to_end(self) -> None:
        topo = Topology(self)
        pod, vmpod, ip = topo.add_pod(0)
        before = await run_thread(topo.snapshots)
        cfg = await topo.node.inspect(pod.path, owner="sb-0")
        # Inspect output, key for key (spec-adaptor §5.5).
        doc = cfg.to_json()
        self.assertEqual(doc["podip"], f"{ip}/24")
        self.assertEqual(doc["interface"], "eth0")
        self.assertEqual(doc["worker-node-ip"], f"{topo.worker_ip}/24")
        self.assertEqual(doc["mtu"], 1450)
        self.assertEqual(doc["vxlan-id"], 555000)
        self.assertEqual(doc["vxlan-port"], 4789)
        self.assertEqual(doc["routes"], [
            {"dst": "0.0.0.0/0", "gw": "10.88.0.1", "dev": "eth0", "protocol": "static"},
            {"dst": "10.88.0.0/24", "gw": "", "dev": "eth0", "protocol": "kernel", "scope": "link"},
            {"dst": "10.96.0.0/12", "gw": "10.88.0.1", "dev": "eth0"},
        ])
        self.assertEqual(doc["neighbors"], [{"ip": "169.254.1.1", "hw-addr": "ee:ee:ee:ee:ee:01", "dev": "eth0",
                                             "state": "permanent"}])
        self.assertFalse(doc["dedicated"])
        await topo.node.setup(pod.path, [topo.vm_ip], cfg)
        await topo.podvm.setup(PodNetworkConfig.from_json(doc), vmpod.name)

        rules = await run_thread(iptables.dump, topo.worker.path)
        self.assertIn('-A peerpod-OUTPUT -d 192.168.77.2/32 -p udp -m comment --comment "peerpod [vni:555000]" '
                      "-m udp --dport 4789 -j NOTRACK", rules)
        self.assertIn("-A OUTPUT -j peerpod-OUTPUT", rules)
        vm_rules = await run_thread(iptables.dump, topo.vm.path)
        self.assertIn("-s 192.168.77.1/32", vm_rules)

        # The VM side carries the pod's routes and neighbours.
        vm_state = await run_thread(h.snapshot, vmpod)
        self.assertIn(("eth0", ip, 24), vm_state["addrs"])
        eth0 = [lk for lk in vm_state["links"] if lk[0] == "eth0"][0]
        self.assertEqual((eth0[1], eth0[2], eth0[3]), ("vxlan", 1450, cfg.pod_hw_addr))
        routes = {(r[1], r[2], r[3]) for r in vm_state["routes"] if r[-1] == 2}
        self.assertEqual(routes, {(None, 0, "10.88.0.1"), ("10.88.0.0", 24, None), ("10.96.0.0", 12, "10.88.0.1")})
        self.assertEqual(vm_state["neigh"], [("eth0", "169.254.1.1", "ee:ee:ee:ee:ee:01")])
        pod_state = await run_thread(h.snapshot, pod)
        self.assertEqual({q[:2] for q in pod_state["qdiscs"] if q[1] == "ingress"},
                         {("eth0", "ingress"), ("vxlan1", "ingress")})
        self.assertEqual({f[:2] for f in pod_state["filters"]}, {("eth0", "u32"), ("vxlan1", "u32")})

        # Traffic: a listener that exists only in the VM's pod netns answers on the pod IP.
        server = vmpod.popen([sys.executable, "-c", SERVER, ip, "5001"], stdout=-1, stderr=-1)
        self.addCleanup(server.wait)
        self.addCleanup(server.kill)
        assert server.stdout is not None
        self.assertEqual(await run_thread(server.stdout.readline), b"ready\n")
        ping = await run_thread(lambda: topo.client.run(["ping", "-c", "2", "-W", "2", ip], check=False))
        self.assertEqual(ping.returncode, 0, ping.stdout + ping.stderr)
        # A packet at the pod MTU (1450 = 1422 + 28) passes with DF set; one byte more does not.
        ping = await run_thread(lambda: topo.client.run(
            ["ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1422", ip], check=False))
        self.assertEqual(ping.returncode, 0, ping.stdout + ping.stderr)
        ping = await run_thread(lambda: topo.client.run(
            ["ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1423", ip], check=False))
        self.assertNotEqual(ping.returncode, 0)
        size = 50 * 1024 * 1024
        out = await run_thread(lambda: topo.client.run([sys.executable, "-c", CLIENT, ip, "5001", str(size)]))
        tag, n, vm_digest, local_digest = out.stdout.split()
        self.assertEqual((tag, int(n)), ("vm", size))
        self.assertEqual(vm_digest, local_digest)

        await topo.bring_down(pod, vmpod, cfg)
        server.kill()
        server.wait()
        after = await run_thread(topo.snapshots)
        self.assertEqual(after, before)
        self.assertEqual(topo.node.allocator.allocated(), {})
        # Idempotent: a second teardown on both ends succeeds and changes nothing.
        await topo.bring_down(pod, vmpod, cfg)
        self.assertEqual(await run_thread(topo.snapshots), before)

    def test_twenty_pods_parallel(self) -> Deferred[None]:
        return ensureDeferred(self._twenty())

    async def _twenty(self) -> None:
        topo = Topology(self)
        pods = [topo.add_pod(i) for i in range(20)]
        before = await run_thread(topo.snapshots)
        results = await DeferredList([ensureDeferred(topo.bring_up(p, v)) for p, v, _ in pods],
                                     consumeErrors=True)
        failures = [r for ok, r in results if not ok]
        self.assertEqual(failures, [])
        cfgs = [r for _ok, r in results]
        self.assertEqual(sorted(c.vxlan_id for c in cfgs), list(range(555000, 555020)))

        def ping_all() -> list[str]:
            bad = []
            for _p, _v, ip in pods:
                res = topo.client.run(["ping", "-c", "1", "-W", "2", ip], check=False)
                if res.returncode != 0:
                    bad.append(ip)
            return bad

        self.assertEqual(await run_thread(ping_all), [])
        self.assertEqual(await topo.node.present_vnis(), set(range(555000, 555020)))
        order = list(range(20))
        random.shuffle(order)
        downs = await DeferredList([Deferred.fromCoroutine(topo.bring_down(pods[i][0], pods[i][1], cfgs[i]))
                                    for i in order], consumeErrors=True)
        self.assertEqual([r for ok, r in downs if not ok], [])
        self.assertEqual(await run_thread(topo.snapshots), before)

    def test_sweep_removes_orphans(self) -> Deferred[None]:
        return ensureDeferred(self._sweep())

    async def _sweep(self) -> None:
        topo = Topology(self)
        pods = [topo.add_pod(i) for i in range(3)]
        before = await run_thread(topo.snapshots)
        cfgs = []
        for p, _v, _ip in pods:
            cfg = await topo.node.inspect(p.path)
            await topo.node.setup(p.path, [topo.vm_ip], cfg)
            cfgs.append(cfg)
        # A restarted adaptor: a fresh allocator learns what is on the node and never reuses it.
        fresh = VniAllocator(MemoryVniStore())
        fresh.reconcile(await topo.node.present_vnis())
        self.assertEqual(fresh.allocate("new"), 555003)
        removed = await topo.node.sweep({cfgs[1].vxlan_id})
        self.assertEqual(removed, [cfgs[0].vxlan_id, cfgs[2].vxlan_id])
        self.assertEqual(await topo.node.present_vnis(), {cfgs[1].vxlan_id})
        await topo.node.teardown(pods[1][0].path, cfgs[1])
        after = await run_thread(topo.snapshots)
        self.assertEqual(after, before)

    def test_restart_of_forwarder_after_half_setup(self) -> Deferred[None]:
        return ensureDeferred(self._half())

    async def _half(self) -> None:
        topo = Topology(self)
        pod, vmpod, ip = topo.add_pod(0)
        before = await run_thread(topo.snapshots)
        cfg = await topo.node.inspect(pod.path)
        await topo.node.setup(pod.path, [topo.vm_ip], cfg)
        # A route whose device does not exist: the VM setup fails half-way and rolls back.
        bad = attrs.evolve(cfg, routes=cfg.routes + (Route(dst="10.1.0.0/16", dev="nope0"),))
        with self.assertRaises(Exception) as ctx:
            await topo.podvm.setup(bad, vmpod.path)
        self.assertIn("nope0", str(ctx.exception))
        self.assertEqual(await run_thread(h.snapshot, vmpod), before["vmpod0"])
        self.assertEqual(await run_thread(h.snapshot, topo.vm), before["vm"])
        # The restarted forwarder succeeds, and a second setup (no teardown in between) also does.
        await topo.podvm.setup(cfg, vmpod.path)
        await topo.podvm.setup(cfg, vmpod.path)
        ping = await run_thread(lambda: topo.client.run(["ping", "-c", "1", "-W", "2", ip], check=False))
        self.assertEqual(ping.returncode, 0, ping.stdout)
        await topo.bring_down(pod, vmpod, cfg)
        self.assertEqual(await run_thread(topo.snapshots), before)
