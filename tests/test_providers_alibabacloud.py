"""The Alibaba Cloud provider against tests/fakes/alibabacloud.py over real HTTP (the fake recomputes every
signature): the provider contract, Alibaba's documented signature example, the RunInstances parameters (TDX,
system disk, public IP, tags), the image annotation not sticking, deletes refused while starting, throttling, bad
credentials, the options, and the second NIC (ENI and EIP) made, released by a fresh provider, rolled back."""

from __future__ import annotations

import base64
import json
from typing import Any

import attrs
from twisted.internet import reactor as global_reactor
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from caa.providers.alibabacloud.config import AlibabaCloudConfig, AlibabaCloudOptions
from caa.providers.alibabacloud.provider import AlibabaCloudProvider
from caa.providers.alibabacloud.rpc import canonical_query, signature
from caa.providers.interfaces import ErrorKind, Instance, InstanceSpec, IProvider, ProviderError
from caa.providers.redact import MASK
from caa.providers.rest import RetryPolicy
from caa.reactors import as_node_reactor
from tests.fakes.alibabacloud import (
    IMAGE,
    KEY_ID,
    KEY_SECRET,
    OIDC_PROVIDER_ARN,
    OIDC_TOKEN,
    REGION,
    ROLE_ARN,
    SECURITY_GROUP,
    VSWITCH,
    FakeAlibabaCloud,
)
from tests.moto_server import serve
from tests.test_providers_contract import ProviderContractMixin, unique_pod

FAST = RetryPolicy(attempts=4, base=0.01, cap=0.05, attempt_timeout=10.0, call_timeout=30.0)


class AliTestMixin:
    fake: FakeAlibabaCloud
    url: str

    async def start_fake(self, **kw: Any) -> FakeAlibabaCloud:
        case: Any = self
        self.fake = FakeAlibabaCloud(**kw)
        self.url, port = await serve(self.fake)
        case.addCleanup(port.stopListening)
        return self.fake

    def ali(self, **changes: Any) -> AlibabaCloudProvider:
        case: Any = self
        config = AlibabaCloudConfig(access_key_id=KEY_ID, access_key_secret=KEY_SECRET, region=REGION,
                                    image_id=IMAGE, vswitch_id=VSWITCH, security_group_ids=(SECURITY_GROUP,),
                                    instance_types=("ecs.g8i.xlarge", "ecs.g8i.2xlarge", "ecs.gn7i-c8g1.2xlarge"),
                                    ecs_endpoint=self.url, vpc_endpoint=self.url, poll_interval=0.02,
                                    boot_timeout=10.0, delete_timeout=10.0)
        provider = AlibabaCloudProvider(as_node_reactor(global_reactor), attrs.evolve(config, **changes),
                                        policy=FAST)
        case.addCleanup(provider.teardown)
        return provider


class AlibabaContractTests(AliTestMixin, ProviderContractMixin, TestCase):
    async def make_provider(self) -> IProvider:
        await self.start_fake()
        self.provider = self.ali()
        await self.provider.verify_config()
        return self.provider

    def impossible_spec(self) -> tuple[InstanceSpec, ErrorKind]:
        return InstanceSpec(vcpus=512, memory_mib=4 * 1024 * 1024), ErrorKind.INVALID_CONFIG

    async def leftovers(self, names: list[str]) -> list[str]:
        return [i["InstanceName"] for i in self.fake.instances.values() if i["InstanceName"] in names]

    async def check_running(self, instance: Instance, user_data: bytes) -> None:
        self.assertEqual(self.fake.instances[instance.id]["Status"], "Running")
        self.assertEqual(base64.b64decode(self.fake.run_params[instance.id]["UserData"]), user_data)
        self.assertEqual(instance.ips,
                         tuple(self.fake.instances[instance.id]["VpcAttributes"]["PrivateIpAddress"]["IpAddress"]))


