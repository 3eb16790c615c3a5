"""caa.k8s against a real kube-apiserver + etcd (tests/kubeapi.py): the PeerPod CRD, PeerPod lifecycle with
its finalizer, Node status capacity, the watcher (events, re-watch, 410, a dropped connection), deadlines."""

from __future__ import annotations

import os
import socket
import time
import urllib.error
from pathlib import Path
from typing import Any, cast

import yaml
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.protocols import portforward
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from caa.k8s import errors
from caa.k8s.client import KubeClient, connect
from caa.k8s.objects import (
    EXTENDED_RESOURCE,
    OWNER_ANNOTATION,
    PEERPOD_CRD_NAME,
    PEERPOD_FINALIZER,
    PEERPOD_GROUP,
    PEERPOD_PLURAL,
    PEERPOD_VERSION,
    extended_resource_patch,
    extended_resource_removal,
    new_peerpod,
    owner_annotation_patch,
)
from caa.k8s.watch import ResourceWatchSource, Watcher, WatchEvent, namespaced_source, peerpods_source
from caa.notifier import Notifier
from caa.reactors import as_node_reactor
from tests.kubeapi import REPO, KubeAPIServer, shared_server

CRD_FILE = REPO / "deploy" / "base" / "crd-peerpod.yaml"
reactor = as_node_reactor(global_reactor)
_crd_installed: set[int] = set()


def install_crd(server: KubeAPIServer) -> None:
    """Create the PeerPod CRD from deploy/ once per server and wait until it is Established."""
    if id(server) in _crd_installed:
        return
    body = yaml.safe_load(CRD_FILE.read_text())
    try:
        server.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", body)
    except urllib.error.HTTPError as e:
        if e.code != 409:
            raise
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        crd = server.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{PEERPOD_CRD_NAME}")
        conditions = {c["type"]: c["status"] for c in crd.get("status", {}).get("conditions", [])}
        if conditions.get("Established") == "True":
            _crd_installed.add(id(server))
            return
        time.sleep(0.1)
    raise RuntimeError("PeerPod CRD not Established after 30s")


class APIServerTestCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.server = shared_server(self)
        install_crd(self.server)
        self.pool = ThreadPool(minthreads=0, maxthreads=4, name="k8s-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.client = self.make_client(self.server.admin_kubeconfig)
        self.namespace = f"t-{os.getpid()}-{self.id().rsplit('.', 1)[-1].replace('_', '-')[:40]}".lower()
        self.server.ensure_namespace(self.namespace)

    def make_client(self, kubeconfig: Path, timeout: float = 10.0) -> KubeClient:
        client = connect(reactor, self.pool, str(kubeconfig), timeout=timeout)
        self.addCleanup(client.close)
        return client

    def kubeconfig_at(self, port: int) -> Path:
        """An admin kubeconfig for the server's certificate but another loopback port (a proxy, a dead end)."""
        kubeconfig = self.server.kubeconfig(self.server.admin_token)
        kubeconfig.write_text(kubeconfig.read_text().replace(f":{self.server.port}", f":{port}"))
        return kubeconfig

    def create_pod(self, name: str) -> dict[str, Any]:
        """A Pod object (never run: no kubelet); its namespace needs the `default` ServiceAccount."""
        self.server.token_for(self.namespace, "default")
        return dict(self.server.request("POST", f"/api/v1/namespaces/{self.namespace}/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"automountServiceAccountToken": False, "containers": [{"name": "c", "image": "busybox"}]}}))


class PeerPodTests(APIServerTestCase):
    async def test_crd_enforces_schema(self) -> None:
        bad = new_peerpod({"metadata": {"name": "p", "namespace": self.namespace, "uid": "u"}}, "local", "i-1")
        bad["spec"]["instanceID"] = 12345
        with self.assertRaises(errors.Invalid) as caught:
            await self.client.create_peerpod(self.namespace, bad)
        self.assertEqual(caught.exception.status, 422)
        good = new_peerpod({"metadata": {"name": "p", "namespace": self.namespace, "uid": "u"}}, "local", "i-1")
        good["spec"]["unknownField"] = "pruned"
        created = await self.client.create_peerpod(self.namespace, good)
        self.assertEqual(created["spec"], {"cloudProvider": "local", "instanceID": "i-1"})
        with self.assertRaises(errors.Conflict):
            await self.client.create_peerpod(self.namespace, good)

    async def test_finalizer_keeps_deleted_peerpod_until_released(self) -> None:
        pod = self.create_pod("web")
        body = new_peerpod(pod, "local", "i-42")
        name = body["metadata"]["name"]
        created = await self.client.create_peerpod(self.namespace, body)
        self.assertEqual(created["metadata"]["finalizers"], [PEERPOD_FINALIZER])
        owner = created["metadata"]["ownerReferences"][0]
        self.assertEqual((owner["kind"], owner["uid"], owner["controller"]), ("Pod", pod["metadata"]["uid"], True))
        listed = await self.client.list_peerpods()
        self.assertIn(name, [item["metadata"]["name"] for item in listed["items"]])

        await self.client.delete_peerpod(self.namespace, name)
        kept = await self.client.get_peerpod(self.namespace, name)
        self.assertTrue(kept["metadata"]["deletionTimestamp"])
        self.assertEqual(kept["spec"]["instanceID"], "i-42")

        await self.client.remove_peerpod_finalizers(self.namespace, name)
        with self.assertRaises(errors.NotFound):
            await self.client.get_peerpod(self.namespace, name)
        with self.assertRaises(errors.NotFound):
            await self.client.remove_peerpod_finalizers(self.namespace, name)

    async def test_least_privilege_token_is_refused(self) -> None:
        token = self.server.token_for(self.namespace, "nobody")
        client = self.make_client(self.server.kubeconfig(token))
        with self.assertRaises(errors.Forbidden):
            await client.list_peerpods(self.namespace)
        self.server.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{self.namespace}/roles", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "pp-read"},
            "rules": [{"apiGroups": [PEERPOD_GROUP], "resources": [PEERPOD_PLURAL], "verbs": ["list"]}]})
        self.server.request("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{self.namespace}/rolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "pp-read"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pp-read"},
            "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": self.namespace}]})
        self.assertEqual((await client.list_peerpods(self.namespace))["items"], [])


class NodeTests(APIServerTestCase):
    async def test_status_capacity_and_owner_annotation(self) -> None:
        node = f"node-{os.getpid()}"
        self.server.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                      "metadata": {"name": node}})
        self.addCleanup(self.server.request, "DELETE", f"/api/v1/nodes/{node}")
        await self.client.patch_node(node, owner_annotation_patch("pod-uid-2"))
        patched = await self.client.patch_node_status(node, extended_resource_patch(3))
        self.assertEqual(patched["status"]["capacity"][EXTENDED_RESOURCE], "3")
        self.assertEqual(patched["status"]["allocatable"][EXTENDED_RESOURCE], "3")
        fetched = await self.client.get_node(node)
        self.assertEqual(fetched["metadata"]["annotations"][OWNER_ANNOTATION], "pod-uid-2")
        self.assertEqual(fetched["status"]["capacity"][EXTENDED_RESOURCE], "3")
        # upstream's JSON patch works too
        await self.client.patch_node_status(node, [
            {"op": "add", "path": "/status/capacity/kata.peerpods.io~1vm", "value": "5"}])
        self.assertEqual((await self.client.get_node(node))["status"]["capacity"][EXTENDED_RESOURCE], "5")
        withdrawn = await self.client.patch_node_status(node, extended_resource_removal())
        self.assertNotIn(EXTENDED_RESOURCE, withdrawn["status"].get("capacity", {}))
        self.assertNotIn(EXTENDED_RESOURCE, withdrawn["status"].get("allocatable", {}))


