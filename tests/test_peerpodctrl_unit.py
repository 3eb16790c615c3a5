"""caa-peerpod-ctrl with fakes: work queue back-off, provider settings, reconcile, leader election, options,
and the controller service wiring (synchronous, time driven by hand)."""

from __future__ import annotations

import base64
import copy
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from caa.k8s.errors import Conflict, NotFound, Unavailable
from caa.k8s.objects import PEERPOD_CTRL_LEASE, PEERPOD_FINALIZER, JSONObject, new_peerpod
from caa.k8s.watch import ADDED, DELETED, MODIFIED
from caa.peerpodctrl.config import CONFIG_MAP_NAME, SECRET_NAME, CloudConfig
from caa.peerpodctrl.lease import LeaderElector, LeaseTimings, micro_time
from caa.peerpodctrl.metrics import ControllerMetrics, probe_site
from caa.peerpodctrl.providers import ProviderCache, ProviderUnavailable, provider_options
from caa.peerpodctrl.queue import WorkQueue, exponential_backoff
from caa.peerpodctrl.reconcile import Reconciler, finalizer_patch
from caa.peerpodctrl.service import PeerPodController
from caa.peerpodctrl.tap import Options
from caa.providers.interfaces import InstanceNotFound, IProvider, IProviderFactory, TransientError
from caa.providers.registry import ProviderRegistry
from caa.reactors import INodeReactor
from tests.fakes.k8s import FakeWatchSource
from tests.fakes.provider import FakeOptions, FakeProvider
from tests.reactors import NodeMemoryReactor

NS = "default"


