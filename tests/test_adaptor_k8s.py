"""The adaptor in a cluster, against a real kube-apiserver (tests/kubeapi.py): a real `twistd caa-adaptor` process
(tests/test_adaptor_process.py's `Adaptor`, fake provider) with `NODE_NAME` and a kubeconfig holding the token of a
ServiceAccount bound to exactly deploy/base/adaptor-rbac.yaml (least privilege proven by use).

- the node's kata.peerpods.io/vm appears at start, follows the flag, and an older instance stopping never
  withdraws a newer one's value (the owner annotation);
- StartVM creates the PeerPod owned by the Pod; StopVM releases its finalizer, also after a kill -9 and restart
  (the name is in the journal); the PeerPod then disappears when deleted;
- with the API server unreachable StartVM and StopVM still answer at once;
- the startup probe waits for the node's peer pods to come back Ready after the adaptor started.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from twisted.trial.unittest import TestCase

from caa.k8s.objects import EXTENDED_RESOURCE, OWNER_ANNOTATION, PEERPOD_FINALIZER
from tests.kubeapi import REPO, KubeAPIServer, shared_server
from tests.test_adaptor_process import Adaptor
from tests.test_k8s_apiserver import install_crd

RBAC_FILE = REPO / "deploy" / "base" / "adaptor-rbac.yaml"
_rbac_installed: set[int] = set()


def install_rbac(server: KubeAPIServer) -> str:
    """Create the adaptor's ServiceAccount, ClusterRole and binding from deploy/ once per server; its token."""
    docs = [d for d in yaml.safe_load_all(RBAC_FILE.read_text()) if d]
    [sa] = [d for d in docs if d["kind"] == "ServiceAccount"]
    if id(server) not in _rbac_installed:
        paths = {"ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
                 "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings"}
        for doc in docs:
            if doc["kind"] in paths:
                try:
                    server.request("POST", paths[doc["kind"]], doc)
                except urllib.error.HTTPError as e:
                    if e.code != 409:
                        raise
        _rbac_installed.add(id(server))
    return server.token_for(sa["metadata"]["namespace"], sa["metadata"]["name"])


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class ClusterTestCase(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.server = shared_server(self)
        install_crd(self.server)
        self.kubeconfig = self.server.kubeconfig(install_rbac(self.server))
        test = self.id().rsplit(".", 1)[-1].replace("_", "-")[:30].strip("-")
        self.node = f"node-{os.getpid()}-{test}".lower()
        self.server.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                      "metadata": {"name": self.node}})
        self.namespace = f"a-{os.getpid()}-{test}".lower()
        self.server.token_for(self.namespace, "default")  # pods need their namespace's default ServiceAccount

    def adaptor(self, limit: int = 3, pod_uid: str = "", kubeconfig: Path | None = None, **env: str) -> Adaptor:
        a = Adaptor(self)
        a.env = {"KUBECONFIG": str(kubeconfig or self.kubeconfig), "NODE_NAME": self.node,
                 "PEERPODS_LIMIT_PER_NODE": str(limit), **env}
        if pod_uid:
            a.env["POD_UID"] = pod_uid
        return a

    def get_node(self) -> Any:
        return self.server.request("GET", f"/api/v1/nodes/{self.node}")

    def node_value(self) -> tuple[str | None, str | None, str | None]:
        """(capacity, allocatable, owner annotation) of the test's node."""
        node = self.get_node()
        status = node.get("status") or {}
        return ((status.get("capacity") or {}).get(EXTENDED_RESOURCE),
                (status.get("allocatable") or {}).get(EXTENDED_RESOURCE),
                (node["metadata"].get("annotations") or {}).get(OWNER_ANNOTATION))

    def create_pod(self, name: str, **spec: Any) -> Any:
        return self.server.request("POST", f"/api/v1/namespaces/{self.namespace}/pods", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"automountServiceAccountToken": False, "containers": [{"name": "c", "image": "busybox"}],
                     **spec}})

    def peerpod(self, name: str) -> Any:
        try:
            return self.server.request(
                "GET", f"/apis/confidentialcontainers.org/v1alpha1/namespaces/{self.namespace}/peerpods/{name}")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def ctl_ok(self, a: Adaptor, *args: str) -> str:
        r = a.ctl(*args)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout

    def create_and_start(self, a: Adaptor, sid: str, pod: str) -> None:
        self.ctl_ok(a, "create", "--id", sid, "--pod", pod, "--namespace", self.namespace, "--netns", a.netns)
        self.ctl_ok(a, "start", "--id", sid)


class NodeCapacityTests(ClusterTestCase):
    def test_capacity_owner_and_rolling_update(self) -> None:
        old = self.adaptor(limit=3, pod_uid="caa-old")
        old.start()
        wait_for(lambda: self.node_value() == ("3", "3", "caa-old"), "kata.peerpods.io/vm = 3 at start")
        new = self.adaptor(limit=5, pod_uid="caa-new")  # a rolling update: the new pod starts first
        new.start()
        wait_for(lambda: self.node_value() == ("5", "5", "caa-new"), "the new adaptor's value")
        old.term()  # the old one stops: not the owner any more, so the value stays
        self.assertEqual(self.node_value(), ("5", "5", "caa-new"))
        new.term()  # the owner stops: withdrawn
        self.assertEqual(self.node_value()[:2], (None, None))

    def test_limit_follows_the_flag(self) -> None:
        a = self.adaptor(limit=2, pod_uid="caa-1")
        a.start()
        wait_for(lambda: self.node_value()[:2] == ("2", "2"), "kata.peerpods.io/vm = 2")
        a.kill9()  # no withdrawal: the next start overwrites the value
        b = self.adaptor(limit=7, pod_uid="caa-2")
        b.start()
        wait_for(lambda: self.node_value() == ("7", "7", "caa-2"), "kata.peerpods.io/vm = 7")
        b.term()
        c = self.adaptor(limit=-1)  # negative: not advertised
        c.start()
        time.sleep(1.0)
        self.assertEqual(self.node_value()[:2], (None, None))


