"""The adaptor's cluster duties (caa/adaptor/cluster.py) over a scripted IKubeClient, and the sandbox service's
calls into IClusterDuties (a recording fake) at its state transitions: PeerPod name journalled with the instance,
created after it, released after a successful delete (StopVM, rollback, sweeper, after a restart)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from caa.adaptor.adapters import NullClusterDuties
from caa.adaptor.cluster import ClusterDuties, ClusterSettings, pods_restarted
from caa.adaptor.daemon import build_daemon
from caa.adaptor.interfaces import IClusterDuties, SandboxRecord, SandboxState
from caa.adaptor.options import AdaptorOptions
from caa.adaptor.store import record_from_json, record_to_json
from caa.k8s.errors import Conflict, Invalid, NotFound, Unavailable
from caa.k8s.interfaces import IKubeClient
from caa.k8s.objects import EXTENDED_RESOURCE, OWNER_ANNOTATION, PEERPOD_FINALIZER, JSONObject
from caa.providers.interfaces import TransientError
from tests.test_adaptor_daemon import DaemonTestCase
from tests.test_adaptor_service import SID, Harness

Answer = Callable[[], Deferred[Any]]

POD = {"metadata": {"name": "web", "namespace": "ns", "uid": "pod-uid-1"}}


@implementer(IKubeClient)
class ScriptedKube:
    """Records every call as (method, args); answers from `script[method]` (a list consumed in order, each an
    object, an exception, or a Deferred the test fires later), else `{}`."""

    timeout = 10.0

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.script: dict[str, list[Any]] = {}

    def _answer(self, method: str, *args: Any) -> Deferred[Any]:
        self.calls.append((method, args))
        queue = self.script.get(method) or []
        answer = queue.pop(0) if queue else {}
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]

    def call(self, fn: Any, *args: Any, timeout: float | None = None, **kwargs: Any) -> Deferred[Any]:
        return self._answer("call", fn, *args)

    def get_node(self, name: str) -> Deferred[Any]:
        return self._answer("get_node", name)

    def patch_node(self, name: str, patch: Any) -> Deferred[Any]:
        return self._answer("patch_node", name, patch)

    def patch_node_status(self, name: str, patch: Any) -> Deferred[Any]:
        return self._answer("patch_node_status", name, patch)

    def create_peerpod(self, namespace: str, body: Any) -> Deferred[Any]:
        return self._answer("create_peerpod", namespace, body)

    def get_peerpod(self, namespace: str, name: str) -> Deferred[Any]:
        return self._answer("get_peerpod", namespace, name)

    def list_peerpods(self, namespace: str | None = None, label_selector: str | None = None) -> Deferred[Any]:
        return self._answer("list_peerpods", namespace, label_selector)

    def patch_peerpod(self, namespace: str, name: str, patch: Any) -> Deferred[Any]:
        return self._answer("patch_peerpod", namespace, name, patch)

    def remove_peerpod_finalizers(self, namespace: str, name: str) -> Deferred[Any]:
        return self._answer("remove_peerpod_finalizers", namespace, name)

    def delete_peerpod(self, namespace: str, name: str) -> Deferred[Any]:
        return self._answer("delete_peerpod", namespace, name)

    def get_pod(self, namespace: str, name: str) -> Deferred[Any]:
        return self._answer("get_pod", namespace, name)

    def list_pods(self, namespace: str | None = None, field_selector: str | None = None) -> Deferred[Any]:
        return self._answer("list_pods", namespace, field_selector)

    def get_config_map(self, namespace: str, name: str) -> Deferred[Any]:
        return self._answer("get_config_map", namespace, name)

    def get_secret(self, namespace: str, name: str) -> Deferred[Any]:
        return self._answer("get_secret", namespace, name)

    def get_service_account(self, namespace: str, name: str) -> Deferred[Any]:
        return self._answer("get_service_account", namespace, name)

    def get_lease(self, namespace: str, name: str) -> Deferred[Any]:
        return self._answer("get_lease", namespace, name)

    def create_lease(self, namespace: str, body: Any) -> Deferred[Any]:
        return self._answer("create_lease", namespace, body)

    def replace_lease(self, namespace: str, name: str, body: Any) -> Deferred[Any]:
        return self._answer("replace_lease", namespace, name, body)


def record(peerpod: str = "web-resource-b2c4d", instance_id: str = "i-1") -> SandboxRecord:
    return SandboxRecord(sandbox_id=SID, pod_name="web", pod_namespace="ns", netns="/x", socket_path="/s",
                         server_name="podvm-web", state=SandboxState.TUNNEL_INTENT, created=1.0,
                         instance_id=instance_id, peerpod=peerpod)


class DutiesHarness(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.kube = ScriptedKube()

    def duties(self, **settings: Any) -> ClusterDuties:
        s: dict[str, Any] = {"node_name": "node-1", "provider": "libvirt", "limit": 3, "pod_uid": "caa-uid-new"}
        s.update(settings)
        return ClusterDuties(self.clock, self.kube, ClusterSettings(**s))


class InterfaceTests(DutiesHarness):
    def test_implementations_verified(self) -> None:
        verifyObject(IKubeClient, self.kube)
        verifyObject(IClusterDuties, self.duties())
        verifyObject(IClusterDuties, NullClusterDuties())
        verifyObject(IClusterDuties, RecordingDuties())

    def test_null_duties_do_nothing(self) -> None:
        null = NullClusterDuties()
        null.start()
        self.assertEqual(null.peerpod_name("web"), "")
        null.instance_created(record())
        null.instance_deleted(record())
        self.assertTrue(self.successResultOf(null.startup_ready()))
        self.successResultOf(null.stop())


class NodeCapacityTests(DutiesHarness):
    def test_owner_then_value(self) -> None:
        self.duties(limit=3).start()
        self.assertEqual(self.kube.calls, [
            ("patch_node", ("node-1", {"metadata": {"annotations": {OWNER_ANNOTATION: "caa-uid-new"}}})),
            ("patch_node_status", ("node-1", {"status": {"capacity": {EXTENDED_RESOURCE: "3"},
                                                         "allocatable": {EXTENDED_RESOURCE: "3"}}})),
        ])

    def test_without_pod_uid_no_annotation(self) -> None:
        self.duties(pod_uid="").start()
        self.assertEqual(self.kube.methods(), ["patch_node_status"])

    def test_negative_limit_not_advertised(self) -> None:
        d = self.duties(limit=-1)
        d.start()
        self.successResultOf(d.stop())
        self.assertEqual(self.kube.calls, [])

    def test_api_down_retried_with_backoff(self) -> None:
        self.kube.script["patch_node"] = [Unavailable("connection refused"), Unavailable("connection refused")]
        d = self.duties()
        d.start()  # returns at once: start-up never waits for the API server
        self.assertEqual(self.kube.methods(), ["patch_node"])
        self.clock.advance(1.0)
        self.assertEqual(self.kube.methods(), ["patch_node", "patch_node"])
        self.clock.advance(1.9)
        self.assertEqual(len(self.kube.calls), 2)  # the second delay doubled
        self.clock.advance(0.1)
        self.assertEqual(self.kube.methods(), ["patch_node", "patch_node", "patch_node", "patch_node_status"])

    def test_stop_withdraws_own_value(self) -> None:
        d = self.duties()
        d.start()
        self.kube.script["get_node"] = [{"metadata": {"annotations": {OWNER_ANNOTATION: "caa-uid-new"}}}]
        self.successResultOf(d.stop())
        self.assertEqual(self.kube.calls[-1], ("patch_node_status", ("node-1", {
            "status": {"capacity": {EXTENDED_RESOURCE: None}, "allocatable": {EXTENDED_RESOURCE: None}}})))

    def test_older_instance_leaves_newer_value(self) -> None:
        d = self.duties(pod_uid="caa-uid-old")
        d.start()
        self.kube.script["get_node"] = [{"metadata": {"annotations": {OWNER_ANNOTATION: "caa-uid-new"}}}]
        self.successResultOf(d.stop())
        self.assertEqual(self.kube.methods(), ["patch_node", "patch_node_status", "get_node"])

    def test_stop_while_retrying_withdraws_nothing(self) -> None:
        self.kube.script["patch_node"] = [Unavailable("down")]
        d = self.duties()
        d.start()
        self.successResultOf(d.stop())  # the back-off sleep is cancelled; nothing of ours to withdraw
        self.clock.advance(100)
        self.assertEqual(self.kube.methods(), ["patch_node"])

    def test_withdraw_failure_logged_not_raised(self) -> None:
        d = self.duties()
        d.start()
        self.kube.script["get_node"] = [Unavailable("down")]
        self.successResultOf(d.stop())
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class PeerPodTests(DutiesHarness):
    def test_name(self) -> None:
        self.assertRegex(self.duties().peerpod_name("web"), r"^web-resource-[bcdfghjklmnpqrstvwxz2456789]{5}$")

    def test_created_with_owner_reference(self) -> None:
        self.kube.script["get_pod"] = [POD]
        self.duties().instance_created(record())
        self.assertEqual(self.kube.calls[0], ("get_pod", ("ns", "web")))
        method, (ns, body) = self.kube.calls[1]
        self.assertEqual((method, ns), ("create_peerpod", "ns"))
        self.assertEqual(body["metadata"]["name"], "web-resource-b2c4d")
        self.assertEqual(body["metadata"]["finalizers"], [PEERPOD_FINALIZER])
        self.assertEqual(body["metadata"]["ownerReferences"], [{
            "apiVersion": "v1", "kind": "Pod", "name": "web", "uid": "pod-uid-1", "controller": True,
            "blockOwnerDeletion": True}])
        self.assertEqual(body["spec"], {"cloudProvider": "libvirt", "instanceID": "i-1"})

    def test_no_name_no_peerpod(self) -> None:
        self.duties().instance_created(record(peerpod=""))
        self.duties().instance_deleted(record(peerpod=""))
        self.assertEqual(self.kube.calls, [])

    def test_existing_counts_as_created(self) -> None:
        d = self.duties()
        self.kube.script["get_pod"] = [POD]
        self.kube.script["create_peerpod"] = [Conflict("exists", 409)]
        d.instance_created(record())
        self.assertEqual(d.creating, {})
        self.clock.advance(100)
        self.assertEqual(self.kube.methods(), ["get_pod", "create_peerpod"])

    def test_api_down_create_retried(self) -> None:
        d = self.duties()
        self.kube.script["get_pod"] = [Unavailable("down"), POD]
        d.instance_created(record())
        self.assertIn("ns/web-resource-b2c4d", d.creating)
        self.clock.advance(1.0)
        self.assertEqual(self.kube.methods(), ["get_pod", "get_pod", "create_peerpod"])
        self.assertEqual(d.creating, {})

    def test_pod_gone_gives_up(self) -> None:
        d = self.duties()
        self.kube.script["get_pod"] = [NotFound("pods \"web\" not found", 404)]
        d.instance_created(record())
        self.clock.advance(1000)
        self.assertEqual(self.kube.methods(), ["get_pod"])

    def test_release(self) -> None:
        d = self.duties()
        d.instance_deleted(record())
        self.assertEqual(self.kube.calls, [("remove_peerpod_finalizers", ("ns", "web-resource-b2c4d"))])
        self.assertEqual(d.releasing, {})

    def test_release_of_missing_or_bare_peerpod_is_done(self) -> None:
        d = self.duties()
        self.kube.script["remove_peerpod_finalizers"] = [NotFound("gone", 404), Invalid("no path", 422)]
        d.instance_deleted(record())
        d.instance_deleted(record())
        self.clock.advance(100)
        self.assertEqual(len(self.kube.calls), 2)

    def test_release_retried_while_api_down(self) -> None:
        d = self.duties()
        self.kube.script["remove_peerpod_finalizers"] = [Unavailable("down"), Unavailable("down")]
        d.instance_deleted(record())
        self.clock.advance(1.0)
        self.clock.advance(2.0)
        self.assertEqual(self.kube.methods(), ["remove_peerpod_finalizers"] * 3)
        self.assertEqual(d.releasing, {})

    def test_delete_cancels_pending_create(self) -> None:
        d = self.duties()
        self.kube.script["get_pod"] = [Unavailable("down")]
        d.instance_created(record())
        d.instance_deleted(record())  # the create waits for its retry: cancelled, never sent again
        self.clock.advance(100)
        self.assertEqual(self.kube.methods(), ["get_pod", "remove_peerpod_finalizers"])

    def test_release_waits_for_a_create_in_flight(self) -> None:
        d = self.duties()
        answer: Deferred[JSONObject] = Deferred()
        self.kube.script["create_peerpod"] = [answer]
        self.kube.script["get_pod"] = [POD]
        d.instance_created(record())
        d.instance_deleted(record())
        self.assertEqual(self.kube.methods(), ["get_pod", "create_peerpod"])  # no release before the answer
        answer.callback({})
        self.assertEqual(self.kube.methods(), ["get_pod", "create_peerpod", "remove_peerpod_finalizers"])

    def test_stop_cancels_retries(self) -> None:
        d = self.duties(limit=-1)
        self.kube.script["remove_peerpod_finalizers"] = [Unavailable("down")]
        d.instance_deleted(record())
        self.successResultOf(d.stop())
        self.clock.advance(100)
        self.assertEqual(self.kube.methods(), ["remove_peerpod_finalizers"])


def pod(name: str, ready: str | None, since: str = "2026-12-02T03:00:10Z", runtime: str = "kata-remote") -> Any:
    conditions = [] if ready is None else [{"type": "Ready", "status": ready, "lastTransitionTime": since}]
    return {"metadata": {"name": name, "namespace": "ns"}, "spec": {"runtimeClassName": runtime},
            "status": {"conditions": conditions}}


STARTED = 1796180405.5  # 2026-12-02T03:00:05.5Z


class StartupProbeTests(DutiesHarness):
    def test_pods_restarted(self) -> None:
        self.assertEqual(pods_restarted({"items": []}, "kata-remote", STARTED), "")
        self.assertEqual(pods_restarted({"items": [pod("a", "True"), pod("b", None, runtime="runc")]},
                                        "kata-remote", STARTED), "")
        self.assertEqual(pods_restarted({"items": [pod("a", "False")]}, "kata-remote", STARTED),
                         "pod ns/a is not Ready")
        self.assertEqual(pods_restarted({"items": [pod("a", None)]}, "kata-remote", STARTED), "pod ns/a is not Ready")
        self.assertEqual(pods_restarted({"items": [pod("a", "True", since="2026-12-02T03:00:04Z")]},
                                        "kata-remote", STARTED),
                         "pod ns/a has not been restarted since the adaptor started")
        # whole seconds: Ready within the adaptor's first second counts as after its start
        self.assertEqual(pods_restarted({"items": [pod("a", "True", since="2026-12-02T03:00:05Z")]},
                                        "kata-remote", STARTED), "")

    def test_checked_until_it_once_passes(self) -> None:
        d = self.duties(started=STARTED)
        self.kube.script["list_pods"] = [Unavailable("down"), {"items": [pod("a", "False")]},
                                         {"items": [pod("a", "True")]}]
        self.assertFalse(self.successResultOf(d.startup_ready()))
        self.assertFalse(self.successResultOf(d.startup_ready()))
        self.assertTrue(self.successResultOf(d.startup_ready()))
        self.assertTrue(self.successResultOf(d.startup_ready()))
        self.assertEqual(self.kube.calls[0], ("list_pods", (None, "spec.nodeName=node-1")))
        self.assertEqual(len(self.kube.calls), 3)


class JournalTests(SynchronousTestCase):
    def test_peerpod_key_only_when_set(self) -> None:
        old = record(peerpod="")
        doc = record_to_json(old)
        self.assertNotIn("peerpod", doc)  # records outside a cluster stay what earlier versions wrote
        self.assertEqual(record_from_json(doc), old)
        new = record()
        doc = record_to_json(new)
        self.assertEqual(doc["peerpod"], "web-resource-b2c4d")
        self.assertEqual(record_from_json(doc), new)


@implementer(IClusterDuties)
class RecordingDuties:
    """Records what the service tells the cluster (events of (name, sandbox state, instance id, peerpod))."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.names = 0

    def start(self) -> None:
        self.events.append(("start", "", ""))

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def peerpod_name(self, pod_name: str) -> str:
        self.names += 1
        return f"{pod_name}-resource-{self.names:05d}"

    def instance_created(self, record: SandboxRecord) -> None:
        self.events.append(("created", record.instance_id, record.peerpod))

    def instance_deleted(self, record: SandboxRecord) -> None:
        self.events.append(("deleted", record.instance_id, record.peerpod))

    def startup_ready(self) -> Deferred[bool]:
        return succeed(True)