class ReadAndLeaseTests(APIServerTestCase):
    async def test_reads(self) -> None:
        pod = self.create_pod("reader")
        self.assertEqual((await self.client.get_pod(self.namespace, "reader"))["metadata"]["uid"],
                         pod["metadata"]["uid"])
        self.server.request("POST", f"/api/v1/namespaces/{self.namespace}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "peer-pods-secret"},
            "data": {"KEY": "c2VjcmV0"}})
        self.assertEqual((await self.client.get_secret(self.namespace, "peer-pods-secret"))["data"],
                         {"KEY": "c2VjcmV0"})
        self.assertEqual((await self.client.get_service_account(self.namespace, "default"))["metadata"]["name"],
                         "default")
        with self.assertRaises(errors.NotFound):
            await self.client.get_config_map(self.namespace, "peer-pods-cm")

    async def test_lease_create_and_replace_are_optimistic(self) -> None:
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "leader"},
                "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}
        created = await self.client.create_lease(self.namespace, body)
        with self.assertRaises(errors.Conflict):
            await self.client.create_lease(self.namespace, body)
        renewed = dict(created, spec=dict(created["spec"], holderIdentity="b"))
        replaced = await self.client.replace_lease(self.namespace, "leader", renewed)
        self.assertEqual(replaced["spec"]["holderIdentity"], "b")
        with self.assertRaises(errors.Conflict):  # created's resourceVersion is stale now
            await self.client.replace_lease(self.namespace, "leader", created)
        self.assertEqual((await self.client.get_lease(self.namespace, "leader"))["spec"]["holderIdentity"], "b")


class Events:
    """Collects WatchEvents; `until(pred)` waits (bounded by the test timeout) for a matching one."""

    def __init__(self) -> None:
        self.seen: list[WatchEvent] = []
        self._arrived = Notifier[None]()

    def __call__(self, event: WatchEvent) -> None:
        self.seen.append(event)
        self._arrived.notify(None)

    def names(self) -> list[tuple[str, str]]:
        return [(e.type, e.object["metadata"]["name"]) for e in self.seen]

    async def until(self, kind: str, name: str) -> WatchEvent:
        while True:
            for e in self.seen:
                if (e.type, e.object["metadata"]["name"]) == (kind, name):
                    return e
            await self._arrived.wait()


