"""The package as users install it: the wheel ships the twistd plugins, and twistd lists them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from twisted.trial.unittest import TestCase

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class WheelTests(TestCase):
    def test_wheel_installs_plugins_non_editable(self) -> None:
        out = Path(self.mktemp()).resolve()
        out.mkdir()
        # A snapshot of the sources: pip builds in-tree (ROOT/build), which the image build of another trial
        # worker would share at the same time.
        src = out / "src"
        ignore = shutil.ignore_patterns("__pycache__", "dropin.cache")
        for tree in ("caa", "twisted"):
            shutil.copytree(ROOT / tree, src / tree, ignore=ignore)
        for name in ("setup.cfg", "pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, src / name)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(src)], check=True, capture_output=True)
        wheels = list(out.glob("caa-*.whl"))
        self.assertEqual(len(wheels), 1)
        names = zipfile.ZipFile(wheels[0]).namelist()
        self.assertIn("twisted/plugins/caa_plugins.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertIn("caa/ttrpc/server.py", names)
        self.assertIn("caa/proto/hypervisor_pb2.py", names)
        # Install the wheel (not editable) into a target directory and ask twistd from there.
        target = out / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                        str(wheels[0])], check=True, capture_output=True)
        # -S: no site processing, so the editable install's .pth of this checkout is not on the path;
        # only the wheel's files and the venv's third-party packages are.
        site_packages = next(p for p in sys.path if p.endswith("site-packages"))
        code = (f"import sys; sys.path[:0] = [{str(target)!r}, {site_packages!r}]; "
                "import caa; assert caa.__file__.startswith(sys.path[0]), caa.__file__; "
                "sys.argv = ['twistd', '--help']; from twisted.scripts.twistd import run; run()")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=str(out), env=env,
                              capture_output=True, text=True)
        helptext = proc.stdout
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("caa-adaptor", helptext)
        self.assertIn("caa-forwarder", helptext)

    def test_twistd_lists_plugins(self) -> None:
        helptext = subprocess.run([str(BIN / "twistd"), "--help"], capture_output=True, text=True,
                                  check=True, cwd="/").stdout
        self.assertIn("caa-adaptor", helptext)
        self.assertIn("caa-forwarder", helptext)