class PeerPodTests(ClusterTestCase):
    def test_peerpod_owned_by_the_pod_and_released(self) -> None:
        pod = self.create_pod("web")
        a = self.adaptor()
        a.start()
        self.create_and_start(a, "s1", "web")
        rec = a.record("s1")
        assert rec is not None
        name = rec["peerpod"]
        self.assertRegex(name, r"^web-resource-[a-z0-9]{5}$")
        wait_for(lambda: self.peerpod(name) is not None, "the PeerPod")
        pp = self.peerpod(name)
        self.assertEqual(pp["metadata"]["finalizers"], [PEERPOD_FINALIZER])
        self.assertEqual(pp["metadata"]["ownerReferences"], [{
            "apiVersion": "v1", "kind": "Pod", "name": "web", "uid": pod["metadata"]["uid"], "controller": True,
            "blockOwnerDeletion": True}])
        self.assertEqual(pp["spec"], {"cloudProvider": "fake", "instanceID": rec["instance_id"]})
        self.ctl_ok(a, "stop", "--id", "s1")
        wait_for(lambda: not (self.peerpod(name)["metadata"].get("finalizers")), "the finalizer released")
        self.server.request(
            "DELETE", f"/apis/confidentialcontainers.org/v1alpha1/namespaces/{self.namespace}/peerpods/{name}")
        self.assertIsNone(self.peerpod(name))

    def test_restarted_adaptor_releases_the_finalizer(self) -> None:
        self.create_pod("db")
        a = self.adaptor()
        a.start()
        self.create_and_start(a, "s2", "db")
        rec = a.record("s2")
        assert rec is not None
        wait_for(lambda: self.peerpod(rec["peerpod"]) is not None, "the PeerPod")
        a.kill9()
        a.start()  # upstream forgets the PeerPod here; the journal remembers it
        self.ctl_ok(a, "stop", "--id", "s2")
        wait_for(lambda: not (self.peerpod(rec["peerpod"])["metadata"].get("finalizers")), "the finalizer released")
        self.assertEqual(a.vms(), [])

    def test_api_down_never_delays_start_or_stop(self) -> None:
        dead = self.server.kubeconfig(self.server.admin_token)
        with socket_closed_port() as port:
            dead.write_text(dead.read_text().replace(f":{self.server.port}", f":{port}"))
            a = self.adaptor(kubeconfig=dead)
            a.start()
            t0 = time.monotonic()
            self.create_and_start(a, "s3", "nopod")
            self.ctl_ok(a, "stop", "--id", "s3")
            self.assertLess(time.monotonic() - t0, 15.0)
            self.assertEqual(a.vms(), [])
            self.assertIn(a.term(), (0, -15))


class PullSecretTests(ClusterTestCase):
    async def test_pull_secrets_read_with_the_adaptor_rbac(self) -> None:
        """KubernetesPullSecrets over the daemon's KubeClient, with the adaptor's least-privilege token."""
        from twisted.internet import reactor as global_reactor
        from twisted.python.threadpool import ThreadPool

        from caa.adaptor.pullsecrets import KubernetesPullSecrets
        from caa.k8s.client import connect
        from caa.reactors import as_node_reactor

        config = base64.b64encode(json.dumps({"auths": {"reg.example": {"username": "u", "password": "p"}}}).encode())
        self.server.request("POST", f"/api/v1/namespaces/{self.namespace}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "regcred"},
            "type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": config.decode()}})
        self.create_pod("private", imagePullSecrets=[{"name": "regcred"}, {"name": "missing"}])
        pool = ThreadPool(minthreads=0, maxthreads=2, name="test-pullsecrets")
        pool.start()
        self.addCleanup(pool.stop)
        client = connect(as_node_reactor(global_reactor), pool, str(self.kubeconfig))
        self.addCleanup(client.close)
        lookup = KubernetesPullSecrets(client)
        self.assertEqual(await lookup(self.namespace, "private"),
                         {"reg.example": base64.b64encode(b"u:p").decode()})
        self.assertEqual(await lookup(self.namespace, "no-such-pod"), {})


class StartupProbeTests(ClusterTestCase):
    def probe(self, a: Adaptor) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{a.probe_port}/startup", timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    def test_waits_for_peer_pods_to_come_back(self) -> None:
        try:
            self.server.request("POST", "/apis/node.k8s.io/v1/runtimeclasses", {
                "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "kata-remote"},
                "handler": "kata-remote"})
        except urllib.error.HTTPError as e:
            if e.code != 409:
                raise
        self.create_pod("peer", nodeName=self.node, runtimeClassName="kata-remote")
        self.create_pod("plain", nodeName=self.node)  # not a peer pod: ignored
        a = self.adaptor()
        with socket_closed_port() as port:
            a.probe_port = port
        a.start()
        self.assertEqual(self.probe(a), 500)  # the peer pod is not Ready
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.server.request(
            "PATCH", f"/api/v1/namespaces/{self.namespace}/pods/peer/status",
            {"status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}]}},
            content_type="application/merge-patch+json")
        wait_for(lambda: self.probe(a) == 200, "the probe to pass once the peer pod is Ready again")


class socket_closed_port:
    """A loopback port nobody listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
        s.close()
        return port

    def __exit__(self, *exc: object) -> None:
        return None
