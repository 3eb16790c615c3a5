"""The real `twistd caa-adaptor --provider gcp` process against the Compute fake (tests/fakes/gcp_compute.py, served
by this test process; the blocking process helpers run in threads so the fake keeps answering): CreateVM, then a
StartVM that inserts the instance in the fake but cannot reach a pod VM there, so it fails after --proxy-timeout
and rolls back (the instance deleted, the sandbox back to CREATED); StopVM then leaves an empty journal. Also
`--help`: upstream's GCP flags, the key given in the environment nowhere in the output or the log, and a missing
required option named at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from caa.providers.registry import provider_names
from tests.fakes import gcp_compute
from tests.fakes.gcp_compute import FakeGcp, service_account_json
from tests.moto_server import serve
from tests.test_adaptor_process import ROOT, Adaptor

FACTORY = "gcp" if "gcp" in provider_names() else "caa.providers.gcp:GcpProviderFactory"


def gcp_env(url: str) -> dict[str, str]:
    return {
        "CLOUD_PROVIDER": FACTORY, "GCP_CREDENTIALS": service_account_json(f"{url}/token"),
        "GCP_PROJECT_ID": gcp_compute.PROJECT, "GCP_ZONE": gcp_compute.ZONE, "PODVM_IMAGE_NAME": gcp_compute.IMAGE,
        "GCP_NETWORK": gcp_compute.NETWORK, "GCP_SUBNETWORK": gcp_compute.SUBNETWORK,
        "GCP_CONFIDENTIAL_TYPE": "SEV_SNP", "GCP_MACHINE_TYPE": "n2d-standard-2",
        "GCP_INSTANCE_TYPES": "n2d-standard-2,n2d-standard-4",
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE": f"{url}/compute/v1",
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDRESOURCEMANAGER": f"{url}/v3",
    }


def key_line(env: dict[str, str]) -> str:
    """One line of the private key's base64: what must never be printed."""
    return str(json.loads(env["GCP_CREDENTIALS"])["private_key"].splitlines()[2])


class GcpAdaptorProcessTests(TestCase):
    timeout = 120

    def test_help_shows_upstream_flags_and_no_secret(self) -> None:
        env = gcp_env("http://127.0.0.1:1")
        r = subprocess.run([sys.executable, "-m", "tests.fakes.run_adaptor", "caa-adaptor", "--provider", FACTORY,
                            "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                           env=dict(os.environ, PYTHONPATH=ROOT, **env))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("Options of provider gcp", r.stdout)
        for flag in ("--gcp-credentials", "--gcp-project-id", "--zone", "--image-name", "--machine-type=",
                     "--machine-types", "--network", "--subnetwork", "--disk-type", "--disable-cvm",
                     "--confidential-type", "--root-volume-size", "--use-public-ip", "--tags", "GCP_CREDENTIALS",
                     "GCP_INSTANCE_TYPES", "GCP_DISK_TYPE", "e2-medium"):
            self.assertIn(flag, r.stdout)
        self.assertNotIn(key_line(env), r.stdout + r.stderr)

    def test_missing_required_option_is_a_start_up_error(self) -> None:
        env = gcp_env("http://127.0.0.1:1")
        env["GCP_NETWORK"] = ""
        r = subprocess.run([sys.executable, "-m", "tests.fakes.run_adaptor", "-n", "--pidfile=", "caa-adaptor",
                            "--pods-dir", self.mktemp()], capture_output=True, text=True, cwd=ROOT, timeout=60,
                           env=dict(os.environ, PYTHONPATH=ROOT, **env))
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("--network (GCP_NETWORK) is required", r.stdout + r.stderr)
        self.assertNotIn(key_line(env), r.stdout + r.stderr)

    async def test_start_vm_rolls_back_when_the_pod_vm_is_unreachable(self) -> None:
        fake = FakeGcp()
        url, port = await serve(fake)
        fake.base = url
        self.addCleanup(port.stopListening)
        env = gcp_env(url)
        a = Adaptor(self)
        a.extra_args = ["--tunnel-type", "none", "--cloud-config-verify"]
        a.tls_args = []  # mTLS: nothing in the fake's network can complete the handshake
        await deferToThread(a.start, **env, PROXY_TIMEOUT="2s")
        await deferToThread(a.create, "gcp1", "web")
        r = await deferToThread(a.ctl, "start", "--id", "gcp1")
        self.assertNotEqual(r.returncode, 0, f"StartVM reached a pod VM inside the fake: {r.stdout}")
        self.assertIn("failed to establish agent proxy connection", r.stderr)
        record: Any = a.record("gcp1")
        self.assertEqual(record["state"], "created", record)  # rolled back, ready for another StartVM
        name = "podvm-web-gcp1"
        path = f"/compute/v1/projects/{gcp_compute.PROJECT}/zones/{gcp_compute.ZONE}/instances"
        self.assertIn(("POST", path), fake.requests)  # the instance was inserted ...
        self.assertIn(name, fake.inserted)
        self.assertIn(("DELETE", f"{path}/{name}"), fake.requests)  # ... and deleted again
        self.assertEqual(fake.instances, {})
        r = await deferToThread(a.ctl, "stop", "--id", "gcp1")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(os.listdir(a.pods), [])
        await deferToThread(a.term)
        with open(a.log) as f:
            log = f.read()
        self.assertIn("created instance", log)
        self.assertNotIn(key_line(env), log)
        for token in fake.tokens:
            self.assertNotIn(token, log)
