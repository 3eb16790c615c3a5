"""The IBM Cloud VPC provider against tests/fakes/ibmcloud.py over real HTTP: the provider contract, the instance
prototype (TDX and secure boot, profiles, images by architecture, second NIC, dedicated host), global tags,
throttling, bad credentials, IAM token caching and refresh, trusted profiles, and the options."""

from __future__ import annotations

import json
import os
import urllib.error
from typing import Any

import attrs
from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from caa.k8s.client import connect
from caa.providers.ibmcloud.config import IbmCloudConfig, IbmCloudOptions
from caa.providers.ibmcloud.discovery import from_labels
from caa.providers.ibmcloud.provider import IbmCloudProvider, instance_ips
from caa.providers.interfaces import ErrorKind, Instance, InstanceSpec, IProvider, ProviderError
from caa.providers.redact import MASK
from caa.providers.rest import RetryPolicy
from caa.reactors import as_node_reactor
from tests.fakes.ibmcloud import API_KEY, CR_TOKEN, PROFILE_ID, FakeIbmCloud
from tests.kubeapi import shared_server
from tests.moto_server import serve
from tests.test_providers_contract import ProviderContractMixin, unique_pod

FAST = RetryPolicy(attempts=4, base=0.01, cap=0.05, attempt_timeout=10.0, call_timeout=30.0)


class IbmTestMixin:
    fake: FakeIbmCloud
    url: str

    async def start_fake(self, **kw: Any) -> FakeIbmCloud:
        case: Any = self
        self.fake = FakeIbmCloud(**kw)
        self.url, port = await serve(self.fake)
        case.addCleanup(port.stopListening)
        return self.fake

    def ibm(self, token_clock: Any = None, **changes: Any) -> IbmCloudProvider:
        case: Any = self
        config = IbmCloudConfig(api_key=API_KEY, iam_url=f"{self.url}/identity/token", vpc_url=f"{self.url}/v1",
                                tagging_url=self.url, containers_url=f"{self.url}/global", profile_name="bx2-2x8",
                                profile_list=("bx2-2x8", "bx2-4x16"),
                                zone="us-south-1", subnet_id="0717-subnet-1", vpc_id="r006-vpc-1",
                                image_ids=("r006-image-amd64", "r006-image-s390x"), poll_interval=0.05,
                                boot_timeout=10.0)
        provider = IbmCloudProvider(as_node_reactor(global_reactor), attrs.evolve(config, **changes), policy=FAST,
                                    token_clock=token_clock)
        case.addCleanup(provider.teardown)
        return provider


class IbmCloudContractTests(IbmTestMixin, ProviderContractMixin, TestCase):
    async def make_provider(self) -> IProvider:
        await self.start_fake()
        self.provider = self.ibm()
        await self.provider.verify_config()
        return self.provider

    def impossible_spec(self) -> tuple[InstanceSpec, ErrorKind]:
        return InstanceSpec(vcpus=512, memory_mib=4 * 1024 * 1024), ErrorKind.INVALID_CONFIG

    async def leftovers(self, names: list[str]) -> list[str]:
        return [i["name"] for i in self.fake.instances.values() if i["name"] in names]

    async def check_running(self, instance: Instance, user_data: bytes) -> None:
        self.assertEqual(self.fake.instances[instance.id]["status"], "running")
        proto = self.fake.prototypes[instance.id]
        self.assertEqual(proto["user_data"].encode(), user_data)
        self.assertEqual((proto["confidential_compute_mode"], proto["enable_secure_boot"]), ("disabled", False))


