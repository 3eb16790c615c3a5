"""The PowerVS provider against tests/fakes/powervs.py over real HTTP: the provider contract, sizing (pod vCPUs and
memory rounded up, a validated `<systype>-<cpus>x<memGB>`, the defaults), ERROR and build timeouts rolled back,
DHCP leases, the 47-character names, throttling, bad credentials, and the options."""

from __future__ import annotations

import base64
from typing import Any

import attrs
from twisted.internet import reactor as global_reactor
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from caa.providers.ibmcloud_powervs.config import PowerVSConfig, PowerVSOptions, Sizing, region_of
from caa.providers.ibmcloud_powervs.provider import PowerVSProvider
from caa.providers.interfaces import ErrorKind, Instance, InstanceSpec, InvalidConfig, IProvider, ProviderError
from caa.providers.redact import MASK
from caa.providers.rest import RetryPolicy
from caa.reactors import as_node_reactor
from tests.fakes.ibmcloud import API_KEY
from tests.fakes.powervs import DHCP_NETWORK, IMAGE, NETWORK, WORKSPACE, ZONE, FakePowerVS
from tests.moto_server import serve
from tests.reactors import NodeMemoryReactor
from tests.test_providers_contract import ProviderContractMixin, unique_pod

FAST = RetryPolicy(attempts=4, base=0.01, cap=0.05, attempt_timeout=10.0, call_timeout=30.0)


class PowerVSTestMixin:
    fake: FakePowerVS
    url: str

    async def start_fake(self, **kw: Any) -> FakePowerVS:
        case: Any = self
        self.fake = FakePowerVS(**kw)
        self.url, port = await serve(self.fake)
        case.addCleanup(port.stopListening)
        return self.fake

    def pvs(self, **changes: Any) -> PowerVSProvider:
        case: Any = self
        config = PowerVSConfig(api_key=API_KEY, zone=ZONE, service_instance_id=WORKSPACE, network_id=NETWORK,
                               image_id=IMAGE, iam_url=f"{self.url}/identity/token", iam_identity_url=self.url,
                               endpoint=self.url, poll_interval=0.02, build_timeout=10.0, dhcp_timeout=5.0)
        provider = PowerVSProvider(as_node_reactor(global_reactor), attrs.evolve(config, **changes), policy=FAST)
        case.addCleanup(provider.teardown)
        return provider


class PowerVSContractTests(PowerVSTestMixin, ProviderContractMixin, TestCase):
    async def make_provider(self) -> IProvider:
        await self.start_fake()
        self.provider = self.pvs()
        await self.provider.verify_config()
        return self.provider

    def impossible_spec(self) -> tuple[InstanceSpec, ErrorKind]:
        return InstanceSpec(instance_type="s922-2x"), ErrorKind.INVALID_CONFIG  # upstream panics on this

    async def leftovers(self, names: list[str]) -> list[str]:
        return [i["serverName"] for i in self.fake.pvm.values() if i["serverName"] in names]

    async def check_running(self, instance: Instance, user_data: bytes) -> None:
        item = self.fake.pvm[instance.id]
        self.assertEqual((item["status"], item["networks"][0]["ipAddress"]), ("ACTIVE", instance.ips[0]))
        self.assertEqual(base64.b64decode(self.fake.bodies[instance.id]["userData"]), user_data)