class AlibabaBehaviourTests(AliTestMixin, TestCase):
    async def test_run_instances_parameters_and_annotation_does_not_stick(self) -> None:
        fake = await self.start_fake()
        provider = self.ali(use_public_ip=True, tags=(("team", "caa"),), key_name="kp1", system_disk_size=60)
        instance = await provider.create_instance(*unique_pod("ali"), b"#cloud-config\n",
                                                  InstanceSpec(vcpus=6, memory_mib=20000))
        params = fake.run_params[instance.id]
        self.assertEqual((params["InstanceType"], params["SecurityOptions.ConfidentialComputingMode"],
                          params["SystemDisk.Size"], params["SystemDisk.Category"], params["InstanceChargeType"],
                          params["InternetChargeType"], params["InternetMaxBandwidthOut"], params["KeyPairName"],
                          params["Tag.1.Key"], params["Tag.1.Value"], params["MinAmount"]),
                         ("ecs.g8i.2xlarge", "TDX", "60", "cloud_essd", "PostPaid", "PayByTraffic", "100", "kp1",
                          "team", "caa", "1"))
        item = fake.instances[instance.id]
        self.assertEqual(instance.ips, (item["PublicIpAddress"]["IpAddress"][0],
                                        item["VpcAttributes"]["PrivateIpAddress"]["IpAddress"][0]))
        try:
            await provider.create_instance(*unique_pod("ali"), b"", InstanceSpec(image="m-other"))
        except ProviderError as e:
            self.assertIn("InvalidImageId.NotFound", str(e))
        else:
            self.fail("an unknown image was accepted")
        later = await provider.create_instance(*unique_pod("ali"), b"", InstanceSpec())
        self.assertEqual(fake.run_params[later.id]["ImageId"], IMAGE)  # upstream kept the annotation's image
        plain = self.ali(disable_cvm=True)
        other = await plain.create_instance(*unique_pod("ali"), b"", InstanceSpec(instance_type="ecs.g8i.xlarge"))
        self.assertNotIn("SecurityOptions.ConfidentialComputingMode", fake.run_params[other.id])
        for i in (instance, later, other):
            await provider.delete_instance(i.id)
        self.assertEqual(fake.instances, {})

    async def test_delete_waits_while_the_instance_refuses_and_is_idempotent(self) -> None:
        fake = await self.start_fake()
        provider = self.ali()
        instance = await provider.create_instance(*unique_pod("ali"), b"", InstanceSpec())
        fake.busy_deletes = 6  # more than one REST call's retries: the provider's own wall-clock wait goes on
        await provider.delete_instance(instance.id)
        self.assertEqual(fake.instances, {})
        self.assertGreaterEqual(fake.actions.count("DeleteInstance"), 7)
        await provider.delete_instance(instance.id)  # InvalidInstanceId.NotFound: a success

    async def test_second_nic_with_eip_created_and_all_released_on_delete(self) -> None:
        fake = await self.start_fake()
        fake.empty_enis = 2  # the documented "no id: call again" answer, twice
        provider = self.ali(use_public_ip=True)
        instance = await provider.create_instance(*unique_pod("ali"), b"", InstanceSpec(multi_nic=True))
        [eni] = fake.enis.values()
        self.assertEqual((eni["NetworkInterfaceName"], eni["InstanceId"], eni["Status"], eni["DeleteOnRelease"],
                          eni["VSwitchId"], eni["SecurityGroupIds"]["SecurityGroupId"]),
                         (f"peerpod-nic-{instance.id}", instance.id, "InUse", True, VSWITCH, [SECURITY_GROUP]))
        self.assertEqual(fake.actions.count("CreateNetworkInterface"), 3)
        [eip] = fake.eips.values()
        self.assertEqual((eip["Status"], eip["InstanceType"], eip["InstanceId"]),
                         ("InUse", "NetworkInterface", eni["NetworkInterfaceId"]))
        await provider.delete_instance(instance.id)
        self.assertEqual((fake.instances, fake.enis, fake.eips), ({}, {}, {}))
        # the order: EIP unbound and released, ENI detached and deleted, then the instance
        order = [a for a in fake.actions if a in ("UnassociateEipAddress", "ReleaseEipAddress",
                                                  "DetachNetworkInterface", "DeleteNetworkInterface",
                                                  "DeleteInstance")]
        self.assertEqual(order, ["UnassociateEipAddress", "ReleaseEipAddress", "DetachNetworkInterface",
                                 "DeleteNetworkInterface", "DeleteInstance"])
        await provider.delete_instance(instance.id)  # idempotent: nothing left to find

    async def test_second_nic_without_public_ip_has_no_eip(self) -> None:
        fake = await self.start_fake()
        provider = self.ali()
        instance = await provider.create_instance(*unique_pod("ali"), b"", InstanceSpec(multi_nic=True))
        self.assertEqual([e["InstanceId"] for e in fake.enis.values()], [instance.id])
        self.assertEqual(fake.eips, {})
        self.assertNotIn("AllocateEipAddress", fake.actions)
        await provider.delete_instance(instance.id)
        self.assertEqual((fake.instances, fake.enis), ({}, {}))

    async def test_a_fresh_provider_deletes_the_eni_and_eip_of_an_earlier_one(self) -> None:
        fake = await self.start_fake()
        instance = await self.ali(use_public_ip=True).create_instance(*unique_pod("ali"), b"",
                                                                        InstanceSpec(multi_nic=True))
        self.assertEqual((len(fake.enis), len(fake.eips)), (1, 1))
        restarted = self.ali(use_public_ip=True)  # an adaptor restart: no memory of the first provider's objects
        await restarted.delete_instance(instance.id)
        self.assertEqual((fake.instances, fake.enis, fake.eips), ({}, {}, {}))

    async def test_a_failure_midway_rolls_back_eip_eni_and_instance(self) -> None:
        fake = await self.start_fake()
        # the EIP is allocated, then binding it is refused (a RAM policy without vpc:AssociateEipAddress)
        fake.fail["AssociateEipAddress"] = (403, "Forbidden.RAM", "User not authorized to operate on the "
                                                                  "specified resource.")
        provider = self.ali(use_public_ip=True)
        with self.assertRaises(ProviderError) as caught:
            await provider.create_instance(*unique_pod("ali"), b"", InstanceSpec(multi_nic=True))
        self.assertIn("Forbidden.RAM", caught.exception.message)
        self.assertIsNone(caught.exception.instance_id)  # rolled back: nothing for the caller to delete
        self.assertIn("AllocateEipAddress", fake.actions)
        self.assertEqual((fake.instances, fake.enis, fake.eips), ({}, {}, {}))

    async def test_a_refused_attach_rolls_back_eni_and_instance(self) -> None:
        fake = await self.start_fake()
        fake.fail["AttachNetworkInterface"] = (403, "InvalidOperation.InvalidEcsState",
                                               "The instance status does not support this operation.")
        provider = self.ali(use_public_ip=True)
        with self.assertRaises(ProviderError) as caught:
            await provider.create_instance(*unique_pod("ali"), b"", InstanceSpec(multi_nic=True))
        self.assertEqual(caught.exception.kind, ErrorKind.INVALID_CONFIG)
        self.assertNotIn("AllocateEipAddress", fake.actions)
        self.assertIn("DeleteNetworkInterface", fake.actions)
        self.assertEqual((fake.instances, fake.enis, fake.eips), ({}, {}, {}))

    async def test_throttling_is_retried_and_fresh_nonces_signed(self) -> None:
        fake = await self.start_fake()
        provider = self.ali()
        await provider.verify_config()
        fake.throttle = 2
        instance = await provider.create_instance(*unique_pod("ali"), b"", InstanceSpec())
        self.assertEqual(fake.actions.count("RunInstances"), 3)
        self.assertEqual(fake.rejections, [])  # every retry signed afresh (a reused nonce would be refused)
        fake.throttle = 10
        try:
            await provider.find_instance(instance.name)
        except ProviderError as e:
            self.assertEqual((e.kind, "Throttling.User" in str(e)), (ErrorKind.TRANSIENT, True))
        else:
            self.fail("throttled past the retries, yet found")

    async def test_bad_credentials_are_invalid_config_without_the_secret(self) -> None:
        fake = await self.start_fake()
        wrong = "wrongSecret-0123456789"
        try:
            await self.ali(access_key_secret=wrong).verify_config()
        except ProviderError as e:
            self.assertEqual((e.kind, "SignatureDoesNotMatch" in str(e)), (ErrorKind.INVALID_CONFIG, True))
            self.assertNotIn(wrong, str(e))
        else:
            self.fail("a wrong secret was accepted")
        self.assertEqual(fake.rejections, ["SignatureDoesNotMatch"])  # not retried
        try:
            await self.ali(access_key_id="LTAIunknown").verify_config()
        except ProviderError as e:
            self.assertIn("InvalidAccessKeyId.NotFound", str(e))
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)  # never mistaken for a missing instance
        else:
            self.fail("an unknown key was accepted")


