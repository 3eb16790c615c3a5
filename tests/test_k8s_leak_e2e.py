"""The leaked-VM scenario end to end against a real kube-apiserver (tests/kubeapi.py), local provider.

A real adaptor process (tests/test_adaptor_process.py's `Adaptor`, `CLOUD_PROVIDER=local`, `NODE_NAME`, the
token of deploy/base/adaptor-rbac.yaml) creates and starts a pod VM: a network namespace with its own
processes, and a PeerPod owned by the Pod with the finalizer. The adaptor is then killed with SIGKILL and its
journal wiped (a node reboot), so nothing on the node remembers the VM. Deleting the PeerPod (what the Pod's
garbage collection does) makes caa-peerpod-ctrl, configured by `peer-pods-cm` naming the local provider,
delete the instance (namespace and processes gone), after which the PeerPod goes away:
- with a real `twistd caa-peerpod-ctrl` process (its token bound to deploy/base/peerpod-ctrl-rbac.yaml);
- with the provider failing twice first: an in-process controller whose registry (the public
  `ProviderRegistry.register`) holds the real local provider behind a wrapper failing its first two deletes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any, cast

from twisted.internet.defer import Deferred, fail
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python import usage
from zope.interface import implementer

from caa.k8s.objects import PEERPOD_FINALIZER
from caa.k8s.watch import peerpods_source
from caa.peerpodctrl.config import cloud_config_sources
from caa.peerpodctrl.providers import ProviderCache
from caa.peerpodctrl.service import PeerPodController
from caa.providers.interfaces import IProvider, IProviderFactory, TransientError
from caa.providers.local import LocalProviderFactory
from caa.providers.registry import ProviderRegistry
from caa.reactors import INodeReactor
from tests.podnet import netns_names, netns_pids, remove_vm_namespaces, running, wire_pod_netns
from tests.test_adaptor_k8s import install_rbac
from tests.test_adaptor_process import Adaptor
from tests.test_k8s_apiserver import reactor
from tests.test_peerpodctrl_apiserver import TIMINGS, ControllerTestCase, eventually

_PEERPODS = "/apis/confidentialcontainers.org/v1alpha1/namespaces/{ns}/peerpods"


@implementer(IProvider)
class FailingDeletes:
    """The real provider, except that its first `failures` deletes fail with a TransientError."""

    def __init__(self, inner: IProvider, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.deletes: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def delete_instance(self, instance_id: str) -> Deferred[None]:
        self.deletes.append(time.monotonic())
        if self.failures:
            self.failures -= 1
            return fail(TransientError("cloud busy"))
        return self.inner.delete_instance(instance_id)


@implementer(IProviderFactory)
class FailingLocalFactory:
    """The local provider's factory (same name, options and settings) handing out `FailingDeletes`."""

    name = "local"
    description = "local provider whose first deletes fail"

    def __init__(self, failures: int) -> None:
        self.local = LocalProviderFactory()
        self.failures = failures
        self.built: list[FailingDeletes] = []

    def options(self) -> usage.Options:
        return self.local.options()

    def create(self, reactor: INodeReactor, options: usage.Options) -> IProvider:
        provider = FailingDeletes(self.local.create(reactor, options), self.failures)
        self.built.append(provider)
        return provider


