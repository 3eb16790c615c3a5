"""The sandbox store: sandbox.json's format (journals of the previous version still load), the pod directory's
files, per-sandbox ordering of the runner's work, and the thread-pool runner."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from caa.adaptor.interfaces import ISandboxStore, SandboxRecord, SandboxState
from caa.adaptor.service import CloudService, ServiceConfig
from caa.adaptor.store import SandboxStore, load_records, record_from_json, record_to_json, threadpool_runner
from caa.network.interfaces import PodNetworkConfig
from caa.providers.interfaces import InstanceSpec
from tests.fakes.adaptor import FakeNetworking, FakeProxyFactory, FakeTLS
from tests.fakes.provider import FakeProvider

T = TypeVar("T")
FIXTURES = Path(__file__).parent / "fixtures" / "journal"


def fixture(name: str) -> dict[str, Any]:
    """sandbox.json as written by the previous version (b09b276: CreateVM + StartVM with the test fakes)."""
    with open(FIXTURES / f"{name}.json") as f:
        doc: dict[str, Any] = json.load(f)
    return doc


class FormatTests(SynchronousTestCase):
    def test_previous_version_running(self) -> None:
        doc = fixture("running-vxlan")
        rec = record_from_json(doc)
        self.assertEqual(rec.state, SandboxState.RUNNING)
        self.assertEqual(rec.spec, InstanceSpec(instance_type="t3.large", vcpus=2, memory_mib=4096))
        assert rec.pod_network is not None
        self.assertEqual((rec.pod_network.vxlan_id, rec.pod_network.pod_ip), (555000, "10.244.1.21/24"))
        self.assertEqual(rec.vni, 555000)
        self.assertEqual(rec.ips, ("192.0.2.1",))
        # written back key for key, value for value
        self.assertEqual(record_to_json(rec), doc)

    def test_previous_version_no_tunnel(self) -> None:
        doc = fixture("created-none")
        rec = record_from_json(doc)
        self.assertEqual((rec.state, rec.vni, rec.instance_id), (SandboxState.CREATED, None, ""))
        assert rec.pod_network is not None
        self.assertEqual(rec.pod_network.tunnel_type, "none")
        self.assertEqual(record_to_json(rec), doc)

    def test_minimal_and_null_fields(self) -> None:
        doc = {k: v for k, v in fixture("created-none").items()
               if k in ("sandbox_id", "pod_name", "pod_namespace", "netns", "socket_path", "server_name", "state",
                        "created")}
        rec = record_from_json(doc)
        self.assertEqual((rec.spec, rec.pod_network, rec.ips, rec.updated), (InstanceSpec(), None, (), 0.0))
        self.assertRaises(KeyError, record_from_json, {"state": "running"})
        self.assertRaises(ValueError, record_from_json, dict(doc, state="bogus"))

    @given(
        state=st.sampled_from(list(SandboxState)),
        text=st.text(max_size=20),
        num=st.integers(min_value=0, max_value=2**31),
        ips=st.lists(st.ip_addresses(v=4).map(str), max_size=3),
        volumes=st.lists(st.text(max_size=8), max_size=3),
        vni=st.integers(min_value=0, max_value=2**24 - 1),
        with_net=st.booleans(),
        when=st.floats(min_value=0, max_value=2e9, allow_nan=False),
        annotations=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
    )
    def test_round_trip(self, state: SandboxState, text: str, num: int, ips: list[str], volumes: list[str],
                        vni: int, with_net: bool, when: float, annotations: dict[str, str]) -> None:
        net = PodNetworkConfig(pod_ip="10.0.0.2/24", pod_hw_addr="02:00:00:00:00:01", interface="eth0",
                               worker_node_ip="192.168.0.1/24", mtu=1450, vxlan_id=vni) if with_net else None
        rec = SandboxRecord(
            sandbox_id="s" + text, pod_name=text, pod_namespace=text, netns=text, socket_path=text,
            server_name=text, state=state, created=when, updated=when, annotations=annotations,
            spec=InstanceSpec(instance_type=text, vcpus=num, memory_mib=num, gpus=num, image=text, multi_nic=True,
                              volumes=tuple(volumes), arch=text),
            pod_network=net, instance_id=text, instance_name=text, ips=tuple(ips), error=text)
        doc = json.loads(json.dumps(record_to_json(rec)))
        self.assertEqual(record_from_json(doc), rec)
        self.assertEqual(doc["vni"], (vni or None) if with_net else None)


class ManualRunner:
    """Runs nothing until the test calls step()."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, f: Callable[[], T]) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self.pending.append((f, d))
        return d

    def step(self) -> None:
        f, d = self.pending.pop(0)
        d.callback(f())


