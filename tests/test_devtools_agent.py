"""The development agent's CreateContainer (caa/devtools/agent.py): a container's bind mounts shown under the
development workload's directory with real bind mounts (root), undone at DestroySandbox."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from caa.devtools.agent import DevelopmentAgent
from caa.forwarder.interceptors import is_mount_point
from caa.proto import agent_pb2
from caa.ttrpc import CallContext, TTRPCError


def _ctx(method: str) -> CallContext:
    return CallContext(clock=Clock(), service="grpc.AgentService", method=method, stream_id=1)


class CreateContainerTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="caa-devagent-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.workload = os.path.join(self.dir, "workload")
        os.makedirs(self.workload)
        self.agent = DevelopmentAgent(Clock(), None, self.workload)

    def test_bind_mounts_shown_and_undone(self) -> Deferred[None]:
        if os.geteuid() != 0:
            self.fail("bind mounts need root (the tests run as root)")
        return Deferred.fromCoroutine(self._mounts())

    async def _mounts(self) -> None:
        volume = os.path.join(self.dir, "cloud-volume")
        os.makedirs(volume)
        with open(os.path.join(volume, "hello.txt"), "w") as f:
            f.write("on the volume")
        req = agent_pb2.CreateContainerRequest(container_id="c1")
        req.OCI.Mounts.add(destination="/data", source=volume, type="bind")
        req.OCI.Mounts.add(destination="/etc/hostname", source=os.path.join(self.dir, "no-such"), type="bind")
        req.OCI.Mounts.add(destination="/../../escape", source=volume, type="bind")  # stays under the root
        req.OCI.Mounts.add(destination="/proc", source="proc", type="proc")
        await self.agent.create_container(_ctx("CreateContainer"), req)
        target = os.path.join(self.workload, "containers", "c1", "data")
        self.addCleanup(os.system, f"umount {target} 2>/dev/null")
        with open(os.path.join(target, "hello.txt")) as f:
            self.assertEqual(f.read(), "on the volume")
        self.assertEqual(self.agent.published, [target])
        self.assertFalse(os.path.exists(os.path.join(self.workload, "containers", "c1", "etc")))
        await self.agent.destroy_sandbox(_ctx("DestroySandbox"), agent_pb2.DestroySandboxRequest())
        self.assertFalse(is_mount_point(target))
        self.assertEqual(self.agent.published, [])

    def test_container_id_must_be_a_plain_name(self) -> Deferred[None]:
        async def run() -> None:
            for bad in ("", "..", "a/b"):
                try:
                    await self.agent.create_container(_ctx("CreateContainer"),
                                                      agent_pb2.CreateContainerRequest(container_id=bad))
                except TTRPCError as e:
                    self.assertIn("not a plain name", str(e))
                else:
                    self.fail(f"accepted container id {bad!r}")

        return Deferred.fromCoroutine(run())
