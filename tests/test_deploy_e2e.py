"""caa installed from deploy/ on a real kube-apiserver (tests/kubeapi.py), one peer pod walked end to end.

The local overlay is rendered with the cert-manager-free webhook component (tests/deploy.py) and applied
server-side, as `kubectl apply --server-side -k` does (less the surge rollout, which Kubernetes 1.20 lacks).
No kubelet runs here, so the test starts the three daemons itself, as their DaemonSet and Deployments would:
through the image's entrypoint (deploy/image/entrypoint.sh) with the manifests' command line, their
environment from the applied peer-pods-cm (the adaptor's envFrom) and the downward API values, each with a
token of its applied ServiceAccount, so it can do exactly what the applied RBAC grants; the webhook runs
without any capability and with no_new_privs (not as uid 65532: the venv's interpreter lives under /root here;
tests/test_image.py runs it as that user), with the certificate read back from the applied Secret. Test-only
differences, each forced by a machine shared with other tests: private socket/pods/tls/netns paths, free ports
instead of the fixed ones, a kubeconfig instead of the in-cluster files, unique local-provider names, and the
webhook configuration's service reference replaced by a URL (the API server cannot route to a Service without
a cluster network). The test has an API server of its own (tests/kubeapi.py's `KubeAPIServer`), since the
uninstall deletes cluster-wide objects other tests share, and a kube-controller-manager running the garbage
collector and the namespace controller.

The walk: the adaptor advertises kata.peerpods.io/vm on its node; a kata-remote Pod created through the API
server comes back mutated by the webhook; the shim's calls (caactl create/start) give it a VM (a namespace
of the local provider) with a real VXLAN tunnel into the pod's network namespace and a PeerPod owned by the
Pod; deleting the Pod and StopVM remove VM, tunnel and PeerPod; deleting every applied object (the
uninstall) leaves no PeerPod behind and the namespace goes.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import urllib.error
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from caa.k8s.objects import EXTENDED_RESOURCE, PEERPOD_FINALIZER
from tests.deploy import NAMESPACE, ResourcePaths, apply, crds_first, find, for_test_server, render_dir
from tests.kubeapi import REPO, KubeAPIServer, kube_bin_dir, require_root
from tests.podnet import netns_names, netns_pids, remove_vm_namespaces, running, wire_pod_netns
from tests.test_adaptor_k8s import wait_for
from tests.test_adaptor_process import BIN, Adaptor
from tests.test_deploy_render import establish, files_variant, webhook_files

ENTRYPOINT = REPO / "deploy" / "image" / "entrypoint.sh"
PEERPODS = "/apis/confidentialcontainers.org/v1alpha1"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def container(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [c] = find(objects, kind, name)["spec"]["template"]["spec"]["containers"]
    return dict(c)


def downward(c: dict[str, Any], values: dict[str, str]) -> dict[str, str]:
    """The container's `env`: literal values, and the downward API fields it asks for from `values`
    (keyed by fieldPath)."""
    env = {}
    for e in c.get("env", []):
        env[e["name"]] = e["value"] if "value" in e else values[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of command arguments."""
    out = []
    for a in args:
        for name, value in env.items():
            a = a.replace(f"$({name})", value)
        out.append(a)
    return out