def rec(sid: str, state: SandboxState = SandboxState.CREATED, **kw: Any) -> SandboxRecord:
    return SandboxRecord(sandbox_id=sid, pod_name="p", pod_namespace="ns", netns="/n", socket_path="/s",
                         server_name="podvm-p", state=state, created=1.0, **kw)


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pods = os.path.abspath(self.mktemp())
        self.store = SandboxStore(self.pods)

    def test_interface(self) -> None:
        verifyObject(ISandboxStore, self.store)

    def test_pod_directory(self) -> None:
        r = rec("a1")
        self.successResultOf(self.store.create(r, b'{"pod-name": "p"}', b"#cloud-config\n"))
        d = os.path.join(self.pods, "a1")
        self.assertEqual(self.store.pod_dir("a1"), d)
        self.assertEqual(self.store.socket_path("a1"), os.path.join(d, "agent.ttrpc"))
        self.assertEqual(stat.S_IMODE(os.stat(d).st_mode), 0o700)
        self.assertEqual(sorted(os.listdir(d)), ["apf.json", "sandbox.json", "user-data"])
        for name in os.listdir(d):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(d, name)).st_mode), 0o600, name)
        self.assertEqual(self.successResultOf(self.store.read_user_data("a1")), b"#cloud-config\n")
        self.assertEqual(self.successResultOf(self.store.get("a1")), r)
        r2 = r.advance(SandboxState.CREATE_INTENT)
        self.successResultOf(self.store.put(r2))
        self.assertEqual(self.successResultOf(self.store.get("a1")), r2)
        self.assertEqual(self.successResultOf(self.store.load_all()), [r2])
        self.successResultOf(self.store.remove("a1"))
        self.successResultOf(self.store.remove("a1"))  # idempotent
        self.assertFalse(os.path.exists(d))
        self.assertIsNone(self.successResultOf(self.store.get("a1")))
        self.assertIsNone(self.successResultOf(self.store.get("../x")))

    def test_bad_ids(self) -> None:
        for sid in ("", ".", "..", "a/b", "a\0b"):
            self.assertRaises(ValueError, self.store.pod_dir, sid)

    def test_strays_and_unreadable(self) -> None:
        self.successResultOf(self.store.create(rec("b2"), b"{}", b""))
        os.makedirs(os.path.join(self.pods, "half"))
        os.makedirs(os.path.join(self.pods, "bad"))
        with open(os.path.join(self.pods, "bad", "sandbox.json"), "w") as f:
            f.write("{not json")
        self.assertEqual(self.successResultOf(self.store.remove_strays()), ["half"])
        self.assertEqual([r.sandbox_id for r in load_records(self.pods)], ["b2"])  # "bad" skipped, logged
        self.assertEqual(load_records(os.path.join(self.pods, "nope")), [])

    def test_order_per_sandbox(self) -> None:
        runner = ManualRunner()
        store = SandboxStore(self.pods, runner)
        a1 = store.put(rec("a"))
        a2 = store.put(rec("a", SandboxState.CREATE_INTENT))
        b1 = store.put(rec("b"))
        # a's second write waits for its first; b's runs beside a's
        self.assertEqual(len(runner.pending), 2)
        runner.step()  # a1
        self.successResultOf(a1)
        self.assertNoResult(a2)
        self.assertEqual(len(runner.pending), 2)  # b1, a2
        runner.step()
        runner.step()
        self.successResultOf(b1)
        self.successResultOf(a2)
        self.assertEqual(self.successResultOf(self.store.get("a")).state,  # type: ignore[union-attr]
                         SandboxState.CREATE_INTENT)

    def test_cancel_leaves_write(self) -> None:
        runner = ManualRunner()
        store = SandboxStore(self.pods, runner)
        d = store.put(rec("c"))
        then = store.remove("c")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        runner.step()
        self.assertTrue(os.path.exists(os.path.join(self.pods, "c", "sandbox.json")))  # written all the same
        runner.step()
        self.successResultOf(then)
        self.assertFalse(os.path.exists(os.path.join(self.pods, "c")))

    def test_failure_passed_on(self) -> None:
        d = self.store.read_user_data("nothing")
        self.failureResultOf(d, FileNotFoundError)


