"""caa.podvm_api.initdata: encode (adaptor) -> decode and digest (pod VM), against upstream's fixture values."""

from __future__ import annotations

import base64
import gzip
import hashlib
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from caa.podvm_api import initdata
from caa.podvm_api.initdata import InitdataError

FIXTURE = Path(__file__).parent / "fixtures" / "initdata_upstream.b64"
UPSTREAM_DIGEST = ("52af3178dd7ad4bf551e629b84b45bfd1fbe1434b980120267181ae3575ea20c"
                   "a9013b8eadf31d27eed7ff2552d500ef")


class FixtureTests(SynchronousTestCase):
    def test_upstream_fixture(self) -> None:
        """Upstream's fixture: plain base64 of the TOML (older adaptors), and as CAA sends it (gzip)."""
        toml = base64.b64decode(FIXTURE.read_text())
        for text in (FIXTURE.read_text(), initdata.encode(toml), base64.encodebytes(gzip.compress(toml))):
            init = initdata.parse(initdata.decode(text))
            self.assertEqual((init.algorithm, init.digest, init.toml), ("sha384", UPSTREAM_DIGEST, toml))
            self.assertEqual(sorted(init.data), ["aa.toml", "cdh.toml", "policy.rego"])
        self.assertEqual(initdata.validate(FIXTURE.read_text().strip()).digest, UPSTREAM_DIGEST)

    def test_multi_member_gzip(self) -> None:
        toml = base64.b64decode(FIXTURE.read_text())
        half = len(toml) // 2
        blob = gzip.compress(toml[:half]) + gzip.compress(toml[half:])
        self.assertEqual(initdata.decode(base64.b64encode(blob)), toml)

    def test_encode_is_deterministic(self) -> None:
        self.assertEqual(initdata.encode("a = 1\n"), initdata.encode(b"a = 1\n"))
        self.assertEqual(gzip.decompress(base64.b64decode(initdata.encode("a = 1\n"))), b"a = 1\n")


class ErrorTests(SynchronousTestCase):
    def test_errors(self) -> None:
        cases: dict[bytes | str, str] = {
            b"not base64 !!": "base64",
            base64.b64encode(b"\x1f\x8bnot gzip"): "gzip",
            initdata.encode(b"algorithm = = 1"): "TOML",
            initdata.encode(b'algorithm = "md5"\n'): "algorithm",
            initdata.encode(b'version = "0.1.0"\n'): "algorithm",
            initdata.encode(b'algorithm = "sha256"\nversion = 1\n'): "version",
            initdata.encode(b'algorithm = "sha256"\n[data]\n"aa.toml" = 3\n'): "string",
            initdata.encode(b'algorithm = "sha256"\ndata = "x"\n'): "table",
        }
        for blob, word in cases.items():
            with self.assertRaises(InitdataError) as cm:
                initdata.parse(initdata.decode(blob))
            self.assertIn(word, str(cm.exception))

    def test_validate_for_the_adaptor_flag(self) -> None:
        for bad in ("not base64!", base64.b64encode(b"plain").decode(),
                    initdata.encode('algorithm = "md5"\nversion = "0.1.0"\n'),
                    initdata.encode('algorithm = "sha256"\n')):
            self.assertRaises(ValueError, initdata.validate, bad)
        self.assertEqual(initdata.validate(" " + initdata.encode('algorithm = "sha256"\nversion = "1"\n') + "\n")
                         .version, "1")

    def test_digest_algorithms(self) -> None:
        for alg in ("sha256", "sha384", "sha512"):
            toml = f'algorithm = "{alg}"\nversion = "0.1.0"\n'.encode()
            self.assertEqual(initdata.parse(toml).digest, hashlib.new(alg, toml).hexdigest())


TOML_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="'\\\"\r"),
                    max_size=50)


class RoundTripTests(SynchronousTestCase):
    @given(st.sampled_from(["sha256", "sha384", "sha512"]), TOML_TEXT,
           st.dictionaries(st.sampled_from(["aa.toml", "cdh.toml", "policy.rego", "x"]), TOML_TEXT))
    def test_encode_decode_digest(self, alg: str, version: str, data: dict[str, str]) -> None:
        """What the adaptor encodes the pod VM decodes to the same bytes, and digests them as upstream does."""
        body = "".join(f'"{k}" = """{v}"""\n' for k, v in data.items())
        toml = f'algorithm = "{alg}"\nversion = "{version}"\n[data]\n{body}'.encode()
        init = initdata.parse(initdata.decode(initdata.encode(toml)))
        self.assertEqual(init.toml, toml)
        self.assertEqual((init.algorithm, init.version, init.data), (alg, version, data))
        self.assertEqual(init.digest, hashlib.new(alg, toml).hexdigest())

    @given(st.binary(max_size=300))
    def test_decode_inverts_encode(self, raw: bytes) -> None:
        self.assertEqual(initdata.decode(initdata.encode(raw)), raw)
        self.assertEqual(initdata.decode(base64.encodebytes(gzip.compress(raw))), raw)  # line breaks ignored
