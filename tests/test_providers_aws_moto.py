"""The AWS provider against moto's EC2 server (tests/moto_server.py): the provider contract, instance-type
selection from DescribeInstanceTypes, the RunInstances it sends, throttling behind a proxy, bad credentials."""

from __future__ import annotations

import base64
import os
import threading
from typing import Any

import attrs
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.trial.unittest import TestCase

from caa.providers.aws.config import AwsConfig
from caa.providers.aws.ec2 import query_params
from caa.providers.aws.provider import AwsProvider
from caa.providers.interfaces import ErrorKind, InstanceSpec, IProvider, ProviderError
from caa.providers.rest import RetryPolicy
from caa.reactors import as_node_reactor
from tests.moto_server import KEY_ID, REGION, SECRET, FakeImds, ThrottlingProxy, moto_endpoint, serve, set_auth
from tests.test_providers_contract import ProviderContractMixin, unique_pod

MOTO_AMI = "ami-03cf127a"  # one of the AMIs moto serves in every region
TYPES = ("m6a.large", "m6a.xlarge", "m6a.2xlarge", "g4dn.xlarge")
FAST = RetryPolicy(attempts=4, base=0.02, cap=0.1, attempt_timeout=10.0, call_timeout=30.0)


def moto_config(**changes: Any) -> AwsConfig:
    config = AwsConfig(access_key_id=KEY_ID, secret_key=SECRET, region=REGION, endpoint=moto_endpoint(),
                       image_id=MOTO_AMI, instance_types=TYPES, tags=(("team", "caa"),), poll_interval=0.1,
                       boot_timeout=20.0)
    return attrs.evolve(config, **changes)


class AwsTestMixin:
    def aws(self, **changes: Any) -> AwsProvider:
        provider = AwsProvider(as_node_reactor(global_reactor), moto_config(**changes), policy=FAST)
        self.addCleanup(provider.teardown)  # type: ignore[attr-defined]
        return provider

    async def described(self, provider: AwsProvider, instance_id: str) -> Any:
        root = await provider.ec2.call("DescribeInstances", query_params("InstanceId", [instance_id]))
        return root.find("reservationSet/item/instancesSet/item")


class AwsContractTests(AwsTestMixin, ProviderContractMixin, TestCase):
    async def make_provider(self) -> IProvider:
        self.provider = self.aws()
        return self.provider

    def impossible_spec(self) -> tuple[InstanceSpec, ErrorKind]:
        return InstanceSpec(vcpus=512, memory_mib=4 * 1024 * 1024), ErrorKind.INVALID_CONFIG

    async def leftovers(self, names: list[str]) -> list[str]:
        return [i.name for i in await self.provider.live_instances(names)] if names else []

    async def check_running(self, instance: Any, user_data: bytes) -> None:
        item = await self.described(self.provider, instance.id)
        self.assertEqual(item.findtext("instanceState/name"), "running")
        self.assertEqual(item.findtext("privateIpAddress"), instance.ips[0])
        attribute = await self.provider.ec2.call("DescribeInstanceAttribute",
                                                 {"InstanceId": instance.id, "Attribute": "userData"})
        self.assertEqual(base64.b64decode(attribute.findtext("userData/value", "")), user_data)


