"""caa-peerpod-ctrl against a real kube-apiserver (tests/kubeapi.py), running with a token bound to exactly
the RBAC of deploy/base/peerpod-ctrl-rbac.yaml: deleted PeerPods get their instance deleted and go away
(also after two provider failures, with back-off), older PeerPods of the same owner are removed, an
ownerless one is left alone, and of two replicas only the Lease holder acts; a holder killed with SIGKILL
(a real `twistd caa-peerpod-ctrl` process) is replaced within the lease duration."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import cast

import yaml
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, globalLogPublisher

from caa.k8s import errors
from caa.k8s.client import KubeClient
from caa.k8s.objects import PEERPOD_CTRL_LEASE, new_peerpod
from caa.k8s.watch import peerpods_source
from caa.peerpodctrl.config import cloud_config_sources
from caa.peerpodctrl.lease import LeaseTimings
from caa.peerpodctrl.providers import ProviderCache
from caa.peerpodctrl.service import PeerPodController
from tests.fakes.provider import FakeProvider
from tests.kubeapi import REPO
from tests.test_k8s_apiserver import APIServerTestCase, reactor, sleep
from tests.test_peerpodctrl_unit import CountingProvider, RecordingFactory, registry_with

RBAC_FILE = REPO / "deploy" / "base" / "peerpod-ctrl-rbac.yaml"
SERVICE_ACCOUNT = "caa-peerpod-ctrl"
# Short leases so hand-over is quick (the flags of a test deployment).
TIMINGS = LeaseTimings(lease_duration=2, renew_deadline=1.5, retry_period=0.25)

_PATHS = {"ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
          "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
          "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
          "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
          "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"}


class ControllerTestCase(APIServerTestCase):
    timeout = 60

    def setUp(self) -> None:
        super().setUp()
        self.apply_rbac()
        token = self.server.token_for(self.namespace, SERVICE_ACCOUNT)
        self.ctrl_kubeconfig = self.server.kubeconfig(token)
        self.ctrl_client = self.make_client(self.ctrl_kubeconfig)
        self.server.request("POST", f"/api/v1/namespaces/{self.namespace}/configmaps", {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "peer-pods-cm"},
            "data": {"CLOUD_PROVIDER": "fake", "FORWARDER_PORT": "15999",
                     "LOCAL_STATE_DIR": tempfile.mkdtemp(prefix="caa-ppctrl-")}})

    def apply_rbac(self) -> None:
        """deploy/'s RBAC moved into this test's namespace (cluster-wide objects get a unique name)."""
        for doc in yaml.safe_load_all(RBAC_FILE.read_text()):
            kind, meta = doc["kind"], doc["metadata"]
            if "namespace" in meta:
                meta["namespace"] = self.namespace
            if kind.startswith("Cluster"):
                meta["name"] = f"{meta['name']}-{self.namespace}"
            if kind.endswith("Binding"):
                if doc["roleRef"]["kind"] == "ClusterRole":
                    doc["roleRef"]["name"] = f"{doc['roleRef']['name']}-{self.namespace}"
                for subject in doc["subjects"]:
                    subject["namespace"] = self.namespace
            self.server.request("POST", _PATHS[kind].format(ns=self.namespace), doc)

    def controller(self, identity: str, provider: FakeProvider, provider_name: str = "fake",
                   release_on_stop: bool = True, backoff_base: float = 0.005) -> tuple[PeerPodController,
                                                                                       RecordingFactory]:
        factory = RecordingFactory(provider)
        factory.name = provider_name
        client: KubeClient = self.ctrl_client
        controller = PeerPodController(
            reactor, client, peerpods_source(client, server_timeout=30),
            cloud_config_sources(client, self.namespace, server_timeout=30), namespace=self.namespace,
            identity=identity, lease=TIMINGS, release_on_stop=release_on_stop,
            providers=ProviderCache(reactor, registry_with(factory).get), backoff_base=backoff_base)
        controller.startService()
        self.addCleanup(controller.stopService)
        return controller, factory

    async def peerpod(self, pod_name: str, instance_id: str, provider: str = "fake",
                      owned: bool = True) -> str:
        pod = self.create_pod(pod_name) if owned else {"metadata": {"name": pod_name, "namespace": self.namespace,
                                                                      "uid": "none"}}
        body = new_peerpod(pod, provider, instance_id)
        if not owned:
            del body["metadata"]["ownerReferences"]
        await self.client.create_peerpod(self.namespace, body)
        return str(body["metadata"]["name"])

    def twistd(self, identity: str) -> subprocess.Popen[bytes]:
        """A real `twistd caa-peerpod-ctrl` process with the controller's token (killed at cleanup)."""
        port = self.free_port()
        log = open(os.path.join(tempfile.gettempdir(), f"caa-ppctrl-{self.namespace}.log"), "wb")  # noqa: SIM115
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "caa-peerpod-ctrl",
             "--kubeconfig", str(self.ctrl_kubeconfig),
             "--peerpods-namespace", self.namespace, "--identity", identity,
             "--lease-duration=2s", "--renew-deadline=1500ms", "--retry-period=250ms",
             f"--health-probe-bind-address=127.0.0.1:{port}"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})

        def stop() -> None:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.addCleanup(stop)
        self.probe_port = port
        return proc

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def probe(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.probe_port}{path}", timeout=2) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    async def gone(self, name: str) -> bool:
        try:
            await self.client.get_peerpod(self.namespace, name)
        except errors.NotFound:
            return True
        return False


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float = 20.0, what: str = "") -> float:
    """Poll `check` every 50 ms until true; returns the seconds it took (fails the test after `within`)."""
    start = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within:.0f}s: {what}")
        await sleep(0.05)


