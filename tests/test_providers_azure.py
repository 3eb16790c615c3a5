"""The Azure provider against the ARM fake (tests/fakes/azure_arm.py) on a real socket: the provider contract,
the VM and NIC it asks for, VM size selection from the region's size list, long-running operations, throttling,
expired tokens, bad credentials (secret never in errors or logs), and the three credential flows."""

from __future__ import annotations

import base64
from typing import Any, cast

import attrs
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from caa.providers.azure.config import AzureConfig, AzureOptions
from caa.providers.azure.provider import AzureProvider
from caa.providers.interfaces import ErrorKind, InstanceSpec, IProvider, ProviderError
from caa.providers.rest import RetryPolicy
from caa.reactors import as_node_reactor
from tests.fakes import azure_arm
from tests.fakes.azure_arm import FakeAzure
from tests.moto_server import serve
from tests.test_providers_contract import ProviderContractMixin, unique_pod

FAST = RetryPolicy(attempts=4, base=0.02, cap=0.1, attempt_timeout=10.0, call_timeout=30.0)
SIZES = ("Standard_DC2as_v5", "Standard_DC4as_v5", "Standard_DC8as_v5", "Standard_DC16as_v5")


def fake_config(url: str, **changes: Any) -> AzureConfig:
    config = AzureConfig(
        client_id=azure_arm.CLIENT_ID, client_secret=azure_arm.CLIENT_SECRET, tenant_id=azure_arm.TENANT,
        subscription_id=azure_arm.SUBSCRIPTION, region=azure_arm.REGION, resource_group=azure_arm.GROUP,
        subnet_id=azure_arm.SUBNET_ID, image_id=azure_arm.IMAGE_ID, instance_sizes=SIZES,
        tags=(("team", "caa"),), arm_endpoint=url, authority_host=url, imds_endpoint=url, poll_interval=0.05,
        boot_timeout=20.0)
    return attrs.evolve(config, **changes)


class AzureTestMixin:
    fake: FakeAzure
    url: str

    async def start_fake(self, **kwargs: Any) -> FakeAzure:
        self.fake = FakeAzure(**kwargs)
        self.url, port = await serve(self.fake)
        self.fake.base = self.url
        self.addCleanup(port.stopListening)  # type: ignore[attr-defined]
        return self.fake

    def azure(self, **changes: Any) -> AzureProvider:
        provider = AzureProvider(as_node_reactor(global_reactor), fake_config(self.url, **changes), policy=FAST,
                                 token_policy=FAST)
        self.addCleanup(provider.teardown)  # type: ignore[attr-defined]
        return provider

    def leftover_names(self, names: list[str]) -> list[str]:
        """Every resource (VM, NIC, public IP, disk) the fake still holds for these VM names."""
        return sorted(r["name"] for r in self.fake.resources.values()
                      if any(r["name"] == n or r["name"].startswith(n + "-") for n in names))


class AzureContractTests(AzureTestMixin, ProviderContractMixin, TestCase):
    async def make_provider(self) -> IProvider:
        await self.start_fake()
        self.provider = self.azure()
        return self.provider

    def impossible_spec(self) -> tuple[InstanceSpec, ErrorKind]:
        return InstanceSpec(vcpus=512, memory_mib=4 * 1024 * 1024), ErrorKind.INVALID_CONFIG

    async def leftovers(self, names: list[str]) -> list[str]:
        return self.leftover_names(names)

    async def check_running(self, instance: Any, user_data: bytes) -> None:
        vm = self.fake.resources[instance.id.lower()]
        self.assertEqual(vm["properties"]["provisioningState"], "Succeeded")
        self.assertEqual(base64.b64decode(vm["properties"]["userData"]), user_data)
        nic = self.fake.of_type("Microsoft.Network/networkInterfaces")[f"{instance.name}-net"]
        self.assertEqual(nic["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"], instance.ips[0])


