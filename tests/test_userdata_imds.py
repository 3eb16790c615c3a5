"""caa-process-user-data against fake metadata services over real loopback HTTP (treq)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import endpoints
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from caa.forwarder import userdata
from caa.reactors import as_node_reactor
from tests.fakes import metadata

reactor = as_node_reactor(_reactor)
DOC = b"#cloud-config\n\nwrite_files:\n  - path: /run/peerpod/auth.json\n    content: |\n      {\"auths\":{}}\n"


class IMDSTests(TestCase):
    def setUp(self) -> None:
        self.http = userdata.make_http_client(reactor)

    async def _serve(self, res: Any) -> str:
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(metadata.site(res))
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    def _dmi(self, vendor: str) -> str:
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        Path(d, "sys_vendor").write_text(vendor + "\n")
        Path(d, "cidata").mkdir()
        return d

    async def _detect(self, vendor: str, name: str, url: str) -> Any:
        d = self._dmi(vendor)
        return await userdata.detect_source(self.http, cidata_dir=str(Path(d, "cidata")), dmi_dir=d,
                                            urls={name: url})

    async def test_azure(self) -> None:
        fake = metadata.AzureIMDS(DOC)
        url = await self._serve(fake)
        src = await self._detect("Microsoft Corporation", "azure", url)
        self.assertIsInstance(src, userdata.AzureSource)
        self.assertEqual(await src.fetch(), DOC)
        method, uri, headers = fake.requests[-1]
        self.assertEqual(uri, "/metadata/instance/compute/userData?api-version=2021-01-01&format=text")
        self.assertEqual(headers["metadata"], "true")

    async def test_azure_plain_text_rejected(self) -> None:
        fake = metadata.AzureIMDS(b"test data")
        fake.plain = True
        src = userdata.AzureSource(self.http, await self._serve(fake))
        with self.assertRaises(userdata.UserDataError) as cm:
            await src.fetch()
        self.assertIn("not base64", str(cm.exception))

    async def test_azure_non_200(self) -> None:
        src = userdata.AzureSource(self.http, await self._serve(metadata.AzureIMDS(None)))
        with self.assertRaises(userdata.UserDataError) as cm:
            await src.fetch()
        self.assertIn("404", str(cm.exception))

    async def test_bad_url(self) -> None:
        with self.assertRaises(userdata.UserDataError):
            await userdata.AzureSource(self.http, "invalidURL").fetch()
        with self.assertRaises(userdata.UserDataError):
            await userdata.AzureSource(self.http, "").fetch()

    async def test_aws_imdsv2(self) -> None:
        fake = metadata.AWSIMDS(DOC, require_v2=True)
        url = await self._serve(fake)
        src = await self._detect("Amazon EC2", "aws", url)
        self.assertIsInstance(src, userdata.AWSSource)
        self.assertEqual(await src.fetch(), DOC)
        (m1, u1, h1), (m2, u2, h2) = fake.requests
        self.assertEqual((m1, u1, h1["x-aws-ec2-metadata-token-ttl-seconds"]), ("PUT", "/latest/api/token", "60"))
        self.assertEqual((m2, u2), ("GET", "/latest/user-data"))
        self.assertIn(h2["x-aws-ec2-metadata-token"], fake.tokens)

    async def test_aws_v1_fallback(self) -> None:
        fake = metadata.AWSIMDS(DOC, token_enabled=False)
        src = userdata.AWSSource(self.http, await self._serve(fake))
        self.assertIsNone(await src.token())
        self.assertEqual(await src.fetch(), DOC)
        self.assertNotIn("x-aws-ec2-metadata-token", fake.requests[-1][2])

    async def test_gcp(self) -> None:
        fake = metadata.GCPMetadata(DOC)
        url = await self._serve(fake)
        src = await self._detect("Google", "gcp", url)
        self.assertIsInstance(src, userdata.GCPSource)
        self.assertEqual(await src.fetch(), DOC)
        self.assertTrue(all(h["metadata-flavor"] == "Google" for _, _, h in fake.requests))
        self.assertEqual(fake.requests[-1][1], "/computeMetadata/v1/instance/attributes/user-data")

    async def test_gcp_vendor_without_metadata_server(self) -> None:
        """Google DMI vendor but no metadata server answering: not GCP (no source)."""
        fake = metadata.AzureIMDS(DOC)  # answers 400 to GCP's probe
        src = await self._detect("Google", "gcp", await self._serve(fake))
        self.assertIsNone(src)

    async def test_alibaba(self) -> None:
        fake = metadata.AlibabaMetadata(DOC)
        src = await self._detect("Alibaba Cloud", "alibaba", await self._serve(fake))
        self.assertIsInstance(src, userdata.AlibabaSource)
        self.assertEqual(await src.fetch(), DOC)

    async def test_cidata_first(self) -> None:
        d = self._dmi("Amazon EC2")
        Path(d, "cidata", "user-data").write_bytes(DOC)
        src = await userdata.detect_source(self.http, cidata_dir=str(Path(d, "cidata")), dmi_dir=d)
        self.assertEqual(src, userdata.FileSource(str(Path(d, "cidata", "user-data"))))

    async def test_provision_retries_imds_errors(self) -> None:
        fake = metadata.AWSIMDS(DOC)
        fake.fail_next = 2
        src = userdata.AWSSource(self.http, await self._serve(fake))
        out = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, out)
        written = await userdata.provision(reactor, out, source=src, delay=0.01)
        self.assertEqual(written[0], "auth.json")
        self.assertEqual(Path(out, "auth.json").read_text(), '{"auths":{}}\n')
        self.assertEqual(sum(1 for m, u, _ in fake.requests if u == "/latest/user-data"), 3)
