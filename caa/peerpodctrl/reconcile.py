"""Reconciling one PeerPod (spec-providers §11.3, with the fixes of §11.5).

- gone → nothing to do;
- being deleted and still holding `peer.pod/finalizer` → delete `spec.instanceID` with the provider named by
  `spec.cloudProvider` (an instance the cloud no longer knows counts as deleted), then remove the finalizer
  (only ours, guarded by the resourceVersion read); any failure raises, and the work queue retries with
  back-off;
- otherwise, when it has an owner → delete the other PeerPods of that owner created before it (an adaptor
  restart recreated the VM); deletion errors are only logged. Without owners there is nothing to compare
  (upstream panics there): it is skipped. Only this namespace is listed (a PeerPod lives with its Pod).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from caa.k8s.errors import NotFound
from caa.k8s.interfaces import IKubeClient
from caa.k8s.objects import PEERPOD_FINALIZER, JSONObject, being_deleted, name_of, resource_version_of
from caa.peerpodctrl.metrics import ControllerMetrics
from caa.peerpodctrl.providers import ProviderCache
from caa.providers.interfaces import ErrorKind, ProviderError


def key_of(obj: JSONObject) -> str:
    meta = obj.get("metadata", {})
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def owner_uid(obj: JSONObject) -> str | None:
    """The first owner's uid (upstream compares `ownerReferences[0]`), None without owners."""
    owners = obj.get("metadata", {}).get("ownerReferences") or []
    uid = owners[0].get("uid") if owners else None
    return str(uid) if uid else None


def finalizer_patch(peerpod: JSONObject) -> dict[str, Any]:
    """Merge patch removing only our finalizer, refused (409) if the object changed since it was read."""
    rest = [f for f in peerpod.get("metadata", {}).get("finalizers") or [] if f != PEERPOD_FINALIZER]
    return {"metadata": {"finalizers": rest or None, "resourceVersion": resource_version_of(peerpod)}}


class Reconciler:
    _log = Logger()

    def __init__(self, client: IKubeClient, providers: ProviderCache, metrics: ControllerMetrics) -> None:
        self.client = client
        self.providers = providers
        self.metrics = metrics

    async def reconcile(self, key: str) -> None:
        namespace, _, name = key.partition("/")
        try:
            peerpod: JSONObject = await self.client.get_peerpod(namespace, name)
        except NotFound:
            return
        if being_deleted(peerpod):
            if PEERPOD_FINALIZER in (peerpod.get("metadata", {}).get("finalizers") or []):
                await self._finalize(key, peerpod)
            return
        uid = owner_uid(peerpod)
        if uid is None:
            self._log.info("{key}: no owner reference; skipped", key=key)
            return
        await self._remove_older(key, peerpod, uid)

    async def _finalize(self, key: str, peerpod: JSONObject) -> None:
        spec = peerpod.get("spec") or {}
        provider_name, instance_id = str(spec.get("cloudProvider") or ""), str(spec.get("instanceID") or "")
        if instance_id:
            provider = self.providers.get(provider_name)
            try:
                await provider.delete_instance(instance_id)
            except ProviderError as e:
                if e.kind is not ErrorKind.NOT_FOUND:
                    self.metrics.instance_deletes.labels(provider=provider_name, result="error").inc()
                    raise
                self._log.info("{key}: instance {instance_id} already gone", key=key, instance_id=instance_id)
            self.metrics.instance_deletes.labels(provider=provider_name, result="deleted").inc()
            self._log.info("{key}: deleted instance {instance_id} ({provider})", key=key,
                           instance_id=instance_id, provider=provider_name)
        else:
            self._log.warn("{key}: no spec.instanceID; releasing the finalizer", key=key)
        namespace, _, name = key.partition("/")
        try:
            await self.client.patch_peerpod(namespace, name, finalizer_patch(peerpod))
        except NotFound:
            return
        self._log.info("{key}: finalizer {finalizer} removed", key=key, finalizer=PEERPOD_FINALIZER)

    async def _remove_older(self, key: str, peerpod: JSONObject, uid: str) -> None:
        namespace = peerpod["metadata"].get("namespace", "")
        created = str(peerpod["metadata"].get("creationTimestamp") or "")
        listing = await self.client.list_peerpods(namespace)
        for other in listing.get("items") or []:
            if name_of(other) == name_of(peerpod) or owner_uid(other) != uid or being_deleted(other):
                continue
            # RFC 3339 UTC timestamps of one server sort as strings.
            if str(other["metadata"].get("creationTimestamp") or "") >= created:
                continue
            try:
                await self.client.delete_peerpod(namespace, name_of(other))
            except NotFound:
                continue
            except Exception as e:
                self._log.warn("{key}: deleting older PeerPod {old} of the same owner: {error}", key=key,
                               old=name_of(other), error=e)
                continue
            self.metrics.older_deleted.inc()
            self._log.info("{key}: deleted older PeerPod {old} of the same owner {uid}", key=key,
                           old=name_of(other), uid=uid)


__all__ = ["Reconciler", "finalizer_patch", "key_of", "owner_uid"]
