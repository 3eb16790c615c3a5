"""The webhook's listeners: HTTPS `/mutate-v1-pod` (port 9443 upstream) and the plain-HTTP probe port
(`/healthz`, `/readyz`, `/metrics`; 8081 upstream).

`start_webhook` (cert directory, ephemeral port) and `listen_webhook` (any endpoint) start the HTTPS side
alone and return the listening port, for tests and for embedding; `WebhookService` is what
`twistd caa-webhook` runs: both listeners, opened in `privilegedStartService` so that a port that cannot be
bound aborts startup.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from caa.promhttp import RegistryResource
from caa.reactors import INodeReactor
from caa.webhook.admission import review
from caa.webhook.certs import ReloadingServerTLS
from caa.webhook.mutation import MutationConfig

__all__ = ["MUTATE_PATH", "WebhookMetrics", "MutateResource", "webhook_site", "probe_site", "listen_webhook",
           "start_webhook", "WebhookService"]

MUTATE_PATH = b"mutate-v1-pod"


@attrs.frozen
class WebhookMetrics:
    """Prometheus metrics of one webhook (its own registry, so several can live in one process)."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram

    @classmethod
    def create(cls) -> WebhookMetrics:
        registry = CollectorRegistry()
        return cls(
            registry,
            Counter("caa_webhook_admission_requests", "Admission reviews answered, by outcome",
                    ["outcome"], registry=registry),
            Histogram("caa_webhook_admission_seconds", "Time to answer an admission review", registry=registry),
        )


class MutateResource(Resource):
    """POST /mutate-v1-pod: one AdmissionReview per request (other methods: 405 from twisted.web)."""

    isLeaf = True
    _log = Logger()

    def __init__(self, config: MutationConfig, clock: IReactorTime, metrics: WebhookMetrics) -> None:
        super().__init__()
        self.config = config
        self.clock = clock
        self.metrics = metrics

    def render_POST(self, request: Request) -> bytes:
        started = self.clock.seconds()
        body = request.content.read() if request.content is not None else b""
        content_type = request.getHeader(b"content-type")
        result = review(body, content_type.decode("latin-1") if content_type else None, self.config)
        if result.outcome == "invalid":
            self._log.warn("admission review {uid} refused: {message}", uid=result.uid, message=result.message)
        else:
            self._log.debug("admission review {uid}: {outcome} ({ops} patch operations)", uid=result.uid,
                            outcome=result.outcome, ops=len(result.patch))
        self.metrics.requests.labels(outcome=result.outcome).inc()
        self.metrics.latency.observe(max(0.0, self.clock.seconds() - started))
        request.setHeader(b"content-type", b"application/json")
        return result.to_json()


class _Ok(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok"


def webhook_site(config: MutationConfig, clock: IReactorTime, metrics: WebhookMetrics) -> Site:
    root = Resource()
    root.putChild(MUTATE_PATH, MutateResource(config, clock, metrics))
    # controller-runtime's webhook server answers its own readiness check too.
    root.putChild(b"readyz", _Ok())
    site = Site(root)
    site.displayTracebacks = False
    return site


def probe_site(metrics: WebhookMetrics) -> Site:
    """`/healthz` and `/readyz` (controller-runtime's `healthz.Ping`: "ok"), `/metrics`."""
    root = Resource()
    root.putChild(b"healthz", _Ok())
    root.putChild(b"readyz", _Ok())
    root.putChild(b"metrics", RegistryResource(metrics.registry))
    site = Site(root)
    site.displayTracebacks = False
    return site


def listen_webhook(endpoint: IStreamServerEndpoint, tls: ReloadingServerTLS, config: MutationConfig,
                   clock: IReactorTime, metrics: WebhookMetrics | None = None) -> Deferred[IListeningPort]:
    """Serve the webhook over TLS on `endpoint` (e.g. `tcp:0:interface=127.0.0.1`); fires with the port."""
    site = webhook_site(config, clock, metrics or WebhookMetrics.create())
    return endpoint.listen(TLSMemoryBIOFactory(tls, False, site))


def start_webhook(reactor: INodeReactor, cert_dir: str | os.PathLike[str], config: MutationConfig | None = None,
                  interface: str = "127.0.0.1", port: int = 0, min_version: str = "",
                  cipher_suites: Sequence[str] = ()) -> Deferred[IListeningPort]:
    """The webhook in-process on `interface:port` (0: an ephemeral port) with `cert_dir/tls.crt` and
    `tls.key`; fires with the listening port (`.getHost().port`, `.stopListening()`)."""
    tls = ReloadingServerTLS(cert_dir, min_version, cipher_suites)
    endpoint = TCP4ServerEndpoint(reactor, port, interface=interface)
    return listen_webhook(endpoint, tls, config or MutationConfig(), reactor)


class WebhookService(Service):
    """The HTTPS webhook and, unless `probe_endpoint` is None, the probe/metrics port."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, webhook_endpoint: IStreamServerEndpoint, tls: ReloadingServerTLS,
                 config: MutationConfig, probe_endpoint: IStreamServerEndpoint | None = None) -> None:
        self.clock = clock
        self.webhook_endpoint = webhook_endpoint
        self.probe_endpoint = probe_endpoint
        self.tls = tls
        self.config = config
        self.metrics = WebhookMetrics.create()
        self.ports: list[IListeningPort] = []

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # TCP listens fail synchronously: raise here so twistd stops with the error instead of serving
        # half (the public equivalent of strports' _raiseSynchronously).
        self._listen(listen_webhook(self.webhook_endpoint, self.tls, self.config, self.clock, self.metrics))
        if self.probe_endpoint is not None:
            self._listen(self.probe_endpoint.listen(probe_site(self.metrics)))
        self._log.info("caa-webhook serving: target runtime class {runtime_class}, extended resource "
                       "{resource}", runtime_class=self.config.target_runtime_class,
                       resource=self.config.extended_resource)

    def _listen(self, d: Deferred[IListeningPort]) -> None:
        outcome: list[IListeningPort | Failure] = []
        d.addBoth(outcome.append)
        if not outcome:
            raise RuntimeError("listening did not complete synchronously")
        result = outcome[0]
        if isinstance(result, Failure):
            for port in self.ports:
                port.stopListening()
            self.ports = []
            result.raiseException()
        else:
            self.ports.append(result)

    def startService(self) -> None:
        if not self.ports:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        ports, self.ports = self.ports, []
        return gatherResults([maybeDeferred(p.stopListening) for p in ports])
