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


def _tiny_init() -> str:
    return (PODVM / "files" / "usr" / "local" / "sbin" / "caa-init").read_text()


def _code(script: str) -> str:
    """A shell script without its comment lines (what it runs, not what it says)."""
    return "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#")) + "\n"


def _position(text: str, step: str) -> int:
    """Where `step` first appears in the code of `text` (a comment mentioning it does not count)."""
    code = _code(text)
    if step not in code:
        raise AssertionError(f"{step!r} is not in the script")
    return code.index(step)


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
        """Upstream's order of effects with one Python start: cidata and podns before the forwarder, which
        provisions the user data from the local cidata disk while DHCP runs (its pod network set-up waits for
        the default route); the agent only once /run/peerpod/provisioned is there."""
        text = _tiny_init()
        steps = ["mount -t iso9660", "ip netns add podns",
                 "/usr/local/lib/caa/run-forwarder --provision-user-data", "\ndhcp\n",
                 "wait-for -e /run/peerpod/provisioned", "mark user-data-done", "kata-agent --config",
                 "wait-for -S /run/kata-containers/agent.sock", "mark agent-listening"]
        positions = [_position(text, s) for s in steps]
        self.assertEqual(positions, sorted(positions), steps)
        # the forwarder loop runs in the background: the init goes on to wait for provisioning, then the agent
        code = _code(text)
        loop = code[_position(text, "ip netns add podns"):_position(text, "wait-for -e /run/peerpod/provisioned")]
        self.assertIn("\n(\n  while true; do\n", loop)
        self.assertIn("\n  done\n) &\n", loop)
        # the separate provisioning program is not on the tiny init's path any more (systemd keeps it)
        self.assertNotIn("caa-process-user-data provision-files", code)
        self.assertIn("caa-process-user-data provision-files",
                      _unit("caa-process-user-data.service")["Service"]["ExecStart"])

    def test_provisioning_wait_is_bounded_and_polls_fast(self) -> None:
        text = _code(_tiny_init())
        self.assertIn("/usr/local/lib/caa/wait-for -e /run/peerpod/provisioned 190 0.02", text)
        # a restarted forwarder does not provision again; it is restarted after 5 s like Restart=on-failure
        loop = text[text.index("while true; do\n    mark forwarder-start"):]
        self.assertIn("if [ -e /run/peerpod/provisioned ]; then\n      /usr/local/lib/caa/run-forwarder\n", loop)
        self.assertIn('mark forwarder-exited "rc=$?"\n    sleep 5', loop)

    def test_floor_mode(self) -> None:
        """caa.init=floor: the same mounts, modules and DHCP, then only a python3 listener on 15150."""
        text = _code(_tiny_init())
        self.assertIn("grep -q 'caa.init=floor' /proc/cmdline && MODE=floor", text)
        start = text.index('if [ "$MODE" = floor ]; then')
        floor = text[start:text.index("\nfi\n", start)]
        for step in ("modprobe -a", "busybox udhcpc"):
            self.assertLess(text.index(step), start, step)
        self.assertLess(floor.index("\n  dhcp\n"), floor.index("python3 -S -c"))  # the floor listens after its lease
        self.assertIn("python3 -S -c", floor)
        self.assertIn('s.bind(("0.0.0.0", 15150))', floor)
        self.assertIn('print("CAA-INIT floor-listening uptime="', floor)
        for pod_step in ("run-forwarder", "kata-agent", "cidata", "podns"):
            self.assertNotIn(pod_step, floor)
        # the floor never falls through to the pod's steps: its loop has no way out
        self.assertNotRegex(floor, r"\b(break|exit|return)\b")

    def test_stage1_takes_root_from_the_command_line(self) -> None:
        stage1 = (PODVM / "stage1-init").read_text()
        self.assertIn("ROOT=/dev/vda\n", stage1)  # default: the fast boot's bare ext4 disk
        self.assertIn("root=*) ROOT=${arg#root=}", stage1)
        self.assertIn('LABEL=*|UUID=*) DEV=$(findfs "$ROOT"', stage1)
        self.assertIn('mount -t ext4 -o ro "$DEV" /newroot', stage1)

    def test_stage1_root_parsing_runs(self) -> None:
        """The stage-1's root= loop, run with a real shell over sample command lines."""
        stage1 = (PODVM / "stage1-init").read_text()
        start = stage1.index("ROOT=/dev/vda\n")
        parse = stage1[start:stage1.index("# wait", start)].replace("$(cat /proc/cmdline)", "$CMDLINE")
        self.assertIn("$CMDLINE", parse)
        for cmdline, root in (("console=ttyS0 quiet panic=-1 ro", "/dev/vda"),
                              ("console=ttyS0 ro root=UUID=388c74f0-907f-4047-b074-e17925f897e3 quiet",
                               "UUID=388c74f0-907f-4047-b074-e17925f897e3"),
                              ("root=/dev/vda2 caa.init=floor", "/dev/vda2")):
            r = subprocess.run(["sh", "-c", parse + 'echo "$ROOT"'], capture_output=True, text=True, check=True,
                               env={"CMDLINE": cmdline, "PATH": os.environ["PATH"]})
            self.assertEqual(r.stdout.strip(), root, cmdline)

    def test_bios_disk_recipe(self) -> None:
        """The BIOS disk: MBR code + a DOS table with a bootable FAT partition 1 and the root as partition 2;
        syslinux boots the kernel and the small stage-1 initrd with root=UUID= of the root filesystem."""
        build = _code((PODVM / "build.sh").read_text())
        config = (PODVM / "config.sh").read_text()
        self.assertIn("SYSLINUX_MBR=/usr/lib/syslinux/mbr/mbr.bin", config)
        self.assertIn('dd if="$SYSLINUX_MBR" of="$DISK" bs=440 count=1 conv=notrunc', build)
        self.assertIn('"start=$BOOT_START, size=$BOOT_SECTORS, type=c, bootable"', build)
        self.assertIn('"start=$ROOT_START, size=$ROOT_SECTORS, type=83"', build)
        self.assertIn('syslinux --install --offset $(( BOOT_START * SECTOR )) "$DISK"', build)
        self.assertIn("INITRD initrd.img", build)
        self.assertIn('"$PODVM_KERNEL_CMDLINE root=UUID=$ROOT_UUID"', build)
        self.assertIn('mkfs.ext4 -q -F -L caa-podvm -U "$ROOT_UUID"', build)
        # the stage-1 initrd exists before it is copied onto the boot partition
        self.assertLess(build.index('> "$STAGE/initrd.img"'), build.index("::initrd.img"))
        # no whole-root initramfs any more
        self.assertNotIn("root.cpio", build)
        self.assertFalse((PODVM / "initramfs-init").exists())

    def test_dev_agent_is_niced(self) -> None:
        build = (PODVM / "build.sh").read_text()
        self.assertIn("exec nice -n 10 /opt/caa/bin/python -m caa.devtools.agent", build)

    def test_executables_are_shipped(self) -> None:
        for rel in ("usr/local/sbin/caa-init", "usr/local/lib/caa/udhcpc-hook", "usr/local/lib/caa/run-forwarder",
                    "usr/local/lib/caa/wait-for"):
            path = PODVM / "files" / rel
            self.assertTrue(os.access(path, os.X_OK), rel)
        for script in ("build.sh", "stage1-init", "disk-cmdline.sh", "make-floor-disk.sh"):
            self.assertTrue(os.access(PODVM / script, os.X_OK), script)
            subprocess.run(["bash" if script.endswith(".sh") else "sh", "-n", str(PODVM / script)], check=True)
        subprocess.run(["sh", "-n", str(PODVM / "files" / "usr" / "local" / "sbin" / "caa-init")], check=True)
        run = (PODVM / "files" / "usr" / "local" / "lib" / "caa" / "run-forwarder").read_text()
        # the tiny init's --provision-user-data is passed through
        self.assertIn('exec /opt/caa/bin/python -m caa.forwarder --config /run/peerpod/apf.json '
                      '$CAA_FORWARDER_OPTIONS "$@"', run)

    def test_no_machine_id_and_console_scripts(self) -> None:
        build = (PODVM / "build.sh").read_text()
        self.assertIn(': > "$R/etc/machine-id"', build)
        cfg = configparser.ConfigParser()
        cfg.read(REPO / "setup.cfg")
        scripts = cfg["options.entry_points"]["console_scripts"]
        self.assertIn("caa-process-user-data", scripts)  # linked into /usr/local/bin by build.sh