class IbmCloudBehaviourTests(IbmTestMixin, TestCase):
    async def test_prototype_cvm_profiles_images_nics_tags_and_host(self) -> None:
        fake = await self.start_fake()
        provider = self.ibm(disable_cvm=False, cluster_id="c123", tags=("team:caa",), key_id="r006-key",
                            profile_list=("bx2-2x8", "bx2-4x16", "bz2-2x8"), secondary_subnet_id="0717-subnet-2",
                            secondary_security_group_id="r006-sg-2", security_group_ids=("r006-sg-1",),
                            dedicated_host_ids=("0717-dh-other", "0717-dh-ours"),
                            dedicated_host_group_ids=("0717-dhg-ours",))
        instance = await provider.create_instance(*unique_pod("ibm"), b"#cloud-config\n",
                                                  InstanceSpec(vcpus=3, memory_mib=10000))
        proto = fake.prototypes[instance.id]
        self.assertEqual((proto["confidential_compute_mode"], proto["enable_secure_boot"]), ("tdx", True))
        self.assertEqual(proto["profile"], {"name": "bx2-4x16"})  # smallest fit of 3 vCPUs and 10000 MiB
        self.assertEqual(proto["image"], {"id": "r006-image-amd64"})
        self.assertEqual(proto["keys"], [{"id": "r006-key"}])
        self.assertEqual(proto["placement_target"], {"id": "0717-dh-ours"})  # the host in our zone
        self.assertEqual(proto["primary_network_interface"]["security_groups"],
                         [{"id": "r006-sg-1"}, {"id": "r006-sg-kube-c123"}])  # the cluster's group appended
        self.assertEqual(proto["network_interfaces"], [{"subnet": {"id": "0717-subnet-2"}, "allow_ip_spoofing": True,
                                                        "security_groups": [{"id": "r006-sg-2"}]}])
        self.assertEqual(len(instance.ips), 2)  # both NICs' addresses, the primary first
        primary = fake.instances[instance.id]["primary_network_interface"]["primary_ip"]["address"]
        self.assertEqual(instance.ips[0], primary)
        self.assertEqual(fake.tags[fake.instances[instance.id]["crn"]], ["coco-pod-vm:c123", "team:caa"])
        s390x = await provider.create_instance(*unique_pod("ibm"), b"", InstanceSpec(instance_type="bz2-2x8"))
        self.assertEqual(fake.prototypes[s390x.id]["image"], {"id": "r006-image-s390x"})  # by the profile's arch
        chosen = await provider.create_instance(*unique_pod("ibm"), b"", InstanceSpec(image="r006-image-s390x"))
        self.assertEqual(fake.prototypes[chosen.id]["image"], {"id": "r006-image-s390x"})
        later = await provider.create_instance(*unique_pod("ibm"), b"", InstanceSpec())
        self.assertEqual(fake.prototypes[later.id]["image"], {"id": "r006-image-amd64"})  # the annotation did not stick
        for i in (instance, s390x, chosen, later):
            await provider.delete_instance(i.id)
        self.assertEqual(fake.instances, {})

    async def test_cluster_without_its_security_group_fails_to_start(self) -> None:
        await self.start_fake()
        try:
            await self.ibm(cluster_id="c404").verify_config()
        except ProviderError as e:
            self.assertIn("cluster_not_found", str(e))
        else:
            self.fail("a cluster unknown to the Kubernetes Service was accepted")

    async def test_throttling_is_retried(self) -> None:
        fake = await self.start_fake()
        provider = self.ibm()
        await provider.verify_config()
        fake.throttle = 2
        instance = await provider.create_instance(*unique_pod("ibm"), b"", InstanceSpec())
        self.assertEqual(fake.calls.count(("POST", "/v1/instances")), 3)
        fake.throttle = 10  # more than the policy's attempts: a TRANSIENT error naming the call
        try:
            await provider.delete_instance(instance.id)
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.TRANSIENT)
            self.assertIn("too_many_requests", str(e))
        else:
            self.fail("a throttled delete succeeded")
        fake.throttle = 0
        await provider.delete_instance(instance.id)

    async def test_bad_api_key_is_invalid_config_without_the_key(self) -> None:
        await self.start_fake()
        wrong = "wrong-key-abcdefgh"
        provider = self.ibm(api_key=wrong)
        try:
            await provider.verify_config()
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("BXNIM0415E", str(e))
            self.assertNotIn(wrong, str(e))
        else:
            self.fail("a wrong API key was accepted")
        self.assertEqual(self.fake.token_requests, 1)  # a 400 is not retried

    async def test_token_cached_and_refreshed_before_expiry(self) -> None:
        clock = Clock()
        fake = await self.start_fake(clock=clock, token_lifetime=100)
        provider = self.ibm(token_clock=clock)
        await provider.verify_config()
        self.assertEqual(fake.token_requests, 1)
        clock.advance(50)
        await provider.find_instance("podvm-x-12345678")
        self.assertEqual(fake.token_requests, 1)  # still fresh: cached
        clock.advance(35)  # 85 s of 100: past the 80 % mark, before expiry
        await provider.find_instance("podvm-x-12345678")
        self.assertEqual((fake.token_requests, fake.rejected_tokens), (2, 0))

    async def test_trusted_profile_with_projected_token(self) -> None:
        fake = await self.start_fake()
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(CR_TOKEN + "\n")
        provider = self.ibm(api_key="", iam_profile_id=PROFILE_ID, cr_token_file=path)
        await provider.verify_config()
        self.assertEqual(fake.token_requests, 1)
        missing = self.ibm(api_key="", iam_profile_id=PROFILE_ID, cr_token_file="/nonexistent/token")
        try:
            await missing.verify_config()
        except ProviderError as e:
            self.assertIn("/nonexistent/token", str(e))
        else:
            self.fail("a missing projected token file was accepted")

    async def test_fake_rejects_calls_without_version(self) -> None:
        import treq

        await self.start_fake()
        response = await treq.get(f"{self.url}/v1/instances?generation=2", persistent=False)
        self.assertEqual(response.code, 401)  # no token first
        provider = self.ibm()
        token = await provider.iam.token()
        response = await treq.get(f"{self.url}/v1/instances?generation=2", persistent=False,
                                  headers=Headers({"Authorization": [f"Bearer {token}"]}))
        body = await response.json()
        self.assertEqual((response.code, body["errors"][0]["code"]), (400, "missing_version"))


