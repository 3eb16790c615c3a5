"""Prometheus metrics of the controller and its probe site (`/healthz`, `/readyz`, `/metrics`)."""

from __future__ import annotations

from collections.abc import Callable

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from caa.promhttp import RegistryResource


@attrs.frozen
class ControllerMetrics:
    """One registry per controller (several can live in one process: tests run two replicas)."""

    registry: CollectorRegistry
    reconciles: Counter
    instance_deletes: Counter
    older_deleted: Counter
    queue_depth: Gauge
    leader: Gauge

    @classmethod
    def create(cls) -> ControllerMetrics:
        r = CollectorRegistry(auto_describe=True)
        return cls(
            registry=r,
            reconciles=Counter("caa_peerpodctrl_reconciles", "PeerPod reconciles by result (ok, error)",
                               ["result"], registry=r),
            instance_deletes=Counter("caa_peerpodctrl_instance_deletes",
                                     "Provider deletes of PeerPod instances by provider and result",
                                     ["provider", "result"], registry=r),
            older_deleted=Counter("caa_peerpodctrl_older_peerpods_deleted",
                                  "Older PeerPods of the same owner deleted", registry=r),
            queue_depth=Gauge("caa_peerpodctrl_queue_depth", "PeerPods in flight or waiting for a retry",
                              registry=r),
            leader=Gauge("caa_peerpodctrl_leader", "1 while this replica holds the Lease", registry=r),
        )


class _Check(Resource):
    isLeaf = True

    def __init__(self, check: Callable[[], bool]) -> None:
        super().__init__()
        self.check = check

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self.check():
            return b"ok"
        request.setResponseCode(503)
        return b"not ready"


def probe_site(metrics: ControllerMetrics, ready: Callable[[], bool]) -> Site:
    """`/healthz` (alive: "ok"), `/readyz` ("ok" once the watches have listed, else 503), `/metrics`."""
    root = Resource()
    root.putChild(b"healthz", _Check(lambda: True))
    root.putChild(b"readyz", _Check(ready))
    root.putChild(b"metrics", RegistryResource(metrics.registry))
    site = Site(root)
    site.displayTracebacks = False
    return site


__all__ = ["ControllerMetrics", "probe_site"]