class AwsBehaviourTests(AwsTestMixin, TestCase):
    async def test_instance_type_from_describe_instance_types_tags_and_public_ip(self) -> None:
        provider = self.aws(use_public_ip=True)
        pod, sid = unique_pod("aws")
        instance = await provider.create_instance(pod, sid, b"#cloud-config\n", InstanceSpec(vcpus=3, memory_mib=9000))
        self.addCleanup(provider.delete_instance, instance.id)
        item = await self.described(provider, instance.id)
        self.assertEqual(item.findtext("instanceType"), "m6a.xlarge")  # smallest GPU-less fit of 3 vCPUs, 9000 MiB
        self.assertEqual(instance.ips, (item.findtext("ipAddress"),))  # the public IP when asked
        tags = {t.findtext("key"): t.findtext("value") for t in item.findall("tagSet/item")}
        self.assertEqual(tags, {"Name": provider.instance_name(pod, sid), "team": "caa"})
        gpu = await provider.create_instance(*unique_pod("aws"), b"", InstanceSpec(gpus=1))
        self.addCleanup(provider.delete_instance, gpu.id)
        self.assertEqual((await self.described(provider, gpu.id)).findtext("instanceType"), "g4dn.xlarge")
        try:
            await provider.create_instance(*unique_pod("aws"), b"", InstanceSpec(instance_type="t3.small"))
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("is not part of supported instance types list", str(e))
        else:
            self.fail("a type outside --instance-types was created")

    async def test_launch_template_mode(self) -> None:
        setup = self.aws()
        template = f"caa-lt-{os.getpid()}-{id(self)}"
        await setup.ec2.call("CreateLaunchTemplate", {
            "LaunchTemplateName": template, "LaunchTemplateData.ImageId": MOTO_AMI,
            "LaunchTemplateData.InstanceType": "t3.small"})
        provider = self.aws(use_lt=True, lt_name=template, image_id="")
        pod, sid = unique_pod("lt")
        # The pod's type and image are the template's business in this mode (upstream ignores them too).
        instance = await provider.create_instance(pod, sid, b"#cloud-config\n",
                                                  InstanceSpec(instance_type="m6a.2xlarge", image="ami-other"))
        self.addCleanup(provider.delete_instance, instance.id)
        item = await self.described(provider, instance.id)
        self.assertEqual((item.findtext("instanceType"), item.findtext("imageId")), ("t3.small", MOTO_AMI))
        self.assertEqual(await provider.find_instance(instance.name), instance)

    async def test_unset_network_region_and_key_come_from_the_nodes_imds(self) -> None:
        subnets = await self.aws().ec2.call("DescribeSubnets")
        subnet = subnets.findtext("subnetSet/item/subnetId", "")
        group = (await self.aws().ec2.call("DescribeSecurityGroups")).findtext("securityGroupInfo/item/groupId", "")
        mac = "0e:11:22:33:44:55"
        url, port = await serve(FakeImds({
            "placement/region": REGION, "mac": mac, f"network/interfaces/macs/{mac}/subnet-id": subnet,
            f"network/interfaces/macs/{mac}/security-group-ids": f"{group}\n", "public-keys/": "0=node-key"}))
        self.addCleanup(port.stopListening)
        provider = self.aws(region="", imds_endpoint=url)
        pod, sid = unique_pod("imds")
        instance = await provider.create_instance(pod, sid, b"", InstanceSpec())
        self.addCleanup(provider.delete_instance, instance.id)
        self.assertEqual((provider.config.region, provider.config.subnet_id, provider.config.security_group_ids,
                          provider.config.key_name), (REGION, subnet, (group,), "node-key"))
        item = await self.described(provider, instance.id)
        self.assertEqual((item.findtext("subnetId"), item.findtext("keyName")), (subnet, "node-key"))
        # Off EC2 (nothing answers): the configuration stays as given, the provider still works.
        await maybeDeferred(port.stopListening)
        given = self.aws(imds_endpoint=url)
        self.assertIsNone(await given.find_instance("podvm-x-12345678"))
        self.assertEqual(given.config.subnet_id, "")

    async def test_verify_config_names_a_missing_ami(self) -> None:
        await self.aws().verify_config()
        # the root volume: the AMI's root device, never smaller than its snapshot (15 GiB for this AMI in moto)
        self.assertEqual(await self.aws(root_volume_size=1).root_volume(MOTO_AMI), ("/dev/sda1", 15))
        self.assertEqual(await self.aws(root_volume_size=40).root_volume(MOTO_AMI), ("/dev/sda1", 40))
        try:
            await self.aws(image_id="ami-00000000deadbeef").verify_config()
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("unable to get image details", str(e))
        else:
            self.fail("verify_config accepted an unknown AMI")

    async def test_throttling_is_retried(self) -> None:
        proxy = ThrottlingProxy(moto_endpoint(), failures=2)
        url, port = await serve(proxy)
        self.addCleanup(port.stopListening)
        provider = self.aws(endpoint=url)
        pod, sid = unique_pod("thr")
        instance = await provider.create_instance(pod, sid, b"", InstanceSpec())
        await provider.delete_instance(instance.id)
        # DescribeInstanceTypes answered RequestLimitExceeded twice, then went through: one create, three tries.
        self.assertEqual(proxy.seen[:3], [b"DescribeInstanceTypes"] * 3)
        self.assertEqual(proxy.seen.count(b"RunInstances"), 1)
        self.assertIsNone(await provider.find_instance(instance.name))

    async def test_throttling_gives_up_as_transient(self) -> None:
        proxy = ThrottlingProxy(moto_endpoint(), failures=100)
        url, port = await serve(proxy)
        self.addCleanup(port.stopListening)
        provider = self.aws(endpoint=url)
        try:
            await provider.find_instance("podvm-x-12345678")
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.TRANSIENT)
            self.assertIn("RequestLimitExceeded", str(e))
        else:
            self.fail("a throttled call succeeded")
        self.assertEqual(len(proxy.seen), FAST.attempts)

    async def test_bad_credentials(self) -> None:
        set_auth(True)
        self.addCleanup(set_auth, False)
        provider = self.aws()
        try:
            await provider.verify_config()
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)  # never retried
            self.assertNotIn(SECRET, str(e))
            self.assertNotIn(KEY_ID, str(e))
        else:
            self.fail("moto accepted unknown credentials")

    async def test_wrong_endpoint_is_transient(self) -> None:
        url, port = await serve(ThrottlingProxy("", 0))
        await maybeDeferred(port.stopListening)  # nobody listens there any more
        provider = self.aws(endpoint=url)
        try:
            await provider.find_instance("podvm-x-12345678")
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.TRANSIENT)
            self.assertIn("DescribeInstances", str(e))
        else:
            self.fail("a closed port answered")

    async def test_private_ip_returned_while_pending_without_waiting(self) -> None:
        proxy = ThrottlingProxy(moto_endpoint(), failures=0, hang=b"DescribeInstances")
        url, port = await serve(proxy)
        self.addCleanup(port.stopListening)
        provider = self.aws(endpoint=url)
        pod, sid = unique_pod("early")
        # DescribeInstances never answers: the create returns on RunInstances' answer alone
        instance = await provider.create_instance(pod, sid, b"#cloud-config\n", InstanceSpec())
        self.addCleanup(lambda: self.aws().delete_instance(instance.id))
        self.assertNotIn(b"DescribeInstances", proxy.seen)
        self.assertEqual(proxy.seen[-1], b"RunInstances")
        item = await self.described(self.aws(), instance.id)
        self.assertEqual(instance.ips, (item.findtext("privateIpAddress"),))
        self.assertEqual(instance.name, provider.instance_name(pod, sid))

    async def test_public_ip_still_waits_for_running(self) -> None:
        proxy = ThrottlingProxy(moto_endpoint(), failures=0)
        url, port = await serve(proxy)
        self.addCleanup(port.stopListening)
        provider = self.aws(endpoint=url, use_public_ip=True)
        instance = await provider.create_instance(*unique_pod("pub"), b"", InstanceSpec())
        self.addCleanup(provider.delete_instance, instance.id)
        self.assertIn(b"DescribeInstances", proxy.seen[proxy.seen.index(b"RunInstances"):])
        item = await self.described(provider, instance.id)
        self.assertEqual(instance.ips, (item.findtext("ipAddress"),))

    async def test_cancelled_create_rolls_back(self) -> None:
        # DescribeInstances (the wait for "running", kept for a public IP) never answers; the create is
        # cancelled there.
        proxy = ThrottlingProxy(moto_endpoint(), failures=0, hang=b"DescribeInstances")
        url, port = await serve(proxy)
        self.addCleanup(port.stopListening)
        provider = self.aws(endpoint=url, use_public_ip=True)
        pod, sid = unique_pod("cancel")
        name = provider.instance_name(pod, sid)
        hung = proxy.hung.wait()
        creating = provider.create_instance(pod, sid, b"", InstanceSpec())
        await hung
        creating.cancel()
        error = await creating.addErrback(lambda f: f.value)
        self.assertIsInstance(error, CancelledError)
        self.assertEqual(proxy.seen[-1], b"TerminateInstances")  # rolled back
        self.assertEqual(await self.aws().live_instances([name]), [])