class FakeKube:
    """The IKubeClient calls the controller makes (PeerPods and Leases), on dicts, answering at once."""

    def __init__(self) -> None:
        self.peerpods: dict[tuple[str, str], JSONObject] = {}
        self.leases: dict[tuple[str, str], JSONObject] = {}
        self.version = 0
        self.calls: list[tuple[str, str]] = []
        self.down = False

    def _rv(self) -> str:
        self.version += 1
        return str(self.version)

    def _check(self) -> None:
        if self.down:
            raise Unavailable("connection refused")

    def add_peerpod(self, body: JSONObject, created: str = "2026-01-01T00:00:00Z",
                    deleting: bool = False) -> JSONObject:
        obj = copy.deepcopy(body)
        obj["metadata"].update(resourceVersion=self._rv(), creationTimestamp=created)
        if deleting:
            obj["metadata"]["deletionTimestamp"] = "2026-01-02T00:00:00Z"
        self.peerpods[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj
        return obj

    def _answer(self, fn: Any, *args: Any) -> Deferred[Any]:
        try:
            self._check()
            return succeed(fn(*args))
        except Exception as e:
            return fail(e)

    def get_peerpod(self, namespace: str, name: str) -> Deferred[JSONObject]:
        self.calls.append(("get", name))

        def get() -> JSONObject:
            if (namespace, name) not in self.peerpods:
                raise NotFound("peerpod")
            return copy.deepcopy(self.peerpods[(namespace, name)])
        return self._answer(get)

    def list_peerpods(self, namespace: str | None = None, label_selector: str | None = None) -> Deferred[JSONObject]:
        self.calls.append(("list", namespace or ""))
        return self._answer(lambda: {"items": [copy.deepcopy(o) for (ns, _), o in self.peerpods.items()
                                               if namespace in (None, ns)]})

    def patch_peerpod(self, namespace: str, name: str, patch: Any) -> Deferred[JSONObject]:
        self.calls.append(("patch", name))

        def apply() -> JSONObject:
            obj = self.peerpods.get((namespace, name))
            if obj is None:
                raise NotFound("peerpod")
            meta = patch["metadata"]
            if meta.get("resourceVersion") not in (None, obj["metadata"]["resourceVersion"]):
                raise Conflict("changed")
            if meta["finalizers"]:
                obj["metadata"]["finalizers"] = meta["finalizers"]
            else:
                obj["metadata"].pop("finalizers", None)
                if obj["metadata"].get("deletionTimestamp"):
                    del self.peerpods[(namespace, name)]
            obj["metadata"]["resourceVersion"] = self._rv()
            return obj
        return self._answer(apply)

    def delete_peerpod(self, namespace: str, name: str) -> Deferred[JSONObject]:
        self.calls.append(("delete", name))

        def delete() -> JSONObject:
            obj = self.peerpods.get((namespace, name))
            if obj is None:
                raise NotFound("peerpod")
            if obj["metadata"].get("finalizers"):
                obj["metadata"]["deletionTimestamp"] = "2026-01-03T00:00:00Z"
            else:
                del self.peerpods[(namespace, name)]
            return obj
        return self._answer(delete)

    def get_lease(self, namespace: str, name: str) -> Deferred[JSONObject]:
        def get() -> JSONObject:
            if (namespace, name) not in self.leases:
                raise NotFound("lease")
            return copy.deepcopy(self.leases[(namespace, name)])
        return self._answer(get)

    def create_lease(self, namespace: str, body: JSONObject) -> Deferred[JSONObject]:
        def create() -> JSONObject:
            key = (namespace, body["metadata"]["name"])
            if key in self.leases:
                raise Conflict("exists")
            obj = copy.deepcopy(body)
            obj["metadata"]["resourceVersion"] = self._rv()
            self.leases[key] = obj
            return obj
        return self._answer(create)

    def replace_lease(self, namespace: str, name: str, body: JSONObject) -> Deferred[JSONObject]:
        def replace() -> JSONObject:
            current = self.leases.get((namespace, name))
            if current is None:
                raise NotFound("lease")
            if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                raise Conflict("stale")
            obj = copy.deepcopy(body)
            obj["metadata"]["resourceVersion"] = self._rv()
            self.leases[(namespace, name)] = obj
            return obj
        return self._answer(replace)


class CountingProvider(FakeProvider):
    """A FakeProvider whose next `failures` deletes fail (TRANSIENT), then succeed."""

    def __init__(self, clock: Clock | INodeReactor, failures: int = 0) -> None:
        super().__init__(clock)
        self.failures = failures
        self.teardowns = 0

    def delete_instance(self, instance_id: str) -> Deferred[None]:
        if self.failures:
            self.failures -= 1
            self.calls.append(("delete", instance_id))
            return fail(TransientError("cloud busy"))
        return super().delete_instance(instance_id)

    def teardown(self) -> Deferred[None]:
        self.teardowns += 1
        return succeed(None)


@implementer(IProviderFactory)
class RecordingFactory:
    """The fake provider's factory that remembers the options it was built with and hands out `provider`."""

    name = "fake"
    description = "test"

    def __init__(self, provider: IProvider) -> None:
        self.provider = provider
        self.built: list[Any] = []

    def options(self) -> FakeOptions:
        return FakeOptions()

    def create(self, reactor: INodeReactor, options: Any) -> IProvider:
        self.built.append(options)
        return self.provider


def pod(name: str = "web", uid: str = "pod-uid") -> JSONObject:
    return {"metadata": {"name": name, "namespace": NS, "uid": uid}}


def registry_with(factory: RecordingFactory) -> ProviderRegistry:
    registry = ProviderRegistry(entry_points_=[], builtins={})
    registry.register(factory)
    return registry


class WorkQueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runs: list[str] = []
        self.outcomes: dict[str, list[Deferred[None]]] = {}

    def work(self, key: str) -> Deferred[None]:
        self.runs.append(key)
        d: Deferred[None] = Deferred()
        self.outcomes.setdefault(key, []).append(d)
        return d

    def test_failures_back_off_exponentially_then_reset(self) -> None:
        queue = WorkQueue(self.clock, self.work, exponential_backoff(0.005, 0.02))
        queue.add("a")
        for expected in (0.005, 0.01, 0.02, 0.02):
            self.outcomes["a"][-1].errback(RuntimeError("boom"))
            self.assertEqual(queue.pending_retry("a"), self.clock.seconds() + expected)
            self.clock.advance(expected - 0.001)
            runs = len(self.runs)
            self.clock.advance(0.001)
            self.assertEqual(len(self.runs), runs + 1)
        self.outcomes["a"][-1].callback(None)
        self.assertEqual(queue.failures, {})
        self.assertEqual(len(queue), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_run_per_key_events_collapse_into_one_rerun(self) -> None:
        queue = WorkQueue(self.clock, self.work)
        queue.add("a")
        queue.add("b")
        queue.add("a")
        queue.add("a")
        self.assertEqual(self.runs, ["a", "b"])
        self.outcomes["a"][0].callback(None)
        self.assertEqual(self.runs, ["a", "b", "a"])
        self.outcomes["a"][1].callback(None)
        self.assertEqual(self.runs, ["a", "b", "a"])

    def test_new_event_runs_at_once_despite_back_off(self) -> None:
        queue = WorkQueue(self.clock, self.work, exponential_backoff(10, 100))
        queue.add("a")
        self.outcomes["a"][0].errback(RuntimeError("boom"))
        queue.add("a")
        self.assertEqual(self.runs, ["a", "a"])
        self.assertIsNone(queue.pending_retry("a"))
        self.assertEqual(queue.failures, {"a": 1})  # kept until a run succeeds

    def test_stop_drops_retries_and_waits_for_runs(self) -> None:
        queue = WorkQueue(self.clock, self.work)
        queue.add("a")
        queue.add("b")
        self.outcomes["a"][0].errback(RuntimeError("boom"))
        stopped = queue.stop()
        self.assertNoResult(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.outcomes["b"][0].callback(None)
        self.successResultOf(stopped)
        queue.add("c")
        self.assertNotIn("c", self.runs)


class CloudConfigTests(SynchronousTestCase):
    def test_from_objects(self) -> None:
        cm = {"data": {"CLOUD_PROVIDER": "libvirt", "LIBVIRT_URI": "qemu:///system", "SHARED": "cm"}}
        secret = {"data": {"API_KEY": base64.b64encode(b"s3cret").decode(), "SHARED": base64.b64encode(b"s").decode(),
                           "BINARY": base64.b64encode(b"\xff\xfe").decode()}}
        config = CloudConfig.from_objects(cm, secret)
        self.assertEqual(dict(config.environ), {"CLOUD_PROVIDER": "libvirt", "LIBVIRT_URI": "qemu:///system",
                                                "SHARED": "s", "API_KEY": "s3cret"})
        self.assertEqual(config.present, {CONFIG_MAP_NAME, SECRET_NAME})
        self.assertEqual(CloudConfig.from_objects(None, None), CloudConfig())

    def test_environ_reaches_provider_options_not_process_environment(self) -> None:
        options = provider_options(RecordingFactory(FakeProvider(Clock())),
                                   CloudConfig({"FORWARDER_PORT": "16000", "FAKE_FAIL_IMAGE": "bad"}))
        self.assertEqual(options["fake-forwarder-port"], "16000")
        self.assertEqual(options["fake-fail-image"], "bad")
        assert isinstance(options, FakeOptions)
        self.assertEqual(options.sources["fake-fail-image"], "env")


class ProviderCacheTests(SynchronousTestCase):
    def test_unknown_provider(self) -> None:
        cache = ProviderCache(NodeMemoryReactor(), registry_with(RecordingFactory(FakeProvider(Clock()))).get)
        with self.assertRaises(ProviderUnavailable) as caught:
            cache.get("aws")
        self.assertIn("aws cloud provider not supported", str(caught.exception))

    def test_built_once_per_config(self) -> None:
        provider = CountingProvider(Clock())
        factory = RecordingFactory(provider)
        cache = ProviderCache(NodeMemoryReactor(), registry_with(factory).get)
        self.successResultOf(cache.configure(CloudConfig({"FORWARDER_PORT": "1"})))
        self.assertIs(cache.get("fake"), provider)
        cache.get("fake")
        self.assertEqual(len(factory.built), 1)
        self.successResultOf(cache.configure(CloudConfig({"FORWARDER_PORT": "2"})))
        self.assertEqual(provider.teardowns, 1)
        cache.get("fake")
        self.assertEqual([o["fake-forwarder-port"] for o in factory.built], ["1", "2"])


class ReconcileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.kube = FakeKube()
        self.provider = CountingProvider(Clock())
        self.provider.instances["i-1"] = object()  # type: ignore[assignment]
        self.cache = ProviderCache(NodeMemoryReactor(), registry_with(RecordingFactory(self.provider)).get)
        self.metrics = ControllerMetrics.create()
        self.reconciler = Reconciler(self.kube, self.cache, self.metrics)  # type: ignore[arg-type]

    def reconcile(self, key: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self.reconciler.reconcile(key))

    def test_deleted_peerpod_instance_deleted_then_finalizer_released(self) -> None:
        self.kube.add_peerpod(new_peerpod(pod(), "fake", "i-1", name="web-resource-aaaaa"), deleting=True)
        self.successResultOf(self.reconcile(f"{NS}/web-resource-aaaaa"))
        self.assertEqual(self.provider.calls, [("delete", "i-1")])
        self.assertNotIn("i-1", self.provider.instances)
        self.assertEqual(self.kube.peerpods, {})
        self.assertEqual(self.metrics.registry.get_sample_value(
            "caa_peerpodctrl_instance_deletes_total", {"provider": "fake", "result": "deleted"}), 1)

    def test_instance_not_found_counts_as_deleted(self) -> None:
        self.provider.fail_delete = InstanceNotFound("no such instance")
        self.kube.add_peerpod(new_peerpod(pod(), "fake", "i-1", name="pp"), deleting=True)
        self.successResultOf(self.reconcile(f"{NS}/pp"))
        self.assertEqual(self.kube.peerpods, {})

    def test_provider_failure_keeps_finalizer(self) -> None:
        self.provider.failures = 1
        self.kube.add_peerpod(new_peerpod(pod(), "fake", "i-1", name="pp"), deleting=True)
        self.failureResultOf(self.reconcile(f"{NS}/pp"), TransientError)
        self.assertEqual(self.kube.peerpods[(NS, "pp")]["metadata"]["finalizers"], [PEERPOD_FINALIZER])
        self.successResultOf(self.reconcile(f"{NS}/pp"))
        self.assertEqual(self.kube.peerpods, {})

    def test_unknown_provider_keeps_finalizer(self) -> None:
        self.kube.add_peerpod(new_peerpod(pod(), "aws", "i-1", name="pp"), deleting=True)
        self.failureResultOf(self.reconcile(f"{NS}/pp"), ProviderUnavailable)
        self.assertIn((NS, "pp"), self.kube.peerpods)

    def test_only_our_finalizer_removed(self) -> None:
        body = new_peerpod(pod(), "fake", "i-1", name="pp")
        body["metadata"]["finalizers"].append("other/finalizer")
        obj = self.kube.add_peerpod(body, deleting=True)
        self.assertEqual(finalizer_patch(obj)["metadata"]["finalizers"], ["other/finalizer"])
        self.successResultOf(self.reconcile(f"{NS}/pp"))
        self.assertEqual(self.kube.peerpods[(NS, "pp")]["metadata"]["finalizers"], ["other/finalizer"])

    def test_without_finalizer_or_gone_nothing_happens(self) -> None:
        body = new_peerpod(pod(), "fake", "i-1", name="pp")
        del body["metadata"]["finalizers"]
        self.kube.add_peerpod(body, deleting=True)
        self.successResultOf(self.reconcile(f"{NS}/pp"))
        self.successResultOf(self.reconcile(f"{NS}/missing"))
        self.assertEqual(self.provider.calls, [])

    def test_older_peerpods_of_the_same_owner_deleted(self) -> None:
        self.kube.add_peerpod(new_peerpod(pod(), "fake", "i-0", name="old"), created="2026-01-01T00:00:00Z")
        self.kube.add_peerpod(new_peerpod(pod(), "fake", "i-1", name="new"), created="2026-01-01T00:00:05Z")
        self.kube.add_peerpod(new_peerpod(pod(uid="other"), "fake", "i-2", name="x"), created="2025-01-01T00:00:00Z")
        self.successResultOf(self.reconcile(f"{NS}/new"))
        self.assertIn(("delete", "old"), self.kube.calls)
        self.assertNotIn(("delete", "x"), self.kube.calls)
        self.assertTrue(self.kube.peerpods[(NS, "old")]["metadata"].get("deletionTimestamp"))
        self.assertEqual(self.metrics.registry.get_sample_value("caa_peerpodctrl_older_peerpods_deleted_total"), 1)
        self.successResultOf(self.reconcile(f"{NS}/old"))  # the older one is the one being deleted now
        self.assertEqual(self.provider.calls, [("delete", "i-0")])

    def test_peerpod_without_owner_skipped(self) -> None:
        body = new_peerpod(pod(), "fake", "i-1", name="orphan")
        del body["metadata"]["ownerReferences"]
        self.kube.add_peerpod(body, created="2026-01-02T00:00:00Z")
        self.kube.add_peerpod(new_peerpod(pod(), "fake", "i-0", name="old"), created="2026-01-01T00:00:00Z")
        self.successResultOf(self.reconcile(f"{NS}/orphan"))
        self.assertEqual(self.kube.calls, [("get", "orphan")])


class LeaderElectionTests(SynchronousTestCase):
    timings = LeaseTimings(lease_duration=15, renew_deadline=10, retry_period=2)

    def setUp(self) -> None:
        self.clock = Clock()
        self.kube = FakeKube()
        self.changes: list[tuple[str, bool]] = []

    def elector(self, identity: str, release: bool = True) -> LeaderElector:
        elector = LeaderElector(self.kube, self.clock, NS, PEERPOD_CTRL_LEASE, identity,  # type: ignore[arg-type]
                                lambda leading: self.changes.append((identity, leading)), self.timings,
                                release_on_stop=release)
        elector.startService()
        return elector

    def test_first_replica_leads_second_follows(self) -> None:
        a, b = self.elector("a"), self.elector("b")
        self.assertEqual(self.changes, [("a", True)])
        self.clock.pump([2] * 20)
        self.assertEqual(self.changes, [("a", True)])
        spec = self.kube.leases[(NS, PEERPOD_CTRL_LEASE)]["spec"]
        self.assertEqual((spec["holderIdentity"], spec["leaseDurationSeconds"], spec["leaseTransitions"]), ("a", 15, 0))
        self.assertEqual(spec["renewTime"], micro_time(40))
        self.assertTrue(a.leading)
        self.assertFalse(b.leading)
        self.successResultOf(b.stopService())
        self.successResultOf(a.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_crashed_holder_taken_over_after_lease_duration(self) -> None:
        a = self.elector("a", release=False)
        b = self.elector("b")
        self.successResultOf(a.stopService())  # as a crash: the Lease is not released
        self.assertEqual(self.changes, [("a", True), ("a", False)])
        self.clock.pump([2] * 7)  # 14 s: b has not seen it change for < 15 s
        self.assertFalse(b.leading)
        self.clock.pump([2] * 2)
        self.assertTrue(b.leading)
        spec = self.kube.leases[(NS, PEERPOD_CTRL_LEASE)]["spec"]
        self.assertEqual((spec["holderIdentity"], spec["leaseTransitions"]), ("b", 1))
        self.successResultOf(b.stopService())

    def test_released_lease_taken_at_next_try(self) -> None:
        a, b = self.elector("a"), self.elector("b")
        self.successResultOf(a.stopService())
        self.assertEqual(self.kube.leases[(NS, PEERPOD_CTRL_LEASE)]["spec"]["holderIdentity"], "")
        self.clock.advance(2)
        self.assertTrue(b.leading)
        self.successResultOf(b.stopService())

    def test_leader_that_cannot_renew_stops_before_the_lease_expires(self) -> None:
        a = self.elector("a")
        self.clock.advance(2)
        self.kube.down = True
        self.clock.pump([2] * 4)  # 8 s without a renewal
        self.assertTrue(a.leading)
        self.clock.advance(2)  # 10 s: the renew deadline
        self.assertFalse(a.leading)
        self.assertEqual(self.changes, [("a", True), ("a", False)])
        self.kube.down = False
        self.clock.advance(2)
        self.assertTrue(a.leading)
        self.successResultOf(a.stopService())

    def test_timings_checked(self) -> None:
        with self.assertRaises(ValueError):
            LeaseTimings(10, 10, 2).check()


class OptionsTests(SynchronousTestCase):
    def parse(self, argv: list[str], env: dict[str, str] | None = None) -> Options:
        options = Options(environ=env or {})
        options.parseOptions(argv)
        return options

    def test_defaults(self) -> None:
        options = self.parse([], {"PEERPODS_NAMESPACE": "ccs", "POD_NAME": "ctrl-0"})
        self.assertEqual(options["lease"], LeaseTimings(15, 10, 2))
        self.assertEqual((options["leader-election-namespace"], options["identity"]), ("ccs", "ctrl-0"))
        self.assertEqual(options["leader-election-id"], PEERPOD_CTRL_LEASE)
        self.assertEqual(options["probe-endpoint"], "tcp:8081")
        self.assertEqual(options["backoff-base"], 0.005)

    def test_go_spellings(self) -> None:
        options = self.parse(["-leader-elect", "--zap-log-level", "debug", "--health-probe-bind-address=:9081",
                              "--lease-duration=4s", "--renew-deadline=3s", "--retry-period=500ms"])
        self.assertEqual(options["lease"], LeaseTimings(4, 3, 0.5))
        self.assertEqual(options["probe-endpoint"], "tcp:9081")
        self.assertIsNone(self.parse(["--leader-elect=false"])["lease"])

    def test_bad_values(self) -> None:
        for argv in (["--lease-duration=5s", "--renew-deadline=6s"], ["--retry-period=soon"],
                     ["--leader-elect=maybe"], ["--backoff-base=0"], ["--health-probe-bind-address=x"]):
            with self.assertRaises(usage.UsageError, msg=argv):
                self.parse(argv)


class ControllerServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = NodeMemoryReactor()
        self.kube = FakeKube()
        self.provider = CountingProvider(self.reactor, failures=2)
        self.factory = RecordingFactory(self.provider)
        self.peerpods, self.cm, self.secret = FakeWatchSource(), FakeWatchSource(), FakeWatchSource()

    def controller(self, identity: str, lease: LeaseTimings | None = LeaseTimings(3, 2, 1)) -> PeerPodController:
        controller = PeerPodController(
            self.reactor, self.kube, self.peerpods, (self.cm, self.secret), namespace=NS,  # type: ignore[arg-type]
            identity=identity, lease=lease,
            providers=ProviderCache(self.reactor, registry_with(self.factory).get), backoff_base=0.1)
        controller.startService()
        return controller

    def list_all(self, listing: JSONObject) -> None:
        cm = {"items": [{"metadata": {"name": "peer-pods-cm"}, "data": {"FORWARDER_PORT": "1"}}]}
        for source, body in ((self.cm, cm), (self.secret, {"items": []}), (self.peerpods, listing)):
            for d in source.lists:
                if not d.called:
                    d.callback(copy.deepcopy({"metadata": {"resourceVersion": "1"}, **body}))

    def test_leader_acts_with_back_off_follower_does_not(self) -> None:
        obj = self.kube.add_peerpod(new_peerpod(pod(), "fake", "i-1", name="pp"), deleting=True)
        a = self.controller("a")
        b = self.controller("b")
        self.assertFalse(a.ready())
        self.list_all({"items": [obj]})
        self.assertTrue(a.ready() and b.ready())
        self.assertEqual(self.factory.built[0]["fake-forwarder-port"], "1")
        self.assertTrue(a.acting)
        self.assertFalse(b.acting)
        self.assertEqual(self.provider.calls, [("delete", "i-1")])  # first failure
        self.reactor.advance(0.1)
        self.assertEqual(len(self.provider.calls), 2)  # second failure
        self.reactor.advance(0.2)
        self.assertEqual(len(self.provider.calls), 3)
        self.assertEqual(self.kube.peerpods, {})
        errors = a.metrics.registry.get_sample_value("caa_peerpodctrl_reconciles_total", {"result": "error"})
        self.assertEqual(errors, 2)
        self.successResultOf(a.stopService())
        self.reactor.advance(1)
        self.assertTrue(b.acting)  # released: the standby takes over at its next try
        self.successResultOf(b.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_events_queue_keys_and_no_election(self) -> None:
        self.provider.failures = 0
        c = self.controller("solo", lease=None)
        self.list_all({"items": []})
        self.assertTrue(c.acting)
        obj = self.kube.add_peerpod(new_peerpod(pod(), "fake", "i-9", name="pp"))
        self.peerpods.streams[-1].event(ADDED, obj)
        self.assertEqual(self.provider.calls, [])
        self.kube.peerpods[(NS, "pp")]["metadata"]["deletionTimestamp"] = "2026-01-02T00:00:00Z"
        self.peerpods.streams[-1].event(MODIFIED, self.kube.peerpods[(NS, "pp")])
        self.assertEqual(self.provider.calls, [("delete", "i-9")])
        self.successResultOf(c.stopService())

    def test_settings_change_rebuilds_provider(self) -> None:
        self.provider.failures = 0
        c = self.controller("solo", lease=None)
        self.list_all({"items": []})
        self.cm.streams[-1].event(MODIFIED, {"metadata": {"name": "peer-pods-cm", "resourceVersion": "5"},
                                             "data": {"FORWARDER_PORT": "2"}})
        self.assertEqual(self.provider.teardowns, 0)  # nothing was built yet
        obj = self.kube.add_peerpod(new_peerpod(pod(), "fake", "i-1", name="pp"), deleting=True)
        self.peerpods.streams[-1].event(MODIFIED, obj)
        self.assertEqual(self.factory.built[-1]["fake-forwarder-port"], "2")
        self.cm.streams[-1].event(DELETED, {"metadata": {"name": "peer-pods-cm", "resourceVersion": "6"}})
        self.assertEqual(c.config.current, CloudConfig())
        self.assertEqual(self.provider.teardowns, 1)
        self.assertEqual(c.providers.config, CloudConfig())
        self.successResultOf(c.stopService())


class ProbeSiteTests(SynchronousTestCase):
    def get(self, site: Any, path: bytes) -> tuple[int, bytes]:
        request = DummyRequest(path.lstrip(b"/").split(b"/"))
        body = getChildForRequest(site.resource, request).render(request)
        return request.responseCode or 200, body

    def test_readyz_follows_readiness(self) -> None:
        ready = [False]
        metrics = ControllerMetrics.create()
        metrics.leader.set(1)
        site = probe_site(metrics, lambda: ready[0])
        self.assertEqual(self.get(site, b"/healthz"), (200, b"ok"))
        self.assertEqual(self.get(site, b"/readyz"), (503, b"not ready"))
        ready[0] = True
        self.assertEqual(self.get(site, b"/readyz"), (200, b"ok"))
        self.assertIn(b"caa_peerpodctrl_leader 1.0", self.get(site, b"/metrics")[1])
