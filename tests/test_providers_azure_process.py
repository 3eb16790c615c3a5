"""The real `twistd caa-adaptor --provider azure` process against the ARM fake (tests/fakes/azure_arm.py, served
by this test process; the blocking process helpers run in threads so the fake keeps answering): CreateVM, then a
StartVM that creates the VM in the fake but cannot reach a pod VM there, so it fails after --proxy-timeout and
rolls back (VM, NIC and disk deleted, the sandbox back to CREATED); StopVM then leaves an empty journal. Also
`--help`: upstream's Azure flags, the secret given in the environment nowhere in the output or the log, and a
missing required option named at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from caa.providers.registry import provider_names
from tests.fakes import azure_arm
from tests.fakes.azure_arm import FakeAzure
from tests.moto_server import serve
from tests.test_adaptor_process import ROOT, Adaptor

FACTORY = "azure" if "azure" in provider_names() else "caa.providers.azure:AzureProviderFactory"


def azure_env(url: str) -> dict[str, str]:
    return {
        "CLOUD_PROVIDER": FACTORY, "AZURE_CLIENT_ID": azure_arm.CLIENT_ID,
        "AZURE_CLIENT_SECRET": azure_arm.CLIENT_SECRET,
        "AZURE_TENANT_ID": azure_arm.TENANT, "AZURE_SUBSCRIPTION_ID": azure_arm.SUBSCRIPTION,
        "AZURE_REGION": azure_arm.REGION, "AZURE_RESOURCE_GROUP": azure_arm.GROUP,
        "AZURE_SUBNET_ID": azure_arm.SUBNET_ID, "AZURE_IMAGE_ID": azure_arm.IMAGE_ID,
        "AZURE_INSTANCE_SIZES": "Standard_DC2as_v5,Standard_DC4as_v5",
        "AZURE_RESOURCE_MANAGER_ENDPOINT": url, "AZURE_AUTHORITY_HOST": url,
    }


def run_help(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.fakes.run_adaptor", "caa-adaptor", "--provider", FACTORY,
                           "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT, **env))


class AzureAdaptorProcessTests(TestCase):
    timeout = 120

    def test_help_shows_upstream_flags_and_no_secret(self) -> None:
        r = run_help(azure_env("http://127.0.0.1:1"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("Options of provider azure", r.stdout)
        for flag in ("--clientid", "--secret", "--tenantid", "--subscriptionid", "--region", "--resourcegroup",
                     "--instance-size=", "--instance-sizes", "--zone", "--subnetid", "--securitygroupid",
                     "--imageid", "--ssh-key-path", "--ssh-username", "--disable-cvm", "--enable-secure-boot",
                     "--use-public-ip", "--root-volume-size", "--tags", "AZURE_CLIENT_SECRET", "AZURE_NSG_ID",
                     "Standard_DC2as_v5"):
            self.assertIn(flag, r.stdout)
        for secret in (azure_arm.CLIENT_SECRET, azure_arm.CLIENT_ID, azure_arm.TENANT):  # upstream's Secret() three
            self.assertNotIn(secret, r.stdout + r.stderr)

    def test_missing_required_option_is_a_start_up_error(self) -> None:
        env = azure_env("http://127.0.0.1:1")
        del env["AZURE_RESOURCE_GROUP"]
        r = subprocess.run([sys.executable, "-m", "tests.fakes.run_adaptor", "-n", "--pidfile=", "caa-adaptor",
                            "--pods-dir", self.mktemp()], capture_output=True, text=True, cwd=ROOT, timeout=60,
                           env=dict(os.environ, PYTHONPATH=ROOT, AZURE_RESOURCE_GROUP="", **env))
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("--resourcegroup (AZURE_RESOURCE_GROUP) is required", r.stdout + r.stderr)
        self.assertNotIn(azure_arm.CLIENT_SECRET, r.stdout + r.stderr)

    async def test_start_vm_rolls_back_when_the_pod_vm_is_unreachable(self) -> None:
        fake = FakeAzure()
        url, port = await serve(fake)
        fake.base = url
        self.addCleanup(port.stopListening)
        a = Adaptor(self)
        a.extra_args = ["--tunnel-type", "none", "--cloud-config-verify"]
        a.tls_args = []  # mTLS: nothing in the fake's subnet can complete the handshake
        await deferToThread(a.start, **azure_env(url), PROXY_TIMEOUT="2s")
        await deferToThread(a.create, "az1", "web")
        r = await deferToThread(a.ctl, "start", "--id", "az1")
        self.assertNotEqual(r.returncode, 0, f"StartVM reached a pod VM inside the fake: {r.stdout}")
        self.assertIn("failed to establish agent proxy connection", r.stderr)
        record: Any = a.record("az1")
        self.assertEqual(record["state"], "created", record)  # rolled back, ready for another StartVM
        name = "podvm-web-az1"
        vm_path = f"{azure_arm.group_path()}/providers/Microsoft.Compute/virtualMachines/{name}"
        self.assertIn(("PUT", vm_path), fake.requests)  # the VM existed ...
        self.assertIn(("DELETE", vm_path), fake.requests)  # ... and was deleted again
        self.assertEqual([r["name"] for r in fake.resources.values()], [])  # with its NIC and disk
        r = await deferToThread(a.ctl, "stop", "--id", "az1")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(os.listdir(a.pods), [])
        await deferToThread(a.term)
        with open(a.log) as f:
            log = f.read()
        self.assertIn("created VM", log)
        for secret in (azure_arm.CLIENT_SECRET, azure_arm.CLIENT_ID, azure_arm.TENANT):
            self.assertNotIn(secret, log)
        for token in fake.tokens:
            self.assertNotIn(token, log)
