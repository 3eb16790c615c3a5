"""The NOTRACK rule module with both backends (iptables, and nft where iptables is absent), in a netns."""

from __future__ import annotations

import shutil
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from caa.network import iptables
from caa.network.interfaces import IptablesError
from caa.network.node import NodeNetwork
from caa.network.vni import MemoryVniStore, VniAllocator
from caa.reactors import as_node_reactor
from tests import netns_helpers as h

reactor = as_node_reactor(_reactor)


class RuleTestsMixin:
    backend = "iptables"

    def setUp(self) -> None:
        h.need_root(self, ("nsenter", self.backend))  # type: ignore[arg-type]
        self.patch(iptables, "FORCE_BACKEND", self.backend)  # type: ignore[attr-defined]
        self.ns = h.make_netns(self, "ipt")  # type: ignore[arg-type]
        self.before = h.snapshot(self.ns)

    def test_add_list_remove(self) -> None:
        t: Any = self
        iptables.add_notrack(self.ns.path, 555000, "192.168.77.2", 4789)
        iptables.add_notrack(self.ns.path, 555000, "192.168.77.2", 4789)  # idempotent
        iptables.add_notrack(self.ns.path, 555001, "192.168.77.3", 4789)
        text = iptables.dump(self.ns.path)
        t.assertEqual(text.count("peerpod [vni:555000]"), 2)
        t.assertIn("192.168.77.3", text)
        t.assertEqual(iptables.list_vnis(self.ns.path), {555000, 555001})
        iptables.remove_notrack(self.ns.path, 555000)
        t.assertEqual(iptables.list_vnis(self.ns.path), {555001})
        t.assertNotEqual(h.snapshot(self.ns), self.before)
        iptables.remove_notrack(self.ns.path, 555001)
        iptables.remove_notrack(self.ns.path, 555001)  # idempotent
        t.assertEqual(iptables.list_vnis(self.ns.path), set())
        t.assertEqual(h.snapshot(self.ns), self.before)  # chains/table and jumps gone


class IptablesRuleTests(RuleTestsMixin, SynchronousTestCase):
    backend = "iptables"

    def test_rule_text(self) -> None:
        iptables.add_notrack(self.ns.path, 7, "10.0.0.9", 4789)
        text = iptables.dump(self.ns.path)
        self.assertIn("-A OUTPUT -j peerpod-OUTPUT", text)
        self.assertIn("-A PREROUTING -j peerpod-PREROUTING", text)
        self.assertIn('-A peerpod-PREROUTING -s 10.0.0.9/32 -p udp -m comment --comment "peerpod [vni:7]" '
                      "-m udp --dport 4789 -j NOTRACK", text)
        iptables.remove_notrack(self.ns.path, 7)

    def test_missing_binary_is_a_clear_error(self) -> None:
        self.patch(shutil, "which", lambda name: None)
        self.patch(iptables, "FORCE_BACKEND", None)
        with self.assertRaises(IptablesError) as ctx:
            iptables.add_notrack(self.ns.path, 7, "10.0.0.9", 4789)
        self.assertIn("neither iptables nor nft", str(ctx.exception))


class NftRuleTests(RuleTestsMixin, SynchronousTestCase):
    backend = "nft"


class NftTunnelTests(TestCase):
    """A node-side setup/teardown with the nft backend leaves nothing behind."""

    def setUp(self) -> None:
        h.need_root(self, ("nsenter", "nft"))
        self.patch(iptables, "FORCE_BACKEND", "nft")

    def test_node_setup_teardown(self) -> Deferred[None]:
        return ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        worker = h.make_netns(self, "nw")
        vm = h.make_netns(self, "nv")
        _w, vm_ip = h.underlay(self, worker, vm)
        h.bridge(worker, "cbr0", "10.88.0.1/24")
        pod = h.cni_pod(self, worker, "cbr0", "10.88.0.10/24", "10.88.0.1")
        before = await deferToThread(lambda: (h.snapshot(worker), h.snapshot(pod)))
        node = NodeNetwork(reactor, reactor.getThreadPool(), VniAllocator(MemoryVniStore()),
                           host_netns=worker.path, netns_lister=lambda: [pod.path])
        cfg = await node.inspect(pod.path)
        await node.setup(pod.path, [vm_ip], cfg)
        text = await deferToThread(iptables.dump, worker.path)
        self.assertIn(f"ip daddr {vm_ip} udp dport 4789 notrack", text)
        self.assertEqual(await node.present_vnis(), {cfg.vxlan_id})
        await node.teardown(pod.path, cfg)
        self.assertEqual(await deferToThread(lambda: (h.snapshot(worker), h.snapshot(pod))), before)
