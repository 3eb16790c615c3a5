"""The real `twistd caa-adaptor --provider aws` process against moto's EC2 server: CreateVM, then a StartVM that
creates the instance in moto but cannot reach a pod VM there, so it fails after --proxy-timeout and rolls back
(the instance is terminated, the sandbox is back to CREATED); StopVM then leaves an empty journal. Also `--help`:
upstream's AWS flags, and the secret given in the environment nowhere in the output or the log."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from caa.providers.aws.config import AwsConfig
from caa.providers.aws.provider import AwsProvider
from caa.providers.registry import provider_names
from caa.reactors import as_node_reactor
from tests.moto_server import KEY_ID, REGION, SECRET, moto_endpoint
from tests.test_adaptor_process import ROOT, Adaptor
from tests.test_providers_aws_moto import MOTO_AMI

# `aws` once the package's entry points are installed; the factory's reference before (a source tree).
FACTORY = "aws" if "aws" in provider_names() else "caa.providers.aws:AwsProviderFactory"


def aws_env() -> dict[str, str]:
    return {
        "CLOUD_PROVIDER": FACTORY, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": REGION, "AWS_ENDPOINT_URL_EC2": moto_endpoint(), "PODVM_AMI_ID": MOTO_AMI,
        "PODVM_INSTANCE_TYPES": "m6a.large,m6a.xlarge", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }


class AwsAdaptorProcessTests(TestCase):
    timeout = 120

    def test_help_shows_upstream_flags_and_no_secret(self) -> None:
        r = subprocess.run([sys.executable, "-m", "tests.fakes.run_adaptor", "caa-adaptor", "--provider", FACTORY,
                            "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                           env=dict(os.environ, PYTHONPATH=ROOT, **aws_env()))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("Options of provider aws", r.stdout)
        for flag in ("--aws-access-key-id", "--aws-secret-key", "--aws-session-token", "--aws-region",
                     "--aws-profile", "--instance-type=", "--instance-types", "--aws-lt-name", "--use-lt", "--imageid",
                     "--keyname", "--subnetid", "--securitygroupids", "--use-public-ip", "--root-volume-size",
                     "--disable-cvm", "--tags", "AWS_SECRET_ACCESS_KEY", "PODVM_AMI_ID"):
            self.assertIn(flag, r.stdout)
        self.assertNotIn(SECRET, r.stdout + r.stderr)
        self.assertNotIn(KEY_ID, r.stdout + r.stderr)

    def test_start_vm_rolls_back_when_the_pod_vm_is_unreachable(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._rollback())

    async def _rollback(self) -> None:
        a = Adaptor(self)
        a.extra_args = ["--tunnel-type", "none", "--cloud-config-verify"]
        # mTLS (not --disable-tls): where a sandbox's network accepts any TCP connection, the handshake still
        # cannot settle, since no forwarder with our CA's certificate answers there.
        a.tls_args = []
        a.start(**aws_env(), PROXY_TIMEOUT="2s")
        a.create("aws1", "web")
        r = a.ctl("start", "--id", "aws1")
        self.assertNotEqual(r.returncode, 0, f"StartVM reached a pod VM inside moto: {r.stdout}")
        self.assertIn("failed to establish agent proxy connection", r.stderr)
        record: Any = a.record("aws1")
        self.assertEqual(record["state"], "created", record)  # rolled back, ready for another StartVM
        name = "podvm-web-aws1"
        provider = AwsProvider(as_node_reactor(global_reactor), AwsConfig(
            access_key_id=KEY_ID, secret_key=SECRET, region=REGION, endpoint=moto_endpoint(), image_id=MOTO_AMI))
        self.addCleanup(provider.teardown)
        self.assertIsNone(await provider.find_instance(name))  # terminated again
        # ... but it did exist: moto still lists it, terminated, under its Name tag.
        root = await provider.ec2.call("DescribeInstances", {"Filter.1.Name": "tag:Name", "Filter.1.Value.1": name})
        self.assertEqual([i.findtext("instanceState/name") for i in root.findall(".//instancesSet/item")],
                         ["terminated"])
        r = a.ctl("stop", "--id", "aws1")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(os.listdir(a.pods), [])
        a.term()
        with open(a.log) as f:
            log = f.read()
        self.assertIn("created instance", log)
        self.assertNotIn(SECRET, log)
