"""
Static checks of the pod VM recipe (podvm/), fast and without root: the cache key follows the inputs, the
units start things in upstream's order, and every path the units and the tiny init run is shipped or built.
The real boot is tests/test_podvm_boot.py.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

REPO = Path(__file__).resolve().parent.parent
PODVM = REPO / "podvm"
UNITS = PODVM / "files" / "etc" / "systemd" / "system"


def _print_dir(src: Path, **env: str) -> str:
    r = subprocess.run([str(PODVM / "build.sh"), "--print-dir"], capture_output=True, text=True, check=True,
                       env={**os.environ, "CAA_SRC": str(src), "CAA_PODVM_CACHE": "/nonexistent", **env},
                       timeout=60)
    return r.stdout.strip()


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNITS / name)
    return cp


class CacheKeyTests(SynchronousTestCase):
    def _copy(self) -> Path:
        dst = Path(self.mktemp())
        dst.mkdir(parents=True)
        for name in ("caa", "twisted"):
            shutil.copytree(REPO / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("setup.cfg", "pyproject.toml", "README.md"):
            shutil.copy(REPO / name, dst / name)
        return dst

    def test_same_inputs_same_directory(self) -> None:
        src = self._copy()
        first = _print_dir(src)
        self.assertEqual(first, _print_dir(src))
        self.assertTrue(first.startswith("/nonexistent/podvm-dev-"), first)

    def test_source_change_changes_key(self) -> None:
        src = self._copy()
        before = _print_dir(src)
        with open(src / "caa" / "__init__.py", "a") as f:
            f.write("# changed\n")
        self.assertNotEqual(before, _print_dir(src))

    def test_kata_agent_makes_a_production_variant(self) -> None:
        src = self._copy()
        agent = Path(self.mktemp())
        agent.write_bytes(b"\x7fELF not really")
        out = _print_dir(src, KATA_AGENT=str(agent))
        self.assertIn("/podvm-kata-", out)
        agent.write_bytes(b"\x7fELF another build")
        self.assertNotEqual(out, _print_dir(src, KATA_AGENT=str(agent)))


class UnitOrderTests(SynchronousTestCase):
    def test_upstream_order(self) -> None:
        pud = _unit("caa-process-user-data.service")
        self.assertEqual(pud["Service"]["Type"], "oneshot")
        self.assertIn("kata-agent.service", pud["Unit"]["Before"])
        agent = _unit("kata-agent.service")
        self.assertIn("caa-process-user-data.service", agent["Unit"]["After"])
        self.assertIn("caa-podns.service", agent["Unit"]["BindsTo"])
        path = _unit("caa-forwarder.path")
        self.assertEqual(path["Path"]["PathExists"], "/run/kata-containers/agent.sock")
        self.assertEqual(path["Path"]["Unit"], "caa-forwarder.service")
        fwd = _unit("caa-forwarder.service")
        self.assertIn("kata-agent.service", fwd["Unit"]["After"])
        self.assertEqual(fwd["Service"]["ExecStart"], "/usr/local/lib/caa/run-forwarder")

    def test_tiny_init_keeps_the_order(self) -> None:
        text = (PODVM / "files" / "usr" / "local" / "sbin" / "caa-init").read_text()
        steps = ["udhcpc", "caa-process-user-data provision-files", "ip netns add podns", "kata-agent --config",
                 "/usr/local/lib/caa/run-forwarder"]
        positions = [text.index(s) for s in steps]
        self.assertEqual(positions, sorted(positions))

    def test_executables_are_shipped(self) -> None:
        for rel in ("usr/local/sbin/caa-init", "usr/local/lib/caa/udhcpc-hook", "usr/local/lib/caa/run-forwarder"):
            path = PODVM / "files" / rel
            self.assertTrue(os.access(path, os.X_OK), rel)
        for script in ("build.sh", "stage1-init", "initramfs-init"):
            self.assertTrue(os.access(PODVM / script, os.X_OK), script)
            if script != "stage1-init":  # busybox sh; the others are plain sh/bash
                subprocess.run(["bash", "-n", str(PODVM / script)], check=True)
        run = (PODVM / "files" / "usr" / "local" / "lib" / "caa" / "run-forwarder").read_text()
        self.assertIn("twistd --nodaemon --pidfile= caa-forwarder --config /run/peerpod/apf.json", run)

    def test_no_machine_id_and_console_scripts(self) -> None:
        build = (PODVM / "build.sh").read_text()
        self.assertIn(': > "$R/etc/machine-id"', build)
        cfg = configparser.ConfigParser()
        cfg.read(REPO / "setup.cfg")
        scripts = cfg["options.entry_points"]["console_scripts"]
        self.assertIn("caa-process-user-data", scripts)  # linked into /usr/local/bin by build.sh


class ByomVariantTests(SynchronousTestCase):
    """The byom variant (docs/podvm.md): its own cache directory, and the pod started by the pushed user data."""

    def test_variant_directory_follows_the_keys(self) -> None:
        keys = Path(self.mktemp())
        keys.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFake adaptor\n")
        out = _print_dir(REPO, BYOM_AUTHORIZED_KEYS=str(keys))
        self.assertIn("/podvm-dev-byom-", out)
        keys.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherOtherOtherOtherOtherOtherOtherOtherOth other\n")
        self.assertNotEqual(out, _print_dir(REPO, BYOM_AUTHORIZED_KEYS=str(keys)))

    def test_units_watch_the_pushed_files(self) -> None:
        units = PODVM / "files-byom" / "etc" / "systemd" / "system"

        def unit(name: str) -> configparser.ConfigParser:
            cp = configparser.ConfigParser(strict=False, interpolation=None)
            cp.optionxform = str  # type: ignore[assignment,method-assign]
            cp.read(units / name)
            return cp

        self.assertEqual((unit("caa-byom-user-data.path")["Path"]["PathChanged"],
                          unit("caa-byom-user-data.path")["Path"]["Unit"]),
                         ("/media/cidata/user-data", "caa-byom-pod.target"))
        self.assertEqual(unit("caa-byom-pod.target")["Unit"]["Wants"].split(),
                         ["caa-process-user-data.service", "kata-agent.service", "caa-forwarder.path"])
        self.assertEqual(unit("caa-byom-reboot.path")["Path"]["PathChanged"], "/media/cidata/reboot")
        self.assertIn("ssh.service", unit("caa-byom-media.service")["Unit"]["Before"].split())
        sshd = (PODVM / "files-byom" / "etc" / "ssh" / "sshd_config.d" / "caa-byom.conf").read_text()
        self.assertIn("ChrootDirectory /media", sshd)
        self.assertIn("ForceCommand internal-sftp", sshd)
