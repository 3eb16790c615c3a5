"""
The local provider: options, and the provider contract on this host (root): each instance a netns on a
bridge running caa-process-user-data, the development agent and a real caa-forwarder; the test calls the
agent through the forwarder on the instance IP (grpc.Health/Version, ListInterfaces of the pod netns).
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import subprocess
import tempfile
from typing import Any

import attrs
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from caa.proto import agent_pb2, health_pb2
from caa.providers.interfaces import ErrorKind, Instance, InstanceSpec, InvalidConfig
from caa.providers.local import LocalConfig, LocalOptions, LocalProvider, LocalProviderFactory
from caa.reactors import as_node_reactor
from caa.ttrpc import connect
from tests.test_providers_contract import ProviderContractMixin, unique_pod

APF_USER_DATA = b"""#cloud-config
write_files:
  - path: /run/peerpod/apf.json
    content: |
      {}
"""

_counter = itertools.count(1)


def _skip() -> None:
    if os.environ.get("CI"):
        return
    if os.geteuid() != 0:
        raise SkipTest("needs root (network namespaces)")
    if shutil.which("ip") is None:
        raise SkipTest("needs iproute2")


def _free_subnet() -> str:
    """A /24 in 10.123.0.0/16 that no route of this host uses (under a machine-wide lock)."""
    routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
    start = (os.getpid() * 7 + next(_counter)) % 250
    for offset in range(250):
        third = (start + offset) % 250 + 1
        if f"10.123.{third}." not in routes:
            return f"10.123.{third}.0/24"
    raise RuntimeError("no free 10.123.x.0/24")


class OptionsTests(SynchronousTestCase):
    def test_defaults_and_env(self) -> None:
        options = LocalOptions(environ={})
        options.parseOptions([])
        self.assertEqual(LocalConfig.from_options(options), LocalConfig())
        env = {"LOCAL_BRIDGE": "br9", "LOCAL_SUBNET": "10.9.0.0/24", "LOCAL_STATE_DIR": "/tmp/x",
               "LOCAL_AGENT_COMMAND": "agent --x", "FORWARDER_PORT": "15151", "LOCAL_FORWARDER_ARGS": "--disable-tls",
               "LOCAL_BOOT_TIMEOUT": "5s"}
        options = LocalOptions(environ=env)
        options.parseOptions(["--local-bridge", "br8"])
        self.assertEqual(
            LocalConfig.from_options(options),
            LocalConfig("br8", "10.9.0.0/24", "/tmp/x", "agent --x", 15151, "--disable-tls", 5.0),
        )
        self.assertEqual(LocalConfig(subnet="10.9.0.0/24").gateway, "10.9.0.1")

    def test_bad(self) -> None:
        for argv in (["--local-subnet=10.0.0.1/24"], ["--local-subnet=fd00::/64"], ["--local-bridge=eth0"],
                     ["--local-bridge=" + "b" * 16], ["--local-forwarder-port=0"], ["--local-subnet=10.0.0.0/30"]):
            self.assertRaises(usage.UsageError, LocalOptions(environ={}).parseOptions, argv)

    def test_agent_command(self) -> None:
        provider = LocalProvider(as_node_reactor(global_reactor), LocalConfig(agent_command="my-agent --v"))
        self.assertEqual(provider._agent_command("/s", "p"), ["my-agent", "--v", "--socket", "/s", "--pod-netns", "p"])
        provider = LocalProvider(as_node_reactor(global_reactor),
                                 LocalConfig(agent_command="a -s {socket} -n {pod_netns}"))
        self.assertEqual(provider._agent_command("/s", "p"), ["a", "-s", "/s", "-n", "p"])
        factory = LocalProviderFactory()
        self.assertIsInstance(factory.create(as_node_reactor(global_reactor), factory.options()), LocalProvider)


class _LocalHost:
    case: TestCase

    def setup_host(self) -> None:
        _skip()
        self.state_dir = tempfile.mkdtemp(prefix="caa-local-")
        os.makedirs("/run/lock", exist_ok=True)
        with open("/run/lock/caa-test-local-subnet.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = _free_subnet()
            self.bridge = f"clb{os.getpid() % 100000}{next(_counter)}"[:15]
            subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True)
        self.case.addCleanup(subprocess.run, ["ip", "link", "del", self.bridge], check=False)
        self.case.addCleanup(shutil.rmtree, self.state_dir, True)
        self.config = LocalConfig(
            bridge=self.bridge, subnet=self.subnet, state_dir=self.state_dir, forwarder_args="--disable-tls",
            boot_timeout=60.0,
        )

    def local_provider(self, **kw: Any) -> LocalProvider:
        provider = LocalProvider(as_node_reactor(global_reactor), attrs.evolve(self.config, **kw))
        self.case.addCleanup(provider.teardown)
        return provider

    def left(self, names: list[str]) -> list[str]:
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        left = [ns for ns in namespaces if any(ns == n or ns == n + "-pod" for n in names)]
        left += [d for d in os.listdir(self.state_dir) if d in names]
        ports = subprocess.run(["ip", "-o", "link", "show", "master", self.bridge], capture_output=True, text=True)
        left += [line.split(":")[1].strip() for line in ports.stdout.splitlines()]
        return left


class LocalContractTests(ProviderContractMixin, _LocalHost, TestCase):
    timeout = 240
    user_data = APF_USER_DATA

    def setUp(self) -> None:
        self.case = self
        self.setup_host()

    async def make_provider(self) -> LocalProvider:
        provider = self.local_provider()
        await provider.verify_config()
        return provider

    def impossible_spec(self) -> tuple[InstanceSpec, ErrorKind]:
        return InstanceSpec(gpus=1), ErrorKind.INVALID_CONFIG

    async def leftovers(self, names: list[str]) -> list[str]:
        return await deferToThread(self.left, names)

    async def check_running(self, instance: Instance, user_data: bytes) -> None:
        """Through the instance IP: forwarder (plain TCP here) -> development agent."""
        endpoint = TCP4ClientEndpoint(global_reactor, instance.ips[0], 15150, timeout=5)
        client = await connect(endpoint, global_reactor)
        try:
            version = await client.call(
                "grpc.Health", "Version", health_pb2.CheckRequest(), health_pb2.VersionCheckResponse, timeout=30
            )
            self.assertIn("not kata-agent", version.agent_version)
            interfaces = await client.call(
                "grpc.AgentService", "ListInterfaces", agent_pb2.ListInterfacesRequest(), agent_pb2.Interfaces,
                timeout=30,
            )
            self.assertIn("lo", [i.name for i in interfaces.Interfaces])
        finally:
            client.close()


class LocalTests(_LocalHost, TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.case = self
        self.setup_host()

    def test_bad_user_data_fails_and_cleans_up(self) -> Deferred[None]:
        async def run() -> None:
            provider = self.local_provider()
            pod, sid = unique_pod("lt")
            with self.assertRaises(InvalidConfig) as caught:
                await provider.create_instance(pod, sid, b"#cloud-config\nbogus: 1\n", InstanceSpec())
            self.assertIn("caa-process-user-data failed", str(caught.exception))
            self.assertEqual(self.left([provider.instance_name(pod, sid)]), [])

        return Deferred.fromCoroutine(run())

    def test_agent_that_exits_fails_the_create(self) -> Deferred[None]:
        async def run() -> None:
            provider = self.local_provider(agent_command="sh -c 'echo no agent here; exit 3' {socket} {pod_netns}")
            pod, sid = unique_pod("lt")
            with self.assertRaises(InvalidConfig) as caught:
                await provider.create_instance(pod, sid, APF_USER_DATA, InstanceSpec())
            self.assertIn("exited with 3", str(caught.exception))
            self.assertEqual(self.left([provider.instance_name(pod, sid)]), [])

        return Deferred.fromCoroutine(run())

    def test_create_again_returns_the_same_instance(self) -> Deferred[None]:
        async def run() -> None:
            provider = self.local_provider()
            pod, sid = unique_pod("lt")
            first = await provider.create_instance(pod, sid, APF_USER_DATA, InstanceSpec())
            self.addCleanup(provider.delete_instance, first.id)
            again = await provider.create_instance(pod, sid, APF_USER_DATA, InstanceSpec())
            self.assertEqual(first, again)
            # a fresh provider object (an adaptor restart) finds it and can delete it
            other = self.local_provider()
            self.assertEqual(await other.find_instance(first.name), first)
            await other.delete_instance(first.id)
            self.assertEqual(self.left([first.name]), [])

        return Deferred.fromCoroutine(run())
