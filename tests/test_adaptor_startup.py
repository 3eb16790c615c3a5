"""A caa-adaptor whose listener cannot start exits at once with a clear line (no thread keeps it alive)."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class ListenFailureTests(TestCase):
    def test_unusable_socket_path_exits_non_zero(self) -> None:
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        socket_path = os.path.join(work, "x" * 120, "hypervisor.sock")  # over the 108-byte AF_UNIX limit
        proc = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "caa-adaptor", "--provider", "local", "--socket", socket_path,
             "--pods-dir", os.path.join(work, "pods"), "--probe-port", "0"],
            capture_output=True, text=True, timeout=60, cwd=work,
        )
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("cannot listen on", proc.stdout + proc.stderr)
