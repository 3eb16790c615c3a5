"""StartVM with a warm pool (caa.adaptor.service + caa.adaptor.pool) on a Clock: a hit claims a pool VM (the real
forwarder ClaimGate checks the real request), a miss or a failed claim starts a fresh VM, a claimed VM is deleted
at StopVM and never returns to the pool, and a restart between claim and tunnel leaks nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caa import tls
from caa.adaptor.adapters import AutoTLS
from caa.adaptor.claimer import Claimer, PodUserData
from caa.adaptor.interfaces import SandboxState
from caa.adaptor.pool import PoolConfig, PoolKey, PoolManager, PoolVM, initdata_digest
from caa.adaptor.service import CloudService, ServiceConfig
from caa.adaptor.store import SandboxStore
from caa.forwarder import initdata
from caa.forwarder.claim import ClaimGate, ClaimState
from caa.podvm_api import cloudconfig
from caa.podvm_api.apf import APFConfig
from caa.proto import podvm_pb2
from caa.ttrpc import CallContext
from tests.fakes.adaptor import FakeNetworking, FakeProxyFactory
from tests.fakes.provider import FakeProvider

SID = "5e1a" + "cd" * 30
#: the adaptor's default key: no size, no image annotations, no initdata (the VM's default document)
KEY = PoolKey(initdata_digest=initdata_digest(""))
SID2 = "6f2b" + "cd" * 30


def ann(pod: str = "web", **extra: str) -> dict[str, str]:
    return {"io.kubernetes.cri.sandbox-name": pod, "io.kubernetes.cri.sandbox-namespace": "default", **extra}


class GateClaimer(Claimer):
    """Stands for the network hop of `Claimer.claim` (dial the pool VM's forwarder over mutual TLS): the request
    the real Claimer builds goes to the real `caa.forwarder.claim.ClaimGate`, made from the bootstrap apf.json
    the pool VM was created with (its user data), one gate per VM, so a second claim is refused as on a VM.
    `hold` makes the next claim wait after the gate accepted it (an adaptor stopped between claim and tunnel)."""

    def __init__(self, clock: Clock, provider: FakeProvider, tls_: AutoTLS,
                 digest: Callable[[str], str] = initdata_digest) -> None:
        super().__init__(clock, lambda host, port, name: None, 15150, tls_,  # type: ignore[arg-type,return-value]
                         digest)
        self.provider = provider
        self.gates: dict[str, ClaimGate] = {}
        self.claimed: dict[str, APFConfig] = {}
        self.hold: Deferred[None] | None = None
        self.dirs: list[str] = []

    def gate(self, vm: PoolVM) -> ClaimGate:
        if vm.instance_id not in self.gates:
            files = {f.path: f.content for f in cloudconfig.parse(self.provider.user_data[vm.instance_id])}
            bootstrap = APFConfig.from_json(files[cloudconfig.APF_PATH])

            async def on_claim(pod: APFConfig, options: Any) -> None:
                self.claimed[vm.instance_id] = pod

            async def relay(*args: Any) -> bytes:
                return b""

            # /run/peerpod as caa-process-user-data leaves it (initdata.digest of what the VM booted with)
            peerpod = tempfile.mkdtemp(prefix=f"poolvm{os.getpid()}-")
            self.dirs.append(peerpod)
            if cloudconfig.INITDATA_PATH in files:
                with open(os.path.join(peerpod, "initdata"), "w") as f:
                    f.write(files[cloudconfig.INITDATA_PATH])
            initdata.process(peerpod)
            self.gates[vm.instance_id] = ClaimGate(bootstrap, relay, on_claim, peerpod,
                                                   lambda pod: tls.server_context_factory(
                                                       pod.tls_server_cert.encode(), pod.tls_server_key.encode()))
        return self.gates[vm.instance_id]

    async def claim(self, vm: PoolVM, pod: PodUserData, timeout: float) -> podvm_pb2.ClaimResponse:
        ctx = CallContext(clock=self.clock, service="caa.podvm.v1.PodVM", method="Claim", stream_id=1)
        resp = await self.gate(vm).claim(ctx, self.request(vm, pod))
        if self.hold is not None:
            await self.hold
        return resp


class PoolServiceBase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.provider = FakeProvider(self.clock)
        self.proxies = FakeProxyFactory()
        self.net = FakeNetworking()
        self.tls = AutoTLS(tls.CertificateAuthority.create(), tls.make_client_certificate().cert_pem)
        base = os.path.abspath(self.mktemp())
        self.pods_dir = os.path.join(base, "pods")
        self.pool_dir = os.path.join(base, "pool")
        self.store = SandboxStore(self.pods_dir)
        self.netns = os.path.join(base, "netns")
        os.makedirs(base, exist_ok=True)
        open(self.netns, "w").close()
        self.claimer = GateClaimer(self.clock, self.provider, self.tls)
        self.addCleanup(self.remove_dirs)
        self.svc, self.pool = self.make()

    def remove_dirs(self) -> None:
        for d in self.claimer.dirs:
            shutil.rmtree(d, ignore_errors=True)

    def make(self, size: int = 1) -> tuple[CloudService, PoolManager]:
        pool = PoolManager(self.clock, self.provider, self.tls, PoolConfig(size=size, pool_dir=self.pool_dir),
                           [KEY], lambda key: "")
        svc = CloudService(self.clock, self.provider, self.proxies, self.store, self.net, self.tls,
                           ServiceConfig(pods_dir=self.pods_dir), wallclock=self.clock.seconds, pool=pool,
                           claimer=self.claimer)
        self.addCleanup(lambda: Deferred.fromCoroutine(pool.stop()))
        return svc, pool

    def start_pool(self, owned: frozenset[str] = frozenset()) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.pool.start(lambda iid: iid in owned)))

    def create(self, sid: str = SID, **annotations: str) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.svc.create_vm(sid, ann(**annotations), self.netns)))

    def start(self, sid: str = SID) -> Deferred[None]:
        return Deferred.fromCoroutine(self.svc.start_vm(sid, None))

    def record(self, sid: str = SID) -> Any:
        rec = self.successResultOf(self.store.get(sid))
        assert rec is not None
        return rec

    def pod_creates(self) -> list[str]:
        return [n for op, n in self.provider.calls if op == "create" and not n.startswith("podvm-pool-")]


class PoolServiceTests(PoolServiceBase):
    def test_hit_claims_the_pool_vm_with_the_pods_configuration(self) -> None:
        self.start_pool()
        (vm,) = self.pool.ready(KEY)
        self.create()
        self.successResultOf(self.start())
        rec = self.record()
        self.assertEqual(rec.state, SandboxState.RUNNING)
        self.assertEqual((rec.instance_id, rec.instance_name, rec.server_name), (vm.instance_id, vm.name, vm.name))
        self.assertEqual(self.pod_creates(), [])  # no fresh VM
        self.assertIs(self.claimer.gates[vm.instance_id].state, ClaimState.CLAIMED)
        pod = self.claimer.claimed[vm.instance_id]
        self.assertEqual((pod.pod_namespace, pod.pod_name), ("default", "web"))
        self.assertIsNotNone(pod.pod_network)
        (proxy,) = self.proxies.live(SID)
        assert proxy.started is not None
        self.assertEqual(proxy.started[0], (vm.ips[0], 15150))
        self.assertEqual(proxy.started[1], vm.name)  # dials verifying the pod's certificate for the VM's name
        self.assertIn(SID, self.net.tunnels)
        # refilled; the claimed VM is not in the pool and is deleted at StopVM
        self.assertEqual(len(self.pool.ready(KEY)), 1)
        self.assertNotIn(vm.pool_id, self.pool.vms)
        self.assertFalse(os.path.exists(os.path.join(self.pool_dir, f"{vm.pool_id}.json")))
        self.successResultOf(Deferred.fromCoroutine(self.svc.stop_vm(SID)))
        self.assertNotIn(vm.instance_id, self.provider.instances)
        self.assertNotIn(vm.pool_id, [v.pool_id for v in self.pool.ready(KEY)])

    def test_initdata_digested_once_per_start(self) -> None:
        """The pool key and the Claim request carry one digest of the pod's initdata, computed once per StartVM."""
        digested: list[str] = []

        def counting(encoded: str) -> str:
            digested.append(encoded)
            return initdata_digest(encoded)

        self.claimer = GateClaimer(self.clock, self.provider, self.tls, counting)
        self.svc, self.pool = self.make()
        self.start_pool()
        (vm,) = self.pool.ready(KEY)
        self.create()
        self.successResultOf(self.start())  # a hit: key lookup and claim
        self.assertEqual(self.record().instance_id, vm.instance_id)
        self.assertIs(self.claimer.gates[vm.instance_id].state, ClaimState.CLAIMED)  # the gate checked the digest
        self.assertEqual(digested, [""])
        self.create(SID2, pod="web2", **{"io.katacontainers.config.hypervisor.image": "other-image"})
        self.successResultOf(self.start(SID2))  # a miss: the key lookup only
        self.assertEqual(digested, ["", ""])

    def test_miss_other_key_starts_a_fresh_vm(self) -> None:
        self.start_pool()
        self.create(**{"io.katacontainers.config.hypervisor.image": "other-image"})
        self.successResultOf(self.start())
        self.assertEqual(self.pod_creates(), [self.record().instance_name])
        self.assertEqual(self.record().server_name, self.record().instance_name)
        self.assertEqual(len(self.pool.ready(KEY)), 1)  # untouched

    def test_empty_pool_misses(self) -> None:
        self.provider.hold_create = True
        self.start_pool()  # the pool VM is still booting
        self.provider.hold_create = False
        self.create()
        self.successResultOf(self.start())
        self.assertEqual(len(self.pod_creates()), 1)
        self.assertEqual(self.record().state, SandboxState.RUNNING)

    def test_failed_claim_deletes_the_pool_vm_and_starts_a_fresh_one(self) -> None:
        self.start_pool()
        (vm,) = self.pool.ready(KEY)
        gate = self.claimer.gate(vm)
        gate.state = ClaimState.FAILED  # as after a claim whose pod network could not be built
        self.create()
        self.successResultOf(self.start())
        rec = self.record()
        self.assertEqual(rec.state, SandboxState.RUNNING)
        self.assertNotEqual(rec.instance_id, vm.instance_id)
        self.assertEqual(rec.server_name, rec.instance_name)
        self.assertEqual(self.pod_creates(), [rec.instance_name])
        self.assertNotIn(vm.instance_id, self.provider.instances)

    def test_restart_between_claim_and_tunnel_leaks_nothing_and_never_hands_out_twice(self) -> None:
        self.start_pool()
        (vm,) = self.pool.ready(KEY)
        self.claimer.hold = Deferred()
        self.create()
        self.start()  # claimed, then "killed": nothing after the claim runs
        self.assertIs(self.claimer.gates[vm.instance_id].state, ClaimState.CLAIMED)
        self.assertEqual(self.record().instance_id, vm.instance_id)  # journalled before the claim
        # a new adaptor on the same journals
        self.claimer.hold = None
        self.successResultOf(Deferred.fromCoroutine(self.pool.stop()))
        self.svc, self.pool = self.make()
        self.successResultOf(Deferred.fromCoroutine(self.svc.recover()))
        owned = frozenset(r.instance_id for r in self.svc.records() if r.instance_id)
        self.start_pool(owned)
        self.assertNotIn(vm.instance_id, self.provider.instances)  # rolled back with its sandbox
        self.assertEqual(self.record().state, SandboxState.CREATED)
        self.assertNotIn(vm.pool_id, self.pool.vms)
        # StartVM again: a different pool VM (the new one), never the claimed one
        self.successResultOf(self.start())
        self.assertNotEqual(self.record().instance_id, vm.instance_id)
        self.assertEqual(self.record().state, SandboxState.RUNNING)

    def test_two_pods_one_vm_one_hit_one_cold(self) -> None:
        self.provider.hold_create = True
        self.start_pool()
        self.provider.release_create()
        self.provider.hold_create = False
        (vm,) = self.pool.ready(KEY)
        self.provider.hold_create = True  # the refill stays booting
        self.create(SID)
        self.create(SID2, pod="db")
        d1, d2 = self.start(SID), self.start(SID2)
        self.provider.hold_create = False
        self.provider.release_create()
        self.successResultOf(d1)
        self.successResultOf(d2)
        ids = {self.record(SID).instance_id, self.record(SID2).instance_id}
        self.assertIn(vm.instance_id, ids)
        self.assertEqual(len(ids), 2)
        self.assertEqual(len(self.pod_creates()), 1)



class ConcurrentTests(PoolServiceBase):
    def test_twenty_concurrent_starts_against_a_pool_of_five(self) -> None:
        """5 hits and 15 correct cold starts; every pool VM claimed once; the refill does not serve this burst."""
        self.svc, self.pool = self.make(size=5)
        self.start_pool()
        pooled = {vm.instance_id for vm in self.pool.ready(KEY)}
        self.assertEqual(len(pooled), 5)
        self.provider.hold_create = True  # cold creates and refills all in flight at once
        sids = [f"{i:04x}" + "ef" * 30 for i in range(20)]
        for i, sid in enumerate(sids):
            self.create(sid, pod=f"p{i}")
        starts = [self.start(sid) for sid in sids]
        self.provider.hold_create = False
        self.provider.release_create()
        for d in starts:
            self.successResultOf(d)
        records = {sid: self.record(sid) for sid in sids}
        self.assertTrue(all(r.state is SandboxState.RUNNING for r in records.values()))
        hits = [r for r in records.values() if r.instance_id in pooled]
        cold = [r for r in records.values() if r.instance_id not in pooled]
        self.assertEqual(len(hits), 5)
        self.assertEqual(len(cold), 15)
        self.assertEqual(len({r.instance_id for r in records.values()}), 20)  # no VM shared
        for r in cold:
            self.assertEqual(r.instance_name, r.server_name)
            self.assertFalse(r.instance_name.startswith("podvm-pool-"))
        for r in hits:
            self.assertEqual(self.claimer.gates[r.instance_id].state, ClaimState.CLAIMED)
            self.assertEqual(self.claimer.claimed[r.instance_id].pod_name, r.pod_name)
        self.assertEqual(len(self.pod_creates()), 15)
        self.assertEqual(len(self.pool.ready(KEY)), 5)  # refilled
