"""caa-forwarder: loading apf.json and the command line (upstream main_test.go); the format: test_podvm_api_apf."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from caa import tls
from caa.forwarder import tap
from caa.forwarder.config import ConfigError, load_config, parse_config
from caa.forwarder.daemon import StartupError, TLSSettings, build_server_tls

APF = {
    "pod-network": {
        "podip": "10.244.0.19/24", "pod-hw-addr": "0e:8f:62:f3:81:ad", "interface": "eth0",
        "worker-node-ip": "10.224.0.4/16", "tunnel-type": "vxlan",
        "routes": [{"Dst": "", "GW": "10.244.0.1", "Dev": "eth0"}],
        "mtu": 1500, "index": 1, "vxlan-port": 8472, "vxlan-id": 555001, "dedicated": False,
    },
    "pod-namespace": "default",
    "pod-name": "nginx-866fdb5bfb-b98nw",
    "tls-server-key": "KEY", "tls-server-cert": "CERT", "tls-client-ca": "CA",
}


class ConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def _write(self, text: str) -> str:
        p = os.path.join(self.dir, "apf.json")
        with open(p, "w") as f:
            f.write(text)
        return p

    def test_load(self) -> None:
        c = load_config(self._write(json.dumps(APF, indent=4) + "\n"))
        self.assertEqual((c.pod_namespace, c.pod_name), ("default", "nginx-866fdb5bfb-b98nw"))
        self.assertEqual((c.tls_server_key, c.tls_server_cert, c.tls_client_ca), ("KEY", "CERT", "CA"))
        assert c.pod_network is not None
        self.assertEqual(c.pod_network.vxlan_id, 555001)
        self.assertEqual(c.pod_network.routes[0].gw, "10.244.0.1")  # "GW" binds to gw
        self.assertEqual(c.pod_network.routes[0].dev, "eth0")
        self.assertNotIn("KEY", repr(c))

    def test_missing_and_invalid(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            load_config(os.path.join(self.dir, "nope.json"))
        self.assertIn("failed to open", str(cm.exception))
        with self.assertRaises(ConfigError) as cm:
            load_config(self._write("{not json"))
        self.assertIn("failed to decode", str(cm.exception))

    def test_bad_values(self) -> None:
        """A malformed document is a ConfigError naming the key (every rule: test_podvm_api_apf)."""
        with self.assertRaises(ConfigError) as cm:
            parse_config({"pod-name": 3})
        self.assertIn("pod-name", str(cm.exception))
        with self.assertRaises(ConfigError) as cm:
            load_config(self._write('{"tls-cipher-suites": "x"}'))
        self.assertIn("failed to decode", str(cm.exception))


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        ca = tls.CertificateAuthority.create()
        self.server = ca.issue_server_certificate("vm")
        self.client = tls.make_client_certificate()
        self.path = os.path.join(self.dir, "apf.json")
        with open(self.path, "w") as f:
            json.dump({"tls-server-cert": self.server.cert_pem.decode(),
                       "tls-server-key": self.server.key_pem.decode(),
                       "tls-client-ca": self.client.cert_pem.decode()}, f)

    def _parse(self, *argv: str) -> tap.Options:
        o = tap.Options()
        o.parseOptions(["--config", self.path, *argv])
        return o

    def test_defaults(self) -> None:
        o = self._parse()
        self.assertEqual(o["listen-address"], ("0.0.0.0", 15150))
        self.assertEqual(o["kata-agent-socket"], "/run/kata-containers/agent.sock")
        self.assertEqual(tap.netns_path(o["pod-netns"]), "/run/netns/podns")
        self.assertEqual(o["host-interface"], "")
        self.assertIsNotNone(o["tls"])
        self.assertEqual(tap.Options()["config"], "/run/peerpod/apf.json")

    def test_flags(self) -> None:
        o = self._parse("--listen", "127.0.0.1:1234", "--kata-agent-socket", "/tmp/a.sock",
                        "--pod-namespace", "podns2", "--host-interface", "ens1", "--disable-tls")
        self.assertEqual(o["listen-address"], ("127.0.0.1", 1234))
        self.assertEqual((o["kata-agent-socket"], o["host-interface"]), ("/tmp/a.sock", "ens1"))
        self.assertEqual(tap.netns_path(o["pod-netns"]), "/run/netns/podns2")
        self.assertIsNone(o["tls"])

    def test_go_style_flags(self) -> None:
        """An upstream TLS_OPTIONS line (single dashes, Go booleans) parses the same."""
        o = self._parse("-listen", "127.0.0.1:99", "-kata-agent-socket=/tmp/k.sock", "-pod-namespace",
                        "/run/netns/x", "-disable-tls=true", "-tls-skip-verify=false")
        self.assertEqual(o["listen-address"], ("127.0.0.1", 99))
        self.assertEqual((o["kata-agent-socket"], o["pod-netns"]), ("/tmp/k.sock", "/run/netns/x"))
        self.assertIsNone(o["tls"])
        self.assertFalse(o["tls-skip-verify"])

    def test_errors(self) -> None:
        for argv in (["--listen", "nope"], ["--tls-skip-verify"], ["--agent-wait", "0"]):
            self.assertRaises(usage.UsageError, self._parse, *argv)
        o = tap.Options()
        with self.assertRaises(usage.UsageError) as cm:
            o.parseOptions(["--config", os.path.join(self.dir, "missing")])
        self.assertIn("failed to open", str(cm.exception))

    def test_version(self) -> None:
        with self.assertRaises(SystemExit) as cm:
            tap.Options().parseOptions(["--version"])
        self.assertEqual(cm.exception.code, 0)

    def test_tls_merge(self) -> None:
        """Flags win over apf.json; without a cert anywhere TLS mode refuses to start."""
        config = parse_config({})
        self.assertRaises(StartupError, build_server_tls, TLSSettings(), config)
        c = os.path.join(self.dir, "c.pem")
        k = os.path.join(self.dir, "k.pem")
        with open(c, "wb") as f:
            f.write(self.server.cert_pem)
        with open(k, "wb") as f:
            f.write(self.server.key_pem)
        opts = build_server_tls(TLSSettings(cert_file=c, key_file=k), config)
        self.assertFalse(opts.verify)  # no CA anywhere: server-only TLS
        opts = build_server_tls(TLSSettings(), load_config(self.path))
        self.assertTrue(opts.verify and opts.requireCertificate)
        bad = parse_config({"tls-server-cert": self.server.cert_pem.decode(),
                            "tls-server-key": self.server.key_pem.decode(), "tls-min-version": "VersionTLS11"})
        with self.assertRaises(StartupError) as cm:
            build_server_tls(TLSSettings(), bad)
        self.assertIn("invalid TLS profile", str(cm.exception))


class PropertyTests(SynchronousTestCase):
    def test_constants(self) -> None:
        self.assertEqual((tap.DEFAULT_LISTEN, tap.DEFAULT_CONFIG, tap.DEFAULT_AGENT_SOCKET, tap.DEFAULT_POD_NETNS),
                         ("0.0.0.0:15150", "/run/peerpod/apf.json", "/run/kata-containers/agent.sock",
                          "/run/netns/podns"))

    def test_key_case_and_unknown_keys(self) -> None:
        from hypothesis import given, settings
        from hypothesis import strategies as st

        keys = ["pod-namespace", "pod-name", "tls-server-cert", "tls-server-key", "tls-client-ca",
                "tls-min-version"]

        @settings(max_examples=40, deadline=None)
        @given(st.dictionaries(st.sampled_from(keys), st.text(max_size=20)),
               st.lists(st.booleans(), min_size=40, max_size=40),
               st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k.lower() not in keys
                                                                      and k.lower() != "pod-network"
                                                                      and k.lower() != "tls-cipher-suites"
                                                                      and not k.lower().startswith("sc-")),
                               st.integers(), max_size=3))
        def check(values: dict[str, str], flips: list[bool], junk: dict[str, int]) -> None:
            def recase(k: str) -> str:
                return "".join(c.upper() if flips[i % 40] else c for i, c in enumerate(k))

            doc: dict[str, object] = {recase(k): v for k, v in values.items()}
            doc.update(junk)
            self.assertEqual(parse_config(doc), parse_config(values))
            self.assertEqual(parse_config(json.loads(json.dumps(doc) + "\n")), parse_config(values))

        check()