class IbmCloudOptionsTests(SynchronousTestCase):
    def test_missing_required_options_name_themselves(self) -> None:
        e = self.assertRaises(usage.UsageError, IbmCloudOptions({}).parseOptions, [])
        self.assertIn("--api-key (IBMCLOUD_API_KEY) or --iam-profile-id", str(e))
        env = {"IBMCLOUD_API_KEY": API_KEY, "IBMCLOUD_VPC_ENDPOINT": "https://x/v1", "IBMCLOUD_ZONE": "z",
               "IBMCLOUD_VPC_SUBNET_ID": "s", "IBMCLOUD_VPC_ID": "v", "IBMCLOUD_PODVM_INSTANCE_PROFILE_NAME": "p"}
        e = self.assertRaises(usage.UsageError, IbmCloudOptions(env).parseOptions, [])
        self.assertIn("--image-id (IBMCLOUD_PODVM_IMAGE_ID) is required", str(e))
        self.assertNotIn(API_KEY, str(e))
        options = IbmCloudOptions({**env, "IBMCLOUD_PODVM_IMAGE_ID": "a,b"})
        options.parseOptions(["--disable-cvm=false"])
        config = IbmCloudConfig.from_options(options)
        self.assertEqual((config.image_ids, config.disable_cvm, config.iam_url),
                         (("a", "b"), False, "https://iam.cloud.ibm.com/identity/token"))
        self.assertEqual(options.redacted()["api-key"], MASK)
        self.assertNotIn(API_KEY, repr(config) + repr(config.redacted()))
        self.assertTrue(IbmCloudOptions({})["disable-cvm"])  # upstream's default: no CVM

    def test_ips_wait_for_every_nic(self) -> None:
        body = {"primary_network_interface": {"id": "a", "primary_ip": {"address": "10.0.0.1"}},
                "network_interfaces": [{"id": "a", "primary_ip": {"address": "10.0.0.1"}},
                                       {"id": "b", "primary_ip": {"address": "0.0.0.0"}}]}
        self.assertIsNone(instance_ips(body))
        body["network_interfaces"][1]["primary_ip"]["address"] = "10.0.1.1"  # type: ignore[index]
        self.assertEqual(instance_ips(body), ("10.0.0.1", "10.0.1.1"))