class DeletionTests(ControllerTestCase):
    async def test_deleted_peerpod_instance_deleted_then_gone(self) -> None:
        provider = CountingProvider(reactor)
        controller, factory = self.controller("solo", provider)
        old = await self.peerpod("web", "i-old")
        provider.instances["i-old"] = provider.instances["i-new"] = object()  # type: ignore[assignment]
        await sleep(1.1)  # creation timestamps have whole seconds
        pod = await self.client.get_pod(self.namespace, "web")
        newer = new_peerpod(pod, "fake", "i-new")
        await self.client.create_peerpod(self.namespace, newer)
        # The older PeerPod of the same Pod is deleted, and so its instance.
        await eventually(lambda: self.gone(old), what="older PeerPod removed")
        self.assertEqual(provider.calls, [("delete", "i-old")])
        self.assertEqual(factory.built[0]["fake-forwarder-port"], "15999")  # from peer-pods-cm
        name = newer["metadata"]["name"]
        await self.client.delete_peerpod(self.namespace, name)
        await eventually(lambda: self.gone(name), what="deleted PeerPod gone")
        self.assertEqual(provider.calls, [("delete", "i-old"), ("delete", "i-new")])
        self.assertEqual(provider.instances, {})
        self.assertTrue(controller.ready())

    async def test_provider_failing_twice_then_success(self) -> None:
        provider = CountingProvider(reactor, failures=2)
        times: list[float] = []
        delete = provider.delete_instance

        def timed(instance_id: str) -> Deferred[None]:
            times.append(time.monotonic())
            return delete(instance_id)
        provider.delete_instance = timed  # type: ignore[method-assign]
        retries: list[float] = []

        def observe(event: dict[str, object]) -> None:
            if event.get("log_namespace") == "caa.peerpodctrl.queue.WorkQueue" and "delay" in event:
                retries.append(float(event["delay"]))  # type: ignore[arg-type]
        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.controller("solo", provider, backoff_base=0.2)
        name = await self.peerpod("web", "i-1")
        await self.client.delete_peerpod(self.namespace, name)
        await eventually(lambda: self.gone(name), what="PeerPod gone after two failures")
        self.assertEqual(provider.calls, [("delete", "i-1")] * 3)
        # Each failure scheduled its retry with back-off (0.2 s, then 0.4 s). A watch event for the key may
        # still run it at once meanwhile (controller-runtime's semantics), so the gaps between the calls are
        # only bounded below by the shorter back-off overall.
        self.assertEqual(retries, [0.2, 0.4])
        self.assertGreaterEqual(times[-1] - times[0], 0.2)

    async def test_peerpod_without_owner_skipped(self) -> None:
        provider = CountingProvider(reactor)
        self.controller("solo", provider)
        owned = await self.peerpod("web", "i-1")
        await sleep(1.1)
        orphan = await self.peerpod("web", "i-2", owned=False)
        await sleep(1.0)
        self.assertFalse(await self.gone(owned))
        pp = await self.client.get_peerpod(self.namespace, orphan)
        self.assertFalse(pp["metadata"].get("deletionTimestamp"))
        self.assertEqual(provider.calls, [])


