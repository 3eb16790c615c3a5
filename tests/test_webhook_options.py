"""`twistd caa-webhook` options: upstream's flags, env vars (default < env < flag), Go spellings, TLS
profile checks, the plugin."""

from __future__ import annotations

from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from caa.goflags import endpoint_description
from caa.tls import CertificateAuthority
from caa.webhook import tap
from caa.webhook.certs import DEFAULT_CERT_DIR
from caa.webhook.mutation import MutationConfig
from caa.webhook.server import WebhookService
from caa.webhook.tap import Options


def parse(argv: list[str], env: dict[str, str] | None = None) -> Options:
    options = Options(environ=env or {})
    options.parseOptions(argv)
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults_are_upstreams(self) -> None:
        o = parse([])
        self.assertEqual(o["webhook-endpoint"], "tcp:9443")
        self.assertEqual(o["probe-endpoint"], "tcp:8081")
        self.assertEqual(o["cert-dir"], DEFAULT_CERT_DIR)
        self.assertEqual(o["mutation"], MutationConfig("kata-remote", "kata.peerpods.io/vm"))
        self.assertEqual((o["tls-min-version"], o["cipher-suites"]), ("", []))

    def test_environment(self) -> None:
        env = {"TARGET_RUNTIMECLASS": "kata-cloud", "POD_VM_EXTENDED_RESOURCE": "example.com/vm",
               "TLS_MIN_VERSION": " VersionTLS12 ",
               "TLS_CIPHER_SUITES": " TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, ,TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"}
        o = parse([], env)
        self.assertEqual(o["mutation"], MutationConfig("kata-cloud", "example.com/vm"))
        self.assertEqual(o["tls-min-version"], "VersionTLS12")
        self.assertEqual(o["cipher-suites"], ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
                                              "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"])

    def test_empty_environment_means_default(self) -> None:
        o = parse([], {"TARGET_RUNTIMECLASS": "", "POD_VM_EXTENDED_RESOURCE": ""})
        self.assertEqual(o["mutation"], MutationConfig())

    def test_flag_beats_environment(self) -> None:
        o = parse(["--target-runtimeclass", "flagged", "--pod-vm-extended-resource=x.io/vm"],
                  {"TARGET_RUNTIMECLASS": "from-env", "POD_VM_EXTENDED_RESOURCE": "env.io/vm"})
        self.assertEqual(o["mutation"], MutationConfig("flagged", "x.io/vm"))

    def test_upstream_command_line(self) -> None:
        """The chart's args, Go spellings and zap's logging flags."""
        o = parse(["--leader-elect", "--health-probe-bind-address=:8081", "--metrics-bind-address=:8443",
                   "-zap-log-level", "debug", "--zap-devel", "--zap-encoder=json"])
        self.assertTrue(o["leader-elect"])
        self.assertEqual(o["probe-endpoint"], "tcp:8081")
        o = parse(["-leader-elect=false", "-health-probe-bind-address", "127.0.0.1:9000"])
        self.assertFalse(o["leader-elect"])
        self.assertEqual(o["probe-endpoint"], "tcp:9000:interface=127.0.0.1")
        self.assertEqual(parse(["--leader-elect=true"])["leader-elect"], True)
        with self.assertRaises(usage.UsageError):
            parse(["--leader-elect=maybe"])

    def test_addresses(self) -> None:
        self.assertEqual(endpoint_description(":9443"), "tcp:9443")
        self.assertEqual(endpoint_description("0.0.0.0:9443"), "tcp:9443:interface=0.0.0.0")
        self.assertEqual(endpoint_description("[::]:9443"), r"tcp6:9443:interface=\:\:")
        self.assertEqual(endpoint_description("tcp:0:interface=127.0.0.1"), "tcp:0:interface=127.0.0.1")
        self.assertIsNone(endpoint_description("0"))
        self.assertIsNone(endpoint_description(""))
        for bad in ("nonsense", "host:99999", "a:b:c"):
            with self.assertRaises(usage.UsageError):
                endpoint_description(bad)
        self.assertIsNone(parse(["--health-probe-bind-address", "0"])["probe-endpoint"])
        with self.assertRaises(usage.UsageError):
            parse(["--webhook-bind-address", "0"])

    def test_tls_profile_errors(self) -> None:
        """Upstream's TestParseTLSOptions: 1.0/1.1 refused, unknown names refused, suites with 1.3 refused."""
        for env in ({"TLS_MIN_VERSION": "VersionTLS10"}, {"TLS_MIN_VERSION": "VersionTLS11"},
                    {"TLS_MIN_VERSION": "TLS1.2"}, {"TLS_CIPHER_SUITES": "TLS_FAKE_SUITE"},
                    {"TLS_MIN_VERSION": "VersionTLS13",
                     "TLS_CIPHER_SUITES": "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"}):
            with self.subTest(env=env), self.assertRaises(usage.UsageError):
                parse([], env)
        self.assertEqual(parse([], {"TLS_MIN_VERSION": "VersionTLS13"})["tls-min-version"], "VersionTLS13")


class MakeServiceTests(SynchronousTestCase):
    def test_service(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        pair = CertificateAuthority.create().issue_server_certificate("localhost")
        (directory / "tls.crt").write_bytes(pair.cert_pem)
        (directory / "tls.key").write_bytes(pair.key_pem)
        service = tap.makeService(parse(["--cert-dir", str(directory)], {"TARGET_RUNTIMECLASS": "k"}))
        self.assertIsInstance(service, WebhookService)
        self.assertEqual(service.config.target_runtime_class, "k")
        self.assertIsNotNone(service.probe_endpoint)

    def test_missing_certificate_exits(self) -> None:
        with self.assertRaises(SystemExit) as caught:
            tap.makeService(parse(["--cert-dir", self.mktemp()]))
        self.assertIn("tls.crt", str(caught.exception.code))

    def test_plugin(self) -> None:
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        self.assertIn("caa-webhook", makers)
        self.assertIsInstance(makers["caa-webhook"].options(), Options)