class AlibabaRrsaTests(AliTestMixin, TestCase):
    async def test_rrsa_keys_from_the_projected_token(self) -> None:
        fake = await self.start_fake()
        token_file = self.mktemp()
        with open(token_file, "w") as f:
            f.write(OIDC_TOKEN + "\n")
        options = AlibabaCloudOptions({"IMAGEID": IMAGE, "VSWITCH_ID": VSWITCH, "SECURITY_GROUP_IDS": SECURITY_GROUP,
                                       "ALIBABA_CLOUD_ROLE_ARN": ROLE_ARN, "ALIBABA_CLOUD_OIDC_PROVIDER_ARN":
                                       OIDC_PROVIDER_ARN, "ALIBABA_CLOUD_OIDC_TOKEN_FILE": token_file})
        options.parseOptions([])
        config = AlibabaCloudConfig.from_options(options)
        self.assertTrue(config.rrsa)
        provider = self.ali(access_key_id="", access_key_secret="", role_arn=config.role_arn,
                            oidc_provider_arn=config.oidc_provider_arn, oidc_token_file=token_file,
                            sts_endpoint=self.url)
        instance = await provider.create_instance(*unique_pod("ali"), b"", InstanceSpec())
        await provider.delete_instance(instance.id)
        self.assertEqual((fake.assumed, fake.rejections), (1, []))  # one exchange, cached for every call
        with open(token_file, "w") as f:
            f.write("stale-token")
        stale = self.ali(access_key_id="", access_key_secret="", role_arn=ROLE_ARN,
                         oidc_provider_arn=OIDC_PROVIDER_ARN, oidc_token_file=token_file, sts_endpoint=self.url)
        try:
            await stale.verify_config()
        except ProviderError as e:
            self.assertEqual((e.kind, "AuthenticationFail.OIDCToken.Invalid" in str(e)),
                             (ErrorKind.INVALID_CONFIG, True))
            self.assertNotIn("stale-token", str(e))
        else:
            self.fail("a bad OIDC token gave keys")


