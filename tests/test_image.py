"""The container image (scripts/build-image.sh): built offline, a valid OCI archive, and its daemons answer.

The build runs once per test process (the debootstrap root filesystem is cached in /var/cache/caa-image, so
only the first build on a machine pays for it). No container engine exists here, so the image's one layer is
unpacked and its entrypoint run under chroot, as the manifests run it: each daemon's `--help`, the non-root
user for the webhook, and the entrypoint's provider checks with upstream's messages.

It needs root (debootstrap, chroot) and debootstrap; without them it fails.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from caa import __version__
from tests.kubeapi import REPO

BUILD = REPO / "scripts" / "build-image.sh"
REF = f"localhost/caa:{__version__}"

_built: dict[str, Any] = {}


def _cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "building the image needs root (debootstrap, chroot)"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed"
    return None


def built_image(testcase: TestCase) -> dict[str, Any]:
    """Build the image once per process; {archive, index, manifest, config, rootfs} (removed at exit)."""
    if not _built:
        reason = _cannot_run()
        if reason:
            testcase.fail(f"{reason}: the image tests build it (run as root after scripts/setup.sh)")
        work = Path(tempfile.mkdtemp(prefix="caa-image-test-"))
        import atexit

        atexit.register(shutil.rmtree, work, True)
        archive = work / "caa.oci.tar"
        result = subprocess.run([str(BUILD), str(archive)], cwd=REPO, capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            testcase.fail(f"scripts/build-image.sh failed:\n{result.stderr[-4000:]}")
        layout = work / "layout"
        with tarfile.open(archive) as tar:
            tar.extractall(layout, filter="data")
        index = json.loads((layout / "index.json").read_text())
        [entry] = index["manifests"]
        manifest = json.loads(_blob(layout, entry["digest"]))
        config = json.loads(_blob(layout, manifest["config"]["digest"]))
        [layer] = manifest["layers"]
        rootfs = work / "rootfs"
        rootfs.mkdir()
        layer_path = layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
        with gzip.open(layer_path) as gz:
            diff_id = hashlib.sha256()
            for chunk in iter(lambda: gz.read(1 << 20), b""):
                diff_id.update(chunk)
        with tarfile.open(layer_path, "r:gz") as tar:
            tar.extractall(rootfs, numeric_owner=True, filter="fully_trusted")
        for name, minor in (("null", 3), ("zero", 5), ("urandom", 9)):  # what a container runtime puts in /dev
            os.mknod(rootfs / "dev" / name, stat.S_IFCHR | 0o666, os.makedev(1, minor))
            os.chmod(rootfs / "dev" / name, 0o666)
        _built.update(archive=archive, layout=layout, index=index, manifest=manifest, config=config,
                      rootfs=rootfs, diff_id=f"sha256:{diff_id.hexdigest()}", stdout=result.stdout)
    return _built


def _blob(layout: Path, digest: str) -> bytes:
    data = (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
    if hashlib.sha256(data).hexdigest() != digest.split(":", 1)[1]:
        raise AssertionError(f"blob {digest} does not match its digest")
    return data


class ImageTests(TestCase):
    timeout = 1800

    def setUp(self) -> None:
        self.image = built_image(self)

    def run_in(self, *argv: str, env: dict[str, str] | None = None, user: str | None = None
               ) -> subprocess.CompletedProcess[str]:
        """argv in the image's root filesystem with the image's environment (+ env), as root or `user`."""
        image_env = dict(e.split("=", 1) for e in self.image["config"]["config"]["Env"])
        chroot = ["chroot", *([f"--userspec={user}"] if user else []), str(self.image["rootfs"])]
        return subprocess.run([*chroot, *argv], env={**image_env, **(env or {})}, capture_output=True, text=True,
                              timeout=120, check=False)

    def test_oci_archive(self) -> None:
        image = self.image
        self.assertEqual(json.loads((image["layout"] / "oci-layout").read_text()), {"imageLayoutVersion": "1.0.0"})
        [entry] = image["index"]["manifests"]
        self.assertEqual(entry["annotations"]["org.opencontainers.image.ref.name"], REF)
        self.assertEqual(entry["annotations"]["io.containerd.image.name"], REF)
        _blob(image["layout"], image["manifest"]["layers"][0]["digest"])
        config = image["config"]
        self.assertEqual(config["rootfs"]["diff_ids"], [image["diff_id"]])
        self.assertEqual(config["config"]["Entrypoint"], ["/usr/local/bin/entrypoint.sh"])
        self.assertEqual(config["config"]["User"], "65532")
        self.assertEqual((config["os"], config["architecture"]), ("linux", "amd64"))
        self.assertTrue(image["stdout"].strip().endswith(str(image["archive"])))

    def test_each_daemon_answers_help(self) -> None:
        for argv, env, expect in (
                (["caa-adaptor", "--help"], {"CLOUD_PROVIDER": "local"}, "Options of provider local"),
                (["libvirt", "--help"], {"LIBVIRT_URI": "qemu+ssh://root@10.0.0.1/system"}, "--uri"),
                (["caa-peerpod-ctrl", "--help"], {}, "--leader-elect"),
                (["caa-webhook", "--help"], {}, "--webhook-bind-address")):
            r = self.run_in("/usr/local/bin/entrypoint.sh", *argv, env=env)
            self.assertEqual(r.returncode, 0, f"{argv}: {r.stdout}\n{r.stderr}")
            self.assertIn(expect, r.stdout, argv)

    def test_webhook_and_controller_run_as_the_image_user(self) -> None:
        for daemon in ("caa-webhook", "caa-peerpod-ctrl"):
            r = self.run_in("/usr/local/bin/entrypoint.sh", daemon, "--version", user="65532:65532")
            self.assertEqual(r.returncode, 0, f"{daemon}: {r.stderr}")
            self.assertIn(__version__, r.stdout)

    def test_entrypoint_checks_with_upstreams_messages(self) -> None:
        for argv, env, message in (
                (["caa-adaptor"], {"CLOUD_PROVIDER": "libvirt"}, "$LIBVIRT_URI is NOT set"),
                (["aws"], {}, "At least one of these must be SET: AWS_SECRET_ACCESS_KEY AWS_ROLE_ARN"),
                (["aws"], {"AWS_ROLE_ARN": "arn:aws:iam::1:role/caa"}, "$AWS_WEB_IDENTITY_TOKEN_FILE is NOT set"),
                (["ibmcloud_powervs"], {}, "$IBMCLOUD_API_KEY is NOT set"),
                (["ibmcloud-powervs"], {}, "$IBMCLOUD_API_KEY is NOT set"),
                (["azure"], {"AZURE_CLIENT_ID": "x"}, "$AZURE_TENANT_ID is NOT set"),
                (["gcp"], {}, "$GCP_CREDENTIALS is NOT set"),
                (["caa-adaptor"], {"CLOUD_PROVIDER": "byom"}, "$VM_POOL_IPS is NOT set"),
                (["ibmcloud"], {}, "At least one of these must be SET: IBMCLOUD_API_KEY IBMCLOUD_IAM_PROFILE_ID"),
                (["alibabacloud"], {},
                 "At least one of these must be SET: ALIBABACLOUD_ACCESS_KEY_ID ALIBABA_CLOUD_ROLE_ARN"),
                (["caa-adaptor"], {"CLOUD_PROVIDER": "vsphere"}, "Usage:")):
            r = self.run_in("/usr/local/bin/entrypoint.sh", *argv, env=env)
            self.assertEqual(r.returncode, 1, f"{argv} {env}: {r.stdout}{r.stderr}")
            self.assertIn(message, r.stderr, argv)

    def test_what_the_adaptor_needs_is_in_the_image(self) -> None:
        for argv in (["ip", "-V"], ["iptables", "--version"], ["nft", "--version"], ["ssh", "-V"],
                     ["/opt/caa/bin/python", "-c", "import libvirt, caa.providers.local, caa.providers.aws"]):
            r = self.run_in(*argv)
            self.assertEqual(r.returncode, 0, f"{argv}: {r.stderr}")
