"""Unit tests of the CreateContainer rewrite (caa.adaptor.interceptors, spec-adaptor §3.2) over a temp
direct-volumes directory."""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caa.adaptor.interceptors import (
    CDI_KEY,
    TARGET_PATH_KEY,
    CreateContainerInterceptor,
    describe_call,
    rewrite_create_container,
)
from caa.podvm_api.volumes import CLOUD_VOLUMES_ANNOTATION
from caa.proto import agent_pb2, oci_pb2
from caa.ttrpc import CallContext

UID = "7f3c9a1e-0000-4000-8000-000000000001"


def csi(name: str, uid: str = UID) -> str:
    return f"/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~csi/{name}/mount"


def enc(path: str) -> str:
    return base64.urlsafe_b64encode(path.encode()).decode()


class CreateContainerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"caa-dv-{os.getpid()}-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def volume(self, path: str, info: object | None = None, raw: bytes | None = None) -> None:
        d = os.path.join(self.dir, enc(path))
        os.makedirs(d)
        if info is not None or raw is not None:
            with open(os.path.join(d, "mountInfo.json"), "wb") as f:
                f.write(raw if raw is not None else json.dumps(info).encode())

    def rewrite(self, req: agent_pb2.CreateContainerRequest) -> agent_pb2.CreateContainerRequest:
        return agent_pb2.CreateContainerRequest.FromString(rewrite_create_container(req.SerializeToString(),
                                                                                    self.dir))

    def request(self, mounts: list[tuple[str, str]], **ann: str) -> agent_pb2.CreateContainerRequest:
        return agent_pb2.CreateContainerRequest(container_id="c1", OCI=oci_pb2.Spec(
            Mounts=[oci_pb2.Mount(destination=d, source=s, type="bind") for d, s in mounts],
            Annotations=ann))

    def test_without_oci_forwarded_unchanged(self) -> None:
        raw = agent_pb2.CreateContainerRequest(container_id="c1").SerializeToString()
        self.assertIs(rewrite_create_container(raw, self.dir), raw)

    def test_undecodable_forwarded_unchanged(self) -> None:
        raw = b"\xff\xff\xff"
        self.assertIs(rewrite_create_container(raw, self.dir), raw)

    def test_nothing_to_do_keeps_bytes(self) -> None:
        raw = self.request([("/etc/hosts", "/run/hosts")], a="b").SerializeToString()
        self.assertIs(rewrite_create_container(raw, self.dir), raw)

    def test_missing_scan_dir(self) -> None:
        raw = self.request([("/d", csi("pv"))]).SerializeToString()
        self.assertIs(rewrite_create_container(raw, os.path.join(self.dir, "absent")), raw)

    def test_csi_target_paths(self) -> None:
        self.volume(csi("pv1"))
        self.volume(csi("pv3"))
        req = self.request([("/etc/hosts", "/run/hosts"), ("/a", csi("pv1")), ("/b", csi("pv2")),
                            ("/c", csi("pv3"))])
        out = self.rewrite(req)
        # no leading comma (upstream adds one when the first mount is not a volume)
        self.assertEqual(out.OCI.Annotations[TARGET_PATH_KEY], f"{csi('pv1')},{csi('pv3')}")
        self.assertEqual([m.source for m in out.OCI.Mounts], [m.source for m in req.OCI.Mounts])

    def test_csi_target_paths_appended_to_existing(self) -> None:
        self.volume(csi("pv1"))
        out = self.rewrite(self.request([("/a", csi("pv1"))], **{TARGET_PATH_KEY: "/x"}))
        self.assertEqual(out.OCI.Annotations[TARGET_PATH_KEY], f"/x,{csi('pv1')}")

    def test_gpu_cdi(self) -> None:
        out = self.rewrite(self.request([], **{"io.katacontainers.config.hypervisor.default_gpus": "0"}))
        self.assertEqual(out.OCI.Annotations[CDI_KEY], "nvidia.com/gpu=all")
        raw = self.request([], **{"io.katacontainers.config.hypervisor.default_gpus": ""}).SerializeToString()
        self.assertIs(rewrite_create_container(raw, self.dir), raw)

    def test_cloud_volumes(self) -> None:
        # name-sorted scan order decides the LUN; base64 names sort by their encoding
        paths = sorted([csi("a"), csi("b"), csi("c"), csi("d"), csi("e")], key=enc)
        p0, p1, p2, p3, p4 = paths
        self.volume(p0, {"device": "/dev/sdb", "fstype": "xfs",
                         "metadata": {"encrypt-type": "luks2", "kbs-key-id": "k1"}})
        self.volume(p1, {"device": "/dev/sdc"})  # no mount in the spec: skipped, index still advances
        self.volume(p2, raw=b"{not json")  # unparsable: skipped, no index increment
        self.volume(p3, {"metadata": {"cloud-volume-path": "disk-3"}, "device": "/dev/sdx"})
        self.volume(p4, {"fstype": "ext4"})  # no disk id: skipped
        self.volume(csi("other", uid="someone-else"), {"device": "/dev/sdz"})  # another pod
        os.makedirs(os.path.join(self.dir, "not-base64!"))
        req = self.request([("/m0", p0), ("/m2", p2), ("/m3", p3), ("/m4", p4),
                            ("/o", csi("other", uid="someone-else"))],
                           **{"io.kubernetes.cri.sandbox-uid": UID})
        out = self.rewrite(req)
        got = out.OCI.Annotations[CLOUD_VOLUMES_ANNOTATION]
        self.assertEqual(got, json.dumps({
            "vol-0": {"mount_point": "/m0", "fs_type": "xfs", "lun": "0", "disk_id": "/dev/sdb",
                      "encrypt_type": "luks2", "key_id": "k1"},
            "vol-2": {"mount_point": "/m3", "fs_type": "ext4", "lun": "2", "disk_id": "disk-3"},
        }, separators=(",", ":")))

    def test_interceptor_object(self) -> None:
        raw = self.request([], **{"io.katacontainers.config.hypervisor.default_gpus": "1"}).SerializeToString()
        ctx = CallContext(clock=Clock(), service="grpc.AgentService", method="CreateContainer", stream_id=1)
        out = self.successResultOf(
            Deferred.fromCoroutine(
                CreateContainerInterceptor(self.dir)(ctx, raw)))
        self.assertEqual(agent_pb2.CreateContainerRequest.FromString(out).OCI.Annotations[CDI_KEY],
                         "nvidia.com/gpu=all")

    def test_describe_never_shows_policy(self) -> None:
        raw = agent_pb2.SetPolicyRequest(policy="package agent_policy\nsecret").SerializeToString()
        text = describe_call("SetPolicy", raw)
        self.assertNotIn("secret", text)
        self.assertIn("bytes", text)
        self.assertEqual(describe_call("StartContainer",
                                       agent_pb2.StartContainerRequest(container_id="c9").SerializeToString()),
                         "containerID:c9")