class PreviousJournalRecoveryTests(SynchronousTestCase):
    """A journal written by the previous version is re-adopted (running) and finished (stop-intent)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pods = os.path.abspath(self.mktemp())
        self.netns = os.path.abspath(self.mktemp())
        open(self.netns, "w").close()
        self.provider = FakeProvider(self.clock)
        self.net = FakeNetworking()
        self.proxies = FakeProxyFactory()

    def install(self, doc: dict[str, Any]) -> str:
        sid: str = doc["sandbox_id"]
        d = os.path.join(self.pods, sid)
        os.makedirs(d)
        doc = dict(doc, netns=self.netns, socket_path=os.path.join(d, "agent.ttrpc"))
        with open(os.path.join(d, "sandbox.json"), "w") as f:
            json.dump(doc, f)
        return sid

    def service(self) -> CloudService:
        return CloudService(self.clock, self.provider, self.proxies, SandboxStore(self.pods), self.net, FakeTLS(),
                            ServiceConfig(pods_dir=self.pods), wallclock=self.clock.seconds)

    def test_running_readopted(self) -> None:
        sid = self.install(fixture("running-vxlan"))
        svc = self.service()
        self.successResultOf(Deferred.fromCoroutine(svc.recover()))
        self.assertEqual(svc.sandboxes[sid].record.state, SandboxState.RUNNING)
        self.assertIn(("ensure", sid), self.net.calls)
        [proxy] = self.proxies.live(sid)
        assert proxy.started is not None
        self.assertEqual(proxy.started[:2], (("192.0.2.1", 15150), "podvm-nginx-7d9f-3f2a9c81"))
        self.successResultOf(Deferred.fromCoroutine(svc.stop_vm(sid)))
        self.assertIn(("delete", "i-podvm-nginx-7d9f-3f2a9c81"), self.provider.calls)
        self.assertEqual(os.listdir(self.pods), [])

    def test_tunnel_rolled_back(self) -> None:
        """TUNNEL is no longer written, but a journal of the previous version may hold it."""
        sid = self.install(dict(fixture("running-vxlan"), state="tunnel"))
        svc = self.service()
        self.successResultOf(Deferred.fromCoroutine(svc.recover()))
        rec = svc.sandboxes[sid].record
        self.assertEqual((rec.state, rec.instance_id, rec.ips), (SandboxState.CREATED, "", ()))
        self.assertIn(("delete", "i-podvm-nginx-7d9f-3f2a9c81"), self.provider.calls)
        self.assertIn(("teardown", sid), self.net.calls)

    def test_stop_intent_finished(self) -> None:
        sid = self.install(dict(fixture("running-vxlan"), state="stop-intent"))
        svc = self.service()
        self.successResultOf(Deferred.fromCoroutine(svc.recover()))
        self.assertNotIn(sid, svc.sandboxes)
        self.assertIn(("delete", "i-podvm-nginx-7d9f-3f2a9c81"), self.provider.calls)
        self.assertIn(("teardown", sid), self.net.calls)
        self.assertEqual(os.listdir(self.pods), [])


class ThreadPoolRunnerTests(TestCase):
    """The daemon's runner: the store's work runs on a pool thread and fires on the reactor thread."""

    def test_runs_in_pool(self) -> Deferred[None]:
        import threading

        from twisted.internet import reactor

        pool = ThreadPool(minthreads=0, maxthreads=2, name="test-journal")
        pool.start()
        self.addCleanup(pool.stop)
        run = threadpool_runner(reactor, pool)  # type: ignore[arg-type]
        pods = os.path.abspath(self.mktemp())
        store = SandboxStore(pods, run)
        main = threading.get_ident()

        def where() -> int:
            return threading.get_ident()

        async def go() -> None:
            await store.put(rec("t1"))
            records = await store.load_all()
            self.assertEqual([r.sandbox_id for r in records], ["t1"])
            self.assertEqual(threading.get_ident(), main)  # results come back on the reactor thread
            self.assertNotEqual(await run(where), main)

        return Deferred.fromCoroutine(go())
