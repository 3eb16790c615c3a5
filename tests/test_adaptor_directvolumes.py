"""The direct-volumes scan (caa.adaptor.directvolumes, spec-adaptor §5.8) over a real directory laid out as a CSI
driver lays it out (`kata-runtime direct-volume add`): upstream's naming, pod filtering, order, and every kind of
malformed entry (skipped with a log line, never an exception)."""

from __future__ import annotations

import base64
import json
import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from caa.adaptor.directvolumes import DirectVolume, decode_name, encode_name, scan

UID = "5e3a1f0c-8f5b-4d6e-9a0b-1c2d3e4f5a6b"


def target(pv: str, uid: str = UID) -> str:
    """A kubelet CSI target path (what the CSI driver's NodePublishVolume gets)."""
    return f"/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~csi/{pv}/mount"


class ScanTests(TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def entry(self, path: str, info: object = None, raw: bytes | None = None) -> str:
        d = os.path.join(self.dir, encode_name(path))
        os.makedirs(d)
        if info is not None or raw is not None:
            with open(os.path.join(d, "mountInfo.json"), "wb") as f:
                f.write(raw if raw is not None else json.dumps(info).encode())
        return d

    def warnings(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.log if e.get("log_level") is LogLevel.warn]

    def test_upstream_naming_and_order(self) -> None:
        # what kata-runtime direct-volume add writes: the target path's URL-safe base64, padded
        path = target("pvc-0f1e2d3c")
        self.assertEqual(encode_name(path), base64.urlsafe_b64encode(path.encode()).decode())
        paths = [target(f"pvc-{i}") for i in range(5)]
        for i, p in enumerate(paths):
            self.entry(p, {"volume-type": "block", "device": f"/dev/sd{'bcdef'[i]}", "fstype": "ext4",
                           "metadata": {}, "options": []})
        got = scan(self.dir, UID)
        self.assertEqual([v.path for v in got], sorted(paths, key=encode_name))  # sorted by directory name
        self.assertEqual(got[0], DirectVolume(got[0].path, got[0].disk_id, "ext4"))

    def test_cloud_volume_path_wins_over_device_and_encryption_read(self) -> None:
        self.entry(target("a"), {"device": "/dev/sdb", "fstype": "xfs",
                                 "metadata": {"cloud-volume-path": "vol-0123456789abcdef0",
                                              "encrypt-type": "luks2", "kbs-key-id": "default/key/1"}})
        self.assertEqual(scan(self.dir, UID), [DirectVolume(target("a"), "vol-0123456789abcdef0", "xfs", "luks2",
                                                            "default/key/1")])

    def test_pod_uid_filter(self) -> None:
        self.entry(target("mine"), {"device": "d1"})
        self.entry(target("theirs", uid="0000-other"), {"device": "d2"})
        self.assertEqual([v.disk_id for v in scan(self.dir, UID)], ["d1"])
        # without the sandbox-uid annotation every pod's CSI volume counts (upstream)
        self.assertEqual(sorted(v.disk_id for v in scan(self.dir, "")), ["d1", "d2"])

    def test_not_csi_not_base64_not_a_directory(self) -> None:
        self.entry(f"/var/lib/kubelet/pods/{UID}/volumes/kubernetes.io~empty-dir/x", {"device": "d0"})
        os.makedirs(os.path.join(self.dir, "not base64!"))
        os.makedirs(os.path.join(self.dir, base64.urlsafe_b64encode(target("np").encode()).decode().rstrip("=")
                                 + "x"))
        with open(os.path.join(self.dir, encode_name(target("file"))), "w") as f:
            f.write("{}")
        os.makedirs(os.path.join(self.dir, base64.urlsafe_b64encode(b"\xff\xfe" + target("u").encode()).decode()))
        self.assertEqual(scan(self.dir, UID), [])

    def test_malformed_metadata_is_skipped_with_a_log_line(self) -> None:
        self.entry(target("1-missing"))
        self.entry(target("2-garbage"), raw=b"{not json")
        self.entry(target("3-array"), [1, 2])
        self.entry(target("4-nodisk"), {"fstype": "ext4", "metadata": {"cloud-volume-path": ""}})
        self.entry(target("5-types"), {"device": 7, "metadata": {"cloud-volume-path": ["x"]}})
        self.entry(target("6-huge"), raw=b" " * (70 * 1024) + b"{}")
        self.entry(target("7-bad-utf8"), raw=b'{"device": "\xff"}')
        self.entry(target("8-metadata-list"), {"device": "/dev/vdz", "metadata": ["cloud-volume-path"],
                                              "fstype": 3})
        got = scan(self.dir, UID)
        self.assertEqual(got, [DirectVolume(target("8-metadata-list"), "/dev/vdz", "ext4")])
        text = "\n".join(self.warnings())
        for pv in ("1-missing", "2-garbage", "3-array", "4-nodisk", "5-types", "6-huge", "7-bad-utf8"):
            self.assertIn(target(pv), text)
        self.assertIn("names no disk", text)
        self.assertIn("not a JSON object", text)

    def test_missing_or_unreadable_directory(self) -> None:
        self.assertEqual(scan(os.path.join(self.dir, "absent"), UID), [])
        not_dir = os.path.join(self.dir, "file")
        open(not_dir, "w").close()
        self.assertEqual(scan(not_dir, UID), [])
        self.assertTrue(any("cannot list" in w for w in self.warnings()))


class NameCodecTests(SynchronousTestCase):
    @given(st.text(min_size=1))
    def test_round_trip(self, path: str) -> None:
        self.assertEqual(decode_name(encode_name(path)), path)

    @given(st.text(alphabet=st.characters(codec="ascii"), max_size=40))
    def test_junk_never_raises(self, name: str) -> None:
        out = decode_name(name)
        if out is not None:  # only strict padded base64url decodes
            self.assertEqual(encode_name(out), name)

    def test_strictness(self) -> None:
        path = target("p")
        std = base64.b64encode(b"\xfb\xff" + path.encode()).decode()  # '+' and '/' are not URL-safe
        self.assertIsNone(decode_name(std))
        self.assertIsNone(decode_name(encode_name(path).rstrip("=") if len(path) % 3 else "a"))
        self.assertIsNone(decode_name(""))