class WatchTests(APIServerTestCase):
    def watcher(self, client: KubeClient, events: Events, server_timeout: int = 300) -> Watcher:
        w = Watcher(peerpods_source(client, self.namespace, server_timeout=server_timeout), reactor, events,
                    name="peerpods")
        w.startService()
        self.addCleanup(w.stopService)
        return w

    def peerpod(self, name: str) -> dict[str, Any]:
        body = new_peerpod({"metadata": {"name": "pod", "namespace": self.namespace, "uid": "u"}}, "local",
                           "i-1", name=name)
        return body

    async def test_added_modified_deleted(self) -> None:
        await self.client.create_peerpod(self.namespace, self.peerpod("before"))
        events, everywhere = Events(), Events()
        w = self.watcher(self.client, events)
        cluster = Watcher(peerpods_source(self.client), reactor, everywhere, name="all-peerpods")
        cluster.startService()
        self.addCleanup(cluster.stopService)
        await w.whenSynced()
        await cluster.whenSynced()
        self.assertEqual(events.names(), [("ADDED", "before")])
        self.assertIn(("ADDED", "before"), everywhere.names())
        await self.client.create_peerpod(self.namespace, self.peerpod("pp"))
        await events.until("ADDED", "pp")
        await everywhere.until("ADDED", "pp")
        await self.client.delete_peerpod(self.namespace, "pp")
        modified = await events.until("MODIFIED", "pp")
        self.assertTrue(modified.object["metadata"]["deletionTimestamp"])
        await self.client.remove_peerpod_finalizers(self.namespace, "pp")
        await events.until("DELETED", "pp")
        self.assertNotIn("pp", [o["metadata"]["name"] for o in w.known.values()])

    async def test_watches_on_after_server_ends_the_stream(self) -> None:
        events = Events()
        w = self.watcher(self.client, events, server_timeout=1)
        await w.whenSynced()
        await sleep(2.5)  # at least two server-side ends
        await self.client.create_peerpod(self.namespace, self.peerpod("late"))
        await events.until("ADDED", "late")
        self.assertEqual(w.failures, 0)

    async def test_follows_one_config_map(self) -> None:
        events = Events()
        w = Watcher(namespaced_source(self.client, "config_map", self.namespace,
                                      field_selector="metadata.name=peer-pods-cm"), reactor, events, name="cm")
        w.startService()
        self.addCleanup(w.stopService)
        await w.whenSynced()
        path = f"/api/v1/namespaces/{self.namespace}/configmaps"
        self.server.request("POST", path, {"apiVersion": "v1", "kind": "ConfigMap",
                                           "metadata": {"name": "other"}, "data": {"a": "1"}})
        self.server.request("POST", path, {"apiVersion": "v1", "kind": "ConfigMap",
                                           "metadata": {"name": "peer-pods-cm"}, "data": {"CLOUD_PROVIDER": "x"}})
        await events.until("ADDED", "peer-pods-cm")
        self.server.request("PATCH", f"{path}/peer-pods-cm", {"data": {"CLOUD_PROVIDER": "local"}},
                            content_type="application/merge-patch+json")
        changed = await events.until("MODIFIED", "peer-pods-cm")
        self.assertEqual(changed.object["data"], {"CLOUD_PROVIDER": "local"})
        self.assertNotIn("other", [name for _, name in events.names()])

    async def test_stale_resource_version_is_gone(self) -> None:
        # The API server keeps a window of history; resourceVersion 1 is long compacted away -> 410.
        source = ResourceWatchSource(self.client, self.client.custom.list_namespaced_custom_object,
                                     PEERPOD_GROUP, PEERPOD_VERSION, self.namespace, PEERPOD_PLURAL)
        stream = source.watch("1", lambda raw: None)
        with self.assertRaises(errors.Gone):
            await stream.done

    async def test_reconnects_after_dropped_connection(self) -> None:
        proxy = DroppingProxy(self.server.port)
        port = reactor.listenTCP(0, cast(ServerFactory, proxy), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        kubeconfig = self.kubeconfig_at(cast(IPv4Address, port.getHost()).port)
        events = Events()
        w = self.watcher(self.make_client(kubeconfig), events)
        await w.whenSynced()
        self.assertEqual(proxy.drop_all(), 1)  # the watch's connection
        await self.client.create_peerpod(self.namespace, self.peerpod("after-drop"))
        await events.until("ADDED", "after-drop")


class DeadlineTests(APIServerTestCase):
    async def test_silent_server_times_out(self) -> None:
        silent = socket.socket()  # the kernel completes connections into its backlog; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        self.addCleanup(silent.close)
        client = self.make_client(self.kubeconfig_at(silent.getsockname()[1]), timeout=0.5)
        started = reactor.seconds()
        with self.assertRaises(errors.KubeTimeout):
            await client.get_node("any")
        self.assertLess(reactor.seconds() - started, 3)

    async def test_refused_connection_is_unavailable(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        with self.assertRaises(errors.Unavailable):
            await self.make_client(self.kubeconfig_at(closed_port)).get_node("any")


class DroppingProxy(portforward.ProxyFactory):
    """A TCP proxy to the API server whose connections the test can cut (a network drop)."""

    def __init__(self, port: int) -> None:
        super().__init__("127.0.0.1", port)
        self.live: list[portforward.ProxyServer] = []
        proxy = self

        class Server(portforward.ProxyServer):
            def connectionMade(self) -> None:
                proxy.live.append(self)
                super().connectionMade()

            def connectionLost(self, reason: Failure = connectionDone) -> None:
                if self in proxy.live:
                    proxy.live.remove(self)
                super().connectionLost(reason)

        self.protocol = Server

    def drop_all(self) -> int:
        live = list(self.live)
        for conn in live:
            cast(ITCPTransport, conn.transport).abortConnection()
        return len(live)


def sleep(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater
    return deferLater(reactor, seconds)
