"""caa.podvm_api.volumes: the cloud_volumes annotation, written by the adaptor's proxy, read by the forwarder."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from caa.podvm_api.volumes import FS_TYPES, CloudVolume, VolumeError, decode_cloud_volumes, encode_cloud_volumes


class EncodeTests(SynchronousTestCase):
    def test_upstream_bytes(self) -> None:
        """Compact Go JSON: names sorted as Go sorts map keys, fields in struct order, omitempty honoured."""
        text = encode_cloud_volumes([
            CloudVolume("vol-2", "/m3", "ext4", 2, "disk-3"),
            CloudVolume("vol-0", "/m0", "xfs", 0, "/dev/sdb", encrypt_type="luks2", key_id="k1"),
            CloudVolume("vol-10", "/<x>", "ext4", 10, "d", fs_group="1000"),
        ])
        self.assertEqual(text, '{"vol-0":{"mount_point":"/m0","fs_type":"xfs","lun":"0","disk_id":"/dev/sdb",'
                               '"encrypt_type":"luks2","key_id":"k1"},'
                               '"vol-10":{"mount_point":"/\\u003cx\\u003e","fs_type":"ext4","lun":"10","disk_id":"d",'
                               '"fs_group":"1000"},'
                               '"vol-2":{"mount_point":"/m3","fs_type":"ext4","lun":"2","disk_id":"disk-3"}}')
        self.assertEqual(encode_cloud_volumes([]), "{}")


class DecodeTests(SynchronousTestCase):
    def test_sorted_and_defaults(self) -> None:
        vols = decode_cloud_volumes(
            '{"vol-b": {"mount_point": "/data", "lun": "1"},'
            ' "vol-a": {"mount_point": "/logs", "lun": "0", "fs_type": "xfs", "encrypt_type": "LUKS",'
            ' "key_id": "default/k/1"}}')
        self.assertEqual([v.name for v in vols], ["vol-a", "vol-b"])
        self.assertEqual((vols[0].fs_type, vols[0].encrypt_type, vols[0].lun), ("xfs", "luks2", 0))
        self.assertEqual((vols[1].fs_type, vols[1].host_path, vols[1].mapper_name),
                         ("ext4", "/run/cloud-volumes/vol-b", "caa-vol-b"))
        self.assertEqual(decode_cloud_volumes(""), [])
        self.assertEqual(decode_cloud_volumes("  "), [])

    def test_errors(self) -> None:
        cases = {
            "{bad": "corrupt cloud_volumes annotation",
            "[]": "corrupt cloud_volumes annotation",
            '{"v": {"lun": 0, "mount_point": "/d"}}': "values must be strings",
            '{"v": {"lun": "0"}}': "missing required mount_point or lun",
            '{"v": {"mount_point": "/d"}}': "missing required mount_point or lun",
            '{"../x": {"mount_point": "/d", "lun": "0"}}': "unsafe name",
            '{"..": {"mount_point": "/d", "lun": "0"}}': "unsafe name",
            '{"v": {"mount_point": "/d", "lun": "0", "fs_type": "ntfs"}}': "unsupported filesystem type",
            '{"v": {"mount_point": "/d", "lun": "x"}}': "invalid lun",
            '{"v": {"mount_point": "/d", "lun": "\\u0663"}}': "invalid lun",  # a non-ASCII digit: Go refuses
            '{"v": {"mount_point": "/d", "lun": "0", "encrypt_type": "aes"}}': "unsupported encryption",
            '{"v": {"mount_point": "/d", "lun": "0", "encrypt_type": "luks2"}}': "key_id",
        }
        for text, word in cases.items():
            with self.assertRaises(VolumeError) as cm:
                decode_cloud_volumes(text)
            self.assertIn(word, str(cm.exception), text)


TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
NAMES = st.text(alphabet=st.characters(codec="utf-8", blacklist_characters="/"), min_size=1,
                max_size=12).filter(lambda n: n not in (".", ".."))
VOLUME = st.builds(
    lambda name, mp, fs, lun, disk, group, key: CloudVolume(name, mp, fs, lun, disk, group,
                                                            "luks2" if key else "", key),
    NAMES, TEXT.filter(bool), st.sampled_from(FS_TYPES), st.integers(-(2**31), 2**31), TEXT, TEXT, TEXT)


class RoundTripTests(SynchronousTestCase):
    @given(st.lists(VOLUME, max_size=5, unique_by=lambda v: v.name))
    def test_encode_decode(self, volumes: list[CloudVolume]) -> None:
        text = encode_cloud_volumes(volumes)
        self.assertEqual(decode_cloud_volumes(text), sorted(volumes, key=lambda v: v.name))
        self.assertTrue(all(isinstance(v, str) for vol in json.loads(text).values() for v in vol.values()))
