"""caa.podvm_api.cloudconfig: the adaptor's user-data document byte for byte, and the pod VM's strict parser."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from caa.podvm_api.cloudconfig import PEERPOD_DIR, PEERPOD_FILES, CloudConfigError, WriteFile, parse, render

APF = '{\n    "pod-network": {"podip": "10.244.1.21/24"},\n    "pod-name": "nginx"\n}\n'
AUTH = '{"auths":{"quay.io":{"auth":"dXNlcjpwYXNz"}}}\n'


def normalised(content: str) -> str:
    """What a YAML literal block gives back: exactly one final newline, none when there is no text."""
    body = content.rstrip("\n")
    return body + "\n" if body else ""


class RenderTests(SynchronousTestCase):
    def test_layout(self) -> None:
        text = render([WriteFile("/a", "x\ny\n"), WriteFile("/b", "")])
        self.assertEqual(text, "#cloud-config\n\nwrite_files:\n  - path: /a\n    content: |\n      x\n      y\n"
                               "  - path: /b\n")
        self.assertEqual(render([]), "#cloud-config\n")


class ParseTests(SynchronousTestCase):
    def test_adaptor_document(self) -> None:
        files = [WriteFile(f"{PEERPOD_DIR}/apf.json", APF), WriteFile(f"{PEERPOD_DIR}/auth.json", AUTH),
                 WriteFile(f"{PEERPOD_DIR}/scratch-space.marker", "")]
        self.assertEqual(parse(render(files)), files)
        self.assertEqual(parse(render(files).encode()), files)

    def test_empty_documents(self) -> None:
        self.assertEqual(parse("write_files: []"), [])
        self.assertEqual(parse("#cloud-config\n"), [])
        self.assertEqual(parse(""), [])
        self.assertEqual(parse("write_files:\n- path: /x\n- null\n"), [WriteFile("/x"), WriteFile("")])

    def test_strict(self) -> None:
        bad = {
            "%$#": "YAML",
            "runcmd: [ls]\n": "runcmd",
            "write_files:\n- path: /run/peerpod/apf.json\n  owner: root\n": "owner",
            "write_files:\n- path: /x\n  permissions: '0644'\n": "permissions",
            "write_files:\n- path: /x\n  path: /y\n": "duplicate",
            "write_files: {}\n": "list",
            "write_files:\n- path: /x\n  content: 3\n": "strings",
            "write_files:\n- 3\n": "mapping",
            "- a\n": "mapping",
            "? {a: 1}\n: x\n": "not a string",  # found by the property test below: it used to raise TypeError
            "1: x\n": "not a string",
        }
        for doc, word in bad.items():
            with self.assertRaises(CloudConfigError) as cm:
                parse(doc)
            self.assertIn(word, str(cm.exception), doc)

    @settings(max_examples=60, deadline=None)
    @given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                     st.builds(lambda p, c: render([WriteFile(p, c)]), st.text(max_size=30), st.text(max_size=60))))
    def test_arbitrary_input_only_cloud_config_errors(self, doc: str | bytes) -> None:
        try:
            files = parse(doc)
        except CloudConfigError:
            return
        self.assertTrue(all(isinstance(f, WriteFile) for f in files))


# Lines as CAA writes them (JSON, base64, TOML): printable, no YAML line breaks but '\n'.
LINE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FFF,
                                      blacklist_characters="\x7f\x85\u2028\u2029",
                                      blacklist_categories=("Cs", "Cc")), max_size=40)
CONTENT = st.lists(LINE, max_size=6).map("\n".join)
PATH = st.one_of(st.sampled_from([f"{PEERPOD_DIR}/{n}" for n in PEERPOD_FILES]),
                 st.from_regex(r"/[a-z0-9._/-]{0,30}", fullmatch=True))


class RoundTripTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(PATH, CONTENT), max_size=5))
    def test_write_then_parse(self, items: list[tuple[str, str]]) -> None:
        """The pod VM reads each file the adaptor wrote: same paths, same text up to the final newline."""
        for _, content in items:
            first = content.lstrip("\n").split("\n", 1)[0]
            assume(not first[:1].isspace())  # a literal block cannot start with indentation (upstream alike)
        files = [WriteFile(p, c) for p, c in items]
        self.assertEqual(parse(render(files)), [WriteFile(p, normalised(c)) for p, c in items])
