"""`twistd caa-adaptor` options: upstream names, env precedence, Go durations, provider flags, bad values."""

from __future__ import annotations

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from caa.adaptor.options import AdaptorOptions

FAKE = "tests.fakes.provider:FakeProviderFactory"


def parse(argv: list[str], env: dict[str, str] | None = None) -> AdaptorOptions:
    o = AdaptorOptions({"CLOUD_PROVIDER": FAKE, **(env or {})})
    o.parseOptions(argv)
    return o


class OptionTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        o = parse([])
        self.assertEqual((o["socket"], o["pods-dir"], o["forwarder-port"], o["proxy-timeout"], o["vxlan-port"],
                          o["vxlan-min-id"], o["socket-mode"], o["probe-port"], o["metrics-port"]),
                         ("/run/peerpod/hypervisor.sock", "/run/peerpod/pods", 15150, 300.0, 4789, 555000, 0o600,
                          8000, 0))
        self.assertFalse(o["disable-tls"])

    def test_precedence(self) -> None:
        env = {"PROXY_TIMEOUT": "90s", "PODS_DIR": "/env", "REMOTE_HYPERVISOR_ENDPOINT": "/env.sock",
               "ENABLE_SCRATCH_SPACE": "TRUE", "FORWARDER_PORT": "1000"}
        o = parse(["--pods-dir", "/flag", "--forwarder-port=2000"], env)
        self.assertEqual((o["proxy-timeout"], o["pods-dir"], o["socket"], o["forwarder-port"]),
                         (90.0, "/flag", "/env.sock", 2000))
        self.assertTrue(o["enable-scratch-space"])
        self.assertEqual(o.sources["pods-dir"], "flag")
        self.assertEqual(parse(["--proxy-timeout", "1h30m"])["proxy-timeout"], 5400.0)

    def test_provider_options_mixed_in(self) -> None:
        o = parse(["--fake-create-delay", "2s", "--socket", "/s", "--fake-state-dir=/d"])
        assert o.provider_options is not None
        self.assertEqual((o.provider_options["fake-create-delay"], o.provider_options["fake-state-dir"], o["socket"]),
                         (2.0, "/d", "/s"))
        o = parse(["--provider", FAKE], {"CLOUD_PROVIDER": ""})
        self.assertIsNotNone(o.provider_factory)

    def test_bad_values(self) -> None:
        cases = [
            (["--proxy-timeout", "5"], {}, "--proxy-timeout: '5' is not a duration"),
            ([], {"PROXY_TIMEOUT": "5"}, "PROXY_TIMEOUT='5'"),
            (["--forwarder-port", "99999"], {}, "--forwarder-port"),
            (["--tls-min-version", "VersionTLS11"], {}, "--tls-min-version"),
            (["--tls-min-version", "VersionTLS13", "--tls-cipher-suites", "X"], {}, "TLS 1.3"),
            (["--tunnel-type", "geneve"], {}, "unknown tunnel type"),
            (["--cert-file", "/x"], {}, "--cert-key"),
            (["--initdata", "bm9wZQ=="], {}, "--initdata"),
            (["--nonsense", "1"], {}, "nonsense"),
            ([], {"CLOUD_PROVIDER": "nope"}, "Unsupported cloud provider"),
            ([], {"CLOUD_PROVIDER": ""}, "no cloud provider"),
        ]
        for argv, env, text in cases:
            e = self.assertRaises(usage.UsageError, parse, argv, env)
            self.assertIn(text, str(e), (argv, env))
