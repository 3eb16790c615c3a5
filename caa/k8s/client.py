"""`KubeClient`: the one `kubernetes` ApiClient of a daemon, every call off the reactor thread with a deadline.

The official client blocks, so each call runs in the injected, bounded thread pool (`deferToThreadPool`) with
`_request_timeout` (urllib3 gives up) and a reactor-side deadline a little later (the caller never waits longer,
even if a worker thread is stuck). Bodies are read raw (`_preload_content=False`) and decoded as JSON: objects
stay exactly as the server sent them, whatever the client's model classes know of this server's version.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from caa.k8s.config import load_configuration
from caa.k8s.errors import KubeTimeout, map_exception
from caa.k8s.interfaces import IKubeClient
from caa.k8s.objects import PEERPOD_GROUP, PEERPOD_PLURAL, PEERPOD_VERSION, JSONObject
from caa.reactors import INodeReactor

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
#: How much longer than `_request_timeout` the reactor waits before it gives up on a worker thread.
DEADLINE_GRACE = 1.0


def patch_content_type(patch: Any) -> str:
    """A list of operations is a JSON patch; anything else a merge patch."""
    return JSON_PATCH if isinstance(patch, list) else MERGE_PATCH


def decode_body(data: bytes | None) -> Any:
    return json.loads(data) if data else None


@implementer(IKubeClient)
class KubeClient:
    """Typed helpers over one ApiClient (see IKubeClient). `core`, `custom`, `coordination`, `apiextensions`
    are the generated API objects for `call()`; they share the client's connection pool."""

    _log = Logger()

    def __init__(self, reactor: INodeReactor, threadpool: ThreadPool, configuration: k8s.Configuration,
                 timeout: float = 10.0) -> None:
        self.reactor = reactor
        self.threadpool = threadpool
        self.timeout = timeout
        self.api_client = k8s.ApiClient(configuration)
        self.core = k8s.CoreV1Api(self.api_client)
        self.custom = k8s.CustomObjectsApi(self.api_client)
        self.coordination = k8s.CoordinationV1Api(self.api_client)
        self.apiextensions = k8s.ApiextensionsV1Api(self.api_client)

    def close(self) -> None:
        """Release the connection pool (after the last call)."""
        self.api_client.close()

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> Deferred[Any]:
        limit = self.timeout if timeout is None else timeout
        what = getattr(fn, "__name__", "kubernetes call")

        def run() -> Any:
            try:
                response = fn(*args, _preload_content=False, _request_timeout=limit, **kwargs)
                return decode_body(response.data)
            except Exception as e:
                raise map_exception(e, what) from e

        d = deferToThreadPool(self.reactor, self.threadpool, run)

        def timed_out(result: object, _timeout: float) -> object:
            raise KubeTimeout(f"{what}: no answer within {limit:.1f}s")

        return d.addTimeout(limit + DEADLINE_GRACE, self.reactor, onTimeoutCancel=timed_out)

    # Nodes
    def get_node(self, name: str) -> Deferred[JSONObject]:
        return self.call(self.core.read_node, name)

    def patch_node(self, name: str, patch: Any) -> Deferred[JSONObject]:
        return self.call(self.core.patch_node, name, patch, _content_type=patch_content_type(patch))

    def patch_node_status(self, name: str, patch: Any) -> Deferred[JSONObject]:
        return self.call(self.core.patch_node_status, name, patch, _content_type=patch_content_type(patch))

    # PeerPods
    def create_peerpod(self, namespace: str, body: JSONObject) -> Deferred[JSONObject]:
        return self.call(self.custom.create_namespaced_custom_object, PEERPOD_GROUP, PEERPOD_VERSION, namespace,
                         PEERPOD_PLURAL, body)

    def get_peerpod(self, namespace: str, name: str) -> Deferred[JSONObject]:
        return self.call(self.custom.get_namespaced_custom_object, PEERPOD_GROUP, PEERPOD_VERSION, namespace,
                         PEERPOD_PLURAL, name)

    def list_peerpods(self, namespace: str | None = None,
                      label_selector: str | None = None) -> Deferred[JSONObject]:
        if namespace is None:
            return self.call(self.custom.list_cluster_custom_object, PEERPOD_GROUP, PEERPOD_VERSION, PEERPOD_PLURAL,
                             label_selector=label_selector)
        return self.call(self.custom.list_namespaced_custom_object, PEERPOD_GROUP, PEERPOD_VERSION, namespace,
                         PEERPOD_PLURAL, label_selector=label_selector)

    def patch_peerpod(self, namespace: str, name: str, patch: Any) -> Deferred[JSONObject]:
        return self.call(self.custom.patch_namespaced_custom_object, PEERPOD_GROUP, PEERPOD_VERSION, namespace,
                         PEERPOD_PLURAL, name, patch, _content_type=patch_content_type(patch))

    def remove_peerpod_finalizers(self, namespace: str, name: str) -> Deferred[JSONObject]:
        # Upstream's exact patch (spec-providers §11.1): the PeerPod carries only our finalizer.
        return self.patch_peerpod(namespace, name, [{"op": "remove", "path": "/metadata/finalizers"}])

    def delete_peerpod(self, namespace: str, name: str) -> Deferred[JSONObject]:
        return self.call(self.custom.delete_namespaced_custom_object, PEERPOD_GROUP, PEERPOD_VERSION, namespace,
                         PEERPOD_PLURAL, name)

    # Reads
    def get_pod(self, namespace: str, name: str) -> Deferred[JSONObject]:
        return self.call(self.core.read_namespaced_pod, name, namespace)

    def list_pods(self, namespace: str | None = None, field_selector: str | None = None) -> Deferred[JSONObject]:
        if namespace is None:
            return self.call(self.core.list_pod_for_all_namespaces, field_selector=field_selector)
        return self.call(self.core.list_namespaced_pod, namespace, field_selector=field_selector)

    def get_config_map(self, namespace: str, name: str) -> Deferred[JSONObject]:
        return self.call(self.core.read_namespaced_config_map, name, namespace)

    def get_secret(self, namespace: str, name: str) -> Deferred[JSONObject]:
        return self.call(self.core.read_namespaced_secret, name, namespace)

    def get_service_account(self, namespace: str, name: str) -> Deferred[JSONObject]:
        return self.call(self.core.read_namespaced_service_account, name, namespace)

    # Leases
    def get_lease(self, namespace: str, name: str) -> Deferred[JSONObject]:
        return self.call(self.coordination.read_namespaced_lease, name, namespace)

    def create_lease(self, namespace: str, body: JSONObject) -> Deferred[JSONObject]:
        return self.call(self.coordination.create_namespaced_lease, namespace, body)

    def replace_lease(self, namespace: str, name: str, body: JSONObject) -> Deferred[JSONObject]:
        return self.call(self.coordination.replace_namespaced_lease, name, namespace, body)


def connect(reactor: INodeReactor, threadpool: ThreadPool, kubeconfig: str | None = None,
            timeout: float = 10.0) -> KubeClient:
    """A KubeClient for `kubeconfig`, else in-cluster, else $KUBECONFIG (KubeError if none is usable)."""
    return KubeClient(reactor, threadpool, load_configuration(kubeconfig), timeout=timeout)


__all__ = ["JSON_PATCH", "MERGE_PATCH", "KubeClient", "connect", "decode_body", "patch_content_type"]
