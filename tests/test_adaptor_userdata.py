"""What the adaptor puts into the user data: pod identity, instance spec, auth.json, files and their order.

The formats themselves are tested in tests/test_podvm_api_*.py.
"""

from __future__ import annotations

import base64
import gzip

from twisted.trial.unittest import SynchronousTestCase

from caa.adaptor.userdata import AnnotationError, auth_json, instance_spec, pod_identity, user_data
from caa.podvm_api import cloudconfig, initdata
from caa.podvm_api.apf import APFConfig

POD_NETWORK = {"podip": "10.0.0.2/24", "tunnel-type": "vxlan", "mtu": 1450, "vxlan-id": 555001}


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


class UserDataTests(SynchronousTestCase):
    def test_user_data_order_and_initdata(self) -> None:
        apf = APFConfig(pod_namespace="default", pod_name="web", pod_network=POD_NETWORK, tls_server_cert="C",
                        tls_server_key="K", tls_client_ca="CA", tls_min_version="VersionTLS13")
        text = user_data(apf, {"io.katacontainers.config.hypervisor.cc_init_data": "version = \"0.1.0\"\n"},
                         auths={"reg.io": "dTpw"}, scratch_space=True)
        paths = [line.split(": ")[1] for line in text.splitlines() if line.startswith("  - path: ")]
        self.assertEqual(paths, ["/run/peerpod/apf.json", "/run/peerpod/auth.json", "/run/peerpod/initdata",
                                 "/run/peerpod/scratch-space.marker"])
        lines = text.splitlines()
        b64 = lines[lines.index("  - path: /run/peerpod/initdata") + 2].strip()
        self.assertEqual(gzip.decompress(base64.b64decode(b64)), b'version = "0.1.0"\n')
        self.assertIn('      {"auths":{"reg.io":{"auth":"dTpw"}}}', lines)

    def test_pod_reads_what_adaptor_wrote(self) -> None:
        """The pod VM's parsers give back apf.json and the initdata document the adaptor put in."""
        apf = APFConfig(pod_namespace="ns", pod_name="p", pod_network=POD_NETWORK, tls_server_key="K")
        toml = 'algorithm = "sha256"\nversion = "0.1.0"\n'
        files = {f.path: f.content for f in cloudconfig.parse(user_data(
            apf, {"io.katacontainers.config.hypervisor.cc_init_data": toml}))}
        self.assertEqual(APFConfig.from_json(files[cloudconfig.APF_PATH]), apf)
        self.assertEqual(initdata.decode(files[cloudconfig.INITDATA_PATH]), toml.encode())

    def test_default_initdata(self) -> None:
        apf = APFConfig(pod_namespace="ns", pod_name="p")
        text = user_data(apf, {}, default_initdata="QUJD")
        self.assertIn("  - path: /run/peerpod/initdata\n    content: |\n      QUJD\n", text)
        self.assertNotIn("initdata", user_data(apf, {}))


class AuthTests(SynchronousTestCase):
    def test_limits(self) -> None:
        self.assertIsNone(auth_json({}))
        self.assertIsNone(auth_json({f"r{i}.io": "x" * 100 for i in range(200)}))
        self.assertEqual(auth_json({"r.io": "a<b"}), '{"auths":{"r.io":{"auth":"a\\u003cb"}}}')
