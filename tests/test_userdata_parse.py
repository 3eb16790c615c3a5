"""caa-process-user-data: allow-listed writes with modes, retry, CLI (the parser: test_podvm_api_cloudconfig)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caa.forwarder import userdata
from caa.podvm_api.cloudconfig import PEERPOD_FILES, WriteFile, render

APF = '{\n    "pod-network": {"podip": "10.244.1.21/24"},\n    "pod-name": "nginx"\n}\n'
AUTH = '{"auths":{"quay.io":{"auth":"dXNlcjpwYXNz"}}}\n'


def cloud_config(files: list[tuple[str, str]]) -> str:
    """The document as the adaptor renders it."""
    return render([WriteFile(path, content) for path, content in files])


class WriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)

    def test_allowed_files_and_modes(self) -> None:
        files = [WriteFile(f"/run/peerpod/{n}", f"{n}\n") for n in PEERPOD_FILES]
        files += [WriteFile("/run/peerpod/policy.rego", "x"),
                  WriteFile("/run/peerpod/../etc/passwd", "x"),
                  WriteFile("/etc/passwd", "x"),
                  WriteFile("/run/peerpod/apf.json/", "x")]
        written = userdata.write_allowed_files(files, self.dir)
        self.assertEqual(written, list(PEERPOD_FILES))
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(PEERPOD_FILES))
        for n in PEERPOD_FILES:
            self.assertEqual((self.dir / n).read_text(), f"{n}\n")
            mode = stat.S_IMODE(os.stat(self.dir / n).st_mode)
            self.assertEqual(mode, 0o600 if n in ("auth.json", "apf.json") else 0o644, n)

    def test_provision_from_file_with_retry(self) -> None:
        """A half-written file is retried until it parses; then initdata runs (dummy)."""
        src = self.dir / "user-data"
        src.write_text("%$#")
        out = self.dir / "out"
        clock = Clock()
        from twisted.internet.defer import Deferred

        d = Deferred.fromCoroutine(userdata.provision(
            clock, str(out), source=userdata.FileSource(str(src)), timeout=180))
        self.assertNoResult(d)
        src.write_text(cloud_config([("/run/peerpod/apf.json", APF)]))
        clock.advance(5)
        written = self.successResultOf(d)
        self.assertEqual(written, ["apf.json", "aa.toml", "initdata.digest"])
        self.assertEqual((out / "apf.json").read_text(), APF)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_provision_gives_up_at_deadline(self) -> None:
        src = self.dir / "user-data"
        src.write_text("runcmd: []")
        clock = Clock()
        from twisted.internet.defer import Deferred

        d = Deferred.fromCoroutine(userdata.provision(
            clock, str(self.dir / "out"), source=userdata.FileSource(str(src)), timeout=12))
        clock.advance(5)
        clock.advance(5)
        f = self.failureResultOf(d, userdata.UserDataError)
        self.assertIn("failed to retrieve cloud config", str(f.value))
        self.assertIn("runcmd", str(f.value))

    def test_no_source_initdata_only(self) -> None:
        clock = Clock()
        from twisted.internet.defer import Deferred

        empty = self.dir / "cidata"
        empty.mkdir()
        dmi = self.dir / "dmi"
        dmi.mkdir()
        (dmi / "sys_vendor").write_text("QEMU\n")
        d = Deferred.fromCoroutine(userdata.provision(
            clock, str(self.dir / "out"), http=None, cidata_dir=str(empty), dmi_dir=str(dmi)))
        self.assertEqual(self.successResultOf(d), ["aa.toml", "initdata.digest"])


class CommandLineTests(SynchronousTestCase):
    def test_cli_user_data_file(self) -> None:
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        (d / "ud").write_text(cloud_config([("/run/peerpod/auth.json", AUTH), ("/tmp/evil", "x")]))
        r = subprocess.run([sys.executable, "-c", "from caa.forwarder.userdata import main; main()",
                            "provision-files", "--user-data-file", str(d / "ud"), "--output-dir", str(d / "o")],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual((d / "o" / "auth.json").read_text(), AUTH)
        self.assertIn("/tmp/evil is not allowed", r.stderr)
        self.assertNotIn("dXNlcjpwYXNz", r.stderr)

    def test_cli_error_exit_1(self) -> None:
        d = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, d)
        r = subprocess.run([sys.executable, "-c", "from caa.forwarder.userdata import main; main()",
                            "--user-data-file", str(d / "missing"), "--output-dir", str(d / "o"),
                            "-t", "0.1", "--retry-delay", "0.01"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 1)
        self.assertIn("caa-process-user-data: failed to retrieve cloud config", r.stderr)