class IbmCloudDiscoveryTests(IbmTestMixin, TestCase):
    """Start-up discovery from the real kube-apiserver (tests/kubeapi.py): cluster id, zone and subnet from the
    cluster, VPC and resource group from the subnet."""

    timeout = 120

    def setUp(self) -> None:
        self.server = shared_server(self)
        self.node = f"ibm-node-{os.getpid()}-{id(self) % 100000}"
        pool = ThreadPool(minthreads=0, maxthreads=2, name="ibm-discovery-test")
        pool.start()
        self.addCleanup(pool.stop)
        self.kube = connect(as_node_reactor(global_reactor), pool, str(self.server.admin_kubeconfig))
        self.addCleanup(self.kube.close)

    def add_node(self, labels: dict[str, str]) -> None:
        self.server.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                      "metadata": {"name": self.node, "labels": labels}})
        self.addCleanup(self.server.request, "DELETE", f"/api/v1/nodes/{self.node}")

    async def test_discovered_from_node_labels_cluster_info_and_subnet(self) -> None:
        fake = await self.start_fake()
        self.add_node({"topology.kubernetes.io/region": "us-south", "topology.kubernetes.io/zone": "us-south-1",
                       "ibm-cloud.kubernetes.io/subnet-id": "0717-subnet-2"})
        cluster = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cluster-info"},
                   "data": {"cluster-config.json": json.dumps({"cluster_id": "cl-iks-42", "name": "iks"})}}
        try:
            self.server.request("POST", "/api/v1/namespaces/kube-system/configmaps", cluster)
        except urllib.error.HTTPError as e:
            if e.code != 409:
                raise
            self.server.request("PUT", "/api/v1/namespaces/kube-system/configmaps/cluster-info", cluster)
        provider = IbmCloudProvider(as_node_reactor(global_reactor), IbmCloudConfig(
            api_key=API_KEY, iam_url=f"{self.url}/identity/token", vpc_url=f"{self.url}/v1", tagging_url=self.url,
            containers_url=f"{self.url}/global", profile_name="bx2-2x8", image_ids=("r006-image-amd64",),
            node_name=self.node, poll_interval=0.05),
            policy=FAST, kube=self.kube)
        self.addCleanup(provider.teardown)
        instance = await provider.create_instance(*unique_pod("ibm"), b"", InstanceSpec())
        proto = fake.prototypes[instance.id]
        self.assertEqual((proto["zone"], proto["primary_network_interface"]["subnet"], proto["vpc"],
                          proto["resource_group"]),
                         ({"name": "us-south-1"}, {"id": "0717-subnet-2"}, {"id": "r006-vpc-1"}, {"id": "rg-0001"}))
        self.assertEqual(fake.tags[fake.instances[instance.id]["crn"]], ["coco-pod-vm:cl-iks-42"])
        self.assertEqual(proto["primary_network_interface"]["security_groups"], [{"id": "r006-sg-kube-cl-iks-42"}])
        await provider.delete_instance(instance.id)

    async def test_zone_nowhere_is_upstreams_error(self) -> None:
        await self.start_fake()
        self.add_node({"topology.kubernetes.io/region": "us-south"})
        provider = IbmCloudProvider(as_node_reactor(global_reactor), IbmCloudConfig(
            api_key=API_KEY, iam_url=f"{self.url}/identity/token", vpc_url=f"{self.url}/v1",
            profile_name="bx2-2x8", image_ids=("r006-image-amd64",), node_name=self.node), policy=FAST,
            kube=self.kube)
        self.addCleanup(provider.teardown)
        try:
            await provider.verify_config()
        except ProviderError as e:
            self.assertIn("zone was not provided and could not detect automatically", str(e))
        else:
            self.fail("started without a zone")

    def test_region_label_names_the_endpoint(self) -> None:
        config = from_labels(IbmCloudConfig(), {"topology.kubernetes.io/region": "eu-de",
                                                "ibm-provider.kubernetes.io/subnet-id": "02b7-sub"})
        self.assertEqual((config.vpc_url, config.subnet_id, config.zone),
                         ("https://eu-de.iaas.cloud.ibm.com/v1", "02b7-sub", ""))