class LeakedVMTests(ControllerTestCase):
    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        n = os.getpid() % 250
        k = 0 if self.id().endswith("_process") else 1  # the two tests may run at once (trial -j2)
        tag = f"{os.getpid() % 10000}{k}"
        self.local = {"CLOUD_PROVIDER": "local", "LOCAL_BRIDGE": f"cle{tag}v", "LOCAL_SUBNET": f"10.{231 + k}.{n}.0/24",
                      "LOCAL_STATE_DIR": f"/tmp/caa-leak-{tag}", "FORWARDER_PORT": str(16000 + 2 * n + k),
                      "LOCAL_FORWARDER_ARGS": "--disable-tls", "LOCAL_BOOT_TIMEOUT": "30s"}
        self.pod_netns, self.pod_bridge = f"cle{tag}p", f"cle{tag}b"
        # the VM's name holds the id's first 8 characters: unique per process and test
        self.sid = f"lk{os.getpid() % 10000:04d}{k}xleak"
        self.vxlan_min_id = 700000 + (os.getpid() % 1000) * 20 + 10 * k
        self.addCleanup(self.cleanup_local)
        # peer-pods-cm names the local provider and carries its settings (the controller never reads its env).
        self.server.request(
            "PUT", f"/api/v1/namespaces/{self.namespace}/configmaps/peer-pods-cm",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "peer-pods-cm"}, "data": self.local})
        self.node = f"node-{self.namespace}"[:63]
        self.server.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                      "metadata": {"name": self.node}})
        self.addCleanup(self.server.request, "DELETE", f"/api/v1/nodes/{self.node}")
        self.adaptor_kubeconfig = self.server.kubeconfig(install_rbac(self.server))
        self.before = netns_names()

    def cleanup_local(self) -> None:
        """Every namespace this test made and its processes, the bridge and the state directory."""
        remove_vm_namespaces(self.sid[:8], getattr(self, "before", set()))  # never another worker's VM (-j2)
        subprocess.run(["ip", "netns", "del", self.pod_netns], check=False, capture_output=True)
        for bridge in (self.local["LOCAL_BRIDGE"], self.pod_bridge):
            subprocess.run(["ip", "link", "del", bridge], check=False, capture_output=True)
        shutil.rmtree(self.local["LOCAL_STATE_DIR"], ignore_errors=True)

    def wire_pod(self) -> str:
        """The Pod's network namespace on a bridge, as a CNI plugin wires it (the tunnel's node end); its path."""
        net = self.local["LOCAL_SUBNET"].replace("10.23", "10.24").rsplit(".", 1)[0]
        return wire_pod_netns(self.pod_netns, self.pod_bridge, net)

    def leak_a_vm(self) -> tuple[str, str]:
        """Pod -> adaptor CreateVM/StartVM -> PeerPod; then kill -9 and a wiped journal. (PeerPod, VM name)."""
        self.create_pod("web")
        a = Adaptor(self)
        netns_dir = os.path.join(a.base, "netns.d")  # sweep only this test's tunnels
        os.makedirs(netns_dir)
        a.extra_args = ["--netns-dir", netns_dir, "--vxlan-min-id", str(self.vxlan_min_id)]
        pod_netns = self.wire_pod()
        a.env = {"KUBECONFIG": str(self.adaptor_kubeconfig), "NODE_NAME": self.node, **self.local}
        a.start()
        r = a.ctl("create", "--id", self.sid, "--pod", "web", "--namespace", self.namespace, "--netns", pod_netns)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = a.ctl("start", "--id", self.sid)
        self.assertEqual(r.returncode, 0, r.stderr)
        rec = a.record(self.sid)
        assert rec is not None
        vm, name = rec["instance_id"], rec["peerpod"]
        pp = self.server.request("GET", _PEERPODS.format(ns=self.namespace) + f"/{name}")
        self.assertEqual(pp["metadata"]["finalizers"], [PEERPOD_FINALIZER])
        self.assertEqual(pp["metadata"]["ownerReferences"][0]["name"], "web")
        self.assertEqual(pp["spec"], {"cloudProvider": "local", "instanceID": vm})
        a.kill9()
        shutil.rmtree(a.pods)  # node reboot: the journal is gone
        self.assertIn(vm, netns_names())  # ... but the instance lives on
        self.assertTrue(netns_pids(vm))
        return name, vm

    async def instance_gone(self, vm: str, pids: list[int]) -> None:
        await eventually(lambda: vm not in netns_names() and f"{vm}-pod" not in netns_names(),
                         within=30, what="the VM's network namespaces deleted")
        self.assertEqual([p for p in pids if running(p)], [])

    async def test_leaked_vm_deleted_by_the_controller_process(self) -> None:
        name, vm = self.leak_a_vm()
        pids = netns_pids(vm)
        self.twistd("ctrl")
        self.server.request("DELETE", _PEERPODS.format(ns=self.namespace) + f"/{name}")
        await eventually(lambda: self.gone(name), within=40, what="the PeerPod gone")
        await self.instance_gone(vm, pids)

    async def test_leaked_vm_deleted_after_two_failures(self) -> None:
        name, vm = self.leak_a_vm()
        pids = netns_pids(vm)
        factory = FailingLocalFactory(failures=2)
        retries: list[float] = []

        def observe(event: dict[str, object]) -> None:
            if event.get("log_namespace") == "caa.peerpodctrl.queue.WorkQueue" and "delay" in event:
                retries.append(float(event["delay"]))  # type: ignore[arg-type]
        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        registry = ProviderRegistry(entry_points_=[], builtins={})
        registry.register(factory)
        controller = PeerPodController(
            reactor, self.ctrl_client, peerpods_source(self.ctrl_client, server_timeout=30),
            cloud_config_sources(self.ctrl_client, self.namespace, server_timeout=30), namespace=self.namespace,
            identity="solo", lease=TIMINGS, providers=ProviderCache(reactor, registry.get), backoff_base=0.2)
        controller.startService()
        self.addCleanup(controller.stopService)
        self.server.request("DELETE", _PEERPODS.format(ns=self.namespace) + f"/{name}")
        await eventually(lambda: self.gone(name), within=40, what="the PeerPod gone after two failures")
        await self.instance_gone(vm, pids)
        [provider] = factory.built
        self.assertEqual(len(provider.deletes), 3)
        # Each failure scheduled its retry with back-off; a watch event may rerun the key at once meanwhile, so
        # the calls' spacing is bounded below only by the first back-off overall.
        self.assertEqual(retries, [0.2, 0.4])
        self.assertGreaterEqual(provider.deletes[-1] - provider.deletes[0], 0.2)