class ServiceCallsTests(Harness):
    def setUp(self) -> None:
        self.cluster = RecordingDuties()
        super().setUp()

    def make(self, **cfg: Any) -> Any:
        from caa.adaptor.service import CloudService, ServiceConfig

        return CloudService(self.clock, self.provider, self.proxies, self.store, self.net, self.tls,
                            ServiceConfig(pods_dir=self.pods_dir, **cfg), wallclock=self.clock.seconds,
                            cluster=self.cluster)

    def test_start_then_stop(self) -> None:
        self.create()
        self.assertEqual(self.cluster.events, [])  # CreateVM: nothing in the cloud yet
        self.successResultOf(self.start())
        iid = self.record().instance_id
        self.assertEqual(self.cluster.events, [("created", iid, "nginx-7d9f-resource-00001")])
        self.assertEqual(self.record().peerpod, "nginx-7d9f-resource-00001")  # journalled
        self.successResultOf(self.stop())
        self.assertEqual(self.cluster.events[-1], ("deleted", iid, "nginx-7d9f-resource-00001"))
        self.assertClean()

    def test_failed_start_rolled_back_releases(self) -> None:
        self.create()
        self.proxies.fail_start = "connection refused"
        self.failureResultOf(self.start())
        self.assertEqual([e[0] for e in self.cluster.events], ["created", "deleted"])
        self.assertEqual(self.record().peerpod, "")  # the next StartVM makes a new one

    def test_failed_delete_keeps_finalizer_until_sweeper_succeeds(self) -> None:
        self.create()
        self.successResultOf(self.start())
        self.provider.fail_delete = TransientError("throttled")
        self.successResultOf(self.stop())
        self.assertEqual([e[0] for e in self.cluster.events], ["created"])
        self.assertEqual(self.record().peerpod, "nginx-7d9f-resource-00001")
        self.provider.fail_delete = None
        self.successResultOf(Deferred.fromCoroutine(self.svc.sweep()))
        self.assertEqual(self.cluster.events[-1][0::2], ("deleted", "nginx-7d9f-resource-00001"))

    def test_restarted_adaptor_releases_from_the_journal(self) -> None:
        self.create()
        self.successResultOf(self.start())
        self.proxies = type(self.proxies)()
        self.cluster = RecordingDuties()  # a new process: nothing in memory
        self.svc = self.make()
        self.successResultOf(Deferred.fromCoroutine(self.svc.recover()))
        # re-adopted: the PeerPod is made sure of (an existing one counts as created), under its journalled name
        self.assertEqual(self.cluster.events[0][0::2], ("created", "nginx-7d9f-resource-00001"))
        self.successResultOf(self.stop())
        self.assertEqual(self.cluster.events[-1][0::2], ("deleted", "nginx-7d9f-resource-00001"))

    def test_readopted_record_without_name_gets_one(self) -> None:
        self.create()
        self.successResultOf(self.start())
        rec = self.record()
        self.successResultOf(self.store.put(rec.evolve(peerpod="")))  # an older adaptor's journal
        self.proxies = type(self.proxies)()
        self.svc = self.make()
        self.successResultOf(Deferred.fromCoroutine(self.svc.recover()))
        self.assertEqual(self.record().peerpod, "nginx-7d9f-resource-00002")
        self.assertEqual(self.cluster.events[-1][0::2], ("created", "nginx-7d9f-resource-00002"))