class AzureBehaviourTests(AzureTestMixin, TestCase):
    async def test_vm_body_size_selection_and_tags(self) -> None:
        await self.start_fake()
        provider = self.azure(enable_secure_boot=True, root_volume_size=40, zone="2")
        pod, sid = unique_pod("az")
        instance = await provider.create_instance(pod, sid, b"#cloud-config\n", InstanceSpec(vcpus=3, memory_mib=9000))
        self.addCleanup(provider.delete_instance, instance.id)
        self.assertEqual(instance.id, provider.vm_path(instance.name))
        body = self.fake.bodies[instance.id.lower()]
        properties = body["properties"]
        # the smallest allowed size with 3 vCPUs and 9000 MiB, from the region's size list
        self.assertEqual(properties["hardwareProfile"]["vmSize"], "Standard_DC4as_v5")
        self.assertEqual(body["tags"], {"team": "caa"})
        self.assertEqual(body["zones"], ["2"])
        self.assertEqual(properties["securityProfile"], {
            "securityType": "ConfidentialVM", "uefiSettings": {"secureBootEnabled": True, "vTpmEnabled": True}})
        os_disk = properties["storageProfile"]["osDisk"]
        self.assertEqual((os_disk["name"], os_disk["diskSizeGB"], os_disk["deleteOption"]),
                         (f"{instance.name}-disk", 40, "Delete"))
        self.assertEqual(os_disk["managedDisk"]["securityProfile"], {"securityEncryptionType": "VMGuestStateOnly"})
        self.assertEqual(properties["storageProfile"]["imageReference"], {"id": azure_arm.IMAGE_ID})
        key = properties["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]
        self.assertEqual(key["path"], "/home/peerpod/.ssh/authorized_keys")
        self.assertTrue(key["keyData"].startswith("ssh-rsa "))
        # every ARM call carried its api-version (the fake rejects any without one), the LROs were followed
        self.assertIn(("GET", f"/subscriptions/{azure_arm.SUBSCRIPTION}/providers/Microsoft.Compute/locations/"
                              f"{azure_arm.REGION}/operations/"),
                      [(m, p.rsplit("/", 1)[0] + "/") for m, p in self.fake.requests])
        try:
            await provider.create_instance(*unique_pod("az"), b"", InstanceSpec(instance_type="Standard_D2s_v5"))
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("is not part of supported instance types list", str(e))
        else:
            self.fail("a size outside --instance-sizes was created")

    async def test_disable_cvm_public_ip_and_community_image(self) -> None:
        await self.start_fake()
        provider = self.azure(disable_cvm=True, use_public_ip=True, security_group_id=azure_arm.NSG_ID)
        pod, sid = unique_pod("azp")
        image = "/CommunityGalleries/caa-gallery/images/podvm/versions/latest"
        instance = await provider.create_instance(pod, sid, b"", InstanceSpec(image=image))
        body = self.fake.bodies[instance.id.lower()]
        self.assertNotIn("securityProfile", body["properties"])
        self.assertNotIn("securityProfile", body["properties"]["storageProfile"]["osDisk"]["managedDisk"])
        self.assertEqual(body["properties"]["storageProfile"]["imageReference"], {"communityGalleryImageId": image})
        self.assertEqual(len(instance.ips), 2)
        self.assertTrue(instance.ips[0].startswith("20.0.0."), instance.ips)  # the public IP first
        self.assertTrue(instance.ips[1].startswith("10.1.0."), instance.ips)
        nic = self.fake.bodies[provider.nic_path(instance.name).lower()]
        self.assertEqual(nic["properties"]["networkSecurityGroup"], {"id": azure_arm.NSG_ID})
        self.assertEqual(await provider.find_instance(instance.name), instance)
        await provider.delete_instance(instance.id)
        self.assertEqual(self.leftover_names([instance.name]), [])  # VM, NIC, public IP and disk all gone

    async def test_failed_vm_create_removes_the_nic(self) -> None:
        await self.start_fake()
        provider = self.azure()
        pod, sid = unique_pod("azf")
        name = provider.instance_name(pod, sid)
        image = f"/subscriptions/{azure_arm.SUBSCRIPTION}/resourceGroups/{azure_arm.GROUP}/providers/" \
                "Microsoft.Compute/images/no-such-image"
        try:
            await provider.create_instance(pod, sid, b"", InstanceSpec(image=image))
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("cannot be found", str(e))
            self.assertIsNone(e.instance_id)
        else:
            self.fail("a VM with a missing image was created")
        self.assertIn(("PUT", provider.nic_path(name)), self.fake.requests)  # the NIC was made ...
        self.assertEqual(self.leftover_names([name]), [])  # ... and removed again

    async def test_missing_gallery_image_is_invalid_config(self) -> None:
        await self.start_fake()
        provider = self.azure()
        pod, sid = unique_pod("azg")
        image = "/CommunityGalleries/caa-gallery/images/no-such-image/versions/latest"
        try:
            await provider.create_instance(pod, sid, b"", InstanceSpec(image=image))
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("GalleryImageNotFound: The gallery image", str(e))
        else:
            self.fail("a VM with a missing gallery image was created")
        self.assertEqual(self.leftover_names([provider.instance_name(pod, sid)]), [])

    async def test_ssh_key_file_checked_at_start_and_used(self) -> None:
        import os

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        await self.start_fake()
        path = self.mktemp()
        public = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        with open(path, "w") as f:
            f.write(public + "\n")
        for mode, text, message in ((0o644, public, "permissions are 644, not 600"),
                                    (0o600, "not a key", "not an SSH public key")):
            with open(path, "w") as f:
                f.write(text + "\n")
            os.chmod(path, mode)
            try:
                await self.azure(ssh_key_path=path).verify_config()  # upstream's ConfigVerifier: at start-up
            except ProviderError as e:
                self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
                self.assertIn("--ssh-key-path", str(e))
                self.assertIn(message, str(e))
            else:
                self.fail(f"a key file ({mode:o}, {text!r}) was accepted")
        with open(path, "w") as f:
            f.write(public + "\n")
        provider = self.azure(ssh_key_path=path)
        await provider.verify_config()
        instance = await provider.create_instance(*unique_pod("azk"), b"", InstanceSpec())
        self.addCleanup(provider.delete_instance, instance.id)
        key = self.fake.bodies[instance.id.lower()]["properties"]["osProfile"]["linuxConfiguration"]["ssh"]
        self.assertEqual(key["publicKeys"][0]["keyData"], public)

    async def test_failed_allocation_is_quota_and_rolled_back(self) -> None:
        await self.start_fake()
        provider = self.azure()
        pod, sid = unique_pod("aza")
        self.fake.fail_vm = ("AllocationFailed", "Allocation failed. We do not have sufficient capacity for the "
                                                 "requested VM size in this region.")
        try:
            await provider.create_instance(pod, sid, b"", InstanceSpec())
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.QUOTA)
            self.assertIn("Failed: AllocationFailed: Allocation failed", str(e))
        else:
            self.fail("a failed allocation was a success")
        name = provider.instance_name(pod, sid)
        self.assertIn(("DELETE", provider.vm_path(name)), self.fake.requests)  # ARM kept the failed VM: deleted
        self.assertEqual(self.leftover_names([name]), [])

    async def test_cancelled_create_rolls_back(self) -> None:
        await self.start_fake()
        provider = self.azure()
        pod, sid = unique_pod("azc")
        name = provider.instance_name(pod, sid)
        self.fake.hang_once("/operations/")  # the first LRO poll (the NIC's) never answers
        hung = self.fake.hung.wait()
        creating = provider.create_instance(pod, sid, b"", InstanceSpec())
        await hung
        self.assertIn(("PUT", provider.nic_path(name)), self.fake.requests)
        creating.cancel()
        error = await creating.addErrback(lambda f: f.value)
        self.assertIsInstance(error, CancelledError)
        self.assertIn(("DELETE", provider.nic_path(name)), self.fake.requests)  # rolled back
        self.assertEqual(self.leftover_names([name]), [])

    async def test_long_operations_and_expired_tokens(self) -> None:
        await self.start_fake(operation_polls=3)
        provider = self.azure()
        instance = await provider.create_instance(*unique_pod("azo"), b"", InstanceSpec())
        polls = [p for m, p in self.fake.requests if "/operations/" in p]
        self.assertGreaterEqual(len(polls), 3 * 2)  # NIC and VM, three InProgress answers each
        self.assertEqual(provider.tokens.fetches, 1)  # one token for all of it
        self.fake.expire_tokens()
        self.assertEqual(await provider.find_instance(instance.name), instance)  # refetched once, retried
        self.assertEqual(provider.tokens.fetches, 2)
        await provider.delete_instance(instance.id)
        self.assertIsNone(await provider.find_instance(instance.name))

    async def test_throttling_is_retried_after_retry_after(self) -> None:
        await self.start_fake()
        provider = self.azure()
        await provider.verify_config()
        self.fake.throttle(2)
        before = len(self.fake.requests)
        self.assertIsNone(await provider.find_instance("podvm-x-12345678"))
        self.assertEqual(len(self.fake.requests) - before, 3)  # two 429s, then the answer
        self.fake.throttle(100)
        try:
            await provider.find_instance("podvm-x-12345678")
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.TRANSIENT)
            self.assertIn("TooManyRequests", str(e))
        else:
            self.fail("a throttled call succeeded")

    async def test_bad_credentials_name_the_problem_and_never_the_secret(self) -> None:
        await self.start_fake()
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)  # a plain callable is a log observer
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        wrong = azure_arm.CLIENT_SECRET + "-wrong"
        provider = self.azure(client_secret=wrong)
        try:
            await provider.verify_config()
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)  # never retried
            self.assertIn("invalid_client", str(e))
            self.assertIn("AADSTS7000215", str(e))
            self.assertNotIn(wrong, str(e))
        else:
            self.fail("a wrong client secret was accepted")
        self.assertEqual(len(self.fake.token_requests), 1)
        self.assertEqual(self.fake.token_requests[0]["client_secret"], wrong)  # it was really sent ...
        logged = "\n".join(formatEvent(e) + repr(e) for e in events)
        self.assertNotIn(wrong, logged)  # ... and never logged
        self.assertEqual(repr(provider.config).count(wrong), 0)
        try:
            await self.azure(tenant_id="00000000-0000-0000-0000-000000000000").verify_config()
        except ProviderError as e:
            self.assertIn("AADSTS90002", str(e))
        else:
            self.fail("an unknown tenant was accepted")

    async def test_workload_identity_and_managed_identity(self) -> None:
        await self.start_fake()
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(azure_arm.FEDERATED_TOKEN + "\n")
        provider = self.azure(client_secret="", federated_token_file=path)
        self.assertIsNone(await provider.find_instance("podvm-x-12345678"))
        request = self.fake.token_requests[-1]
        self.assertEqual((request["client_assertion"], request["client_assertion_type"]),
                         (azure_arm.FEDERATED_TOKEN, "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"))
        self.assertNotIn("client_secret", request)
        managed = self.azure(client_secret="", client_id="")
        self.assertIsNone(await managed.find_instance("podvm-x-12345678"))
        self.assertEqual(len(self.fake.token_requests), 1)  # the IMDS answered this one
        try:
            await self.azure(client_secret="", federated_token_file=path + ".missing").verify_config()
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("AZURE_FEDERATED_TOKEN_FILE", str(e))
        else:
            self.fail("a missing federated token file was accepted")

    async def test_delete_of_foreign_or_malformed_ids(self) -> None:
        await self.start_fake()
        provider = self.azure()
        await provider.delete_instance("i-0123456789abcdef0")  # not a VM id: nothing to delete
        try:
            await provider.delete_instance(f"/subscriptions/{azure_arm.SUBSCRIPTION}/resourceGroups/other/providers/"
                                           "Microsoft.Compute/virtualMachines/podvm-a-12345678")
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
        else:
            self.fail("a VM of another resource group was deleted")
        self.assertEqual(self.fake.requests, [])


