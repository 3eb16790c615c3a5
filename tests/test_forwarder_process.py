"""caa-forwarder as a process (`python -m caa.forwarder`, same Options/makeService as twistd): READY=1 over
$NOTIFY_SOCKET, SIGTERM -> STOPPING=1 and exit 0, bad apf.json -> one line and exit 1, a port in use -> exit 1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="fwdproc")
        self.addCleanup(shutil.rmtree, self.dir)
        self.apf = os.path.join(self.dir, "apf.json")
        with open(self.apf, "w") as f:
            json.dump({"pod-name": "p"}, f)

    def _argv(self, port: int, *extra: str) -> list[str]:
        return [sys.executable, "-m", "caa.forwarder", "--config", self.apf, "--disable-tls",
                "--listen", f"127.0.0.1:{port}", "--kata-agent-socket", os.path.join(self.dir, "a.sock"), *extra]

    def test_ready_then_sigterm(self) -> None:
        notify = os.path.join(self.dir, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(notify)
        sock.settimeout(30)
        self.addCleanup(sock.close)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        p = subprocess.Popen(self._argv(port), cwd=ROOT, env=dict(os.environ, NOTIFY_SOCKET=notify),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            self.assertEqual(sock.recv(64), b"READY=1")
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
            p.send_signal(signal.SIGTERM)
            self.assertEqual(sock.recv(64), b"STOPPING=1")
            self.assertEqual(p.wait(30), 0)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()  # type: ignore[union-attr]
            p.stderr.close()  # type: ignore[union-attr]

    def test_bad_config_exit_1(self) -> None:
        with open(self.apf, "w") as f:
            f.write("{broken")
        r = subprocess.run(self._argv(0), cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stderr.count("\n"), 1, r.stderr)
        self.assertIn("failed to decode a Agent Protocol Forwarder config file file", r.stderr)

    def test_port_in_use_exit_1(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            r = subprocess.run(self._argv(s.getsockname()[1]), cwd=ROOT, capture_output=True, text=True,
                               timeout=60)
        self.assertEqual(r.returncode, 1)
        self.assertIn("caa-forwarder: failed to listen", r.stderr)

    def test_twistd_port_in_use_fails(self) -> None:
        """Under twistd the late failure ends the process through SIGTERM (caa.process: twistd has no
        exit-status API once the reactor runs), after a clean stop and with the one line on stderr."""
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            argv = [twistd, "-n", "--pidfile=", "caa-forwarder", *self._argv(s.getsockname()[1])[3:]]
            r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, -signal.SIGTERM, r.stdout[-2000:])
        self.assertIn("caa-forwarder: failed to listen", r.stdout + r.stderr)  # twistd logs stderr
