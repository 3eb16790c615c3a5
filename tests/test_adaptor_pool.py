"""The adaptor's warm-pool manager (caa.adaptor.pool) on a Clock, the in-memory FakeProvider and a real CA:
fill, hit and miss, refill with back-off, TTL recycling, the journal across a restart, metrics."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from caa import tls
from caa.adaptor.adapters import AutoTLS
from caa.adaptor.metrics import REGISTRY
from caa.adaptor.options import AdaptorOptions
from caa.adaptor.pool import PoolConfig, PoolKey, PoolManager, PoolVM, initdata_digest
from caa.adaptor.poolspec import PoolEntry, PoolSize, PoolSpecError, parse_pools
from caa.podvm_api import claim as claim_format
from caa.podvm_api import cloudconfig
from caa.podvm_api import initdata as initdata_format
from caa.podvm_api.apf import APFConfig
from caa.providers.interfaces import TransientError
from tests.fakes.provider import FakeProvider

INITDATA_TOML = 'algorithm = "sha256"\nversion = "0.1.0"\n\n[data]\n"aa.toml" = \'\'\'\n\'\'\'\n'
_keys = itertools.count()


def sample(name: str, key: PoolKey, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"key": key.label(), **labels}) or 0.0


class PoolTestBase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.provider = FakeProvider(self.clock)
        self.dir = tempfile.mkdtemp(prefix=f"pool{os.getpid()}-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.tls = AutoTLS(tls.CertificateAuthority.create(), tls.make_client_certificate().cert_pem)
        # a key of its own per test: the process-wide counters are read as differences anyway
        self.key = PoolKey(instance_type=f"t{os.getpid()}-{next(_keys)}")
        self.initdata = ""

    def manager(self, size: int = 2, ttl: float = 600.0, sizes: dict[PoolKey, PoolSize] | None = None) -> PoolManager:
        keys = [self.key] if sizes is None else []
        m = PoolManager(self.clock, self.provider, self.tls, PoolConfig(size=size, ttl=ttl, pool_dir=self.dir),
                        keys, lambda key: self.initdata, sizes=sizes)
        self.addCleanup(lambda: Deferred.fromCoroutine(m.stop()))
        return m

    def start(self, m: PoolManager, owned: frozenset[str] = frozenset()) -> None:
        self.successResultOf(Deferred.fromCoroutine(m.start(lambda iid: iid in owned)))

    def creates(self) -> list[str]:
        return [n for op, n in self.provider.calls if op == "create"]

    def deletes(self) -> list[str]:
        return [n for op, n in self.provider.calls if op == "delete"]

    def journal_states(self) -> list[str]:
        out = []
        for name in sorted(os.listdir(self.dir)):
            with open(os.path.join(self.dir, name)) as f:
                out.append(json.load(f)["state"])
        return sorted(out)

    def take(self, m: PoolManager, key: PoolKey) -> PoolVM | None:
        """`take` to its end (the journal runs inline here)."""
        return self.successResultOf(Deferred.fromCoroutine(m.take(key)))



class FillTests(PoolTestBase):
    def test_fills_to_size_with_bootstrap_user_data_only(self) -> None:
        m = self.manager(size=2)
        self.start(m)
        self.assertEqual(len(self.creates()), 2)
        self.assertEqual(len(m.ready(self.key)), 2)
        self.assertEqual(self.journal_states(), ["ready", "ready"])
        self.assertEqual(sample("caa_pool_vms", self.key, state="ready"), 2)
        for vm in m.ready(self.key):
            data = self.provider.user_data[vm.instance_id]
            files = {f.path: f.content for f in cloudconfig.parse(data)}
            self.assertEqual(set(files), {cloudconfig.APF_PATH})  # no auth.json, no initdata, no pod
            apf = APFConfig.from_json(files[cloudconfig.APF_PATH])
            self.assertTrue(claim_format.is_bootstrap(apf))
            self.assertEqual(apf.pool_vm_name, vm.name)
            self.assertIsNone(apf.pod_network)
            self.assertEqual(apf.pod_name, "")
            self.assertTrue(claim_format.token_matches(vm.token, apf.claim_token_sha256))
            self.assertNotIn(vm.token.hex().encode(), data)
            self.assertTrue(vm.name.startswith("podvm-pool-"))

    def test_initdata_of_the_key_is_in_the_boot_user_data(self) -> None:
        self.initdata = initdata_format.encode(INITDATA_TOML)
        self.key = PoolKey(instance_type=self.key.instance_type, initdata_digest=initdata_digest(self.initdata))
        m = self.manager(size=1)
        self.start(m)
        (vm,) = m.ready(self.key)
        files = {f.path: f.content for f in cloudconfig.parse(self.provider.user_data[vm.instance_id])}
        self.assertEqual(files[cloudconfig.INITDATA_PATH].strip(), self.initdata)
        self.assertEqual(len(self.key.initdata_digest), 64)

    def test_size_zero_is_off(self) -> None:
        m = self.manager(size=0)
        self.start(m)
        self.assertEqual(self.creates(), [])
        before = sample("caa_pool_misses_total", self.key)
        self.assertIsNone(self.take(m, self.key))
        self.assertEqual(sample("caa_pool_misses_total", self.key), before + 1)

    def test_bad_settings_refused(self) -> None:
        with self.assertRaises(ValueError):
            self.manager(size=-1)
        with self.assertRaises(ValueError):
            self.manager(ttl=0)


class TakeTests(PoolTestBase):
    def test_hit_journals_taken_and_refills_miss_for_other_key(self) -> None:
        m = self.manager(size=2)
        self.start(m)
        hits = sample("caa_pool_hits_total", self.key)
        vm = self.take(m, self.key)
        assert vm is not None
        self.assertEqual(vm.state, "taken")
        self.assertEqual(sample("caa_pool_hits_total", self.key), hits + 1)
        self.assertEqual(len(self.creates()), 3)  # refilled at once
        self.assertEqual(self.journal_states(), ["ready", "ready", "taken"])
        # the same VM is never handed out twice
        others = [self.take(m, self.key), self.take(m, self.key)]
        self.assertNotIn(vm.pool_id, [o.pool_id for o in others if o is not None])
        other = PoolKey(image="another-image")
        misses = sample("caa_pool_misses_total", other)
        self.assertIsNone(self.take(m, other))
        self.assertEqual(sample("caa_pool_misses_total", other), misses + 1)
        path = os.path.join(self.dir, f"{vm.pool_id}.json")
        self.assertTrue(os.path.exists(path))
        self.successResultOf(Deferred.fromCoroutine(m.handed_over(vm)))  # its sandbox journals it now
        self.assertFalse(os.path.exists(path))
        self.assertNotIn(vm.pool_id, m.vms)

    def test_exhausted_pool_misses(self) -> None:
        m = self.manager(size=1)
        self.provider.hold_create = True
        self.start(m)
        self.assertIsNone(self.take(m, self.key))  # still booting: a miss, not a wait
        self.provider.release_create()
        self.assertIsNotNone(self.take(m, self.key))

    def test_discard_deletes_the_vm(self) -> None:
        m = self.manager(size=1)
        self.start(m)
        vm = self.take(m, self.key)
        assert vm is not None
        m.discard(vm)
        self.assertIn(vm.instance_id, self.deletes())
        self.assertNotIn(vm.instance_id, self.provider.instances)


class StopTests(PoolTestBase):
    def test_stop_cancels_a_create_in_flight_and_leaves_nothing_running(self) -> None:
        self.provider.hold_create = True
        m = self.manager(size=1)
        self.start(m)
        self.assertEqual(self.journal_states(), ["creating"])
        self.successResultOf(Deferred.fromCoroutine(m.stop()))
        self.assertEqual(self.journal_states(), [])  # looked up by name, nothing made, journal entry gone
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no retry, no TTL timer
        m.refill()
        self.assertEqual(len(self.creates()), 1)  # stopped: no refill


class RefillTests(PoolTestBase):
    def test_failed_create_backs_off_doubling_then_recovers(self) -> None:
        self.provider.fail_create = TransientError("quota")
        m = self.manager(size=1)
        self.start(m)
        self.assertEqual(len(self.creates()), 1)
        self.assertEqual(m.vms, {})
        self.clock.advance(0.9)
        self.assertEqual(len(self.creates()), 1)
        self.clock.advance(0.1)  # 1 s
        self.assertEqual(len(self.creates()), 2)
        self.clock.advance(1.9)
        self.assertEqual(len(self.creates()), 2)
        self.clock.advance(0.1)  # then 2 s
        self.assertEqual(len(self.creates()), 3)
        self.provider.fail_create = None
        self.clock.advance(4)
        self.assertEqual(len(self.creates()), 4)
        self.assertEqual(len(m.ready(self.key)), 1)
        self.assertEqual(self.journal_states(), ["ready"])


class ProbeTests(PoolTestBase):
    """A provider may return before its VM has booted (libvirt): the pool's probe decides when it is ready."""

    def probed_manager(self) -> tuple[PoolManager, list[tuple[PoolVM, Deferred[None]]]]:
        probes: list[tuple[PoolVM, Deferred[None]]] = []

        def probe(vm: PoolVM) -> Deferred[None]:
            d: Deferred[None] = Deferred()
            probes.append((vm, d))
            return d

        m = PoolManager(self.clock, self.provider, self.tls, PoolConfig(size=1, pool_dir=self.dir), [self.key],
                        lambda key: "", probe=probe)
        self.addCleanup(lambda: Deferred.fromCoroutine(m.stop()))
        return m, probes

    def test_ready_only_once_the_probe_answers(self) -> None:
        m, probes = self.probed_manager()
        self.start(m)
        ((vm, answered),) = probes
        self.assertTrue(vm.instance_id and vm.ips)  # probed at the address the provider gave
        self.assertEqual(self.journal_states(), ["creating"])
        self.assertEqual(m.ready(self.key), [])
        self.assertIsNone(self.take(m, self.key))  # a booting VM is not handed out
        answered.callback(None)
        (ready,) = m.ready(self.key)
        self.assertEqual(ready.instance_id, vm.instance_id)
        self.assertEqual(self.journal_states(), ["ready"])

    def test_a_vm_that_never_answers_is_deleted_and_the_key_backs_off(self) -> None:
        m, probes = self.probed_manager()
        self.start(m)
        ((vm, answered),) = probes
        answered.errback(TimeoutError("did not answer within 300s"))
        self.assertIn(vm.instance_id, self.deletes())
        self.assertNotIn(vm.instance_id, self.provider.instances)
        self.assertEqual(self.journal_states(), [])
        self.clock.advance(1.0)  # the key's first back-off
        self.assertEqual(len(probes), 2)

    def test_stop_while_probing_deletes_the_booting_vm(self) -> None:
        m, probes = self.probed_manager()
        self.start(m)
        ((vm, _answered),) = probes
        self.successResultOf(Deferred.fromCoroutine(m.stop()))
        self.assertNotIn(vm.instance_id, self.provider.instances)
        self.assertEqual(self.journal_states(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_creating_vm_with_its_id_is_deleted_at_restart(self) -> None:
        m, probes = self.probed_manager()
        self.start(m)
        ((vm, _answered),) = probes
        # a kill -9 while probing: the journal says creating, with the instance's id
        m2 = self.manager(size=0)
        self.start(m2)
        self.assertNotIn(vm.instance_id, self.provider.instances)
        self.assertIn(vm.instance_id, self.deletes())


class TTLTests(PoolTestBase):
    def test_idle_vm_recycled_at_ttl_and_idle_seconds_counted(self) -> None:
        m = self.manager(size=1, ttl=100)
        self.start(m)
        (first,) = m.ready(self.key)
        idle = sample("caa_pool_idle_vm_seconds_total", self.key)
        self.clock.advance(99)
        self.assertEqual(self.deletes(), [])
        self.clock.advance(1)
        self.assertEqual(self.deletes(), [first.instance_id])
        (second,) = m.ready(self.key)
        self.assertNotEqual(second.pool_id, first.pool_id)
        self.assertEqual(sample("caa_pool_idle_vm_seconds_total", self.key), idle + 100)
        self.assertEqual(self.journal_states(), ["ready"])

    def test_taken_vm_is_not_recycled(self) -> None:
        m = self.manager(size=1, ttl=100)
        self.start(m)
        vm = self.take(m, self.key)
        assert vm is not None
        self.clock.advance(500)
        self.assertNotIn(vm.instance_id, self.deletes())


class RestartTests(PoolTestBase):
    def test_ready_vms_survive_taken_and_creating_ones_are_deleted(self) -> None:
        m = self.manager(size=3, ttl=100)
        self.start(m)
        taken = self.take(m, self.key)
        owned = self.take(m, self.key)
        assert taken is not None and owned is not None
        self.successResultOf(Deferred.fromCoroutine(m.stop()))
        # an interrupted create: journalled, the instance made, the adaptor gone before it was "ready"
        vm = next(iter(m.ready(self.key)))
        creating = vm.to_json() | {"pool_id": "c" * 64, "state": "creating", "instance_id": "", "name": "podvm-x"}
        with open(os.path.join(self.dir, "c" * 64 + ".json"), "w") as f:
            json.dump(creating, f)
        self.provider.instances["i-podvm-x"] = type(vm.instance())("i-podvm-x", "podvm-x", ("192.0.2.200",))
        self.clock.advance(50)
        self.provider.calls.clear()
        again = self.manager(size=3, ttl=100)
        self.start(again, owned=frozenset({owned.instance_id}))
        self.assertIn(taken.instance_id, self.deletes())  # never handed out twice, nothing leaked
        self.assertIn("i-podvm-x", self.deletes())
        self.assertNotIn(owned.instance_id, self.deletes())  # its sandbox owns it
        ready = again.ready(self.key)
        self.assertEqual(len(ready), 3)  # one survivor kept, two refilled
        self.assertIn(vm.pool_id, [r.pool_id for r in ready])
        self.assertEqual(self.journal_states(), ["ready", "ready", "ready"])
        # the survivor keeps its age: recycled 100 s after it first became ready
        self.clock.advance(50)
        self.assertIn(vm.instance_id, self.deletes())


class PoolOptionsTests(SynchronousTestCase):
    def parse(self, argv: list[str], env: dict[str, str] | None = None) -> AdaptorOptions:
        o = AdaptorOptions({"CLOUD_PROVIDER": "tests.fakes.provider:FakeProviderFactory", **(env or {})})
        o.parseOptions(argv)
        return o

    def test_defaults_off_and_env(self) -> None:
        o = self.parse([])
        self.assertEqual((o["pool-size"], o["pool-ttl"]), (0, 3600.0))
        o = self.parse([], {"POOL_SIZE": "5", "POOL_TTL": "10m"})
        self.assertEqual((o["pool-size"], o["pool-ttl"]), (5, 600.0))
        self.assertEqual(self.parse(["--pool-size", "2"], {"POOL_SIZE": "5"})["pool-size"], 2)

    def test_refused(self) -> None:
        for argv, words in ((["--pool-size", "-1"], "--pool-size"), (["--pool-ttl", "0s"], "--pool-ttl"),
                            (["--pool-size", "1", "--disable-tls"], "auto CA"),
                            (["--pool-size", "1", "--tls-skip-verify"], "auto CA")):
            e = self.assertRaises(usage.UsageError, self.parse, argv)
            self.assertIn(words, str(e))


class MinMaxTests(PoolTestBase):
    def test_min_kept_misses_grow_to_max_ttl_shrinks_to_min(self) -> None:
        m = self.manager(ttl=100, sizes={self.key: PoolSize(1, 3)})
        self.start(m)
        self.assertEqual((len(self.creates()), m.target(self.key)), (1, 1))  # min booted at start
        self.assertIsNotNone(self.take(m, self.key))  # a hit: refilled to the target, not grown
        self.assertEqual((len(self.creates()), m.alive(self.key)), (2, 1))
        self.provider.hold_create = True
        self.assertIsNotNone(self.take(m, self.key))
        self.assertIsNone(self.take(m, self.key))  # the refill is still booting: a miss grows the pool
        self.assertEqual((m.target(self.key), m.alive(self.key)), (2, 2))
        self.assertIsNone(self.take(m, self.key))
        self.assertIsNone(self.take(m, self.key))  # never past max
        self.assertEqual((m.target(self.key), m.alive(self.key)), (3, 3))
        self.provider.hold_create = False
        self.provider.release_create()
        self.assertEqual(len(m.ready(self.key)), 3)
        self.assertEqual(self.journal_states(), ["ready", "ready", "ready", "taken", "taken"])
        # idle: each VM recycled at its TTL shrinks the target by one, down to min
        self.clock.advance(100)
        self.assertEqual((m.target(self.key), m.alive(self.key)), (1, 1))
        self.clock.advance(100)
        self.assertEqual((m.target(self.key), m.alive(self.key)), (1, 1))  # min stays, recycled

    def test_min_zero_boots_nothing_until_a_miss(self) -> None:
        m = self.manager(sizes={self.key: PoolSize(0, 1)})
        self.start(m)
        self.assertEqual(self.creates(), [])
        self.assertIsNone(self.take(m, self.key))
        self.assertEqual(len(m.ready(self.key)), 1)
        self.assertIsNotNone(self.take(m, self.key))
        self.assertEqual((len(self.creates()), m.alive(self.key)), (2, 1))  # refilled to the target, max 1

    def test_restart_deletes_what_is_no_longer_configured_or_over_max(self) -> None:
        other = PoolKey(image=f"img-{self.key.instance_type}")
        m = self.manager(sizes={self.key: PoolSize(3, 3), other: PoolSize(1, 1)})
        self.start(m)
        self.successResultOf(Deferred.fromCoroutine(m.stop()))
        kept = {vm.instance_id for vm in m.ready(self.key)}
        (dropped,) = [vm.instance_id for vm in m.ready(other)]
        self.provider.calls.clear()
        again = self.manager(sizes={self.key: PoolSize(1, 2)})  # `other` dropped, self.key at most 2
        self.start(again)
        self.assertIn(dropped, self.deletes())
        self.assertEqual(len(self.deletes()), 2)  # `other`'s VM and the oldest of self.key's three
        self.assertEqual(self.creates(), [])
        self.assertEqual({vm.instance_id for vm in again.ready(self.key)}, kept - set(self.deletes()))
        self.assertEqual(self.journal_states(), ["ready", "ready"])

    def test_pools_off_deletes_every_journalled_vm(self) -> None:
        m = self.manager(size=2)
        self.start(m)
        self.successResultOf(Deferred.fromCoroutine(m.stop()))
        ids = {vm.instance_id for vm in m.ready(self.key)}
        off = PoolManager(self.clock, self.provider, None, PoolConfig(pool_dir=self.dir), [], lambda key: "")
        self.start(off)
        self.assertEqual(set(self.deletes()), ids)
        self.assertEqual(self.journal_states(), [])
        self.assertEqual(len(self.creates()), 2)
        self.assertIsNone(self.take(off, self.key))

    def test_keys_without_tls_refused(self) -> None:
        e = self.assertRaises(ValueError, PoolManager, self.clock, self.provider, None,
                              PoolConfig(size=1, pool_dir=self.dir), [self.key], lambda key: "")
        self.assertIn("auto CA", str(e))


class PoolSpecTests(SynchronousTestCase):
    def test_entries(self) -> None:
        self.assertEqual(parse_pools(""), [])
        self.assertEqual(parse_pools(" min=1,max=4 ; min=0, max=2, instance-type=t3.large;"), [
            PoolEntry(PoolSize(1, 4)), PoolEntry(PoolSize(0, 2), instance_type="t3.large")])
        self.assertEqual(parse_pools("min=2,max=2,vcpus=4,memory=8192,image=projects/p/global/images/i"),
                         [PoolEntry(PoolSize(2, 2), vcpus=4, memory_mib=8192, image="projects/p/global/images/i")])
        self.assertEqual(parse_pools("min=1,max=1,image=ami-1", pool_size=3),
                         [PoolEntry(PoolSize(1, 1), image="ami-1"), PoolEntry(PoolSize(3, 3))])

    def test_bad_input_named(self) -> None:
        for text, words in (("min=1", "max= is required"), ("max=1", "min= is required"),
                            ("min=2,max=1", "max (1) must be at least min (2)"),
                            ("min=-1,max=1", "min='-1' must be 0 or more"), ("min=x,max=1", "is not a whole number"),
                            ("min=1,max=1,size=3", "unknown field 'size'"), ("min=1,max=1,min=2", "min given twice"),
                            ("min=1,max=1,t3.large", "'t3.large' is not name=value"),
                            ("min=1,max=1;min=0,max=2", "the default key is configured twice"),
                            ("min=1,max=1,vcpus=two", "vcpus='two'")):
            e = self.assertRaises(PoolSpecError, parse_pools, text)
            self.assertIn(words, str(e), text)
        e = self.assertRaises(PoolSpecError, parse_pools, "min=0,max=1", 2)
        self.assertIn("--pool-size", str(e))


class PoolsOptionTests(SynchronousTestCase):
    def test_pools_flag_env_and_errors(self) -> None:
        env = {"CLOUD_PROVIDER": "tests.fakes.provider:FakeProviderFactory"}
        o = AdaptorOptions({**env, "POOLS": "min=1,max=2"})
        o.parseOptions([])
        self.assertEqual(o["pools"], "min=1,max=2")
        o = AdaptorOptions(env)
        e = self.assertRaises(usage.UsageError, o.parseOptions, ["--pools", "min=3,max=2"])
        self.assertIn("--pools: pool 'min=3,max=2': max (2) must be at least min (3)", str(e))
        o = AdaptorOptions(env)
        e = self.assertRaises(usage.UsageError, o.parseOptions, ["--pools", "min=0,max=1", "--disable-tls"])
        self.assertIn("auto CA", str(e))
        o = AdaptorOptions(env)
        o.parseOptions(["--pools", "min=0,max=0", "--disable-tls"])  # no pool at all: TLS does not matter
