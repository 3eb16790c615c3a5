"""Unit tests of caa.k8s without an API server: error mapping, object shapes, call deadlines, the Watcher."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import urllib3.exceptions
from kubernetes.client import Configuration
from kubernetes.client.exceptions import ApiException
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface.verify import verifyObject

from caa.k8s import errors
from caa.k8s.client import JSON_PATCH, MERGE_PATCH, KubeClient
from caa.k8s.interfaces import IKubeClient, IWatchSource, IWatchStream
from caa.k8s.objects import (
    EXTENDED_RESOURCE,
    PEERPOD_FINALIZER,
    extended_resource_patch,
    new_peerpod,
    peerpod_name,
)
from caa.k8s.pool import ThreadPoolService
from caa.k8s.watch import ADDED, DELETED, MODIFIED, Watcher, WatchEvent
from tests.fakes.k8s import FakeWatchSource, InlineThreadPool, StuckThreadPool
from tests.kubeapi import require_root
from tests.reactors import NodeMemoryReactor


def obj(name: str, rv: str, uid: str | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "uid": uid or f"uid-{name}", "resourceVersion": rv}}


def listing(rv: str, *items: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"resourceVersion": rv}, "items": list(items)}


class ErrorMappingTests(SynchronousTestCase):
    def api_error(self, status: int, reason: str = "") -> BaseException:
        body = json.dumps({"kind": "Status", "code": status, "reason": reason, "message": f"m{status}"})
        return errors.map_exception(ApiException(status=status, reason="r", body=body), "op")

    def test_statuses(self) -> None:
        for status, kind in [(404, errors.NotFound), (409, errors.Conflict), (410, errors.Gone),
                             (422, errors.Invalid), (403, errors.Forbidden), (401, errors.Forbidden),
                             (429, errors.Unavailable), (503, errors.Unavailable), (400, errors.KubeError)]:
            e = self.api_error(status, "Why")
            self.assertIs(type(e), kind, status)
            assert isinstance(e, errors.KubeError)
            self.assertEqual((e.status, e.reason, str(e)), (status, "Why", f"op: m{status}"))

    def test_transport_errors(self) -> None:
        timeout = urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out")  # type: ignore[arg-type]
        self.assertIsInstance(errors.map_exception(timeout, "op"), errors.KubeTimeout)
        wrapped = urllib3.exceptions.MaxRetryError(None, "/", timeout)  # type: ignore[arg-type]
        self.assertIsInstance(errors.map_exception(wrapped, "op"), errors.KubeTimeout)
        refused = urllib3.exceptions.MaxRetryError(None, "/", ConnectionRefusedError())  # type: ignore[arg-type]
        e = errors.map_exception(refused, "op")
        self.assertIs(type(e), errors.Unavailable)
        other = ValueError("x")
        self.assertIs(errors.map_exception(other, "op"), other)

    def test_watch_error_event_status(self) -> None:
        e = errors.from_status_object({"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"})
        self.assertIsInstance(e, errors.Gone)


class ObjectTests(SynchronousTestCase):
    def test_peerpod_shape(self) -> None:
        pod = {"metadata": {"name": "web", "namespace": "ns", "uid": "u1"}}
        pp = new_peerpod(pod, "libvirt", "i-1", name="web-resource-abcde")
        self.assertEqual(pp, {
            "apiVersion": "confidentialcontainers.org/v1alpha1", "kind": "PeerPod",
            "metadata": {"name": "web-resource-abcde", "namespace": "ns", "finalizers": [PEERPOD_FINALIZER],
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "web", "uid": "u1",
                                              "controller": True, "blockOwnerDeletion": True}]},
            "spec": {"cloudProvider": "libvirt", "instanceID": "i-1"}})
        self.assertRegex(peerpod_name("web"), re.compile(r"^web-resource-[a-z0-9]{5}$"))

    def test_extended_resource_patch(self) -> None:
        self.assertEqual(extended_resource_patch(2), {"status": {"capacity": {EXTENDED_RESOURCE: "2"},
                                                                 "allocatable": {EXTENDED_RESOURCE: "2"}}})


class Response:
    def __init__(self, data: bytes) -> None:
        self.data = data


class ClientCallTests(SynchronousTestCase):
    def client(self, pool: Any, reactor: NodeMemoryReactor | None = None) -> KubeClient:
        cfg = Configuration()
        cfg.host = "https://127.0.0.1:1"
        return KubeClient(reactor or NodeMemoryReactor(), pool, cfg, timeout=2.0)

    def test_interface(self) -> None:
        verifyObject(IKubeClient, self.client(InlineThreadPool()))

    def test_call_passes_deadline_and_decodes(self) -> None:
        seen: dict[str, Any] = {}

        def read_node(name: str, **kwargs: Any) -> Response:
            seen.update(kwargs, name=name)
            return Response(b'{"metadata": {"name": "n1"}}')

        d = self.client(InlineThreadPool()).call(read_node, "n1", timeout=3.0)
        self.assertEqual(self.successResultOf(d), {"metadata": {"name": "n1"}})
        self.assertEqual(seen, {"name": "n1", "_preload_content": False, "_request_timeout": 3.0})

    def test_call_maps_errors(self) -> None:
        def read_node(name: str, **kwargs: Any) -> Response:
            raise ApiException(status=404, reason="Not Found")

        f = self.failureResultOf(self.client(InlineThreadPool()).call(read_node, "n1"), errors.NotFound)
        self.assertIn("read_node", str(f.value))

    def test_patch_content_types(self) -> None:
        seen: list[str] = []
        c = self.client(InlineThreadPool())

        def patch(*args: Any, _content_type: str, **kwargs: Any) -> Response:
            seen.append(_content_type)
            return Response(b"{}")

        c.core.patch_node_status = patch  # type: ignore[method-assign,assignment]
        c.patch_node_status("n", {"status": {}})
        c.patch_node_status("n", [{"op": "remove", "path": "/x"}])
        self.assertEqual(seen, [MERGE_PATCH, JSON_PATCH])

    def test_stuck_worker_times_out_on_the_reactor(self) -> None:
        reactor = NodeMemoryReactor()
        d = self.client(StuckThreadPool(), reactor).get_node("n1")
        reactor.advance(2.9)
        self.assertNoResult(d)
        reactor.advance(0.2)
        self.failureResultOf(d, errors.KubeTimeout)
        self.assertEqual(reactor.getDelayedCalls(), [])


class WatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.source = FakeWatchSource()
        self.events: list[tuple[str, str, str]] = []
        self.watcher = Watcher(self.source, self.clock, self.record, name="pp",
                               backoff=lambda attempt: float(2 ** attempt))

    def record(self, event: WatchEvent) -> None:
        meta = event.object["metadata"]
        self.events.append((event.type, meta["name"], meta["resourceVersion"]))

    def start(self, *items: dict[str, Any], rv: str = "10") -> None:
        self.watcher.startService()
        self.source.lists[-1].callback(listing(rv, *items))

    def test_fakes_provide_interfaces(self) -> None:
        verifyObject(IWatchSource, self.source)
        self.start()
        verifyObject(IWatchStream, self.source.streams[0])

    def test_list_then_watch_from_its_version(self) -> None:
        synced = self.watcher.whenSynced()
        self.start(obj("a", "5"), rv="10")
        self.successResultOf(synced)
        self.assertEqual(self.events, [(ADDED, "a", "5")])
        stream = self.source.streams[0]
        self.assertEqual(stream.resource_version, "10")
        stream.event("ADDED", obj("b", "11"))
        stream.event("MODIFIED", obj("a", "12"))
        stream.event("DELETED", obj("b", "13"))
        self.assertEqual(self.events[1:], [(ADDED, "b", "11"), (MODIFIED, "a", "12"), (DELETED, "b", "13")])
        self.assertEqual(list(self.watcher.known), ["uid-a"])
        self.assertEqual(self.watcher.resource_version, "13")

    def test_clean_end_watches_on_from_last_version(self) -> None:
        self.start()
        self.source.streams[0].event("ADDED", obj("a", "11"))
        self.source.streams[0].event("BOOKMARK", {"metadata": {"resourceVersion": "20"}})
        self.source.streams[0].end()
        self.assertEqual(len(self.source.lists), 1)
        self.assertEqual(self.source.streams[1].resource_version, "20")
        self.assertEqual(self.events, [(ADDED, "a", "11")])  # bookmarks are not events

    def test_gone_relists_and_delivers_the_difference(self) -> None:
        self.start(obj("keep", "1"), obj("change", "2"), obj("vanish", "3"))
        self.events.clear()
        self.source.streams[0].fail(errors.Gone("too old", 410))
        self.assertEqual(len(self.source.lists), 2)  # at once, no back-off
        self.source.lists[1].callback(listing("50", obj("keep", "1"), obj("change", "40"), obj("new", "41")))
        self.assertEqual(sorted(self.events), [(ADDED, "new", "41"), (DELETED, "vanish", "3"),
                                               (MODIFIED, "change", "40")])
        self.assertEqual(self.source.streams[1].resource_version, "50")

    def test_repeated_gone_backs_off(self) -> None:
        self.start()
        self.source.streams[0].fail(errors.Gone("too old", 410))
        self.source.lists[1].callback(listing("11"))
        self.source.streams[1].fail(errors.Gone("too old", 410))
        self.assertEqual(len(self.source.lists), 2)
        self.clock.advance(2)
        self.assertEqual(len(self.source.lists), 3)

    def test_dropped_stream_reconnects_with_back_off(self) -> None:
        self.start()
        self.source.streams[0].fail(errors.Unavailable("connection reset"))
        self.clock.advance(1.9)
        self.assertEqual(len(self.source.streams), 1)
        self.clock.advance(0.1)
        self.assertEqual(self.source.streams[1].resource_version, "10")
        self.source.streams[1].fail(errors.KubeTimeout("read timed out"))
        self.clock.advance(3.9)
        self.assertEqual(len(self.source.streams), 2)
        self.clock.advance(0.1)
        self.source.streams[2].event("ADDED", obj("a", "11"))  # an event resets the back-off
        self.assertEqual(self.watcher.failures, 0)
        self.source.streams[2].fail(errors.Unavailable("again"))
        self.clock.advance(2)
        self.assertEqual(len(self.source.streams), 4)

    def test_failed_list_retries(self) -> None:
        self.watcher.startService()
        self.source.lists[0].errback(errors.Forbidden("no", 403))
        self.clock.advance(2)
        self.source.lists[1].callback(listing("7", obj("a", "6")))
        self.assertEqual(self.events, [(ADDED, "a", "6")])

    def test_handler_failure_does_not_stop_the_watch(self) -> None:
        def explode(event: WatchEvent) -> None:
            raise RuntimeError("handler bug")

        self.watcher.on_event = explode
        self.start()
        self.source.streams[0].event("ADDED", obj("a", "11"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.watcher.resource_version, "11")
        self.assertEqual(len(self.source.streams), 1)

    def test_stop_closes_stream(self) -> None:
        self.start()
        stream = self.source.streams[0]
        self.successResultOf(self.watcher.stopService())  # type: ignore[arg-type]
        self.assertTrue(stream.stopped)
        self.assertEqual(len(self.source.streams), 1)

    def test_stop_while_backing_off(self) -> None:
        self.start()
        self.source.streams[0].fail(errors.Unavailable("reset"))
        self.successResultOf(self.watcher.stopService())  # type: ignore[arg-type]
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.source.streams), 1)


class ThreadPoolServiceTests(SynchronousTestCase):
    def test_pool_lives_with_the_service(self) -> None:
        service = ThreadPoolService(maxthreads=2, name="k8s")
        self.assertFalse(service.pool.started)
        service.startService()
        self.assertTrue(service.pool.started)
        self.assertEqual(service.pool.max, 2)
        service.stopService()
        self.assertFalse(service.pool.started)


class RequireRootTests(SynchronousTestCase):
    """The API-server tests skip without root, except in CI where they must fail instead."""

    def setUp(self) -> None:
        self.patch(os, "geteuid", lambda: 1000)
        saved = os.environ.pop("CI", None)
        if saved is not None:
            self.addCleanup(os.environ.__setitem__, "CI", saved)

    def test_skips_outside_ci(self) -> None:
        self.assertRaises(SkipTest, require_root, self)

    def test_fails_in_ci(self) -> None:
        os.environ["CI"] = "true"
        self.addCleanup(os.environ.pop, "CI", None)
        self.assertRaises(self.failureException, require_root, self)
