"""The controller daemon as one MultiService: provider settings watch, PeerPod watch, leader election, work
queue and the probe port.

Both watches run on every replica (a standby has its view ready); only the Lease holder acts. On becoming
leader it queues every known PeerPod (controller-runtime's initial sync); afterwards each PeerPod event
queues its key. On losing the Lease (or at stop) the queue stops taking work and waits for what is in
flight: a provider delete is not interrupted halfway (deletes are idempotent, the next leader repeats it).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from caa.k8s.interfaces import IKubeClient, IWatchSource
from caa.k8s.objects import PEERPOD_CTRL_LEASE
from caa.k8s.watch import Watcher, WatchEvent
from caa.peerpodctrl.config import CloudConfig, CloudConfigWatch
from caa.peerpodctrl.lease import LeaderElector, LeaseTimings
from caa.peerpodctrl.metrics import ControllerMetrics, probe_site
from caa.peerpodctrl.providers import ProviderCache
from caa.peerpodctrl.queue import WorkQueue, exponential_backoff
from caa.peerpodctrl.reconcile import Reconciler, key_of
from caa.reactors import INodeReactor


class PeerPodController(MultiService):
    """`lease` None: no leader election (this replica always acts; upstream's `--leader-elect=false`)."""

    _log = Logger()

    def __init__(self, reactor: INodeReactor, client: IKubeClient, peerpods: IWatchSource,
                 config_sources: tuple[IWatchSource, IWatchSource], *, namespace: str, identity: str,
                 lease: LeaseTimings | None = LeaseTimings(), lease_name: str = PEERPOD_CTRL_LEASE,
                 release_on_stop: bool = True, providers: ProviderCache | None = None,
                 backoff_base: float = 0.005, backoff_max: float = 1000.0,
                 probe_endpoint: IStreamServerEndpoint | None = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.identity = identity
        self.metrics = ControllerMetrics.create()
        self.providers = providers or ProviderCache(reactor)
        self.reconciler = Reconciler(client, self.providers, self.metrics)
        self.backoff = exponential_backoff(backoff_base, backoff_max)
        self.queue: WorkQueue | None = None
        self.probe_endpoint = probe_endpoint
        self.port: IListeningPort | None = None
        self.config = CloudConfigWatch(config_sources, reactor, self._config_changed)
        self.config.setServiceParent(self)
        self.peerpods = Watcher(peerpods, reactor, self._peerpod_event, name="peerpods")
        self.peerpods.setServiceParent(self)
        self.elector: LeaderElector | None = None
        if lease is not None:
            self.elector = LeaderElector(client, reactor, namespace, lease_name, identity, self._leading, lease,
                                         release_on_stop=release_on_stop)
            self.elector.setServiceParent(self)

    # -- readiness ---------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Both watches have listed (a standby is ready too: it is ready to take over)."""
        return self.peerpods.synced and self.config.published

    @property
    def acting(self) -> bool:
        return self.queue is not None

    # -- lifecycle ---------------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.probe_endpoint is None or self.port is not None:
            return
        # TCP listens fail synchronously: raise so twistd stops with the error instead of running blind.
        outcome: list[IListeningPort | Failure] = []
        self.probe_endpoint.listen(probe_site(self.metrics, self.ready)).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError("listening on the probe address did not complete synchronously")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0]

    def startService(self) -> None:
        if self.probe_endpoint is not None and self.port is None:
            self.privilegedStartService()
        super().startService()
        if self.elector is None:
            self._leading(True)

    def stopService(self) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await super().stopService()  # the elector stops leading (queue drained) before the watches end
        if self.queue is not None:
            await maybeDeferred(self._leading, False)
        await self.providers.clear()
        if self.port is not None:
            port, self.port = self.port, None
            await maybeDeferred(port.stopListening)

    # -- events ------------------------------------------------------------------------------------

    def _leading(self, leading: bool) -> Deferred[object] | None:
        self.metrics.leader.set(1 if leading else 0)
        if leading:
            if self.queue is None:
                self.queue = WorkQueue(self.reactor, self._reconcile, self.backoff, self._reconciled)
                for obj in list(self.peerpods.known.values()):
                    self.queue.add(key_of(obj))
            return None
        queue, self.queue = self.queue, None
        self.metrics.queue_depth.set(0)
        return queue.stop() if queue is not None else None

    def _peerpod_event(self, event: WatchEvent) -> None:
        if self.queue is not None:
            self.queue.add(key_of(event.object))
            self.metrics.queue_depth.set(len(self.queue))

    def _config_changed(self, config: CloudConfig) -> None:
        self.providers.configure(config)

    async def _reconcile(self, key: str) -> None:
        if not self.config.published:
            # Never build a provider from settings not read yet: retried with back-off.
            raise RuntimeError("provider settings (peer-pods-cm, peer-pods-secret) not loaded yet")
        await self.reconciler.reconcile(key)

    def _reconciled(self, key: str, ok: bool) -> None:
        self.metrics.reconciles.labels(result="ok" if ok else "error").inc()
        if self.queue is not None:
            self.metrics.queue_depth.set(len(self.queue))


__all__ = ["PeerPodController"]
