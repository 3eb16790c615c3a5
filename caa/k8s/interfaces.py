"""Contracts of the Kubernetes client layer: the calls our daemons make, and a source of watch events.

Every method returns a Deferred fired on the reactor thread; failures are `caa.k8s.errors` types
(NotFound, Conflict, Gone, Invalid, Forbidden, Unavailable/KubeTimeout). Objects are plain JSON dicts as the
API server sends them. A merge patch is a dict (application/merge-patch+json), a JSON patch a list of
operations (application/json-patch+json).
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class IKubeClient(Interface):
    """The API calls of caa's daemons, each off the reactor thread with its own deadline."""

    timeout = Attribute("float: default deadline in seconds of one call")

    def call(fn: Any, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Deferred[JSON | None]: run a generated `kubernetes` API method (e.g. `client.core.read_node`) in the
        thread pool with `_request_timeout` and return its decoded JSON body. The escape hatch for calls
        without a helper below."""

    # Nodes (the adaptor's extended resource, spec-adaptor §5.9)
    def get_node(name: str) -> Any:
        """Deferred[JSON]"""

    def patch_node(name: str, patch: Any) -> Any:
        """Deferred[JSON]: patch metadata/spec (e.g. the owner annotation)."""

    def patch_node_status(name: str, patch: Any) -> Any:
        """Deferred[JSON]: patch the status subresource (capacity and allocatable)."""

    # PeerPods (spec-providers §11.1)
    def create_peerpod(namespace: str, body: Any) -> Any:
        """Deferred[JSON]: the created object (Conflict if the name exists)."""

    def get_peerpod(namespace: str, name: str) -> Any:
        """Deferred[JSON]"""

    def list_peerpods(namespace: str | None = None, label_selector: str | None = None) -> Any:
        """Deferred[JSON]: a PeerPodList, cluster-wide when namespace is None."""

    def patch_peerpod(namespace: str, name: str, patch: Any) -> Any:
        """Deferred[JSON]"""

    def remove_peerpod_finalizers(namespace: str, name: str) -> Any:
        """Deferred[JSON]: upstream's JSON patch removing /metadata/finalizers (NotFound if gone)."""

    def delete_peerpod(namespace: str, name: str) -> Any:
        """Deferred[JSON]: with a finalizer the object stays, with deletionTimestamp set."""

    # Reads of other daemons' inputs
    def get_pod(namespace: str, name: str) -> Any:
        """Deferred[JSON]"""

    def list_pods(namespace: str | None = None, field_selector: str | None = None) -> Any:
        """Deferred[JSON]: a PodList, all namespaces when namespace is None (e.g. `spec.nodeName=<node>`)."""

    def get_config_map(namespace: str, name: str) -> Any:
        """Deferred[JSON]"""

    def get_secret(namespace: str, name: str) -> Any:
        """Deferred[JSON]: `data` values stay base64 as on the wire."""

    def get_service_account(namespace: str, name: str) -> Any:
        """Deferred[JSON]"""

    # Leader election (coordination.k8s.io/v1)
    def get_lease(namespace: str, name: str) -> Any:
        """Deferred[JSON]"""

    def create_lease(namespace: str, body: Any) -> Any:
        """Deferred[JSON]: Conflict when another replica created it first."""

    def replace_lease(namespace: str, name: str, body: Any) -> Any:
        """Deferred[JSON]: Conflict when body's resourceVersion is stale (someone else renewed)."""


class IWatchStream(Interface):
    """One open watch request."""

    done = Attribute("Deferred[None]: fires when the server ends the stream (its timeout); errbacks with Gone "
                     "(resourceVersion too old), Unavailable (dropped, timed out) or another KubeError")

    def stop() -> None:
        """Close the stream from the reactor thread; `done` then fires (or errbacks) soon after."""


class IWatchSource(Interface):
    """A collection that can be listed and watched (one resource type, optional namespace/selectors)."""

    def list() -> Any:
        """Deferred[JSON]: the List object (items and metadata.resourceVersion)."""

    def watch(resource_version: str, deliver: Any) -> IWatchStream:
        """Open a watch from resource_version (bookmarks asked for); deliver(event_dict) is called on the
        reactor thread for each event, in order, before `done` fires."""


__all__ = ["IKubeClient", "IWatchSource", "IWatchStream"]