class RBACTests(ControllerTestCase):
    async def test_token_holds_exactly_what_the_controller_needs(self) -> None:
        client = self.ctrl_client
        self.assertEqual((await client.get_config_map(self.namespace, "peer-pods-cm"))["data"]["CLOUD_PROVIDER"],
                         "fake")
        with self.assertRaises(errors.NotFound):  # allowed, just absent
            await client.get_secret(self.namespace, "peer-pods-secret")
        self.server.request("POST", f"/api/v1/namespaces/{self.namespace}/configmaps", {
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other"}})
        for denied in (client.get_config_map(self.namespace, "other"), client.get_secret(self.namespace, "other"),
                       client.get_lease(self.namespace, "other-lease"), client.get_pod(self.namespace, "web"),
                       client.create_peerpod(self.namespace, new_peerpod(
                           {"metadata": {"name": "p", "namespace": self.namespace, "uid": "u"}}, "fake", "i"))):
            with self.assertRaises(errors.Forbidden):
                await denied
        self.assertIsInstance((await client.list_peerpods())["items"], list)  # cluster-wide


class LeaderElectionTests(ControllerTestCase):
    async def test_only_the_holder_acts_and_a_killed_holder_is_replaced(self) -> None:
        # Holder: a real `twistd caa-peerpod-ctrl` (its registry's local provider; settings from peer-pods-cm).
        proc = self.twistd("holder")
        await eventually(lambda: self.holder() == "holder", what="the process holds the Lease")
        standby_provider = CountingProvider(reactor)
        standby, _ = self.controller("standby", standby_provider, provider_name="local")
        await eventually(standby.ready, what="standby ready")
        self.assertEqual(self.probe("/healthz"), (200, b"ok"))
        self.assertEqual(self.probe("/readyz"), (200, b"ok"))
        status, metrics = self.probe("/metrics")
        self.assertIn(b"caa_peerpodctrl_leader 1.0", metrics)
        first = await self.peerpod("web", "i-1", provider="local")
        await self.client.delete_peerpod(self.namespace, first)
        await eventually(lambda: self.gone(first), what="the holder finalized the PeerPod")
        self.assertFalse(standby.acting)
        self.assertEqual(standby_provider.calls, [])
        self.assertIn(b"caa_peerpodctrl_reconciles_total", self.probe("/metrics")[1])

        proc.send_signal(signal.SIGKILL)
        proc.wait()
        took = await eventually(lambda: standby.acting, what="the standby takes over")
        self.assertLess(took, TIMINGS.lease_duration + 2 * TIMINGS.retry_period + 0.5)
        self.assertEqual(self.holder(), "standby")
        second = await self.peerpod("db", "i-2", provider="local")
        await self.client.delete_peerpod(self.namespace, second)
        await eventually(lambda: self.gone(second), what="the new holder finalized the PeerPod")
        self.assertEqual(standby_provider.calls, [("delete", "i-2")])

    def holder(self) -> str:
        try:
            lease = self.server.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/"
                                               f"leases/{PEERPOD_CTRL_LEASE}")
        except urllib.error.HTTPError:
            return ""
        return str(lease["spec"].get("holderIdentity") or "")