class WaitForTests(SynchronousTestCase):
    """podvm/files/usr/local/lib/caa/wait-for, the tiny init's poll, run for real on real files."""

    WAIT_FOR = PODVM / "files" / "usr" / "local" / "lib" / "caa" / "wait-for"

    def _wait_for(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.WAIT_FOR), *args], capture_output=True, text=True, timeout=60)

    def test_present_file(self) -> None:
        path = Path(self.mktemp())
        path.write_text("")
        self.assertEqual(self._wait_for("-e", str(path), "5").returncode, 0)

    def test_file_that_never_appears_ends_at_the_bound(self) -> None:
        r = self._wait_for("-e", str(Path(self.mktemp())), "0", "0.02")
        self.assertEqual(r.returncode, 1, r.stderr)

    def test_file_that_appears_later(self) -> None:
        path = Path(self.mktemp())
        proc = subprocess.Popen([str(self.WAIT_FOR), "-e", str(path), "50", "0.02"])
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        self.assertIsNone(proc.poll())  # still waiting (the file is not there)
        path.write_text("")
        self.assertEqual(proc.wait(timeout=50), 0)

    def test_socket_test_is_not_satisfied_by_a_file(self) -> None:
        path = Path(self.mktemp())
        path.write_text("")
        self.assertEqual(self._wait_for("-S", str(path), "0", "0.02").returncode, 1)

    def test_bad_arguments(self) -> None:
        for args, message in ((("-x", "/a", "1"), "unsupported test -x"),
                              (("-e", "/a", "soon"), "must be numbers"),
                              (("-e", "/a"), "usage: wait-for")):
            r = self._wait_for(*args)
            self.assertEqual(r.returncode, 2, args)
            self.assertIn(message, r.stderr)


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
