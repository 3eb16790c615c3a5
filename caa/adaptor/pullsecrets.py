"""Image pull secrets of a pod -> registry auths for the pod VM's auth.json (spec-adaptor §5.7).

`registry_auths` is the algorithm over three lookups (pod, service account, secret), so it is tested without
an API server. `KubernetesPullSecrets` feeds it from the daemon's one Kubernetes client (caa.k8s: every call off
the reactor thread with a deadline); the adaptor uses it whenever it has a client (in-cluster or --kubeconfig).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from caa.k8s.errors import KubeError, NotFound
from caa.k8s.interfaces import IKubeClient
from caa.k8s.objects import JSONObject

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
    """auth_lookup for CloudService over the daemon's `IKubeClient`: the three lookups fetched first (each off
    the reactor with its own deadline), then `registry_auths` over what came back. A missing object is None."""

    def __init__(self, client: IKubeClient) -> None:
        self.client = client

    async def _get(self, d: Deferred[JSONObject]) -> JSONObject | None:
        try:
            return await d
        except NotFound:
            return None

    async def __call__(self, namespace: str, pod: str) -> dict[str, str]:
        obj = await self._get(self.client.get_pod(namespace, pod))
        if obj is None:
            return {}
        spec = obj.get("spec") or {}
        sa = await self._get(self.client.get_service_account(namespace, spec.get("serviceAccountName") or "default"))
        secrets: dict[str, JSONObject | None] = {}
        for ref in [*((sa or {}).get("imagePullSecrets") or []), *(spec.get("imagePullSecrets") or [])]:
            name = ref.get("name", "")
            if name and name not in secrets:
                try:
                    secrets[name] = await self._get(self.client.get_secret(namespace, name))
                except KubeError:
                    secrets[name] = None  # unreadable secrets are skipped, as the kubelet does
        return registry_auths(namespace, pod, lambda ns, n: obj, lambda ns, n: sa, lambda ns, n: secrets.get(n))