class EbsVolumeTests(AwsTestMixin, TestCase):
    """CSI volumes (EBS) against moto: attached at create in the adaptor's order, detached and kept at delete,
    also by a provider that never saw the create (a restarted adaptor)."""

    async def new_volume(self, provider: AwsProvider) -> str:
        root = await provider.ec2.call("CreateVolume", {"AvailabilityZone": f"{REGION}a", "Size": "1"})
        volume_id = root.findtext("volumeId", "")
        self.assertTrue(volume_id.startswith("vol-"), volume_id)

        async def delete() -> None:
            await provider.ec2.call("DeleteVolume", {"VolumeId": volume_id})

        self.addCleanup(lambda: Deferred.fromCoroutine(delete()))
        return volume_id

    async def volumes(self, provider: AwsProvider, ids: list[str]) -> dict[str, Any]:
        from caa.providers.aws.volumes import parse_volumes

        return parse_volumes(await provider.ec2.call("DescribeVolumes", query_params("VolumeId", ids)))

    async def test_attached_at_create_detached_not_deleted_at_delete(self) -> None:
        provider = self.aws(volume_poll_interval=0.1)
        ids = [await self.new_volume(provider) for _ in range(2)]
        pod, sid = unique_pod("ebs")
        instance = await provider.create_instance(pod, sid, b"", InstanceSpec(volumes=ids))
        self.addCleanup(provider.delete_instance, instance.id)
        states = await self.volumes(provider, ids)
        for index, volume_id in enumerate(ids):
            attachment = states[volume_id].attachment_to(instance.id)
            self.assertIsNotNone(attachment, volume_id)
            assert attachment is not None
            self.assertEqual((attachment.state, attachment.device), ("attached", ["/dev/xvdb", "/dev/xvdc"][index]))
            self.assertEqual(states[volume_id].status, "in-use")
        # a restarted adaptor's provider (no memory of the create) deletes the instance: volumes detached, kept
        proxy = ThrottlingProxy(moto_endpoint(), failures=0)
        url, port = await serve(proxy)
        self.addCleanup(port.stopListening)
        restarted = self.aws(endpoint=url)
        await restarted.delete_instance(instance.id)
        # detached by us, before the instance goes (not left to the termination); never DeleteVolume
        self.assertEqual([a for a in proxy.seen if not a.startswith(b"Describe")],
                         [b"DetachVolume", b"DetachVolume", b"TerminateInstances"], proxy.seen)
        states = await self.volumes(provider, ids)
        self.assertEqual({v: (s.status, s.attachments) for v, s in states.items()},
                         {v: ("available", ()) for v in ids})
        await restarted.delete_instance(instance.id)  # again: idempotent
        self.assertEqual(set(await self.volumes(provider, ids)), set(ids))

    async def test_prevalidation(self) -> None:
        provider = self.aws(volume_poll_interval=0.1)
        cases: list[tuple[tuple[str, ...], ErrorKind, str]] = [
            (("disk-1",), ErrorKind.INVALID_CONFIG, "invalid volume ids ['disk-1']"),
            (("vol-0123456789abcdef0",), ErrorKind.INVALID_CONFIG, "EBS volume pre-validation failed"),
        ]
        busy = await self.new_volume(provider)
        holder = await provider.create_instance(*unique_pod("ebs"), b"", InstanceSpec(volumes=(busy,)))
        self.addCleanup(provider.delete_instance, holder.id)
        cases.append(((busy,), ErrorKind.TRANSIENT, f"volume {busy} is in-use, not available"))
        for volumes, kind, text in cases:
            pod, sid = unique_pod("ebs")
            try:
                await provider.create_instance(pod, sid, b"", InstanceSpec(volumes=volumes))
            except ProviderError as e:
                self.assertIs(e.kind, kind, str(e))
                self.assertIn(text, str(e))
            else:
                self.fail(f"created an instance with volumes {volumes}")
            self.assertEqual(await provider.live_instances([provider.instance_name(pod, sid)]), [])


