"""caa.podvm_api.naming: upstream's `podvm-<pod>-<sid8>` and, always, a valid DNS label (bug: a name ending
in '-' failed at StartVM with "Label must not start or end with a hyphen")."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from caa.podvm_api.naming import MAX_NAME_LENGTH, instance_name, is_dns_label, sanitize

SID = "3f2a9c81e0d1" + "0" * 52


class UpstreamFormTests(SynchronousTestCase):
    def test_examples(self) -> None:
        self.assertEqual(instance_name("nginx-7d9f", SID), "podvm-nginx-7d9f-3f2a9c81")
        self.assertEqual(instance_name("nginx-7d9f", "3f2a9c81e0aa"), "podvm-nginx-7d9f-3f2a9c81")
        self.assertEqual(instance_name("My_Pod.x", "ABCDEF12XYZ"), "podvm-my-pod-x-abcdef12")

    def test_truncated(self) -> None:
        name = instance_name("p" * 100, SID)
        self.assertEqual(name, "podvm-" + "p" * 48 + "-3f2a9c81")
        self.assertEqual(len(name), 63)
        self.assertEqual(instance_name("a" * 100, "b" * 64), "podvm-" + "a" * 48 + "-" + "b" * 8)
        self.assertEqual(len(instance_name("p" * 100, SID, 47)), 47)

    def test_limit(self) -> None:
        self.assertRaises(ValueError, instance_name, "p", SID, 14)
        self.assertEqual(len(instance_name("p" * 100, SID, 200)), MAX_NAME_LENGTH)  # a label's limit

    def test_sanitize(self) -> None:
        self.assertEqual(sanitize("Web_1.x/ü"), "web-1-x--")


class DNSLabelTests(SynchronousTestCase):
    def test_bad_ids(self) -> None:
        """Sandbox ids whose first 8 characters end in a hyphen or sanitise to one, or are empty."""
        self.assertEqual(instance_name("web", "abc-def-ghi"), "podvm-web-abc-def")
        self.assertEqual(instance_name("web", "abcdefg_hij"), "podvm-web-abcdefg")
        self.assertEqual(instance_name("web", "--------"), "podvm-web")
        self.assertEqual(instance_name("web", ""), "podvm-web")
        self.assertEqual(instance_name("", ""), "podvm")
        self.assertEqual(instance_name("-web-", "-x"), "podvm--web---x")
        for name in ("podvm-web-abc-def", "podvm", "podvm--web---x", "a", "a-1"):
            self.assertTrue(is_dns_label(name), name)

    def test_is_dns_label(self) -> None:
        for bad in ("", "-a", "a-", "A", "a_b", "a.b", "a" * 64, "é"):
            self.assertFalse(is_dns_label(bad), bad)
        self.assertTrue(is_dns_label("a" * 63))

    def test_tls_accepts_the_name(self) -> None:
        """What failed at StartVM: the name as a TLS server name goes through IDNA."""
        import idna

        for sid in ("abc-def-ghi", "", "________"):
            idna.encode(instance_name("web", sid))

    @settings(max_examples=300)
    @given(st.text(max_size=120), st.text(max_size=80), st.integers(min_value=15, max_value=200))
    def test_always_a_label(self, pod: str, sid: str, limit: int) -> None:
        name = instance_name(pod, sid, limit)
        self.assertTrue(is_dns_label(name), name)
        self.assertLessEqual(len(name), min(limit, MAX_NAME_LENGTH))
        self.assertTrue(name.startswith("podvm"))

    @given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", max_size=80),
           st.text(alphabet="0123456789abcdef", min_size=8, max_size=64))
    def test_upstream_form_kept(self, pod: str, sid: str) -> None:
        """Where upstream's rule already gives a label (a hex id), the name is exactly upstream's."""
        self.assertEqual(instance_name(pod, sid), f"podvm-{pod[:48]}-{sid[:8]}")