class AzureFakeRejectsTests(AzureTestMixin, TestCase):
    """The fake refuses what ARM refuses, with ARM's codes, and the client takes each as INVALID_CONFIG (never
    retried): no api-version, an api-version the resource type does not have, no bearer token, a body that is not
    JSON."""

    async def test_rejections(self) -> None:
        from caa.providers.rest import RestRequest

        await self.start_fake()
        provider = self.azure()
        arm = provider.arm
        vm = provider.vm_path("podvm-x-12345678")
        cases = [
            (RestRequest("GET", f"{self.url}{vm}"), True, "MissingApiVersionParameter"),
            (RestRequest("GET", f"{self.url}{vm}?api-version=2015-01-01"), True, "InvalidApiVersionParameter"),
            (RestRequest("GET", f"{self.url}{vm}?api-version=2024-03-01"), False, "AuthenticationFailed"),
            (RestRequest("PUT", f"{self.url}{vm}?api-version=2024-03-01", {"Content-Type": "application/json"},
                         b"{not json"), True, "InvalidRequestContent"),
        ]
        for request, signed, code in cases:
            before = len(self.fake.requests)
            try:
                await arm.rest.call(request, error_of=arm.arm_error, sign=arm.sign if signed else None)
            except ProviderError as e:
                self.assertIs(e.kind, ErrorKind.INVALID_CONFIG, str(e))
                self.assertIn(code, str(e))
            else:
                self.fail(f"{request.method} {request.url} was accepted")
            self.assertEqual(len(self.fake.requests) - before, 1)  # not retried