class InstalledTests(TestCase):
    timeout = 300

    def setUp(self) -> None:
        # A private API server: the uninstall deletes cluster-wide objects (the CRD, ClusterRoles, the namespace)
        # that other tests of this process installed once on the shared one and rely on.
        require_root(self)
        self.server = KubeAPIServer(kube_bin_dir())
        self.addCleanup(self.server.stop)
        self.server.start()
        self.server.start_controller_manager()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.addCleanup(self.stop_all)
        n = os.getpid() % 250
        tag = f"{os.getpid() % 10000}"
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        self.local = {"LOCAL_BRIDGE": f"cdi{tag}v", "LOCAL_SUBNET": f"10.236.{n}.0/24",
                      "LOCAL_STATE_DIR": f"/tmp/caa-inst-{tag}", "FORWARDER_PORT": str(17000 + 2 * n),
                      "LOCAL_BOOT_TIMEOUT": "30s"}
        self.pod_netns, self.pod_bridge, self.pod_prefix = f"cdi{tag}p", f"cdi{tag}b", f"10.246.{n}"
        self.sid = f"in{os.getpid() % 10000:04d}xinstall"
        self.node = f"node-install-{os.getpid()}"
        self.namespace = f"install-{os.getpid()}"
        self.before = netns_names()
        self.addCleanup(self.cleanup_local)

    # ----------------------------------------------------------------- set-up helpers

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def cleanup_local(self) -> None:
        remove_vm_namespaces(self.sid[:8], self.before)
        subprocess.run(["ip", "netns", "del", self.pod_netns], check=False, capture_output=True)
        for bridge in (self.local["LOCAL_BRIDGE"], self.pod_bridge):
            subprocess.run(["ip", "link", "del", bridge], check=False, capture_output=True)
        shutil.rmtree(self.local["LOCAL_STATE_DIR"], ignore_errors=True)

    def install(self) -> list[dict[str, Any]]:
        """Render the local overlay (webhook certificate from files, for `localhost`), give peer-pods-cm this
        test's local-provider names, and apply everything server-side: Namespace and CRD first."""
        objects = render_dir(self, files_variant(self, webhook_files("localhost")))
        find(objects, "ConfigMap", "peer-pods-cm")["data"].update(self.local)  # the same dict as in objects
        self.paths = ResourcePaths(self.server)
        for obj in crds_first(objects):
            if obj["kind"] == "CustomResourceDefinition":
                establish(self.server, self.paths, obj)
            else:
                apply(self.server, self.paths, for_test_server(obj))
        return objects

    def uninstall(self, objects: list[dict[str, Any]]) -> None:
        """Delete every applied object, the reverse of the apply order (namespace and CRD last)."""
        for obj in reversed(crds_first(objects)):
            try:
                self.server.request("DELETE", self.paths.path(obj))
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    raise

    def spawn(self, name: str, argv: list[str], env: dict[str, str], unprivileged: bool = False) -> None:
        """One daemon through the image's entrypoint (the venv's twistd on PATH); `unprivileged`: with no
        capability at all and no_new_privs (the manifest's `drop: [ALL]`, `allowPrivilegeEscalation: false`)."""
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115
        self.addCleanup(log.close)
        command = [str(ENTRYPOINT), *argv]
        if unprivileged:
            command = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", *command]
        full_env = {"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.work), **env}
        self.procs.append(subprocess.Popen(command, env=full_env, stdout=log,
                                           stderr=subprocess.STDOUT, cwd=self.work))

    def wait(self, cond: Callable[[], bool], what: str, daemon: str, timeout: float = 30.0) -> None:
        try:
            wait_for(cond, what, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- {daemon} log:\n{self.log(daemon)}") from None

    def log(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")[-3000:]

    def http_ok(self, port: int, path: str) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                return int(resp.status) == 200
        except OSError:
            return False

    def token_kubeconfig(self, service_account: str) -> str:
        return str(self.server.kubeconfig(self.server.token_for(NAMESPACE, service_account)))

    def settings(self) -> dict[str, str]:
        """peer-pods-cm as applied (what envFrom gives the adaptor); peer-pods-secret is optional and absent."""
        with self.assertRaises(urllib.error.HTTPError) as absent:
            self.server.request("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/peer-pods-secret")
        self.assertEqual(absent.exception.code, 404)
        cm = self.server.request("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps/peer-pods-cm")
        return dict(cm["data"])

    # ----------------------------------------------------------------- the daemons

    def start_webhook(self, objects: list[dict[str, Any]]) -> None:
        c = container(objects, "Deployment", "caa-webhook")
        secret = self.server.request("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/webhook-server-cert")
        cert_dir = self.work / "serving-certs"
        cert_dir.mkdir()
        for key in ("tls.crt", "tls.key"):
            (cert_dir / key).write_bytes(base64.b64decode(secret["data"][key]))
        self.webhook_port, probe = free_port(), free_port()
        self.assertEqual(c["securityContext"]["capabilities"], {"drop": ["ALL"]})
        args = [*c["args"], f"--webhook-bind-address=127.0.0.1:{self.webhook_port}",
                f"--health-probe-bind-address=127.0.0.1:{probe}", f"--cert-dir={cert_dir}"]
        # Not as uid 65532 here: the venv's interpreter lives under /root (mode 0700) on these machines;
        # tests/test_image.py runs the webhook as that user from the image.
        self.spawn("webhook", args, downward(c, {}), unprivileged=True)
        self.wait(lambda: self.http_ok(probe, "/readyz"), "webhook ready", "webhook")
        # The API server reaches the webhook at its URL (no Service routing here); the caBundle is the applied one.
        mwc = find(objects, "MutatingWebhookConfiguration")
        ca_bundle = mwc["webhooks"][0]["clientConfig"]["caBundle"]
        self.server.request("PATCH", self.paths.path(mwc), [
            {"op": "replace", "path": "/webhooks/0/clientConfig",
             "value": {"url": f"https://localhost:{self.webhook_port}/mutate-v1-pod", "caBundle": ca_bundle}}],
            content_type="application/json-patch+json")

    def start_controller(self, objects: list[dict[str, Any]]) -> None:
        c = container(objects, "Deployment", "caa-peerpod-ctrl")
        probe = free_port()
        env = downward(c, {"metadata.namespace": NAMESPACE, "metadata.name": "caa-peerpod-ctrl-0"})
        args = [*c["args"], f"--health-probe-bind-address=127.0.0.1:{probe}",
                f"--kubeconfig={self.token_kubeconfig('caa-peerpod-ctrl')}"]
        self.spawn("ctrl", args, env)
        self.wait(lambda: self.http_ok(probe, "/readyz"), "caa-peerpod-ctrl ready", "ctrl")

    def start_adaptor(self, objects: list[dict[str, Any]], a: Adaptor) -> None:
        c = container(objects, "DaemonSet", "cloud-api-adaptor-daemonset")
        self.assertEqual([r["secretRef" if "secretRef" in r else "configMapRef"]["name"] for r in c["envFrom"]],
                         ["peer-pods-secret", "peer-pods-cm"])
        env = {**self.settings(), **downward(c, {"spec.nodeName": self.node, "metadata.uid": str(uuid.uuid4()),
                                                 "metadata.namespace": NAMESPACE, "status.hostIP": "127.0.0.1"})}
        netns_dir = Path(a.base) / "netns.d"
        netns_dir.mkdir()
        args = [*expand(c["args"], env), f"--metrics-port={free_port()}", f"--probe-port={free_port()}",
                "--socket", a.socket, "--pods-dir", a.pods, "--tls-dir", os.path.join(a.base, "tls"),
                "--netns-dir", str(netns_dir), "--vxlan-min-id", str(710000 + (os.getpid() % 1000) * 10),
                f"--kubeconfig={self.token_kubeconfig('cloud-api-adaptor')}"]
        self.spawn("adaptor", args, env)
        self.wait(lambda: a.ctl("version").returncode == 0, "adaptor serving", "adaptor", timeout=60)

    # ----------------------------------------------------------------- the walk

    def node_capacity(self) -> str | None:
        node = self.server.request("GET", f"/api/v1/nodes/{self.node}")
        return (node.get("status", {}).get("capacity") or {}).get(EXTENDED_RESOURCE)

    def create_peer_pod(self, name: str, dry_run: bool = False) -> Any:
        return self.server.request("POST", f"/api/v1/namespaces/{self.namespace}/pods"
                                   + ("?dryRun=All" if dry_run else ""), {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"runtimeClassName": "kata-remote", "automountServiceAccountToken": False,
                     "containers": [{"name": "c", "image": "busybox", "resources": {
                         "requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}}}]}})

    def peerpods(self, namespace: str | None = None) -> list[dict[str, Any]]:
        path = f"{PEERPODS}/namespaces/{namespace}/peerpods" if namespace else f"{PEERPODS}/peerpods"
        return list(self.server.request("GET", path)["items"])

    def vxlan_in_pod(self) -> bool:
        out = subprocess.run(["ip", "-n", self.pod_netns, "-d", "link", "show"], capture_output=True, text=True,
                             check=False).stdout
        return "vxlan id" in out

    def test_install_walk_one_peer_pod_uninstall(self) -> None:
        objects = self.install()
        self.server.request("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node, "labels": {"node.kubernetes.io/worker": ""}}})
        self.addCleanup(self.server.request, "DELETE", f"/api/v1/nodes/{self.node}")
        self.server.token_for(self.namespace, "default")  # pods need their namespace's default ServiceAccount
        a = Adaptor(self)
        self.addCleanup(self.stop_all)  # the daemons stop before the adaptor's directory goes
        self.start_webhook(objects)
        self.start_controller(objects)
        self.start_adaptor(objects, a)

        # capacity from peer-pods-cm's PEERPODS_LIMIT_PER_NODE, written with the adaptor's own token
        self.wait(lambda: self.node_capacity() == self.settings()["PEERPODS_LIMIT_PER_NODE"],
                  "kata.peerpods.io/vm advertised", "adaptor")

        # the API server calls the webhook (its configuration is picked up asynchronously)
        self.wait(lambda: EXTENDED_RESOURCE in str(self.create_peer_pod("probe", dry_run=True)["spec"]),
                  "pods mutated by the installed webhook", "webhook", timeout=60)
        pod = self.create_peer_pod("web")
        annotations = pod["metadata"]["annotations"]
        self.assertEqual(annotations["io.katacontainers.config.hypervisor.default_vcpus"], "2")
        self.assertEqual(annotations["io.katacontainers.config.hypervisor.default_memory"], "2048")
        self.assertEqual(pod["spec"]["containers"][0]["resources"],
                         {"requests": {EXTENDED_RESOURCE: "1"}, "limits": {EXTENDED_RESOURCE: "1"}})
        self.assertEqual(pod["spec"]["overhead"], {"cpu": "250m", "memory": "120Mi"})
        self.assertEqual(pod["spec"]["nodeSelector"], {"node.kubernetes.io/worker": ""})  # the RuntimeClass's

        # the shim's calls for that pod
        pod_netns = wire_pod_netns(self.pod_netns, self.pod_bridge, self.pod_prefix)
        for args in (("create", "--id", self.sid, "--pod", "web", "--namespace", self.namespace,
                      "--netns", pod_netns), ("start", "--id", self.sid)):
            r = a.ctl(*args)
            self.assertEqual(r.returncode, 0, f"{r.stderr}\n{self.log('adaptor')}")
        record = a.record(self.sid)
        assert record is not None
        vm = record["instance_id"]
        self.assertIn(vm, netns_names())
        vm_pids = netns_pids(vm)
        self.assertTrue(vm_pids)
        self.assertTrue(self.vxlan_in_pod())
        self.wait(lambda: len(self.peerpods(self.namespace)) == 1, "the PeerPod created", "adaptor")
        [peerpod] = self.peerpods(self.namespace)
        self.assertEqual(peerpod["spec"], {"cloudProvider": "local", "instanceID": vm})
        self.assertEqual(peerpod["metadata"]["finalizers"], [PEERPOD_FINALIZER])
        self.assertEqual(peerpod["metadata"]["ownerReferences"][0]["uid"], pod["metadata"]["uid"])

        # the pod goes: Kubernetes deletes it, the shim calls StopVM
        self.server.request("DELETE", f"/api/v1/namespaces/{self.namespace}/pods/web")
        r = a.ctl("stop", "--id", self.sid)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.wait(lambda: vm not in netns_names() and f"{vm}-pod" not in netns_names(), "the VM deleted", "adaptor")
        self.assertEqual([p for p in vm_pids if running(p)], [])
        self.assertFalse(self.vxlan_in_pod())
        self.wait(lambda: self.peerpods(self.namespace) == [], "the PeerPod gone (garbage collected, released)",
                  "ctrl", timeout=60)

        # uninstall: every applied object deleted, daemons stopped; nothing stuck on a finalizer
        self.uninstall(objects)
        self.stop_all()

        def crd_gone() -> bool:
            try:
                self.server.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                                    f"{find(objects, 'CustomResourceDefinition')['metadata']['name']}")
            except urllib.error.HTTPError as e:
                return e.code == 404
            return False

        def namespace_gone() -> bool:
            try:
                self.server.request("GET", f"/api/v1/namespaces/{NAMESPACE}")
            except urllib.error.HTTPError as e:
                return e.code == 404
            return False
        wait_for(crd_gone, "the PeerPod CRD deleted (no PeerPod left holding it)", timeout=60)
        wait_for(namespace_gone, f"namespace {NAMESPACE} deleted", timeout=120)
        for kind in ("ClusterRole", "ClusterRoleBinding", "RuntimeClass", "MutatingWebhookConfiguration"):
            for obj in (o for o in objects if o["kind"] == kind):
                with self.assertRaises(urllib.error.HTTPError) as gone:
                    self.server.request("GET", self.paths.path(obj))
                self.assertEqual(gone.exception.code, 404)