class CredentialChainTests(AwsTestMixin, TestCase):
    """No keys in the options: botocore's chain finds them (a shared profile, web identity through moto's STS),
    in a worker thread."""

    def environ(self, **values: str) -> None:
        saved = dict(os.environ)
        os.environ.update(values)

        def restore() -> None:
            os.environ.clear()
            os.environ.update(saved)

        self.addCleanup(restore)

    async def signed_as(self, provider: AwsProvider, proxy: ThrottlingProxy) -> str:
        await provider.find_instance("podvm-x-12345678")
        return proxy.credentials[-1]

    async def test_shared_profile(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[caa]\naws_access_key_id = AKIAPROFILEKEY000001\naws_secret_access_key = profile-secret\n")
        self.environ(AWS_SHARED_CREDENTIALS_FILE=path, AWS_CONFIG_FILE=path + ".none")
        proxy = ThrottlingProxy(moto_endpoint(), failures=0)
        url, port = await serve(proxy)
        self.addCleanup(port.stopListening)
        provider = self.aws(access_key_id="", secret_key="", profile="caa", endpoint=url)
        self.assertEqual(await self.signed_as(provider, proxy), "AKIAPROFILEKEY000001")
        try:
            await self.aws(access_key_id="", secret_key="", profile="nope", endpoint=url).verify_config()
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("nope", str(e))
        else:
            self.fail("an unknown profile was accepted")

    async def test_web_identity_through_sts_off_the_reactor_thread(self) -> None:
        token = self.mktemp()
        with open(token, "w") as f:
            f.write("eyJhbGciOiJub25lIn0.eyJzdWIiOiJjYWEifQ.")
        self.environ(AWS_ROLE_ARN="arn:aws:iam::123456789012:role/caa-adaptor", AWS_WEB_IDENTITY_TOKEN_FILE=token,
                     AWS_ENDPOINT_URL_STS=moto_endpoint(), AWS_CONFIG_FILE=token + ".none",
                     AWS_SHARED_CREDENTIALS_FILE=token + ".none", AWS_EC2_METADATA_DISABLED="true")
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            os.environ.pop(name, None)
        proxy = ThrottlingProxy(moto_endpoint(), failures=0)
        url, port = await serve(proxy)
        self.addCleanup(port.stopListening)
        provider = self.aws(access_key_id="", secret_key="", endpoint=url)
        threads: list[bool] = []
        resolve = provider.ec2.resolve

        def recording() -> Any:
            threads.append(threading.current_thread() is threading.main_thread())
            return resolve()

        provider.ec2.resolve = recording
        key = await self.signed_as(provider, proxy)
        self.assertTrue(key.startswith("ASIA"), key)  # temporary keys from AssumeRoleWithWebIdentity
        self.assertEqual(threads, [False])