class AzureFakeAdminNameTests(AzureTestMixin, TestCase):
    async def test_reserved_admin_name_is_refused_by_arm(self) -> None:
        """What the start-up check spares the user: ARM refuses the VM (the fake, as ARM does)."""
        from caa.providers.azure.provider import nic_body, vm_body

        await self.start_fake()
        provider = self.azure(ssh_username="admin")  # no check(): straight to ARM
        name = "podvm-admin-12345678"
        await provider.arm.put(provider.nic_path(name), "2023-09-01", nic_body(provider.config, ""), 10, "nic")
        body = vm_body(provider.config, name, "Standard_DC2as_v5", azure_arm.IMAGE_ID, b"", provider.nic_path(name),
                       "ssh-rsa AAAA")
        try:
            await provider.arm.put(provider.vm_path(name), "2024-03-01", body, 10, "vm")
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("InvalidParameter: The Admin Username specified is not allowed.", str(e))
        else:
            self.fail("ARM took 'admin' as admin user")


class AzureBodyTests(TestCase):
    def test_user_data_limit(self) -> None:
        from caa.providers.azure.provider import vm_body

        config = fake_config("http://127.0.0.1:1")
        nic = "/subscriptions/s/resourceGroups/g/providers/Microsoft.Network/networkInterfaces/vm-net"
        body = vm_body(config, "vm", "Standard_DC2as_v5", azure_arm.IMAGE_ID, b"x" * 49152, nic, "ssh-rsa AAAA")
        self.assertEqual(len(body["properties"]["userData"]), 65536)  # exactly at the limit: accepted
        with self.assertRaises(ProviderError) as raised:
            vm_body(config, "vm", "Standard_DC2as_v5", azure_arm.IMAGE_ID, b"x" * 49153, nic, "ssh-rsa AAAA")
        self.assertIs(raised.exception.kind, ErrorKind.INVALID_CONFIG)
        self.assertEqual(str(raised.exception), "base64 encoded userData is greater than 64KB")


