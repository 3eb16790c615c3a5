"""`twistd caa-adaptor --provider <p> --help` for byom, ibmcloud, ibmcloud-powervs and alibabacloud lists
upstream's flag and env names (spec-adaptor §7.3) and no secret given in the environment; a start without a
required option fails with one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tests.test_adaptor_process import ROOT

SECRET = "very-secret-value-0123456789"

PROVIDERS = {
    "byom": ({"SSH_USERNAME": "peerpod"},
             ["--vm-pool-ips=", "--ssh-username=", "--ssh-pub-key=", "--ssh-priv-key=", "--ssh-timeout=",
              "--ssh-host-key-allowlist-dir=", "--pool-namespace=", "--pool-configmap-name=", "--max-range-ips=",
              "VM_POOL_IPS", "SSH_USERNAME", "SSH_PUB_KEY_PATH", "SSH_PRIV_KEY_PATH", "SSH_TIMEOUT",
              "SSH_HOST_KEY_ALLOWLIST_DIR", "POOL_NAMESPACE", "POOL_CONFIGMAP_NAME", "MAX_RANGE_IPS"],
             "--vm-pool-ips (VM_POOL_IPS) is required"),
    "ibmcloud": ({"IBMCLOUD_API_KEY": SECRET},
                 ["--api-key=", "--iam-profile-id=", "--cr-token-filename=", "--iam-service-url=",
                  "--vpc-service-url=", "--resource-group-id=", "--profile-name=", "--profile-list=", "--zone-name=",
                  "--primary-subnet-id=", "--vpc-id=", "--key-id=", "--cluster-id=", "--image-id=",
                  "--security-group-ids=", "--secondary-subnet-id=", "--secondary-security-group-id=",
                  "--dedicated-host-ids=", "--dedicated-host-group-ids=", "--disable-cvm=", "--tags=",
                  "IBMCLOUD_IAM_ENDPOINT", "IBMCLOUD_VPC_ENDPOINT", "IBMCLOUD_PODVM_INSTANCE_PROFILE_NAME",
                  "IBMCLOUD_PODVM_IMAGE_ID", "IBMCLOUD_DEDICATED_HOST_GROUP_IDS", "DISABLECVM"],
                 "--image-id (IBMCLOUD_PODVM_IMAGE_ID) is required"),
    "ibmcloud-powervs": ({"IBMCLOUD_API_KEY": SECRET},
                         ["--api-key=", "--zone=", "--service-instance-id=", "--network-id=", "--image-id=",
                          "--ssh-key=", "--proc-type=", "--sys-type=", "--memory=", "--cpu=", "--use-public-ip=",
                          "--build-timeout=", "POWERVS_ZONE", "POWERVS_SERVICE_INSTANCE_ID", "POWERVS_NETWORK_ID",
                          "POWERVS_IMAGE_ID", "POWERVS_SSH_KEY_NAME", "POWERVS_PROCESSOR_TYPE",
                          "POWERVS_SYSTEM_TYPE", "POWERVS_MEMORY", "POWERVS_PROCESSORS", "POWERVS_BUILD_TIMEOUT"],
                         "--zone (POWERVS_ZONE) is required"),
    "alibabacloud": ({"ALIBABACLOUD_ACCESS_KEY_SECRET": SECRET},
                     ["--alibabacloud-access-key-id=", "--alibabacloud-secret-access-key=",
                      "--alibabacloud-security-token=", "--region=", "--imageid=", "--instance-type=",
                      "--instance-types=", "--vswitch-id=", "--keyname=", "--use-public-ip=", "--system-disk-size=",
                      "--disable-cvm=", "--vpc-id=", "--security-group-ids=", "--tags=", "ALIBABACLOUD_ACCESS_KEY_ID",
                      "ALIBABACLOUD_ACCESS_KEY_SECRET", "ALIBABACLOUD_SECURITY_TOKEN", "REGION", "IMAGEID",
                      "PODVM_INSTANCE_TYPE", "VSWITCH_ID", "KEYNAME", "SYSTEM_DISK_SIZE", "SECURITY_GROUP_IDS"],
                     "--imageid (IMAGEID) is required"),
}


def adaptor(provider: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("IBMCLOUD_", "POWERVS_", "ALIBABACLOUD_"))
             and k not in ("VM_POOL_IPS", "IMAGEID", "VSWITCH_ID", "CLOUD_PROVIDER")}
    return subprocess.run([sys.executable, "-m", "tests.fakes.run_adaptor", "caa-adaptor", "--provider", provider,
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env=dict(clean, PYTHONPATH=ROOT, **env))


class UpstreamHelpTests(TestCase):
    timeout = 240

    def test_help_names_and_missing_options(self) -> None:
        for provider, (env, names, missing) in PROVIDERS.items():
            shown = adaptor(provider, env, "--help")
            self.assertEqual(shown.returncode, 0, shown.stderr)
            self.assertIn(f"Options of provider {provider}", shown.stdout)
            for name in names:
                self.assertIn(name, shown.stdout, f"{provider}: {name}")
            self.assertNotIn(SECRET, shown.stdout + shown.stderr)
            started = adaptor(provider, env)
            self.assertNotEqual(started.returncode, 0)
            self.assertIn(missing, started.stderr + started.stdout, provider)
            self.assertNotIn(SECRET, started.stdout + started.stderr)
