"""caa.forwarder.initdata (the pod VM's initdata step) against upstream's fixture values (spec-podvm §2.4,
provision_test.go). The format itself: tests/test_podvm_api_initdata.py."""

from __future__ import annotations

import base64
import gzip
import os
import shutil
import stat
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from caa.forwarder import initdata
from caa.podvm_api.initdata import decode, encode

FIXTURE = Path(__file__).parent / "fixtures" / "initdata_upstream.b64"
UPSTREAM_DIGEST = ("52af3178dd7ad4bf551e629b84b45bfd1fbe1434b980120267181ae3575ea20c"
                   "a9013b8eadf31d27eed7ff2552d500ef")
DUMMY_DIGEST = "adb48cc14fea9403d3d51f3b5f5068fd4d80445a14e94f1b3d5dbabaad66478d"
AA_HEAD = "[token_configs]\n[token_configs.coco_as]\nurl = 'http://127.0.0.1:8080'\n"
CDH_HEAD = "socket = 'unix:///run/confidential-containers/cdh.sock'\ncredentials = []\n"
POLICY_HEAD = "package agent_policy\n\nimport future.keywords.in\n"


class InitdataTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)
        self.toml = base64.b64decode(FIXTURE.read_text())

    def _check_outputs(self) -> None:
        self.assertEqual((self.dir / "initdata.digest").read_text(), UPSTREAM_DIGEST)
        aa = (self.dir / "aa.toml").read_text()
        self.assertTrue(aa.startswith(AA_HEAD))
        self.assertTrue(aa.endswith("-----END CERTIFICATE-----\n\"\"\"\n"))
        self.assertTrue((self.dir / "cdh.toml").read_text().startswith(CDH_HEAD))
        policy = (self.dir / "policy.rego").read_text()
        self.assertTrue(policy.startswith(POLICY_HEAD))
        self.assertTrue(policy.endswith("default WriteStreamRequest := false\n"))

    def test_upstream_fixture_gzip(self) -> None:
        """What the adaptor sends today: base64(gzip(toml)), with line breaks."""
        b64 = base64.encodebytes(gzip.compress(self.toml))
        (self.dir / "initdata").write_bytes(b64 + b"\n")
        init = initdata.process(self.dir)
        self.assertEqual(init.algorithm, "sha384")
        self.assertEqual(init.digest, UPSTREAM_DIGEST)
        self._check_outputs()

    def test_upstream_fixture_plain_base64(self) -> None:
        """Upstream's fixture itself (older adaptors: base64 of the TOML, no gzip)."""
        (self.dir / "initdata").write_bytes(FIXTURE.read_bytes())
        initdata.process(self.dir)
        self._check_outputs()

    def test_without_initdata_writes_dummy(self) -> None:
        init = initdata.process(self.dir)
        self.assertEqual(init.digest, DUMMY_DIGEST)
        self.assertEqual((self.dir / "initdata.digest").read_text(), DUMMY_DIGEST)
        self.assertEqual((self.dir / "aa.toml").read_bytes(), b"")
        self.assertEqual(decode((self.dir / "initdata").read_bytes()), initdata.DUMMY_TOML)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir / "aa.toml").st_mode), 0o644)

    def test_malicious_keys_not_written(self) -> None:
        toml = (b'algorithm = "sha256"\nversion = "0.1.0"\n[data]\n"aa.toml" = "a"\n'
                b'"malicious.rego" = "x"\n"../escape" = "y"\n"/etc/passwd" = "z"\n"./cdh.toml" = "c"\n')
        (self.dir / "sub").mkdir()
        out = self.dir / "sub"
        (out / "initdata").write_text(encode(toml))
        initdata.process(out)
        self.assertEqual((out / "aa.toml").read_text(), "a")
        self.assertEqual((out / "cdh.toml").read_text(), "c")
        self.assertFalse((out / "malicious.rego").exists())
        self.assertFalse((self.dir / "escape").exists())
