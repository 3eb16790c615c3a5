"""Leader election on a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it.

Every `retry_period` a replica reads the Lease. It takes it when it is free (no holder) or expired: the
record (holder, renewTime, ...) has not changed for `leaseDurationSeconds` by this replica's own clock, so
clock skew between replicas does not matter. The holder renews it every `retry_period`; every write carries
the resourceVersion read, so of two replicas racing for it one gets 409 and stays a follower. A leader that
cannot renew for `renew_deadline` (< lease duration) stops acting before anyone else may take over; one that
sees another holder stops at once. On a clean stop the leader releases the Lease (holder emptied) so a
standby takes over at its next try instead of after the lease duration.
"""

from __future__ import annotations

import datetime
import socket
import uuid
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from caa.k8s.errors import Conflict, NotFound
from caa.k8s.interfaces import IKubeClient
from caa.k8s.objects import JSONObject


@attrs.frozen
class LeaseTimings:
    """Seconds; controller-runtime's defaults (15 s / 10 s / 2 s)."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def check(self) -> None:
        """ValueError unless retry_period < renew_deadline < lease_duration (client-go's rule), all > 0."""
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("need 0 < retry period < renew deadline < lease duration, got "
                             f"{self.retry_period:g}s, {self.renew_deadline:g}s, {self.lease_duration:g}s")


def default_identity() -> str:
    """client-go's candidate id: hostname (the pod name in a cluster) + "_" + a fresh UUID."""
    return f"{socket.gethostname()}_{uuid.uuid4()}"


def micro_time(seconds: float) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector(Service):
    """Calls `on_change(True)` when this replica starts leading and `on_change(False)` (awaited if it
    returns a Deferred) when it stops, including at stopService."""

    _log = Logger()

    def __init__(self, client: IKubeClient, clock: IReactorTime, namespace: str, name: str, identity: str,
                 on_change: Callable[[bool], Any], timings: LeaseTimings = LeaseTimings(),
                 release_on_stop: bool = True) -> None:
        timings.check()
        self.setName("leader-election")
        self.client = client
        self.clock = clock
        self.namespace = namespace
        self.lease_name = name
        self.identity = identity
        self.on_change = on_change
        self.timings = timings
        self.release_on_stop = release_on_stop
        self.leading = False
        self.holder = ""
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0
        self._sleep: Deferred[None] | None = None
        self._loop_done: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._loop_done = Deferred.fromCoroutine(self._loop())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._sleep is not None:
            self._sleep.cancel()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._loop_done is not None:
            await self._loop_done
        if self.leading:
            await self._set_leading(False)
            if self.release_on_stop:
                await self._release()

    async def _loop(self) -> None:
        while self.running:
            try:
                held = await self._bounded(self._try())
            except Exception as e:
                held = None
                self._log.warn("lease {namespace}/{name}: {error}", namespace=self.namespace,
                               name=self.lease_name, error=e)
            if not self.running:
                break
            now = self.clock.seconds()
            if held:
                self._last_renew = now
                if not self.leading:
                    self._log.info("lease {namespace}/{name}: {identity} is the leader", namespace=self.namespace,
                                   name=self.lease_name, identity=self.identity)
                    await self._set_leading(True)
            elif self.leading and (held is False or now - self._last_renew >= self.timings.renew_deadline):
                self._log.warn("lease {namespace}/{name}: leadership lost (holder now {holder!r})",
                               namespace=self.namespace, name=self.lease_name, holder=self.holder)
                await self._set_leading(False)
            self._sleep = deferLater(self.clock, self.timings.retry_period)
            try:
                await self._sleep
            except CancelledError:
                pass
            finally:
                self._sleep = None

    async def _set_leading(self, leading: bool) -> None:
        self.leading = leading
        try:
            await maybeDeferred(self.on_change, leading)
        except Exception:
            self._log.failure("leadership change handler failed")

    def _bounded(self, coro: Any) -> Deferred[bool]:
        # One attempt may not outlast the renew deadline (a hung connection must not keep a leader acting).
        d: Deferred[bool] = Deferred.fromCoroutine(coro)
        return d.addTimeout(self.timings.renew_deadline, self.clock)

    async def _try(self) -> bool:
        """Acquire or renew; True while we hold the Lease, False when another replica does."""
        now = self.clock.seconds()
        try:
            lease: JSONObject = await self.client.get_lease(self.namespace, self.lease_name)
        except NotFound:
            try:
                await self.client.create_lease(self.namespace, self._body(None, now))
            except Conflict:
                return False
            self.holder = self.identity
            return True
        spec = lease.get("spec") or {}
        self.holder = str(spec.get("holderIdentity") or "")
        record = (self.holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"), spec.get("acquireTime"),
                  spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or self.timings.lease_duration)
        if self.holder and self.holder != self.identity and now < self._observed_at + duration:
            return False
        try:
            await self.client.replace_lease(self.namespace, self.lease_name, self._body(lease, now))
        except Conflict:
            return False
        self.holder = self.identity
        return True

    def _body(self, lease: JSONObject | None, now: float) -> JSONObject:
        spec = dict((lease or {}).get("spec") or {})
        if spec.get("holderIdentity") != self.identity:
            spec["acquireTime"] = micro_time(now)
            if lease is not None:
                spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=max(1, round(self.timings.lease_duration)),
                    renewTime=micro_time(now))
        spec.setdefault("leaseTransitions", 0)
        meta: dict[str, Any] = {"name": self.lease_name, "namespace": self.namespace}
        if lease is not None:
            meta["resourceVersion"] = lease["metadata"]["resourceVersion"]
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    async def _release(self) -> None:
        try:
            lease: JSONObject = await self._bounded_json(self.client.get_lease(self.namespace, self.lease_name))
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            now = self.clock.seconds()
            spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=micro_time(now),
                        acquireTime=micro_time(now))
            await self._bounded_json(self.client.replace_lease(self.namespace, self.lease_name, lease))
            self._log.info("lease {namespace}/{name}: released", namespace=self.namespace, name=self.lease_name)
        except Exception as e:
            self._log.warn("lease {namespace}/{name}: release failed ({error}); it expires instead",
                           namespace=self.namespace, name=self.lease_name, error=e)

    def _bounded_json(self, d: Deferred[JSONObject]) -> Deferred[JSONObject]:
        return d.addTimeout(self.timings.renew_deadline, self.clock)


__all__ = ["LeaderElector", "LeaseTimings", "default_identity", "micro_time"]