class PowerVSBehaviourTests(PowerVSTestMixin, TestCase):
    async def test_sizing_names_public_ip_and_dhcp(self) -> None:
        fake = await self.start_fake()
        provider = self.pvs(ssh_key="key1")
        pod, sid = "a-very-long-pod-name-that-goes-on-and-on-and-on", "0123456789abcdef" * 4
        sized = await provider.create_instance(pod, sid, b"", InstanceSpec(vcpus=2, memory_mib=5000))
        body = fake.bodies[sized.id]
        self.assertEqual((body["processors"], body["memory"], body["sysType"], body["keyPairName"]),
                         (2.0, 5.0, "s922", "key1"))  # 5000 MiB rounds up to 5 GB (upstream: 4)
        self.assertLessEqual(len(sized.name), 47)
        self.assertEqual(sized.name, provider.instance_name(pod, sid))
        typed = await provider.create_instance(*unique_pod("pvs"), b"", InstanceSpec(instance_type="e980-0.5x4"))
        self.assertEqual((fake.bodies[typed.id]["processors"], fake.bodies[typed.id]["memory"],
                          fake.bodies[typed.id]["sysType"]), (0.5, 4.0, "e980"))
        default = await provider.create_instance(*unique_pod("pvs"), b"", InstanceSpec())
        self.assertEqual((fake.bodies[default.id]["processors"], fake.bodies[default.id]["memory"]), (0.5, 2.0))
        public = self.pvs(use_public_ip=True)
        outside = await public.create_instance(*unique_pod("pvs"), b"", InstanceSpec())
        self.assertEqual(outside.ips, (fake.pvm[outside.id]["networks"][0]["externalIP"],))
        dhcp = self.pvs(network_id=DHCP_NETWORK)
        leased = await dhcp.create_instance(*unique_pod("pvs"), b"", InstanceSpec())
        mac = fake.pvm[leased.id]["networks"][0]["macAddress"]
        self.assertEqual(leased.ips, tuple(lease["instanceIP"] for lease in fake.leases
                                           if lease["instanceMacAddress"] == mac))
        for i in (sized, typed, default, outside, leased):
            await provider.delete_instance(i.id)
        self.assertEqual(fake.pvm, {})

    async def test_error_and_build_timeout_roll_back(self) -> None:
        fake = await self.start_fake()
        provider = self.pvs()
        pod, sid = unique_pod("pvs")
        fake.fail_names.add(provider.instance_name(pod, sid))
        try:
            await provider.create_instance(pod, sid, b"", InstanceSpec())
        except ProviderError as e:
            self.assertIn("No valid host was found", str(e))
            self.assertIsNone(e.instance_id)  # rolled back
        else:
            self.fail("an instance in ERROR was returned")
        fake.build_polls = 10**6
        slow = self.pvs(build_timeout=0.2)
        try:
            await slow.create_instance(*unique_pod("pvs"), b"", InstanceSpec())
        except ProviderError as e:
            self.assertEqual((e.kind, "not ACTIVE after" in str(e)), (ErrorKind.TRANSIENT, True))
        else:
            self.fail("a VM still building was returned")
        self.assertEqual(fake.pvm, {})

    async def test_throttling_and_bad_key(self) -> None:
        fake = await self.start_fake()
        provider = self.pvs()
        await provider.verify_config()
        fake.throttle = 2
        instance = await provider.create_instance(*unique_pod("pvs"), b"", InstanceSpec())
        self.assertEqual(fake.calls.count(("POST", f"/pcloud/v1/cloud-instances/{WORKSPACE}/pvm-instances")), 3)
        await provider.delete_instance(instance.id)
        await provider.delete_instance(instance.id)  # 404: a success
        wrong = "wrong-powervs-key-123"
        try:
            await self.pvs(api_key=wrong).verify_config()
        except ProviderError as e:
            self.assertEqual((e.kind, "BXNIM0415E" in str(e), wrong in str(e)), (ErrorKind.INVALID_CONFIG, True, False))
        else:
            self.fail("a wrong API key was accepted")


class PowerVSUnitTests(SynchronousTestCase):
    def test_machine_type_validated_not_panicking(self) -> None:
        config = PowerVSConfig(sys_type="s922", processors=0.5, memory_gb=2)
        self.assertEqual(config.sizing(InstanceSpec(instance_type="s1022-4x32")), Sizing(4.0, 32.0, "s1022"))
        for bad in ("s922", "s922-2", "s922-x8", "s922-2x", "-2x8", "s922-0x8", "S922-2x8", "s922-2x8x1"):
            e = self.assertRaises(InvalidConfig, config.sizing, InstanceSpec(instance_type=bad))
            self.assertIn(repr(bad), str(e))
        self.assertEqual(config.sizing(InstanceSpec(vcpus=3, memory_mib=2048)), Sizing(3.0, 2.0, "s922"))
        self.assertEqual(config.sizing(InstanceSpec(vcpus=3)), Sizing(0.5, 2.0, "s922"))  # both or neither

    def test_volumes_and_second_nic_refused_before_any_call(self) -> None:
        provider = PowerVSProvider(NodeMemoryReactor(), PowerVSConfig(api_key="k" * 8))
        for spec in (InstanceSpec(volumes=("vol-1",)), InstanceSpec(multi_nic=True)):
            failure = self.failureResultOf(provider.create_instance("p", "0" * 64, b"", spec), InvalidConfig)
            self.assertIn("not supported", str(failure.value))

    def test_options_and_region(self) -> None:
        e = self.assertRaises(usage.UsageError, PowerVSOptions({}).parseOptions, [])
        self.assertIn("--api-key (IBMCLOUD_API_KEY) is required", str(e))
        env = {"IBMCLOUD_API_KEY": API_KEY, "POWERVS_ZONE": "dal12", "POWERVS_SERVICE_INSTANCE_ID": "w",
               "POWERVS_NETWORK_ID": "n", "POWERVS_IMAGE_ID": "i", "POWERVS_BUILD_TIMEOUT": "5m"}
        options = PowerVSOptions(env)
        options.parseOptions(["--cpu", "1.5"])
        config = PowerVSConfig.from_options(options)
        self.assertEqual((config.build_timeout, config.processors, config.memory_gb, config.proc_type,
                          config.api), (300.0, 1.5, 2.0, "shared", "https://dal.power-iaas.cloud.ibm.com"))
        self.assertEqual(options.redacted()["api-key"], MASK)
        self.assertRaises(usage.UsageError, PowerVSOptions(env).parseOptions, ["--memory", "-1"])
        e = self.assertRaises(usage.UsageError, PowerVSOptions(env).parseOptions, ["--proc-type", "fast"])
        self.assertIn("--proc-type", str(e))
        self.assertEqual([region_of(z) for z in ("dal12", "eu-de-1", "us-south", "lon04")],
                         ["dal", "eu-de", "us-south", "lon"])