class LoggingDuties(RecordingDuties):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def start(self) -> None:
        self.log.append("cluster start")

    def stop(self) -> Deferred[None]:
        self.log.append("cluster stop")
        return succeed(None)


class DaemonWiringTests(DaemonTestCase):
    def test_started_after_the_pools_stopped_before_them(self) -> None:
        d = self.daemon()
        duties = LoggingDuties(self.log)
        d.cluster = duties
        d.startService()
        self.assertEqual(self.log[:3], ["pool start", "cluster start", "recover"])
        self.successResultOf(d.stopService())
        self.assertEqual(self.log[-3:], ["shutdown", "cluster stop", "pool stop"])

    def build(self, environ: dict[str, str], *args: str) -> Any:
        options = AdaptorOptions(environ={})
        options.parseOptions(["--provider", "tests.fakes.provider:FakeProviderFactory", "--socket", self.path,
                              "--pods-dir", os.path.join(self.dir, "pods"), "--tls-dir", os.path.join(self.dir, "tls"),
                              "--tunnel-type", "none", "--disable-tls", *args])
        return build_daemon(self.reactor, options, on_fatal=lambda: None, environ=environ)

    def kubeconfig(self) -> str:
        path = os.path.join(self.dir, "kubeconfig")
        with open(path, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "t",
                       "clusters": [{"name": "t", "cluster": {"server": "https://127.0.0.1:1"}}],
                       "users": [{"name": "t", "user": {"token": "x"}}],
                       "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}]}, f)
        return path

    def test_duties_chosen_from_the_environment(self) -> None:
        outside = self.build({"NODE_NAME": "n1"})
        self.assertIsInstance(outside.cluster, NullClusterDuties)
        self.assertIsNone(outside.cloud.auth_lookup)
        no_node = self.build({}, "--kubeconfig", self.kubeconfig())
        self.assertIsInstance(no_node.cluster, NullClusterDuties)
        self.assertIsNotNone(no_node.cloud.auth_lookup)  # pull secrets need no node
        inside = self.build({"NODE_NAME": "n1", "POD_UID": "u1"}, "--kubeconfig", self.kubeconfig(),
                            "--peerpods-limit-per-node", "4")
        self.assertIsInstance(inside.cluster, ClusterDuties)
        self.assertIs(inside.cloud.cluster, inside.cluster)
        settings = inside.cluster.settings
        self.assertEqual((settings.node_name, settings.pod_uid, settings.limit, settings.provider,
                          settings.runtime_class), ("n1", "u1", 4, "fake", "kata-remote"))
        self.assertIn("caa-k8s", [p.name for p in inside.thread_pools])
