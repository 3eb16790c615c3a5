"""`make demo` end to end: the real adaptor process with the local provider, one pod's whole life."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import TestCase


class DemoTests(TestCase):
    timeout = 240

    def setUp(self) -> None:
        if os.geteuid() != 0 and not os.environ.get("CI"):
            self.skipTest("the demo creates network namespaces: needs root")

    def test_demo_walks_a_pod_and_leaves_nothing(self) -> None:
        # unix socket paths are limited to 108 bytes: keep the work directory short.
        workdir = tempfile.mkdtemp(prefix="caademo-", dir="/tmp")
        self.addCleanup(shutil.rmtree, workdir, True)
        # A VNI range of its own: other suites run adaptors and tunnels on this machine at the same time.
        proc = subprocess.run([sys.executable, "-m", "caa.devtools.demo", "--workdir", workdir,
                               "--vxlan-min-id", "5100000"],
                              capture_output=True, text=True, timeout=200)
        out = proc.stdout + proc.stderr
        self.assertEqual(proc.returncode, 0, out)
        self.assertIn("grpc.Health/Check through the proxy: SERVING", out)
        self.assertIn("answered 'from pod VM: hello'", out)
        self.assertIn("no pod directory, VM namespace, tunnel device, qdisc or journal entry left", out)
        self.assertIn("the peer pod lived and left nothing behind", out)

    def test_demo_pool_walks_a_hit_beside_a_cold_start(self) -> None:
        workdir = tempfile.mkdtemp(prefix="caademo-", dir="/tmp")
        self.addCleanup(shutil.rmtree, workdir, True)
        proc = subprocess.run([sys.executable, "-m", "caa.devtools.demo", "--pool", "--workdir", workdir,
                               "--vxlan-min-id", "5100100"],
                              capture_output=True, text=True, timeout=220)
        out = proc.stdout + proc.stderr
        self.assertEqual(proc.returncode, 0, out)
        self.assertRegex(out, r"pool hit \(claimed podvm-pool-[0-9a-f]{8}\) in \d+\.\d\ds")
        self.assertRegex(out, r"cold StartVM \(created podvm-demo-cold-[0-9a-f]{8}\) in \d+\.\d\ds; the pool hit "
                              r"took \d+\.\d\ds")
        self.assertIn("grpc.Health/Check through the proxy: SERVING", out)
        self.assertIn("restarted without --pool-size: deleted the idle pool VMs", out)
        self.assertIn("the peer pod lived and left nothing behind", out)