class AzureOptionsTests(TestCase):
    def environ(self) -> dict[str, str]:
        return {"AZURE_SUBSCRIPTION_ID": azure_arm.SUBSCRIPTION, "AZURE_REGION": "eastus",
                "AZURE_RESOURCE_GROUP": "rg", "AZURE_SUBNET_ID": azure_arm.SUBNET_ID,
                "AZURE_IMAGE_ID": azure_arm.IMAGE_ID, "AZURE_CLIENT_SECRET": "s3cret-value",
                "AZURE_CLIENT_ID": "c", "AZURE_TENANT_ID": "t", "AZURE_INSTANCE_SIZES": "a, b",
                "TAGS": "k=v,k2=v2", "ENABLE_SECURE_BOOT": "true"}

    def test_env_and_defaults(self) -> None:
        options = AzureOptions(self.environ())
        options.parseOptions(["--ssh-username", "caa-admin"])
        config = AzureConfig.from_options(options)
        self.assertEqual((config.instance_size, config.instance_sizes, config.tags, config.enable_secure_boot,
                          config.ssh_username, config.root_volume_size, config.disable_cvm),
                         ("Standard_DC2as_v5", ("a", "b"), (("k", "v"), ("k2", "v2")), True, "caa-admin", 0, False))
        # upstream marks --clientid, --secret and --tenantid Secret(): masked wherever the config is shown
        environ = dict(self.environ(), AZURE_CLIENT_ID="client-id-value", AZURE_TENANT_ID="tenant-id-value")
        options = AzureOptions(environ)
        options.parseOptions([])
        config = AzureConfig.from_options(options)
        for name in ("clientid", "secret", "tenantid"):
            self.assertEqual(options.redacted()[name], "**********")
        for value in ("s3cret-value", "client-id-value", "tenant-id-value"):
            self.assertNotIn(value, repr(config))
            self.assertNotIn(value, repr(config.redacted()))
            self.assertIn(value, config.secrets())

    def test_missing_required_option_is_named(self) -> None:
        from twisted.python import usage

        for variable, flag in (("AZURE_SUBSCRIPTION_ID", "--subscriptionid"), ("AZURE_REGION", "--region"),
                               ("AZURE_RESOURCE_GROUP", "--resourcegroup"), ("AZURE_SUBNET_ID", "--subnetid"),
                               ("AZURE_IMAGE_ID", "--imageid")):
            environ = self.environ()
            del environ[variable]
            with self.assertRaises(usage.UsageError) as raised:
                AzureOptions(environ).parseOptions([])
            self.assertIn(flag, str(raised.exception))
            self.assertIn(variable, str(raised.exception))
        with self.assertRaises(usage.UsageError) as raised:
            AzureOptions(dict(self.environ(), SSH_USERNAME="root")).parseOptions([])
        self.assertIn("--ssh-username (SSH_USERNAME) 'root' is not allowed", str(raised.exception))
        environ = dict(self.environ(), AZURE_SUBNET_ID="subnet-1")
        with self.assertRaises(usage.UsageError) as raised:
            AzureOptions(environ).parseOptions([])
        self.assertIn("not a subnet's ARM id", str(raised.exception))

    def test_help_hides_the_secret(self) -> None:
        options = AzureOptions(dict(self.environ(), AZURE_CLIENT_SECRET="very-secret-value",
                                    AZURE_CLIENT_ID="client-id-value", AZURE_TENANT_ID="tenant-id-value"))
        for value in ("very-secret-value", "client-id-value", "tenant-id-value"):
            self.assertNotIn(value, str(options))
            self.assertNotIn(value, repr(options.usage_rows()))

    def test_authority_host_without_scheme_is_https(self) -> None:
        options = AzureOptions({**self.environ(), "AZURE_AUTHORITY_HOST": "login.microsoftonline.us/"})
        options.parseOptions([])
        self.assertEqual(AzureConfig.from_options(options).authority_host, "https://login.microsoftonline.us")
        # as the AKS workload identity webhook sets it
        options = AzureOptions({**self.environ(), "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/"})
        options.parseOptions([])
        self.assertEqual(AzureConfig.from_options(options).authority_host, "https://login.microsoftonline.com")
