"""Image pull secrets of a pod -> registry auths for the pod VM's auth.json (spec-adaptor §5.7).

`registry_auths` is the algorithm over three lookups (pod, service account, secret), so it is tested without
an API server. `KubernetesPullSecrets` runs it with the official client (in-cluster config) in a thread pool,
with a deadline per call; the adaptor uses it only when it runs in a cluster (KUBERNETES_SERVICE_HOST set).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from caa.reactors import INodeReactor

_log = Logger(namespace="caa.adaptor.pullsecrets")

Lookup = Callable[[str, str], Mapping[str, Any] | None]


def _docker_auths(secret: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """{registry: entry} from a secret's .dockerconfigjson or legacy .dockercfg. Malformed JSON raises."""
    data = secret.get("data") or {}
    if ".dockerconfigjson" in data:
        doc = json.loads(base64.b64decode(data[".dockerconfigjson"]))
        auths = doc.get("auths") or {}
    elif ".dockercfg" in data:
        auths = json.loads(base64.b64decode(data[".dockercfg"]))
    else:
        return {}
    if not isinstance(auths, dict):
        raise ValueError("docker config auths is not an object")
    return auths


def registry_auths(namespace: str, pod_name: str, get_pod: Lookup, get_service_account: Lookup,
                   get_secret: Lookup) -> dict[str, str]:
    """registry -> base64("user:pass") from the pod's and its service account's image pull secrets.

    Pod entries override the service account's for the same registry; unreadable secrets are skipped (as the
    kubelet does); malformed docker config JSON fails the whole lookup (ValueError)."""
    pod = get_pod(namespace, pod_name)
    if pod is None:
        return {}
    spec = pod.get("spec") or {}
    sa_name = spec.get("serviceAccountName") or "default"
    names: list[str] = []
    sa = get_service_account(namespace, sa_name)
    for ref in (sa or {}).get("imagePullSecrets") or []:
        names.append(ref.get("name", ""))
    for ref in spec.get("imagePullSecrets") or []:
        names.append(ref.get("name", ""))
    out: dict[str, str] = {}
    for name in names:
        if not name:
            continue
        try:
            secret = get_secret(namespace, name)
        except Exception:
            secret = None
        if secret is None:
            continue
        for registry, entry in _docker_auths(secret).items():
            auth = entry.get("auth") or ""
            if not auth:
                user, password = entry.get("username"), entry.get("password")
                if not (user and password):
                    continue
                auth = base64.b64encode(f"{user}:{password}".encode()).decode()
            out[registry] = auth
    return out


class KubernetesPullSecrets:
    """auth_lookup for CloudService: the official kubernetes client (in-cluster) in a thread pool."""

    def __init__(self, reactor: INodeReactor, threadpool: ThreadPool, timeout: float = 10.0) -> None:
        from kubernetes import client, config

        config.load_incluster_config()
        self.api = client.CoreV1Api()
        self.reactor = reactor
        self.threadpool = threadpool
        self.timeout = timeout

    def _get(self, fn: Callable[..., Any], namespace: str, name: str) -> Mapping[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj = fn(name, namespace, _request_timeout=self.timeout)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return self.api.api_client.sanitize_for_serialization(obj)  # type: ignore[no-any-return]

    def _lookup(self, namespace: str, pod: str) -> dict[str, str]:
        return registry_auths(
            namespace, pod,
            lambda ns, n: self._get(self.api.read_namespaced_pod, ns, n),
            lambda ns, n: self._get(self.api.read_namespaced_service_account, ns, n),
            lambda ns, n: self._get(self.api.read_namespaced_secret, ns, n))

    def __call__(self, namespace: str, pod: str) -> Deferred[dict[str, str]]:
        return deferToThreadPool(self.reactor, self.threadpool, self._lookup, namespace, pod)
