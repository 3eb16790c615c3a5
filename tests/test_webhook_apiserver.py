"""caa-webhook behind a real kube-apiserver (tests/kubeapi.py): registered in a `MutatingWebhookConfiguration`,
it rewrites kata-remote pods created through the API server and leaves runc pods alone; with a real
kube-scheduler, a node advertising one `kata.peerpods.io/vm` takes one peer pod at a time.

The webhook runs in this process on the test reactor, so every API call that can trigger admission goes
through a thread pool: a blocking call on the reactor thread would leave the API server's review unanswered.
Everything cluster-scoped is unique per test and deleted in cleanup (the API server is shared per process),
and the configuration only matches the test's own namespace, selected by a label.
"""

from __future__ import annotations

import base64
import os
import time
import urllib.error
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.policies import WrappingFactory
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from caa.k8s.objects import EXTENDED_RESOURCE, extended_resource_patch
from caa.reactors import as_node_reactor
from caa.tls import CertificateAuthority
from caa.webhook.certs import CERT_NAME, KEY_NAME, ReloadingServerTLS
from caa.webhook.mutation import CPU_ANNOTATION, DEFAULT_RUNTIME_CLASS, MEMORY_ANNOTATION, MutationConfig
from caa.webhook.server import MUTATE_PATH, WebhookMetrics, listen_webhook
from tests.kubeapi import KubeAPIServer, shared_server

reactor = as_node_reactor(global_reactor)

MERGE_PATCH = "application/merge-patch+json"
#: Namespace label the webhook configuration selects on (1.20 has no automatic kubernetes.io/metadata.name).
SELECTOR_LABEL = "caa-test/webhook"
#: Node label the scheduling test's pods select on, so nodes of other tests never count.
RUN_LABEL = "caa-test/run"
POLL = 0.1


def _pod(name: str, runtime_class: str | None, **spec: Any) -> dict[str, Any]:
    """A Pod (never run: no kubelet) with sums to check: requests 2.5 CPU / 4.5Gi, limits 3.5 / 5.5Gi once the
    API server has defaulted the init container's requests to its limits."""
    body: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "annotations": {"keep": "me"}},
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [
                {"name": "app", "image": "busybox", "resources": {
                    "requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "3", "memory": "5Gi"}}},
                {"name": "side", "image": "busybox"},
            ],
            "initContainers": [
                {"name": "init", "image": "busybox", "resources": {"limits": {"cpu": "500m", "memory": "512Mi"}}},
            ],
            **spec,
        },
    }
    if runtime_class is not None:
        body["spec"]["runtimeClassName"] = runtime_class
    return body


async def advertise_vm_slots(api: Callable[..., Awaitable[Any]], node: str, slots: int) -> None:
    """What the adaptor does on its node at start (`--peerpods-limit-per-node`): swap this for the adaptor."""
    await api("PATCH", f"/api/v1/nodes/{node}/status", extended_resource_patch(slots), content_type=MERGE_PATCH)


@implementer(IStreamServerEndpoint)
class TrackingEndpoint:
    """A server endpoint that remembers the connections it accepted: the API server keeps its connections to
    the webhook alive, and the test must close them before the reactor is checked for leftovers."""

    def __init__(self, inner: IStreamServerEndpoint) -> None:
        self.inner = inner
        self.factories: list[WrappingFactory] = []

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        wrapping = WrappingFactory(factory)
        self.factories.append(wrapping)
        return self.inner.listen(wrapping)

    def open_connections(self) -> int:
        return sum(len(f.protocols) for f in self.factories)

    def abort_connections(self) -> None:
        for factory in self.factories:
            for protocol in list(factory.protocols):
                protocol.transport.abortConnection()


class WebhookAPIServerTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.server: KubeAPIServer = shared_server(self)
        self.pool = ThreadPool(minthreads=0, maxthreads=4, name="webhook-apiserver-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.run_id = f"{os.getpid()}-{os.urandom(3).hex()}"
        self.namespace = f"wh-{self.run_id}"
        self.server.ensure_namespace(self.namespace)
        self.server.request("PATCH", f"/api/v1/namespaces/{self.namespace}",
                            {"metadata": {"labels": {SELECTOR_LABEL: self.namespace}}}, content_type=MERGE_PATCH)
        self.server.token_for(self.namespace, "default")  # creates the ServiceAccount pods need
        self.addCleanup(self.server.request, "DELETE", f"/api/v1/namespaces/{self.namespace}/pods?gracePeriodSeconds=0")
        self.overhead = ensure_runtime_class(self.server)
        self.metrics = WebhookMetrics.create()
        self.webhook: tuple[IListeningPort, TrackingEndpoint] | None = None

    async def api(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        """`server.request` off the reactor thread, so the in-process webhook can answer meanwhile."""
        return await deferToThreadPool(reactor, self.pool, self.server.request, method, path, body,
                                       None, content_type)

    async def create_pod(self, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        query = "?dryRun=All" if dry_run else ""
        return dict(await self.api("POST", f"/api/v1/namespaces/{self.namespace}/pods{query}", body))

    async def get_pod(self, name: str) -> dict[str, Any]:
        return dict(await self.api("GET", f"/api/v1/namespaces/{self.namespace}/pods/{name}"))

    def reviews(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value("caa_webhook_admission_requests_total", {"outcome": outcome})
        return value or 0.0

    async def start_webhook(self) -> None:
        """Serve the webhook on an ephemeral port with a `localhost` certificate, register it (caBundle, Fail)
        for this namespace's pod creations, and wait until the API server actually calls it."""
        ca = CertificateAuthority.create()
        pair = ca.issue_server_certificate("localhost")
        cert_dir = Path(self.mktemp())
        cert_dir.mkdir()
        (cert_dir / CERT_NAME).write_bytes(pair.cert_pem)
        (cert_dir / KEY_NAME).write_bytes(pair.key_pem)
        endpoint = TrackingEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        port = await listen_webhook(endpoint, ReloadingServerTLS(cert_dir), MutationConfig(), reactor, self.metrics)
        self.webhook = (port, endpoint)
        self.addCleanup(lambda: Deferred.fromCoroutine(self.stop_webhook()))
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        name = f"caa-webhook-{self.namespace}"
        await self.api("POST", "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations", {
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{
                "name": "mwebhook.peerpods.io",
                "clientConfig": {"url": f"https://localhost:{address.port}/{MUTATE_PATH.decode()}",
                                 "caBundle": base64.b64encode(ca.cert_pem).decode()},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                           "resources": ["pods"]}],
                "namespaceSelector": {"matchLabels": {SELECTOR_LABEL: self.namespace}},
                "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail",
                "reinvocationPolicy": "IfNeeded", "timeoutSeconds": 10,
            }]})
        # Cleanups run last-in first-out: the configuration goes before the port closes.
        self.addCleanup(self.server.request, "DELETE",
                        f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}")
        # The API server picks configurations up from an informer: probe with dry-run creations until one is
        # mutated (dry run is allowed because the webhook declares sideEffects: None).
        probe = _pod("probe", DEFAULT_RUNTIME_CLASS)
        await self.until("the webhook configuration is in effect", lambda: self._mutated(probe), timeout=30)

    async def stop_webhook(self) -> None:
        """Stop listening and close the API server's connections; calling it again is a no-op."""
        if self.webhook is None:
            return
        (port, endpoint), self.webhook = self.webhook, None
        await maybeDeferred(port.stopListening)
        endpoint.abort_connections()

        async def closed() -> bool:
            return endpoint.open_connections() == 0

        await self.until("the API server's connections to the webhook are closed", closed, timeout=5)

    async def _mutated(self, probe: dict[str, Any]) -> bool:
        created = await self.create_pod(probe, dry_run=True)
        return CPU_ANNOTATION in created["metadata"].get("annotations", {})

    async def until(self, what: str, check: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
        """Poll `check` until it returns something true; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            result = await check()
            if result:
                return result
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout:.0f}s waiting until {what}")
            await deferLater(reactor, POLL)

    async def test_kata_pod_mutated_runc_pod_untouched(self) -> None:
        await self.start_webhook()
        before = (self.reviews("mutated"), self.reviews("unchanged"))

        kata = await self.create_pod(_pod("kata", DEFAULT_RUNTIME_CLASS))
        for pod in (kata, await self.get_pod("kata")):
            self.assertEqual(pod["metadata"]["annotations"],
                             {"keep": "me", CPU_ANNOTATION: "4", MEMORY_ANNOTATION: "5632"})
            one = {EXTENDED_RESOURCE: "1"}
            self.assertEqual(pod["spec"]["containers"][0]["resources"], {"limits": one, "requests": one})
            self.assertEqual(pod["spec"]["containers"][1]["resources"], {})
            self.assertEqual(pod["spec"]["initContainers"][0]["resources"], {})
            self.assertEqual(pod["spec"]["runtimeClassName"], DEFAULT_RUNTIME_CLASS)
            # RuntimeClass admission (before the webhook) set the class's overhead; the webhook keeps it and
            # leaves it out of the sums: the node pays it, not the VM.
            self.assertEqual(pod["spec"].get("overhead", {}), self.overhead)

        runc = await self.create_pod(_pod("runc", None))
        for pod in (runc, await self.get_pod("runc")):
            self.assertEqual(pod["metadata"]["annotations"], {"keep": "me"})
            self.assertNotIn("runtimeClassName", pod["spec"])
            self.assertEqual(pod["spec"]["containers"][0]["resources"], {
                "requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "3", "memory": "5Gi"}})
            self.assertEqual(pod["spec"]["containers"][1]["resources"], {})
            init = {"cpu": "500m", "memory": "512Mi"}  # requests defaulted to limits by the API server
            self.assertEqual(pod["spec"]["initContainers"][0]["resources"], {"limits": init, "requests": init})

        # Both went through the webhook: the runc pod was reviewed and answered without a patch.
        self.assertEqual((self.reviews("mutated"), self.reviews("unchanged")), (before[0] + 1, before[1] + 1))

    async def test_webhook_down_refuses_pods(self) -> None:
        """failurePolicy: Fail: with the webhook unreachable no pod of a selected namespace is admitted, so a
        peer pod never slips through unmutated (and, with this selector, neither does a runc pod)."""
        await self.start_webhook()
        await self.stop_webhook()
        for name, runtime_class in (("kata", DEFAULT_RUNTIME_CLASS), ("runc", None)):
            with self.assertRaises(urllib.error.HTTPError) as caught:
                await self.create_pod(_pod(name, runtime_class))
            self.assertEqual(caught.exception.code, 500)
            self.assertIn("failed calling webhook", caught.exception.read().decode())
        pods = await self.api("GET", f"/api/v1/namespaces/{self.namespace}/pods")
        self.assertEqual(pods["items"], [])

    async def test_scheduler_binds_one_peer_pod_per_vm_slot(self) -> None:
        scheduler = self.server.start_scheduler()
        self.addCleanup(_stop, scheduler)
        await self.start_webhook()
        kata_node, plain_node = f"wh-{self.run_id}-kata", f"wh-{self.run_id}-plain"
        for node in (kata_node, plain_node):
            await self.make_schedulable_node(node)
        await advertise_vm_slots(self.api, kata_node, 1)

        pods = ("peer-a", "peer-b")
        for name in pods:
            await self.create_pod(_pod(name, DEFAULT_RUNTIME_CLASS, nodeSelector={RUN_LABEL: self.run_id}))

        async def one_bound_one_refused() -> tuple[str, str] | None:
            got = {name: await self.get_pod(name) for name in pods}
            bound = [n for n, p in got.items() if p["spec"].get("nodeName")]
            refused = [n for n, p in got.items() if "Insufficient kata.peerpods.io/vm" in _unschedulable(p)]
            if len(bound) == 1 and refused and refused != bound:
                return bound[0], refused[0]
            return None

        bound, pending = await self.until("one pod is bound and the other refused", one_bound_one_refused)
        self.assertEqual((await self.get_pod(bound))["spec"]["nodeName"], kata_node)
        waiting = await self.get_pod(pending)
        self.assertNotIn("nodeName", waiting["spec"])
        self.assertEqual(waiting["status"]["phase"], "Pending")

        # No kubelet: a bound pod is only removed at once with a zero grace period.
        await self.api("DELETE", f"/api/v1/namespaces/{self.namespace}/pods/{bound}?gracePeriodSeconds=0")

        async def rebound() -> str:
            return str((await self.get_pod(pending))["spec"].get("nodeName", ""))

        self.assertEqual(await self.until("the pending pod is bound", rebound), kata_node)

    async def make_schedulable_node(self, name: str) -> None:
        """A Node object (no kubelet) the scheduler will use: capacity, Ready, no not-ready taint (the recipe)."""
        await self.api("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                 "metadata": {"name": name, "labels": {RUN_LABEL: self.run_id}}})
        self.addCleanup(self.server.request, "DELETE", f"/api/v1/nodes/{name}")
        resources = {"cpu": "4", "memory": "8Gi", "pods": "110"}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        await self.api("PATCH", f"/api/v1/nodes/{name}/status", {"status": {
            "capacity": resources, "allocatable": resources,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}]}}, content_type=MERGE_PATCH)
        await self.api("PATCH", f"/api/v1/nodes/{name}", {"spec": {"taints": None}}, content_type=MERGE_PATCH)


def _unschedulable(pod: dict[str, Any]) -> str:
    """The message of a PodScheduled=False condition, or ""."""
    for condition in pod.get("status", {}).get("conditions", []):
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return str(condition.get("message", ""))
    return ""


def _stop(proc: Any) -> None:
    proc.terminate()
    proc.wait(timeout=10)


def ensure_runtime_class(server: KubeAPIServer) -> dict[str, str]:
    """The `kata-remote` RuntimeClass as upstream installs it (handler kata-remote, overhead 250m / 120Mi) and
    its pod overhead: RuntimeClass admission refuses pods naming a class that does not exist, and copies the
    overhead into the pod before the webhook sees it. Cluster-scoped and the same for every test: kept."""
    try:
        server.request("POST", "/apis/node.k8s.io/v1/runtimeclasses", {
            "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": DEFAULT_RUNTIME_CLASS},
            "handler": DEFAULT_RUNTIME_CLASS, "overhead": {"podFixed": {"cpu": "250m", "memory": "120Mi"}}})
    except urllib.error.HTTPError as e:
        if e.code != 409:
            raise
    existing = server.request("GET", f"/apis/node.k8s.io/v1/runtimeclasses/{DEFAULT_RUNTIME_CLASS}")
    return dict(existing.get("overhead", {}).get("podFixed", {}))
