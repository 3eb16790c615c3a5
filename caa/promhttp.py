"""Prometheus exposition as a plain twisted.web resource.

prometheus_client's own Twisted resource is a WSGI resource answered in the reactor's thread pool; the
daemons' probe sites render their registry on the reactor thread instead (a registry of a few dozen series
renders in well under a millisecond), which also keeps their unit tests synchronous.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request


class RegistryResource(Resource):
    """GET: the registry in Prometheus' text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        body: bytes = generate_latest(self.registry)
        return body


__all__ = ["RegistryResource"]
