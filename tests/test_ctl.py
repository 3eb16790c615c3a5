"""caactl: usage errors exit 2, `list` reads the journal; calls against a real socket are in test_adaptor_process."""

from __future__ import annotations

import io
import os

from twisted.trial.unittest import SynchronousTestCase

from caa import ctl
from caa.adaptor.interfaces import SandboxRecord, SandboxState
from caa.adaptor.store import SandboxStore


class CtlTests(SynchronousTestCase):
    def test_usage_exit_2(self) -> None:
        for argv in ([], ["bogus"], ["create", "--id", "x"], ["agent", "check"]):
            e = self.assertRaises(SystemExit, ctl.main, argv)
            self.assertEqual(e.code, 2)

    def test_list(self) -> None:
        d = os.path.abspath(self.mktemp())
        store = SandboxStore(d)
        store.put(SandboxRecord(sandbox_id="a" * 64, pod_name="web", pod_namespace="default", netns="/n",
                                socket_path="/s", server_name="podvm-web-aaaaaaaa", state=SandboxState.RUNNING,
                                created=0.0, instance_id="i-1", ips=("10.0.0.5",)))
        out = io.StringIO()
        self.assertEqual(ctl.cmd_list(d, out), 0)
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[0].split(), ["SANDBOX", "POD", "INSTANCE", "VM", "IP", "STATE", "AGE"])
        self.assertEqual(lines[1].split()[:5], ["a" * 12, "default/web", "i-1", "10.0.0.5", "running"])
        self.assertEqual(ctl.cmd_list(os.path.abspath(self.mktemp()), io.StringIO()), 0)
