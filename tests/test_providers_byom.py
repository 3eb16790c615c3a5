"""The BYOM provider against real sshd "machines" in network namespaces (tests/sshd_machines.py) and its pool
ConfigMap on the real kube-apiserver (tests/kubeapi.py): the provider contract, two allocators sharing one pool
never hand out one IP, a host key outside the allow-list is refused, a restarted provider keeps the allocations;
and the pure parts (pool syntax, the state layout, the MD5 spread, options)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.python import usage
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from caa.k8s.client import KubeClient, connect
from caa.providers.byom.config import ByomConfig, ByomOptions, parse_pool
from caa.providers.byom.pool import STATE_KEY, Allocation, IPPool, PoolState, select_index
from caa.providers.byom.provider import ByomProvider
from caa.providers.byom.sftp import HostKeyPolicy, HostKeyRejected, SSHIdentity, SSHPushError, load_allowlist, push_file
from caa.providers.interfaces import ErrorKind, Instance, InstanceSpec, IProvider, ProviderError
from caa.reactors import as_node_reactor
from tests.kubeapi import KubeAPIServer, shared_server
from tests.sshd_machines import Machine, client_key, keygen, machine, need_sshd
from tests.test_providers_contract import ProviderContractMixin, unique_pod

_names = itertools.count()


class ByomTestMixin:
    """A namespace and ConfigMap name of our own on the shared API server, Kubernetes clients, machines."""

    machines: list[Machine]

    def kube_setup(self) -> None:
        case: Any = self
        need_sshd(case)
        self.server: KubeAPIServer = shared_server(case)
        self.namespace = f"byom-{os.getpid()}-{next(_names)}"
        self.server.ensure_namespace(self.namespace)
        self.cm_name = f"pool-{next(_names)}"

    def kube(self) -> KubeClient:
        case: Any = self
        pool = ThreadPool(minthreads=0, maxthreads=3, name="byom-test")
        pool.start()
        case.addCleanup(pool.stop)
        client = connect(as_node_reactor(global_reactor), pool, str(self.server.admin_kubeconfig))
        case.addCleanup(client.close)
        return client

    def config(self, ips: list[str], **changes: Any) -> ByomConfig:
        public, private = client_key()
        config = ByomConfig(pool_ips=tuple(ips), ssh_username="root", ssh_pub_key=public, ssh_priv_key=private,
                            ssh_timeout=15.0, pool_namespace=self.namespace, pool_configmap_name=self.cm_name,
                            node_name="worker-1")
        return attrs.evolve(config, **changes)

    def provider(self, ips: list[str], **changes: Any) -> ByomProvider:
        case: Any = self
        provider = ByomProvider(as_node_reactor(global_reactor), self.config(ips, **changes), kube=self.kube())
        case.addCleanup(provider.teardown)
        return provider

    def stored(self) -> PoolState:
        cm = self.server.request("GET", f"/api/v1/namespaces/{self.namespace}/configmaps/{self.cm_name}")
        return PoolState.decode(cm["data"][STATE_KEY])


class ByomContractTests(ByomTestMixin, ProviderContractMixin, TestCase):
    timeout = 120
    concurrent_creates = 3

    def setUp(self) -> None:
        self.kube_setup()
        self.machines = [machine(self) for _ in range(self.concurrent_creates)]

    async def make_provider(self) -> IProvider:
        if self._testMethodName == "test_contract_impossible_spec":
            # Nothing in a spec is impossible for BYOM (it ignores sizes and images); what cannot work is a pool
            # whose only VM does not answer on port 22: the create fails, nothing stays reserved.
            self.provider_ = self.provider([machine(self, sshd=False).ip])
        else:
            self.provider_ = self.provider([m.ip for m in self.machines])
        await self.provider_.verify_config()
        return self.provider_

    def impossible_spec(self) -> tuple[InstanceSpec, ErrorKind]:
        return InstanceSpec(instance_type="any", image="any"), ErrorKind.TRANSIENT

    async def leftovers(self, names: list[str]) -> list[str]:
        state = self.stored()
        return [name for name in names if await self.provider_.find_instance(name) is not None] + [
            a.ip for a in state.allocated.values() if a.ip in state.available]

    async def check_running(self, instance: Instance, user_data: bytes) -> None:
        (vm,) = [m for m in self.machines if m.ip == instance.ips[0]]
        self.assertEqual(vm.pushed("user-data"), user_data)
        self.assertEqual(instance.id, vm.ip)
        holder = self.stored().holder_of(vm.ip)
        assert holder is not None
        sandbox_id = holder.allocation_id[len(holder.pod_name) + 1:]
        self.assertEqual((holder.node_name, self.provider_.instance_name(holder.pod_name, sandbox_id)),
                         ("worker-1", instance.name))


class ByomBehaviourTests(ByomTestMixin, TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.kube_setup()

    async def test_two_allocators_never_share_an_ip(self) -> None:
        vms = [machine(self) for _ in range(2)]
        ips = [m.ip for m in vms]
        checker = self.provider(ips)  # its TCP readiness probe of port 22, shared by both pools

        def pool() -> IPPool:
            return IPPool(global_reactor, self.kube(), self.namespace, self.cm_name, ips, "worker-1",
                          checker.check_ready)

        a, b = pool(), pool()
        await a.recover()
        for round_ in range(50):
            first, second = f"pod-a-{round_}", f"pod-b-{round_}"
            got: list[str] = await gatherResults([Deferred.fromCoroutine(a.allocate(first, "pod-a")),
                                                  Deferred.fromCoroutine(b.allocate(second, "pod-b"))],
                                                 consumeErrors=True)
            self.assertEqual(len(set(got)), 2, f"round {round_}: both allocators got {got}")
            state = self.stored()
            self.assertEqual({state.ip_of(first), state.ip_of(second)}, set(got))
            self.assertEqual(state.available, ())
            await gatherResults([Deferred.fromCoroutine(a.release(first)), Deferred.fromCoroutine(b.release(second))],
                                consumeErrors=True)
        final = self.stored()
        self.assertEqual((final.allocated, sorted(final.available)), ({}, sorted(ips)))
        self.assertEqual(final.version, 1 + 50 * 4)  # recover + two allocations and two releases a round
        # Both read before either writes in most rounds: the losers' writes were refused and recomputed.
        self.assertGreater(a.conflicts + b.conflicts, 0)

    async def test_host_key_outside_the_allow_list_is_refused(self) -> None:
        vm = machine(self)
        other = Path(tempfile.mkdtemp(prefix="byom-allow-"))
        self.addCleanup(shutil.rmtree, other, True)
        keygen(other / "stranger")
        provider = self.provider([vm.ip], host_key_allowlist_dir=str(other))
        await provider.verify_config()
        pod, sid = unique_pod("byom")
        try:
            await provider.create_instance(pod, sid, b"#cloud-config\n", InstanceSpec())
        except ProviderError as e:
            self.assertIn("not in the host key allow-list", str(e))
            self.assertIs(e.kind, ErrorKind.TRANSIENT)
        else:
            self.fail("a VM with an unknown host key received the user data")
        self.assertIsNone(vm.pushed("user-data"))
        self.assertEqual(self.stored().allocated, {})  # the IP went back
        (other / "nested").mkdir()
        (other / "nested" / "vm.pub").write_bytes(vm.host_key_pub.read_bytes())
        trusted = self.provider([vm.ip], host_key_allowlist_dir=str(other))
        instance = await trusted.create_instance(pod, sid, b"#cloud-config\n", InstanceSpec())
        self.assertEqual((instance.ips, vm.pushed("user-data")), ((vm.ip,), b"#cloud-config\n"))
        await trusted.delete_instance(instance.id)
        self.assertEqual(vm.pushed("reboot"), b"reboot")

    async def test_restart_keeps_allocations(self) -> None:
        vms = [machine(self) for _ in range(2)]
        ips = [m.ip for m in vms]
        first = self.provider(ips)
        await first.verify_config()
        pod, sid = unique_pod("byom")
        instance = await first.create_instance(pod, sid, b"one", InstanceSpec())
        await first.teardown()
        # A restart with one more VM configured: the allocation stays, the new IP becomes free.
        third = machine(self)
        again = self.provider([*ips, third.ip])
        await again.verify_config()
        self.assertEqual(await again.find_instance(instance.name), instance)
        state = self.stored()
        self.assertEqual(state.ip_of(f"{pod}-{sid}"), instance.id)
        self.assertEqual(sorted(state.available), sorted(ip for ip in [*ips, third.ip] if ip != instance.id))
        others = [await again.create_instance(*unique_pod("byom"), b"two", InstanceSpec()) for _ in range(2)]
        self.assertNotIn(instance.id, [o.id for o in others])
        try:
            await again.create_instance(*unique_pod("byom"), b"three", InstanceSpec())
        except ProviderError as e:
            self.assertEqual((e.kind, str(e)), (ErrorKind.QUOTA, "no available IPs in pool"))
        else:
            self.fail("a fourth VM came out of a pool of three")
        for o in (instance, *others):
            await again.delete_instance(o.id)
        self.assertEqual(self.stored().allocated, {})

    async def test_missing_keys_fail_verify_config_naming_the_file(self) -> None:
        provider = self.provider(["192.0.2.1"], ssh_pub_key="/nonexistent/id.pub")
        try:
            await provider.verify_config()
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("/nonexistent/id.pub", str(e))
        else:
            self.fail("verify_config accepted a missing key")


class ByomUnitTests(SynchronousTestCase):
    def test_pool_syntax_ranges_and_dedup(self) -> None:
        self.assertEqual(parse_pool("10.0.0.5, 10.0.0.1-10.0.0.3,10.0.0.2,,", 100),
                         ("10.0.0.5", "10.0.0.1", "10.0.0.2", "10.0.0.3"))
        self.assertEqual(parse_pool("10.0.0.1-10.0.0.200", 3), ("10.0.0.1", "10.0.0.2", "10.0.0.3"))
        for bad in ("10.0.0.3-10.0.0.1", "10.0.0.1-10.0.0.1", "nope", "10.0.0.1-fd00::1", "10.0.0.256"):
            self.assertRaises(ValueError, parse_pool, bad, 100)

    def test_max_range_ips_applies_whatever_the_order(self) -> None:
        # Upstream expands the env pool before MAX_RANGE_IPS is registered: ranges from the env came out empty.
        pool, limit = "10.1.0.1-10.1.0.9", "4"
        cases = [({"VM_POOL_IPS": pool, "MAX_RANGE_IPS": limit}, []),
                 ({"VM_POOL_IPS": pool}, ["--max-range-ips", limit]),
                 ({"MAX_RANGE_IPS": limit}, ["--vm-pool-ips", pool]),
                 ({}, ["--vm-pool-ips", pool, "--max-range-ips", limit]),
                 ({}, ["--max-range-ips", limit, "--vm-pool-ips", pool])]
        for env, argv in cases:
            options = ByomOptions(env)
            options.parseOptions(argv)
            self.assertEqual(ByomConfig.from_options(options).pool_ips,
                             ("10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"), (env, argv))

    def test_missing_pool_is_a_clear_error(self) -> None:
        e = self.assertRaises(usage.UsageError, ByomOptions({}).parseOptions, [])
        self.assertIn("--vm-pool-ips (VM_POOL_IPS) is required", str(e))
        e = self.assertRaises(usage.UsageError, ByomOptions({"VM_POOL_IPS": "10.0.0.9-10.0.0.1"}).parseOptions, [])
        self.assertIn("VM_POOL_IPS", str(e))

    def test_defaults_namespace_and_node(self) -> None:
        options = ByomOptions({"VM_POOL_IPS": "10.0.0.1", "POD_NAMESPACE": "ns1", "NODE_NAME": "n1"})
        options.parseOptions([])
        config = ByomConfig.from_options(options)
        self.assertEqual((config.ssh_username, config.ssh_pub_key, config.ssh_priv_key, config.ssh_timeout,
                          config.pool_configmap_name, config.node_name),
                         ("peerpod", "/root/.ssh/id_rsa.pub", "/root/.ssh/id_rsa", 30.0, "byom-ip-pool-state", "n1"))
        if not os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/namespace"):
            self.assertEqual(config.pool_namespace, "ns1")

    def test_state_layout_is_upstreams(self) -> None:
        state = PoolState({"web-abc": Allocation("web-abc", "10.0.0.5", "worker-1", "web", "2026-01-02T03:04:05Z")},
                          ("10.0.0.6",), "2026-01-02T03:04:05Z", 7)
        doc = json.loads(state.encode())
        self.assertEqual(doc, {"allocatedIPs": {"web-abc": {
            "allocationID": "web-abc", "ip": "10.0.0.5", "nodeName": "worker-1", "podName": "web",
            "podNamespace": "", "allocatedAt": "2026-01-02T03:04:05Z"}},
            "availableIPs": ["10.0.0.6"], "lastUpdated": "2026-01-02T03:04:05Z", "version": 7})
        self.assertIn('\n  "allocatedIPs": {\n    "web-abc": {', state.encode())  # Go's MarshalIndent, 2 spaces
        self.assertEqual(PoolState.decode(state.encode()), state)
        self.assertRaises(ValueError, PoolState.decode, "[]")

    def test_md5_spread(self) -> None:
        ips = ["a", "b", "c", "d", "e"]
        for alloc in ("pod-1", "nginx-0123abcd", ""):
            expected = int(hashlib.md5(alloc.encode()).hexdigest()[:8], 16) % 5
            self.assertEqual(select_index(ips, alloc), expected)
        self.assertEqual(select_index(["only"], "x"), 0)
        self.assertGreater(len({select_index(ips, f"pod-{i}") for i in range(50)}), 3)

    def test_allowlist_loading(self) -> None:
        directory = Path(self.mktemp())
        (directory / "deep").mkdir(parents=True)
        keygen(directory / "deep" / "k1")
        (directory / "big.pub").write_bytes(b"x" * (17 * 1024))
        (directory / "notes.txt").write_text("ssh-ed25519 AAAA not a pub file")
        prints = load_allowlist(str(directory))
        self.assertEqual(len(prints), 1)
        self.assertTrue(next(iter(prints)).startswith("SHA256:"))
        empty = Path(self.mktemp())
        empty.mkdir()
        self.assertRaises(ValueError, load_allowlist, str(empty))
        self.assertIsNone(HostKeyPolicy.from_dir("").allowed)


class ByomSFTPTests(TestCase):
    """The SFTP push alone, against one real sshd: chroot path, mkdir -p, truncate, refused key and host key."""

    timeout = 60

    async def test_push_overwrites_and_refusals_name_the_step(self) -> None:
        vm = machine(self)
        public, private = client_key()
        identity = SSHIdentity.from_files("root", public, private)
        await push_file(global_reactor, vm.ip, 22, identity, HostKeyPolicy(), "cidata/user-data", b"x" * 70000, 15)
        await push_file(global_reactor, vm.ip, 22, identity, HostKeyPolicy(), "cidata/user-data", b"short", 15)
        self.assertEqual(vm.pushed("user-data"), b"short")
        stranger_dir = Path(self.mktemp())
        stranger_dir.mkdir()
        keygen(stranger_dir / "id")
        stranger = SSHIdentity.from_files("root", str(stranger_dir / "id.pub"), str(stranger_dir / "id"))
        with self.assertRaises(SSHPushError) as refused:
            await push_file(global_reactor, vm.ip, 22, stranger, HostKeyPolicy(), "cidata/x", b"", 15)
        self.assertIn("authentication as 'root'", str(refused.exception))
        policy = HostKeyPolicy.from_dir(str(stranger_dir))  # a directory holding some other key
        with self.assertRaises(HostKeyRejected) as rejected:
            await push_file(global_reactor, vm.ip, 22, identity, policy, "cidata/x", b"", 15)
        self.assertIn(vm.ip, str(rejected.exception))
        self.assertIsNone(vm.pushed("x"))
        self.assertRaises(ValueError, SSHIdentity.from_files, "root", public, str(stranger_dir / "id"))
