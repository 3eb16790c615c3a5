"""Prometheus metric objects of the node daemon (prometheus_client), shared by the service and the proxy.

All live in one `CollectorRegistry` (REGISTRY) so tests and several daemons in one process do not clash
with the client library's global registry. `--metrics-port` serves REGISTRY at /metrics (`metrics_site`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.web.resource import Resource
from twisted.web.server import Site

REGISTRY = CollectorRegistry(auto_describe=True)

SANDBOXES = Gauge(
    "caa_sandboxes", "Sandboxes known to the adaptor, by journal state", ["state"], registry=REGISTRY)

START_PHASE_SECONDS = Histogram(
    "caa_startvm_phase_seconds",
    "StartVM latency by phase: provider_create, vm_boot (until the forwarder answers), tunnel, proxy, total",
    ["phase"], registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))

STOP_SECONDS = Histogram("caa_stopvm_seconds", "StopVM latency", registry=REGISTRY)

PROVIDER_CALL_SECONDS = Histogram(
    "caa_provider_call_seconds", "Provider call latency by method", ["method"], registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))

PROVIDER_ERRORS = Counter(
    "caa_provider_errors", "Provider call failures by method and error kind", ["method", "kind"],
    registry=REGISTRY)

PROXY_CALLS = Counter(
    "caa_proxy_calls", "Agent calls relayed by the proxy, by service/method and status code",
    ["method", "code"], registry=REGISTRY)

PROXY_BYTES = Counter(
    "caa_proxy_bytes", "Payload bytes relayed by the proxy, by service/method and direction (to_agent, from_agent)",
    ["method", "direction"], registry=REGISTRY)

PROXY_RECONNECTS = Counter(
    "caa_proxy_reconnects", "Upstream (forwarder) reconnects made by agent proxies", registry=REGISTRY)

RPC_ERRORS = Counter(
    "caa_hypervisor_errors", "Hypervisor RPCs answered with an error, by method and code", ["method", "code"],
    registry=REGISTRY)


def metrics_site() -> Site:
    """The HTTP site of `--metrics-port`: REGISTRY at /metrics, in Prometheus' text format."""
    from prometheus_client.twisted import MetricsResource

    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=REGISTRY))
    return Site(root)