class AlibabaUnitTests(SynchronousTestCase):
    def test_documented_signature_example(self) -> None:
        # Alibaba's signature documentation: key testid/testsecret, DescribeRegions, this nonce and timestamp.
        params = {"AccessKeyId": "testid", "Action": "DescribeRegions", "Format": "XML",
                  "SignatureMethod": "HMAC-SHA1", "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
                  "SignatureVersion": "1.0", "Timestamp": "2016-02-23T12:46:24Z", "Version": "2014-05-26"}
        self.assertEqual(signature("GET", params, "testsecret"), "OLeaidS1JvxuMvnyHOwuJ+uX5qY=")
        self.assertEqual(canonical_query({"b": "a b*~", "a": "ü/"}), "a=%C3%BC%2F&b=a%20b%2A~")

    def test_options(self) -> None:
        e = self.assertRaises(usage.UsageError, AlibabaCloudOptions({}).parseOptions, [])
        self.assertIn("--imageid (IMAGEID) is required", str(e))
        env = {"IMAGEID": IMAGE, "VSWITCH_ID": VSWITCH, "ALIBABACLOUD_ACCESS_KEY_ID": KEY_ID,
               "ALIBABACLOUD_ACCESS_KEY_SECRET": KEY_SECRET}
        e = self.assertRaises(usage.UsageError, AlibabaCloudOptions(env).parseOptions, [])
        self.assertIn("--security-group-ids (SECURITY_GROUP_IDS) is required", str(e))  # no `cn-beijing` default
        options = AlibabaCloudOptions({**env, "SECURITY_GROUP_IDS": "sg-1,sg-2", "PODVM_INSTANCE_TYPES": "a,b"})
        options.parseOptions(["--tags", "k=v"])
        config = AlibabaCloudConfig.from_options(options)
        self.assertEqual((config.security_group_ids, config.instance_types, config.region, config.instance_type,
                          config.system_disk_size, config.tags),
                         (("sg-1", "sg-2"), ("a", "b"), "cn-beijing", "ecs.g8i.xlarge", 40, (("k", "v"),)))
        self.assertEqual(options.redacted()["alibabacloud-secret-access-key"], MASK)
        self.assertNotIn(KEY_SECRET, repr(config) + json.dumps(config.redacted(), default=str))
