"""apf.json, cloud-config, VM naming, annotations and initdata: upstream's formats byte for byte."""

from __future__ import annotations

import base64
import gzip
import json
import os

from twisted.trial.unittest import SynchronousTestCase

from caa.adaptor.userdata import (
    AnnotationError,
    APFConfig,
    WriteFile,
    auth_json,
    cloud_config,
    encode_initdata,
    instance_spec,
    pod_identity,
    user_data,
    validate_initdata,
    vm_name,
)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "initdata_upstream.b64")


class NamingTests(SynchronousTestCase):
    def test_examples(self) -> None:
        self.assertEqual(vm_name("nginx-7d9f", "3f2a9c81e0aa"), "podvm-nginx-7d9f-3f2a9c81")
        self.assertEqual(vm_name("My_Pod.x", "ABCDEF1234"), "podvm-my-pod-x-abcdef12")
        long = vm_name("a" * 100, "b" * 64)
        self.assertEqual(len(long), 63)
        self.assertEqual(long, "podvm-" + "a" * 48 + "-" + "b" * 8)


class AnnotationTests(SynchronousTestCase):
    def test_identity(self) -> None:
        self.assertEqual(pod_identity({"io.kubernetes.cri.sandbox-name": "k8s_web_ns_uid_0",
                                       "io.kubernetes.cri.sandbox-namespace": "ns"}), ("web", "ns"))
        self.assertRaises(AnnotationError, pod_identity, {"io.kubernetes.cri.sandbox-name": "a"})

    def test_spec(self) -> None:
        p = "io.katacontainers.config.hypervisor."
        s = instance_spec({p + "machine_type": "m5.large", p + "default_vcpus": "2", p + "default_memory": "x",
                           p + "default_gpus": "1", p + "image": "img"}, multi_nic=True)
        self.assertEqual((s.instance_type, s.vcpus, s.memory_mib, s.gpus, s.image, s.multi_nic),
                         ("m5.large", 2, 0, 1, "img", True))


class CloudConfigTests(SynchronousTestCase):
    def test_layout(self) -> None:
        text = cloud_config([WriteFile("/a", "x\ny\n"), WriteFile("/b", "")])
        self.assertEqual(text, "#cloud-config\n\nwrite_files:\n  - path: /a\n    content: |\n      x\n      y\n"
                               "  - path: /b\n")
        self.assertEqual(cloud_config([]), "#cloud-config\n")

    def test_user_data_order_and_initdata(self) -> None:
        apf = APFConfig("default", "web", {"podip": "10.0.0.2/24"}, tls_server_cert="C", tls_server_key="K",
                        tls_client_ca="CA", tls_min_version="VersionTLS13")
        text = user_data(apf, {"io.katacontainers.config.hypervisor.cc_init_data": "version = \"0.1.0\"\n"},
                         auths={"reg.io": "dTpw"}, scratch_space=True)
        paths = [line.split(": ")[1] for line in text.splitlines() if line.startswith("  - path: ")]
        self.assertEqual(paths, ["/run/peerpod/apf.json", "/run/peerpod/auth.json", "/run/peerpod/initdata",
                                 "/run/peerpod/scratch-space.marker"])
        lines = text.splitlines()
        b64 = lines[lines.index("  - path: /run/peerpod/initdata") + 2].strip()
        self.assertEqual(gzip.decompress(base64.b64decode(b64)), b'version = "0.1.0"\n')
        self.assertIn('      {"auths":{"reg.io":{"auth":"dTpw"}}}', lines)

    def test_default_initdata(self) -> None:
        apf = APFConfig("ns", "p", {})
        text = user_data(apf, {}, default_initdata="QUJD")
        self.assertIn("  - path: /run/peerpod/initdata\n    content: |\n      QUJD\n", text)


class APFTests(SynchronousTestCase):
    def test_keys(self) -> None:
        apf = APFConfig("default", "web", {"podip": "10.0.0.2/24"}, tls_server_cert="C", tls_server_key="K",
                        tls_client_ca="CA", tls_cipher_suites=("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",))
        d = json.loads(apf.to_json())
        self.assertEqual(list(d), ["pod-network", "pod-namespace", "pod-name", "tls-server-key", "tls-server-cert",
                                   "tls-client-ca", "tls-cipher-suites"])
        self.assertTrue(apf.to_json().startswith('{\n    "pod-network": {\n        "podip"'))
        bare = json.loads(APFConfig("n", "p", {}).to_json())
        self.assertEqual(list(bare), ["pod-network", "pod-namespace", "pod-name"])

    def test_html_escaped_like_go(self) -> None:
        self.assertIn("\\u003c", APFConfig("n", "<p>", {}).to_json())


class AuthTests(SynchronousTestCase):
    def test_limits(self) -> None:
        self.assertIsNone(auth_json({}))
        self.assertIsNone(auth_json({f"r{i}.io": "x" * 100 for i in range(200)}))


class InitdataTests(SynchronousTestCase):
    def test_upstream_fixture_valid(self) -> None:
        with open(FIXTURE) as f:
            validate_initdata(f.read().strip())

    def test_invalid(self) -> None:
        for bad in ("not base64!", base64.b64encode(b"plain").decode(),
                    encode_initdata('algorithm = "md5"\nversion = "0.1.0"\n')):
            self.assertRaises(ValueError, validate_initdata, bad)
