"""The Kubernetes names and object shapes of peer pods, in one place (spec-providers §11.1, spec-adaptor §5.9).

Objects travel as plain JSON dicts, exactly as the API server sends them; these helpers build and read them.
"""

from __future__ import annotations

import secrets
from typing import Any

JSONObject = dict[str, Any]

PEERPOD_GROUP = "confidentialcontainers.org"
PEERPOD_VERSION = "v1alpha1"
PEERPOD_PLURAL = "peerpods"
PEERPOD_KIND = "PeerPod"
PEERPOD_API_VERSION = f"{PEERPOD_GROUP}/{PEERPOD_VERSION}"
PEERPOD_CRD_NAME = f"{PEERPOD_PLURAL}.{PEERPOD_GROUP}"
PEERPOD_FINALIZER = "peer.pod/finalizer"

#: The node's extended resource a peer pod requests (webhook) and the adaptor advertises.
EXTENDED_RESOURCE = "kata.peerpods.io/vm"
#: Node annotation naming the adaptor pod (POD_UID) whose value is current, so an older instance
#: never withdraws a newer one's.
OWNER_ANNOTATION = "kata.peerpods.io/caa-owner"

#: Upstream peerpod-ctrl's leader-election Lease name.
PEERPOD_CTRL_LEASE = "33f6c5d6.confidentialcontainers.org"

#: Kubernetes' utilrand alphabet (no vowels, no confusable characters), which upstream's names are drawn from.
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def peerpod_name(pod_name: str, suffix: str | None = None) -> str:
    """`<pod>-resource-<5 random characters of Kubernetes' alphabet>` as upstream names them."""
    if suffix is None:
        suffix = "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(5))
    return f"{pod_name}-resource-{suffix}"


def new_peerpod(pod: JSONObject, cloud_provider: str, instance_id: str, name: str | None = None) -> JSONObject:
    """The PeerPod the adaptor creates for `pod` (a Pod object with metadata name/namespace/uid):
    finalizer set, one controller owner reference to the Pod, spec {cloudProvider, instanceID}."""
    meta = pod["metadata"]
    return {
        "apiVersion": PEERPOD_API_VERSION,
        "kind": PEERPOD_KIND,
        "metadata": {
            "name": name or peerpod_name(meta["name"]),
            "namespace": meta["namespace"],
            "finalizers": [PEERPOD_FINALIZER],
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"],
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {"cloudProvider": cloud_provider, "instanceID": instance_id},
    }


#: The label of a warm-pool VM's PeerPod (not upstream): the pool key's short hash.
POOL_LABEL = "caa.peerpods.io/pool"


def new_pool_peerpod(node: JSONObject, namespace: str, name: str, cloud_provider: str, instance_id: str,
                     pool: str) -> JSONObject:
    """The PeerPod of a warm-pool VM (not upstream): no Pod exists yet, so it lives in the adaptor's namespace,
    owned by the adaptor's Node (a Node object with metadata name/uid): deleting the Node has the garbage
    collector delete it, and peerpod-ctrl then deletes the VM; finalizer and spec as for a pod's."""
    meta = node["metadata"]
    return {
        "apiVersion": PEERPOD_API_VERSION,
        "kind": PEERPOD_KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {POOL_LABEL: pool},
            "finalizers": [PEERPOD_FINALIZER],
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": meta["name"], "uid": meta["uid"]}],
        },
        "spec": {"cloudProvider": cloud_provider, "instanceID": instance_id},
    }


def extended_resource_patch(limit: int) -> JSONObject:
    """Merge patch for a Node's status: `kata.peerpods.io/vm` = limit in capacity and allocatable."""
    value = str(limit)
    return {"status": {"capacity": {EXTENDED_RESOURCE: value}, "allocatable": {EXTENDED_RESOURCE: value}}}


def extended_resource_removal() -> JSONObject:
    """Merge patch for a Node's status withdrawing `kata.peerpods.io/vm` (null deletes a key)."""
    return {"status": {"capacity": {EXTENDED_RESOURCE: None}, "allocatable": {EXTENDED_RESOURCE: None}}}


def owner_annotation_patch(pod_uid: str) -> JSONObject:
    """Merge patch for a Node naming the adaptor pod that owns the advertised value."""
    return {"metadata": {"annotations": {OWNER_ANNOTATION: pod_uid}}}


def name_of(obj: JSONObject) -> str:
    return str(obj.get("metadata", {}).get("name", ""))


def namespace_of(obj: JSONObject) -> str:
    return str(obj.get("metadata", {}).get("namespace", ""))


def resource_version_of(obj: JSONObject) -> str:
    return str(obj.get("metadata", {}).get("resourceVersion", ""))


def being_deleted(obj: JSONObject) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


__all__ = ["EXTENDED_RESOURCE", "JSONObject", "OWNER_ANNOTATION", "PEERPOD_API_VERSION", "PEERPOD_CRD_NAME",
           "PEERPOD_CTRL_LEASE", "PEERPOD_FINALIZER", "PEERPOD_GROUP", "PEERPOD_KIND", "PEERPOD_PLURAL",
           "PEERPOD_VERSION", "being_deleted", "extended_resource_patch", "extended_resource_removal", "name_of",
           "namespace_of", "new_peerpod", "owner_annotation_patch", "peerpod_name", "resource_version_of"]
