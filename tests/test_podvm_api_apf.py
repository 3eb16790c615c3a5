"""caa.podvm_api.apf and gojson: apf.json as upstream's adaptor writes it and its forwarder reads it."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from caa.network.interfaces import NEIGH_STATES, ROUTE_PROTOCOLS, ROUTE_SCOPES, Neighbor, PodNetworkConfig, Route
from caa.podvm_api import gojson
from caa.podvm_api.apf import APFConfig, APFError

POD_NETWORK = {
    "podip": "10.244.0.19/24", "pod-hw-addr": "0e:8f:62:f3:81:ad", "interface": "eth0",
    "worker-node-ip": "10.224.0.4/16", "tunnel-type": "vxlan",
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.0.1", "dev": "eth0"}], "neighbors": None,
    "mtu": 1500, "index": 1, "vxlan-port": 4789, "vxlan-id": 555001, "dedicated": False,
    "external-net-via-pod-vm": False,
}

# Strings as they reach apf.json: anything but lone surrogates (no UTF-8 for them, in Go or Python).
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=30)
IPV4 = st.ip_addresses(v=4).map(str)
PREFIX = st.tuples(IPV4, st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}")
MAC = st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))
ROUTES = st.builds(Route, dst=st.one_of(st.just(""), PREFIX), gw=st.one_of(st.just(""), IPV4), dev=TEXT,
                   protocol=st.sampled_from(("",) + ROUTE_PROTOCOLS),
                   scope=st.sampled_from(("",) + ROUTE_SCOPES[1:]))
NEIGHBORS = st.builds(Neighbor, ip=IPV4, hw_addr=st.one_of(st.just(""), MAC), dev=TEXT,
                      state=st.sampled_from(NEIGH_STATES))
UINT = st.integers(0, 2**31 - 1)
POD_NETWORKS = st.builds(
    PodNetworkConfig, pod_ip=PREFIX, pod_hw_addr=MAC, interface=TEXT, worker_node_ip=PREFIX, mtu=UINT,
    vxlan_id=UINT, vxlan_port=UINT, tunnel_type=st.sampled_from(["vxlan", "none"]),
    routes=st.lists(ROUTES, max_size=3).map(tuple), neighbors=st.lists(NEIGHBORS, max_size=2).map(tuple),
    index=UINT, dedicated=st.booleans(), external_net_via_pod_vm=st.booleans())
APFS = st.builds(
    APFConfig, pod_network=st.one_of(st.none(), POD_NETWORKS), pod_namespace=TEXT, pod_name=TEXT,
    tls_server_key=TEXT, tls_server_cert=TEXT, tls_client_ca=TEXT, tls_min_version=TEXT,
    tls_cipher_suites=st.lists(TEXT, max_size=3).map(tuple), sc_pp_prv=st.binary(max_size=16),
    sc_wn_pub=st.binary(max_size=16), pool_vm_name=TEXT, claim_token_sha256=TEXT)


class WriteTests(SynchronousTestCase):
    def test_keys_in_upstream_order(self) -> None:
        apf = APFConfig(pod_namespace="default", pod_name="web", pod_network=POD_NETWORK, tls_server_cert="C",
                        tls_server_key="K", tls_client_ca="CA",
                        tls_cipher_suites=("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",))
        d = json.loads(apf.to_json())
        self.assertEqual(list(d), ["pod-network", "pod-namespace", "pod-name", "tls-server-key", "tls-server-cert",
                                   "tls-client-ca", "tls-cipher-suites"])
        self.assertEqual(d["pod-network"], POD_NETWORK)
        self.assertTrue(apf.to_json().startswith('{\n    "pod-network": {\n        "podip"'))
        bare = json.loads(APFConfig(pod_namespace="n", pod_name="p").to_json())
        self.assertEqual(bare, {"pod-network": None, "pod-namespace": "n", "pod-name": "p"})
        secure = APFConfig(sc_pp_prv=b"\x00\x01", sc_wn_pub=b"k").to_dict()
        self.assertEqual((secure["sc-pp-prv"], secure["sc-wn-pub"]), ("AAE=", "aw=="))

    def test_html_escaped_like_go(self) -> None:
        text = APFConfig(pod_name="<p>&\u2028").to_json()
        self.assertIn('"pod-name": "\\u003cp\\u003e\\u0026\\u2028"', text)

    def test_key_never_in_repr(self) -> None:
        apf = APFConfig(pod_namespace="ns", pod_name="p", tls_server_key="SECRET-KEY")
        self.assertNotIn("SECRET-KEY", repr(apf))
        self.assertIn("ns/p", repr(apf))


class ReadTests(SynchronousTestCase):
    def test_go_decoding_rules(self) -> None:
        self.assertEqual(APFConfig.from_json("{}"), APFConfig())
        self.assertEqual(APFConfig.from_json("null"), APFConfig())
        self.assertEqual(APFConfig.from_json('{"extra": 1, "pod-name": "p", "pod-network": null}'),
                         APFConfig(pod_name="p"))
        c = APFConfig.from_dict({"POD-NAME": "upper", "tls-min-version": "VersionTLS13",
                                 "tls-cipher-suites": ["a"], "sc-pp-prv": "AAEC", "Pod-Network": POD_NETWORK})
        self.assertEqual((c.pod_name, c.tls_min_version, c.tls_cipher_suites, c.sc_pp_prv),
                         ("upper", "VersionTLS13", ("a",), b"\x00\x01\x02"))
        assert c.pod_network is not None
        self.assertEqual((c.pod_network.vxlan_id, c.pod_network.routes[0].gw), (555001, "10.244.0.1"))

    def test_bad_values(self) -> None:
        for doc in ({"pod-name": 3}, {"pod-network": {"podip": "10.0.0.1"}},
                    {"pod-network": {"routes": [{"protocol": "bogus"}]}}, {"tls-cipher-suites": "x"},
                    {"tls-cipher-suites": [1]}, {"sc-pp-prv": "!!"}, {"sc-pp-prv": 5}, [1]):
            self.assertRaises(APFError, APFConfig.from_dict, doc)
        self.assertRaises(APFError, APFConfig.from_json, "{not json")
        with self.assertRaises(APFError) as cm:
            APFConfig.from_dict({"sc-pp-prv": 5})
        self.assertIn("must be a string", str(cm.exception))


class RoundTripTests(SynchronousTestCase):
    @given(APFS)
    def test_apf_roundtrip(self, apf: APFConfig) -> None:
        """What the adaptor writes, the forwarder reads back unchanged, and writes again byte for byte."""
        text = apf.to_json()
        again = APFConfig.from_json(text.encode("utf-8"))
        self.assertEqual(again, apf)
        self.assertEqual(again.to_json(), text)

    @given(APFS, st.randoms(use_true_random=False))
    def test_keys_match_case_insensitively(self, apf: APFConfig, rnd: object) -> None:
        import random

        assert isinstance(rnd, random.Random)
        doc = {"".join(c.upper() if rnd.random() < 0.5 else c for c in k): v for k, v in apf.to_dict().items()}
        self.assertEqual(APFConfig.from_dict(doc), apf)


class GoJSONTests(SynchronousTestCase):
    def test_dumps(self) -> None:
        self.assertEqual(gojson.dumps({"a": ["<", "é"], "b": None}), '{"a":["\\u003c","é"],"b":null}')
        self.assertEqual(gojson.dumps({"a": 1}, indent=4), '{\n    "a": 1\n}')
        self.assertEqual(gojson.dumps({"a": [], "b": {}}, indent=4), '{\n    "a": [],\n    "b": {}\n}')

    def test_fold_keys(self) -> None:
        self.assertEqual(gojson.fold_keys({"A": 1, "a": 2, "B": 3, 4: 5}), {"a": 2, "b": 3})
        self.assertEqual(gojson.fold_keys({"a": 2, "A": 1}), {"a": 2})

    @given(st.recursive(st.none() | st.booleans() | st.integers() | TEXT,
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                        max_leaves=10), st.sampled_from([None, 4]))
    def test_dumps_roundtrip(self, value: object, indent: int | None) -> None:
        text = gojson.dumps(value, indent)
        self.assertEqual(json.loads(text), value)
        for raw in "<>&\u2028\u2029":
            self.assertNotIn(raw, text)
