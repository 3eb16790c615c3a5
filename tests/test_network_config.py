"""Unit tests: the ``pod-network`` value (apf.json §5.5) and the VNI allocator."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from caa.network.interfaces import (
    ConfigError,
    IVniAllocator,
    IVniStore,
    Neighbor,
    PodNetworkConfig,
    Route,
    TeardownError,
    VniExhaustedError,
)
from caa.network.vni import CallableVniStore, JsonFileVniStore, MemoryVniStore, VniAllocator

SPEC_EXAMPLE = {
    "podip": "10.244.1.21/24",
    "pod-hw-addr": "32:b9:59:6b:f0:d5",
    "interface": "eth0",
    "worker-node-ip": "10.224.0.5/16",
    "tunnel-type": "vxlan",
    "routes": [
        {"dst": "0.0.0.0/0", "gw": "10.244.1.1", "dev": "eth0", "protocol": "boot"},
        {"dst": "10.244.1.0/24", "gw": "", "dev": "eth0", "protocol": "kernel", "scope": "link"},
    ],
    "neighbors": None,
    "mtu": 1450,
    "index": 2,
    "vxlan-port": 4789,
    "vxlan-id": 555002,
    "dedicated": False,
    "external-net-via-pod-vm": False,
}


class PodNetworkConfigTests(SynchronousTestCase):
    def test_spec_example_round_trip(self) -> None:
        cfg = PodNetworkConfig.from_json(SPEC_EXAMPLE)
        self.assertEqual(cfg.to_json(), SPEC_EXAMPLE)
        self.assertEqual(list(cfg.to_json()), list(SPEC_EXAMPLE))  # key order as Go writes it
        self.assertEqual(cfg.pod_address, "10.244.1.21")
        self.assertEqual(cfg.worker_node_address, "10.224.0.5")
        self.assertEqual(cfg.routes[1], Route("10.244.1.0/24", "", "eth0", "kernel", "link"))

    def test_json_text_round_trip(self) -> None:
        text = json.dumps(SPEC_EXAMPLE)
        self.assertEqual(json.loads(json.dumps(PodNetworkConfig.from_json(json.loads(text)).to_json())),
                         SPEC_EXAMPLE)

    def test_zero_values_omitted_or_null(self) -> None:
        cfg = PodNetworkConfig(pod_ip="10.0.0.2/32", pod_hw_addr="02:00:00:00:00:01", interface="eth0",
                               worker_node_ip="192.168.0.3/24", mtu=1500, vxlan_id=0, vxlan_port=0)
        doc = cfg.to_json()
        self.assertNotIn("vxlan-id", doc)
        self.assertNotIn("vxlan-port", doc)
        self.assertIsNone(doc["routes"])
        self.assertIsNone(doc["neighbors"])

    def test_go_decoding_rules(self) -> None:
        # Keys are case-insensitive, unknown keys ignored, null -> zero, {} is valid.
        cfg = PodNetworkConfig.from_json({"PodIP": "10.0.0.2/24", "Routes": [{"Dst": "", "GW": "10.0.0.1",
                                          "Dev": "eth0"}], "mtu": None, "whatever": 1})
        self.assertEqual(cfg.pod_ip, "10.0.0.2/24")
        self.assertEqual(cfg.routes, (Route(dst="", gw="10.0.0.1", dev="eth0"),))
        self.assertTrue(cfg.routes[0].is_default)
        self.assertEqual(cfg.mtu, 0)
        self.assertEqual(PodNetworkConfig.from_json({}).interface, "")

    def test_neighbor(self) -> None:
        n = Neighbor.from_json({"ip": "169.254.1.1", "hw-addr": "ee:ee:ee:ee:ee:ee", "dev": "eth0",
                                "state": "permanent"})
        self.assertEqual(n.to_json(), {"ip": "169.254.1.1", "hw-addr": "ee:ee:ee:ee:ee:ee", "dev": "eth0",
                                       "state": "permanent"})

    def test_bad_values(self) -> None:
        bad = [
            {"podip": "10.0.0.300/24"},
            {"podip": "10.0.0.3"},
            {"worker-node-ip": "nope"},
            {"pod-hw-addr": "zz:00:00:00:00:00"},
            {"routes": [{"dst": "0.0.0.0/0", "protocol": "bgp"}]},
            {"routes": [{"dst": "0.0.0.0/0", "scope": "galaxy"}]},
            {"routes": [{"dst": "10.0.0.0/33"}]},
            {"routes": [{"dst": "0.0.0.0/0", "gw": "x"}]},
            {"neighbors": [{"ip": "1.2.3.4", "state": "bogus"}]},
            {"neighbors": [{"ip": "nope"}]},
            {"mtu": "1500"},
            {"dedicated": "yes"},
            {"routes": {"dst": "x"}},
        ]
        for doc in bad:
            self.assertRaises(ConfigError, PodNetworkConfig.from_json, doc)
        self.assertRaises(ConfigError, PodNetworkConfig.from_json, [])

    @given(
        st.ip_addresses(v=4), st.integers(0, 32), st.integers(0, 2**48 - 1), st.integers(1, 9000),
        st.integers(0, 2**24 - 1), st.integers(0, 65535), st.booleans(),
        st.lists(st.tuples(st.ip_addresses(v=4), st.integers(0, 32), st.sampled_from(["", "10.0.0.1"]),
                           st.sampled_from(["", "kernel", "boot", "static", "dhcp"]),
                           st.sampled_from(["", "site", "link", "host", "nowhere"])), max_size=4),
    )
    def test_round_trip_property(self, ip, plen, mac, mtu, vni, port, dedicated, routes) -> None:  # type: ignore[no-untyped-def]
        macs = ":".join(f"{(mac >> (8 * i)) & 0xFF:02x}" for i in range(6))
        cfg = PodNetworkConfig(
            pod_ip=f"{ip}/{plen}", pod_hw_addr=macs, interface="eth0", worker_node_ip=f"{ip}/{plen}", mtu=mtu,
            vxlan_id=vni, vxlan_port=port, dedicated=dedicated,
            routes=tuple(Route(dst=f"{d}/{pl}", gw=gw, dev="eth0", protocol=pr, scope=sc)
                         for d, pl, gw, pr, sc in routes),
        )
        doc = json.loads(json.dumps(cfg.to_json()))
        self.assertEqual(PodNetworkConfig.from_json(doc), cfg)
        self.assertEqual(PodNetworkConfig.from_json(doc).to_json(), doc)

    def test_teardown_error_message(self) -> None:
        err = TeardownError("tearing down VNI 5", [("delete vxlan1", OSError(19, "No such device"))])
        self.assertIn("delete vxlan1", str(err))
        self.assertIn("No such device", str(err))


class VniAllocatorTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        store = MemoryVniStore()
        self.assertTrue(verifyObject(IVniStore, store))
        self.assertTrue(verifyObject(IVniAllocator, VniAllocator(store)))
        self.assertTrue(verifyObject(IVniStore, JsonFileVniStore("/nonexistent")))
        self.assertTrue(verifyObject(IVniStore, CallableVniStore(dict, lambda m: None)))

    def test_allocate_release_lowest_free(self) -> None:
        store = MemoryVniStore()
        a = VniAllocator(store)
        self.assertEqual([a.allocate(f"s{i}") for i in range(3)], [555000, 555001, 555002])
        a.release(555001)
        a.release(555001)  # no error
        self.assertEqual(a.allocate("s3"), 555001)
        self.assertEqual(store.data, {555000: "s0", 555001: "s3", 555002: "s2"})

    def test_restart_never_reuses(self) -> None:
        store = MemoryVniStore()
        a = VniAllocator(store)
        a.allocate("s0")
        a.allocate("s1")
        b = VniAllocator(store)  # the restarted adaptor
        self.assertEqual(b.allocate("s2"), 555002)

    def test_reconcile_marks_devices_found(self) -> None:
        a = VniAllocator(MemoryVniStore())
        a.reconcile([555000, 555002])
        self.assertEqual(a.allocated(), {555000: "", 555002: ""})
        self.assertEqual(a.allocate("x"), 555001)
        self.assertEqual(a.allocate("y"), 555003)

    def test_exhausted(self) -> None:
        a = VniAllocator(MemoryVniStore(), min_id=10, max_id=11)
        a.allocate("a")
        a.allocate("b")
        self.assertRaises(VniExhaustedError, a.allocate, "c")
        self.assertRaises(ConfigError, VniAllocator, MemoryVniStore(), 0, 5)
        self.assertRaises(ConfigError, VniAllocator, MemoryVniStore(), 5, 2**24)

    def test_failed_save_allocates_nothing(self) -> None:
        def save(m: object) -> None:
            raise OSError("disk full")

        a = VniAllocator(CallableVniStore(dict, save))
        self.assertRaises(OSError, a.allocate, "x")
        self.assertEqual(a.allocated(), {})

    def test_json_file_store(self) -> None:
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "vni.json")
        store = JsonFileVniStore(path)
        self.assertEqual(store.load(), {})
        VniAllocator(store).allocate("sb")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(json.load(open(path)), {"555000": "sb"})
        self.assertEqual(VniAllocator(JsonFileVniStore(path)).allocated(), {555000: "sb"})
        with open(path, "w") as f:
            f.write("{not json")
        self.assertRaises(ConfigError, store.load)
