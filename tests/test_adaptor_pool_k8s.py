"""Warm-pool VMs as PeerPods, against a real kube-apiserver (tests/kubeapi.py): the pool manager
(caa.adaptor.pool, in-memory FakeProvider) with the cluster duties (caa.adaptor.cluster) over a KubeClient holding
the token of a ServiceAccount bound to exactly deploy/base/adaptor-rbac.yaml (least privilege proven by use).

A pool VM's PeerPod is in the adaptor's namespace, owned by its Node, labelled with the pool key's hash, with
the finalizer and spec.instanceID peerpod-ctrl acts on; handed to a sandbox or deleted by the pool, it is released
(finalizer) and deleted; a restart re-creates a PeerPod a kill cut short; one left behind (the adaptor gone, its
Node deleted) is held by its finalizer for peerpod-ctrl to delete the VM.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from caa import tls
from caa.adaptor.adapters import AutoTLS
from caa.adaptor.cluster import ClusterDuties, ClusterSettings
from caa.adaptor.pool import PoolConfig, PoolKey, PoolManager
from caa.k8s.client import connect
from caa.k8s.objects import PEERPOD_FINALIZER, POOL_LABEL
from caa.reactors import as_node_reactor
from tests.fakes.provider import FakeProvider
from tests.kubeapi import shared_server
from tests.test_adaptor_k8s import install_rbac
from tests.test_k8s_apiserver import install_crd


class PoolPeerPodTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.server = shared_server(self)
        install_crd(self.server)
        kubeconfig = self.server.kubeconfig(install_rbac(self.server))
        test = self.id().rsplit(".", 1)[-1].replace("_", "-")[:30].strip("-")
        self.node = f"node-{os.getpid()}-{test}".lower()
        self.node_obj = self.server.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                                      "metadata": {"name": self.node}})
        self.namespace = f"p-{os.getpid()}-{test}".lower()
        self.server.ensure_namespace(self.namespace)
        threads = ThreadPool(minthreads=0, maxthreads=4, name="pool-k8s-test")
        threads.start()
        self.addCleanup(threads.stop)
        node_reactor = as_node_reactor(reactor)
        self.client = connect(node_reactor, threads, str(kubeconfig), timeout=10.0)
        self.addCleanup(self.client.close)
        self.duties = ClusterDuties(reactor, self.client, ClusterSettings(
            node_name=self.node, provider="fake", namespace=self.namespace), backoff=lambda n: 0.2)
        self.addCleanup(self.duties.stop)
        self.provider = FakeProvider(reactor)
        self.dir = tempfile.mkdtemp(prefix=f"poolk8s{os.getpid()}-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.tls = AutoTLS(tls.CertificateAuthority.create(), tls.make_client_certificate().cert_pem)
        self.key = PoolKey(instance_type=f"k8s-{os.getpid()}")

    def manager(self, size: int) -> PoolManager:
        m = PoolManager(reactor, self.provider, self.tls, PoolConfig(size=size, pool_dir=self.dir), [self.key],
                        lambda key: "", peerpods=self.duties)
        self.addCleanup(lambda: Deferred.fromCoroutine(m.stop()))
        return m

    def peerpod(self, name: str) -> Any:
        try:
            return self.server.request(
                "GET", f"/apis/confidentialcontainers.org/v1alpha1/namespaces/{self.namespace}/peerpods/{name}")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    async def wait_for(self, cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        for _ in range(int(timeout / 0.1)):
            if cond():
                return
            await deferLater(reactor, 0.1, lambda: None)
        raise AssertionError(f"timed out waiting for {what}")

    async def test_pool_peerpods_follow_the_pool(self) -> None:
        m = self.manager(size=1)
        await m.start()
        await self.wait_for(lambda: len(m.ready(self.key)) == 1, "a ready pool VM")
        (vm,) = m.ready(self.key)
        await self.wait_for(lambda: self.peerpod(vm.name) is not None, "the pool VM's PeerPod")
        pp = self.peerpod(vm.name)
        self.assertEqual(pp["metadata"]["finalizers"], [PEERPOD_FINALIZER])
        self.assertEqual(pp["metadata"]["ownerReferences"], [
            {"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": self.node_obj["metadata"]["uid"]}])
        self.assertEqual(pp["metadata"]["labels"], {POOL_LABEL: self.key.short_hash()})
        self.assertEqual(pp["spec"], {"cloudProvider": "fake", "instanceID": vm.instance_id})
        # handed to a sandbox (which creates the pod's own PeerPod): released and deleted, the VM kept
        taken = await m.take(self.key)
        assert taken is not None
        await m.handed_over(taken)
        await self.wait_for(lambda: self.peerpod(vm.name) is None, "the pool PeerPod deleted at the hand-over")
        self.assertIn(vm.instance_id, self.provider.instances)
        # the refill has its own; the pool deleting its VM (pools drained) deletes it
        await self.wait_for(lambda: len(m.ready(self.key)) == 1, "the refilled pool VM")
        (refill,) = m.ready(self.key)
        await self.wait_for(lambda: self.peerpod(refill.name) is not None, "the refill's PeerPod")
        await m.drain()
        self.assertNotIn(refill.instance_id, self.provider.instances)
        await self.wait_for(lambda: self.peerpod(refill.name) is None, "the deleted pool VM's PeerPod gone")

    async def test_restart_recreates_a_missing_peerpod_and_a_leaked_one_waits_for_peerpod_ctrl(self) -> None:
        m = self.manager(size=1)
        await m.start()
        await self.wait_for(lambda: len(m.ready(self.key)) == 1, "a ready pool VM")
        (vm,) = m.ready(self.key)
        await self.wait_for(lambda: self.peerpod(vm.name) is not None, "the pool VM's PeerPod")
        await m.stop()
        # as if a kill had cut its creation short: the PeerPod is missing when the adaptor restarts
        path = f"/apis/confidentialcontainers.org/v1alpha1/namespaces/{self.namespace}/peerpods/{vm.name}"
        self.server.request("PATCH", path, [{"op": "remove", "path": "/metadata/finalizers"}],
                            content_type="application/json-patch+json")
        self.server.request("DELETE", path)
        self.assertIsNone(self.peerpod(vm.name))
        again = self.manager(size=1)
        await again.start()
        self.assertEqual([v.pool_id for v in again.ready(self.key)], [vm.pool_id])  # the same VM, kept
        await self.wait_for(lambda: self.peerpod(vm.name) is not None, "the PeerPod re-created")
        await again.stop()
        # the adaptor is gone for good and its Node deleted: the garbage collector deletes the PeerPod, whose
        # finalizer keeps it (Terminating) until peerpod-ctrl has deleted spec.instanceID
        self.server.request("DELETE", path)
        pp = self.peerpod(vm.name)
        self.assertIsNotNone(pp["metadata"].get("deletionTimestamp"))
        self.assertEqual(pp["spec"]["instanceID"], vm.instance_id)
        self.server.request("PATCH", path, [{"op": "remove", "path": "/metadata/finalizers"}],
                            content_type="application/json-patch+json")
