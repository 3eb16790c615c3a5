"""Unit tests of the CreateContainer rewrite (caa.adaptor.interceptors, spec-adaptor §3.2) over a temp
direct-volumes directory: cloud volumes are numbered by the sandbox's attach order, whatever the directory holds
by the time a container is made."""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from caa.adaptor.directvolumes import scan
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

    def rewrite(self, req: agent_pb2.CreateContainerRequest,
                attached: tuple[str, ...] = ()) -> agent_pb2.CreateContainerRequest:
        return agent_pb2.CreateContainerRequest.FromString(rewrite_create_container(req.SerializeToString(),
                                                                                    self.dir, attached=attached))

    def request(self, mounts: list[tuple[str, str]], **ann: str) -> agent_pb2.CreateContainerRequest:
        return agent_pb2.CreateContainerRequest(container_id="c1", OCI=oci_pb2.Spec(
            Mounts=[oci_pb2.Mount(destination=d, source=s, type="bind") for d, s in mounts],
            Annotations=ann))

    def test_without_oci_forwarded_unchanged(self) -> None:
        raw = agent_pb2.CreateContainerRequest(container_id="c1").SerializeToString()
        self.assertIs(rewrite_create_container(raw, self.dir, attached=()), raw)

    def test_undecodable_forwarded_unchanged(self) -> None:
        raw = b"\xff\xff\xff"
        self.assertIs(rewrite_create_container(raw, self.dir, attached=()), raw)

    def test_nothing_to_do_keeps_bytes(self) -> None:
        raw = self.request([("/etc/hosts", "/run/hosts")], a="b").SerializeToString()
        self.assertIs(rewrite_create_container(raw, self.dir, attached=()), raw)

    def test_missing_scan_dir(self) -> None:
        raw = self.request([("/d", csi("pv"))]).SerializeToString()
        self.assertIs(rewrite_create_container(raw, os.path.join(self.dir, "absent"), attached=("d",)), raw)

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
        self.assertIs(rewrite_create_container(raw, self.dir, attached=()), raw)

    def test_cloud_volumes(self) -> None:
        # the attach order decides the LUN: CreateVM's name-sorted scan; base64 names sort by their encoding
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
        out = self.rewrite(req, attached=("/dev/sdb", "/dev/sdc", "disk-3"))  # what CreateVM's scan found
        got = out.OCI.Annotations[CLOUD_VOLUMES_ANNOTATION]
        self.assertEqual(got, json.dumps({
            "vol-0": {"mount_point": "/m0", "fs_type": "xfs", "lun": "0", "disk_id": "/dev/sdb",
                      "encrypt_type": "luks2", "key_id": "k1"},
            "vol-2": {"mount_point": "/m3", "fs_type": "ext4", "lun": "2", "disk_id": "disk-3"},
        }, separators=(",", ":")))

    def announced(self, out: agent_pb2.CreateContainerRequest) -> dict[str, tuple[str, str, str]]:
        """The cloud_volumes annotation as {name: (mount point, lun, disk id)}."""
        doc = json.loads(out.OCI.Annotations[CLOUD_VOLUMES_ANNOTATION])
        return {name: (v["mount_point"], v["lun"], v["disk_id"]) for name, v in doc.items()}

    def test_volume_added_after_create_vm_keeps_the_numbering(self) -> None:
        log = EventLoggingObserver()
        globalLogPublisher.addObserver(log)
        self.addCleanup(globalLogPublisher.removeObserver, log)
        # in scan (directory name) order: q0 and q2 come after CreateVM, q1 and q3 were attached
        q0, q1, q2, q3 = sorted([csi(f"pv{i}") for i in range(4)], key=enc)
        self.volume(q1, {"device": "disk-q1"})
        self.volume(q3, {"device": "disk-q3"})
        attached = tuple(v.disk_id for v in scan(self.dir, UID))  # CreateVM's scan: the attach order
        self.assertEqual(attached, ("disk-q1", "disk-q3"))
        # the CSI driver adds two volumes before CreateContainer, one sorting ahead of both attached ones
        self.volume(q0, {"device": "disk-q0"})
        self.volume(q2, {"device": "disk-q2"})
        req = self.request([("/m0", q0), ("/m1", q1), ("/m2", q2), ("/m3", q3)],
                           **{"io.kubernetes.cri.sandbox-uid": UID})
        self.assertEqual(self.announced(self.rewrite(req, attached)),
                         {"vol-0": ("/m1", "0", "disk-q1"), "vol-1": ("/m3", "1", "disk-q3")})
        warned = [formatEvent(e) for e in log if e["log_level"] is LogLevel.warn and "cloud volume" in formatEvent(e)]
        self.assertEqual(len(warned), 2, warned)
        for path, disk in ((q0, "disk-q0"), (q2, "disk-q2")):
            self.assertTrue(any(path in w and disk in w and "not attached" in w for w in warned), warned)

    def test_volume_removed_after_create_vm_keeps_the_numbering(self) -> None:
        p0, p1, p2 = sorted([csi("a"), csi("b"), csi("c")], key=enc)
        for i, p in enumerate((p0, p1, p2)):
            self.volume(p, {"device": f"disk-{i}"})
        attached = tuple(v.disk_id for v in scan(self.dir, UID))
        shutil.rmtree(os.path.join(self.dir, enc(p0)))  # the first attached volume's entry is gone
        req = self.request([("/m1", p1), ("/m2", p2)])
        self.assertEqual(self.announced(self.rewrite(req, attached)),
                         {"vol-1": ("/m1", "1", "disk-1"), "vol-2": ("/m2", "2", "disk-2")})
        # nothing attached: nothing announced (the VM has no disks)
        self.assertNotIn(CLOUD_VOLUMES_ANNOTATION, self.rewrite(req, ()).OCI.Annotations)

    def test_one_disk_behind_two_entries_gets_two_luns(self) -> None:
        p0, p1 = sorted([csi("a"), csi("b")], key=enc)
        self.volume(p0, {"device": "same-disk"})
        self.volume(p1, {"device": "same-disk"})
        req = self.request([("/m0", p0), ("/m1", p1)])
        self.assertEqual(self.announced(self.rewrite(req, ("same-disk", "same-disk"))),
                         {"vol-0": ("/m0", "0", "same-disk"), "vol-1": ("/m1", "1", "same-disk")})

    def test_interceptor_numbers_by_its_sandbox_attach_order(self) -> None:
        p0, p1 = sorted([csi("a"), csi("b")], key=enc)
        self.volume(p0, {"device": "disk-0"})
        self.volume(p1, {"device": "disk-1"})
        raw = self.request([("/m0", p0), ("/m1", p1)]).SerializeToString()
        ctx = CallContext(clock=Clock(), service="grpc.AgentService", method="CreateContainer", stream_id=1)
        out = self.successResultOf(Deferred.fromCoroutine(
            CreateContainerInterceptor(("disk-1", "disk-0"), self.dir)(ctx, raw)))
        self.assertEqual(self.announced(agent_pb2.CreateContainerRequest.FromString(out)),
                         {"vol-1": ("/m0", "1", "disk-0"), "vol-0": ("/m1", "0", "disk-1")})

    def test_interceptor_object(self) -> None:
        raw = self.request([], **{"io.katacontainers.config.hypervisor.default_gpus": "1"}).SerializeToString()
        ctx = CallContext(clock=Clock(), service="grpc.AgentService", method="CreateContainer", stream_id=1)
        out = self.successResultOf(
            Deferred.fromCoroutine(
                CreateContainerInterceptor((), self.dir)(ctx, raw)))
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
