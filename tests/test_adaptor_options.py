"""`twistd caa-adaptor` options: upstream names, env precedence, Go durations, provider flags, bad values."""

from __future__ import annotations

import io
import os
import sys
from typing import cast

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from caa.adaptor.options import AdaptorOptions
from caa.dialer import BootWindow
from caa.providers.options import ProviderOptions

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

    def test_dial_boot_window(self) -> None:
        self.assertEqual(parse([]).boot_window, BootWindow(length=120.0, period=0.05))
        self.assertEqual(parse(["--dial-boot-window", "3m", "--dial-boot-period", "100ms"]).boot_window,
                         BootWindow(length=180.0, period=0.1))
        self.assertIsNone(parse(["--dial-boot-window", "0"]).boot_window)  # back-off only, as before
        e = self.assertRaises(usage.UsageError, parse, ["--dial-boot-period", "1ms"])
        self.assertIn("--dial-boot-period must be at least 10ms", str(e))
        e = self.assertRaises(usage.UsageError, parse, ["--dial-boot-window", "-5s"])
        self.assertIn("--dial-boot-window must not be negative", str(e))
        self.assertEqual(parse(["--dial-boot-rate", "50"]).boot_window, BootWindow(max_rate=50.0))
        e = self.assertRaises(usage.UsageError, parse, ["--dial-boot-rate", "0"])
        self.assertIn("--dial-boot-rate must be positive", str(e))

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

    def test_provider_flags_anywhere_with_values_and_abbreviations(self) -> None:
        # Provider flags before, between and after the common ones; `--x=v` and `--x v`; getopt's unique prefixes.
        o = parse(["--fake-fail-image=bad", "--pods-dir", "/p", "--fake-create-delay", "1m", "--disable-tls",
                   "--fake-vm-boot", "3s", "--provider", FAKE])
        assert o.provider_options is not None
        self.assertEqual((o.provider_options["fake-fail-image"], o.provider_options["fake-create-delay"],
                          o.provider_options["fake-vm-boot-delay"], o["pods-dir"], o["disable-tls"]),
                         ("bad", 60.0, 3.0, "/p", True))
        sources = cast(ProviderOptions, o.provider_options).sources
        self.assertEqual(sources["fake-vm-boot-delay"], "flag")
        self.assertEqual(sources["fake-delete-delay"], "default")

    def test_provider_env_precedence(self) -> None:
        self.patch(os, "environ", {**os.environ, "FAKE_CREATE_DELAY": "5s", "FAKE_DELETE_DELAY": "7s"})
        o = parse(["--fake-create-delay", "9s"])
        assert o.provider_options is not None
        self.assertEqual((o.provider_options["fake-create-delay"], o.provider_options["fake-delete-delay"]),
                         (9.0, 7.0))
        sources = cast(ProviderOptions, o.provider_options).sources
        self.assertEqual((sources["fake-create-delay"], sources["fake-delete-delay"]), ("flag", "env"))

    def test_flags_read_their_env_var_as_a_boolean(self) -> None:
        self.assertIs(parse([], {"TLS_SKIP_VERIFY": "1"})["tls-skip-verify"], True)
        self.assertIs(parse([], {"TLS_SKIP_VERIFY": "false"})["tls-skip-verify"], False)
        self.assertIs(parse(["--tls-skip-verify"], {"TLS_SKIP_VERIFY": "0"})["tls-skip-verify"], True)
        self.assertIs(parse([])["disable-tls"], False)
        e = self.assertRaises(usage.UsageError, parse, [], {"TLS_SKIP_VERIFY": "yes"})
        self.assertEqual(str(e), "environment variable TLS_SKIP_VERIFY='yes': 'yes' is not a boolean (true/false/1/0)")

    def test_bad_provider_values_name_the_provider_and_the_flag(self) -> None:
        e = self.assertRaises(usage.UsageError, parse, ["--fake-create-delay", "soon"])
        self.assertEqual(str(e), "provider fake: --fake-create-delay: 'soon' is not a duration such as 300s, 5m or "
                                 "1h30m (expected a number)")
        self.assertNotIn("\n", str(e))
        e = self.assertRaises(usage.UsageError, parse, ["--fake-create-delay"])
        self.assertIn("requires argument", str(e))
        e = self.assertRaises(usage.UsageError, parse, ["stray"])
        self.assertIn("provider fake: Wrong number of arguments", str(e))
        # Provider flags without a provider: the missing provider is the one clear error.
        e = self.assertRaises(usage.UsageError, parse, ["--fake-create-delay", "1s"], {"CLOUD_PROVIDER": ""})
        self.assertIn("no cloud provider", str(e))
        e = self.assertRaises(usage.UsageError, parse, ["--uri", "x"], {"CLOUD_PROVIDER": "nope"})
        self.assertIn("Unsupported cloud provider", str(e))

    def test_provider_config_checked_at_parse_time(self) -> None:
        e = self.assertRaises(usage.UsageError, parse, ["--provider", "libvirt", "--domain-type", "xen"],
                              {"CLOUD_PROVIDER": ""})
        self.assertIn("provider libvirt:", str(e))
        self.assertIn("xen", str(e))

    def test_help_lists_the_provider_options_with_env_vars(self) -> None:
        o = AdaptorOptions({"CLOUD_PROVIDER": ""})
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        e = self.assertRaises(SystemExit, o.parseOptions, ["--provider", "libvirt", "--help"])
        self.assertEqual(e.code, 0)
        text = out.getvalue()
        common, _, provider = text.partition("Options of provider libvirt:")
        self.assertIn("--pods-dir=", common)
        self.assertIn("(env PODS_DIR)", common)
        self.assertIn("--uri=", provider)
        self.assertIn("(env LIBVIRT_URI)", provider)
        self.assertIn("--ip-timeout=", provider)
        self.assertNotIn("--help", provider)
        # Without a provider, --help still works and shows the common options only.
        out.truncate(0)
        e = self.assertRaises(SystemExit, AdaptorOptions({}).parseOptions, ["--help"])
        self.assertEqual(e.code, 0)
        self.assertIn("--provider=", out.getvalue())
        self.assertNotIn("Options of provider", out.getvalue())
