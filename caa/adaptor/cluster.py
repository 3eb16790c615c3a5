"""The adaptor's duties towards the cluster it runs in (spec-adaptor §5.7, §5.9, §7.4; spec-providers §11).

- The node's `kata.peerpods.io/vm` (capacity and allocatable) = `--peerpods-limit-per-node`, with the owner
  annotation naming this adaptor's pod (POD_UID), so that at stop an older instance never withdraws the value
  a newer one (rolling update) wrote.
- One PeerPod per instance, created right after the instance exists, its finalizer released after the
  instance is deleted; peerpod-ctrl deletes the instance of a PeerPod whose finalizer was never released.
- One PeerPod per warm-pool VM (not upstream), in the adaptor's namespace (POD_NAMESPACE) and owned by its
  Node: a pool VM has no pod yet. A PeerPod is namespaced and its owner must be cluster-scoped or in its
  namespace, so it cannot be re-owned by the claiming pod: at the claim the pool PeerPod is released
  (finalizer, then the object) and the sandbox creates the pod's as for any instance. A leaked pool VM (its
  node deleted, the adaptor gone) is deleted by peerpod-ctrl when the garbage collector deletes its PeerPod.
- The startup probe's check that the node's peer pods came back Ready after this adaptor started.

Nothing here blocks the sandbox service on the API server: every write is a background task retried with
back-off (`_Task`); StartVM and StopVM only start or cancel tasks. The PeerPod's name is chosen before the
task starts and journalled with the instance id, so a restarted adaptor can still release its finalizer.
Outside a cluster the service gets `caa.adaptor.adapters.NullClusterDuties` (it never imports caa.k8s).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

import attrs
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from caa.adaptor.interfaces import IClusterDuties, IPoolPeerPods, SandboxRecord
from caa.k8s.errors import Conflict, Forbidden, Invalid, KubeError, NotFound
from caa.k8s.interfaces import IKubeClient
from caa.k8s.objects import (
    OWNER_ANNOTATION,
    JSONObject,
    extended_resource_patch,
    extended_resource_removal,
    new_peerpod,
    new_pool_peerpod,
    owner_annotation_patch,
    peerpod_name,
)

__all__ = ["ClusterDuties", "ClusterSettings", "pods_restarted"]


@attrs.frozen
class ClusterSettings:
    """node_name: NODE_NAME; pod_uid: POD_UID (the owner annotation's value, "" = no owner check);
    limit: --peerpods-limit-per-node (< 0: not advertised); provider: the PeerPods' spec.cloudProvider;
    runtime_class: RUNTIMECLASS_NAME (which pods the startup probe waits for); started: wall-clock start;
    namespace: POD_NAMESPACE, the adaptor's own (where pool VMs' PeerPods live)."""

    node_name: str
    provider: str
    limit: int = 10
    pod_uid: str = ""
    runtime_class: str = "kata-remote"
    started: float = 0.0
    namespace: str = "confidential-containers-system"


class _GiveUp(Exception):
    """An answer that retrying cannot change (the task logs it and ends)."""


class _Task:
    """One background job retried with back-off until it succeeds, gives up (`_GiveUp`) or is cancelled.

    Cancelling ends the back-off sleep at once; a call already sent runs to its answer (the client's deadline
    bounds it), so a later job on the same object (the release after a create) never races a late create."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, what: str, attempt: Callable[[], Awaitable[None]],
                 backoff: Callable[[int], float]) -> None:
        self.clock = clock
        self.what = what
        self.attempt = attempt
        self.backoff = backoff
        self.cancelled = False
        self.succeeded = False
        self._sleep: Deferred[None] | None = None
        self.done: Deferred[None] = Deferred.fromCoroutine(self._run())

    def cancel(self) -> None:
        self.cancelled = True
        if self._sleep is not None:
            self._sleep.cancel()

    def wait(self) -> Deferred[None]:
        """A Deferred that fires when the job has ended (never errbacks)."""
        d: Deferred[None] = Deferred()
        self.done.addBoth(lambda _: d.callback(None))
        return d

    def _stopped(self) -> bool:
        return self.cancelled

    async def _run(self) -> None:
        failures = 0
        while not self._stopped():
            try:
                await self.attempt()
                self.succeeded = True
                return
            except _GiveUp as e:
                self._log.warn("{what}: {error}; giving up", what=self.what, error=str(e))
                return
            except Exception as e:
                failures += 1
                delay = self.backoff(failures - 1)  # backoffPolicy counts attempts from 0
                self._log.warn("{what} failed: {error}; retrying in {delay:.1f}s (attempt {n})", what=self.what,
                               error=str(e), delay=delay, n=failures)
            if self._stopped():  # cancelled while the attempt was under way
                return
            self._sleep = deferLater(self.clock, delay)
            try:
                await self._sleep
            except CancelledError:
                return
            finally:
                self._sleep = None


def _key(record: SandboxRecord) -> str:
    return f"{record.pod_namespace}/{record.peerpod}"


def _timestamp(text: str) -> float:
    """Seconds of an RFC 3339 time as the API server writes them (`2026-12-02T03:09:37Z`)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def pods_restarted(pods: JSONObject, runtime_class: str, started: float) -> str:
    """Why the startup probe must still fail ("" when it may pass): among the pods of a PodList running with
    runtime_class, one is not Ready, or became Ready before this adaptor started (its agent proxy died with
    the previous adaptor; Kubernetes must restart it first). Timestamps have whole seconds."""
    for pod in pods.get("items") or []:
        if (pod.get("spec") or {}).get("runtimeClassName") != runtime_class:
            continue
        meta = pod.get("metadata") or {}
        name = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        ready = [c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"]
        if not ready or ready[0].get("status") != "True":
            return f"pod {name} is not Ready"
        since = ready[0].get("lastTransitionTime") or ""
        if not since or _timestamp(since) < int(started):
            return f"pod {name} has not been restarted since the adaptor started"
    return ""


@implementer(IClusterDuties, IPoolPeerPods)
class ClusterDuties:
    """The duties over one `IKubeClient` (see the module docstring)."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, client: IKubeClient, settings: ClusterSettings,
                 backoff: Callable[[int], float] | None = None) -> None:
        self.clock = clock
        self.client = client
        self.settings = settings
        # 1 s doubling, capped at a minute: an API server back after an outage is found within a minute.
        self.backoff = backoff or backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=2.0, jitter=lambda: 0.0)
        self.advertising: _Task | None = None
        # Keyed by "<namespace>/<PeerPod name>" (a sandbox id may come back after its record was removed).
        self.creating: dict[str, _Task] = {}
        self.releasing: dict[str, _Task] = {}
        self.probe_passed = False

    def _task(self, what: str, attempt: Callable[[], Awaitable[None]]) -> _Task:
        return _Task(self.clock, what, attempt, self.backoff)

    # -- the node's extended resource (spec-adaptor §5.9) -----------------------------------------------------

    def start(self) -> None:
        s = self.settings
        if s.limit < 0:
            self._log.info("--peerpods-limit-per-node < 0: kata.peerpods.io/vm is not advertised")
            return
        self.advertising = self._task(f"advertising kata.peerpods.io/vm={s.limit} on node {s.node_name}",
                                      self._advertise)

    async def _advertise(self) -> None:
        s = self.settings
        if s.pod_uid:  # the owner first: a value is never written without its owner's name beside it
            await self.client.patch_node(s.node_name, owner_annotation_patch(s.pod_uid))
        await self.client.patch_node_status(s.node_name, extended_resource_patch(s.limit))
        self._log.info("node {node}: kata.peerpods.io/vm = {limit} (owner {owner})", node=s.node_name,
                       limit=s.limit, owner=s.pod_uid or "-")

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        tasks = [t for t in (self.advertising, *self.creating.values(), *self.releasing.values()) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await gatherResults([t.wait() for t in tasks])
        if self.advertising is not None and self.advertising.succeeded:
            try:
                await self._withdraw()
            except Exception as e:
                self._log.warn("node {node}: withdrawing kata.peerpods.io/vm failed: {error}",
                               node=self.settings.node_name, error=str(e))

    async def _withdraw(self) -> None:
        """Withdraw the value unless a newer adaptor's pod owns it now (upstream: "not owner")."""
        s = self.settings
        if s.pod_uid:
            node = await self.client.get_node(s.node_name)
            owner = ((node.get("metadata") or {}).get("annotations") or {}).get(OWNER_ANNOTATION, "")
            if owner != s.pod_uid:
                self._log.info("node {node}: kata.peerpods.io/vm is owned by {owner}, not us: left alone",
                               node=s.node_name, owner=owner)
                return
        await self.client.patch_node_status(s.node_name, extended_resource_removal())
        self._log.info("node {node}: kata.peerpods.io/vm withdrawn", node=s.node_name)

    # -- PeerPods (spec-adaptor §5.7, spec-providers §11) -------------------------------------------------------

    def peerpod_name(self, pod_name: str) -> str:
        return peerpod_name(pod_name)

    def instance_created(self, record: SandboxRecord) -> None:
        if not record.peerpod or not record.instance_id:
            return
        key = _key(record)
        old = self.creating.pop(key, None)
        if old is not None:
            old.cancel()
        task = self._task(f"{record.sandbox_id}: creating PeerPod {key}", lambda: self._create(record))
        if not task.done.called:
            self.creating[key] = task
            task.done.addBoth(lambda _: self._forget(self.creating, key, task))

    async def _create(self, record: SandboxRecord) -> None:
        ns = record.pod_namespace
        try:
            pod = await self.client.get_pod(ns, record.pod_name)  # its uid, for the owner reference
            await self.client.create_peerpod(ns, new_peerpod(pod, self.settings.provider, record.instance_id,
                                                             name=record.peerpod))
        except Conflict:
            pass  # ours already (a retried create whose first answer was lost, or re-adoption)
        except NotFound as e:
            # No Pod (gone already, or a sandbox made without one): a PeerPod without its owner would never
            # be garbage-collected; the instance is deleted by StopVM or the sweeper.
            raise _GiveUp(str(e)) from e
        except (Forbidden, Invalid) as e:
            raise _GiveUp(str(e)) from e
        self._log.info("{sandbox_id}: PeerPod {namespace}/{name} created for instance {instance_id}",
                       sandbox_id=record.sandbox_id, namespace=ns, name=record.peerpod,
                       instance_id=record.instance_id)

    def instance_deleted(self, record: SandboxRecord) -> None:
        if not record.peerpod:
            return
        key = _key(record)
        creating = self.creating.pop(key, None)
        if creating is not None:
            creating.cancel()
        before = creating.wait() if creating is not None else succeed(None)

        async def release() -> None:
            await before  # a create already sent answers first; the release then finds its object
            await self._release(record)

        task = self._task(f"{record.sandbox_id}: releasing the finalizer of PeerPod {key}", release)
        if not task.done.called:
            self.releasing[key] = task
            task.done.addBoth(lambda _: self._forget(self.releasing, key, task))

    async def _release(self, record: SandboxRecord) -> None:
        try:
            await self.client.remove_peerpod_finalizers(record.pod_namespace, record.peerpod)
        except NotFound:
            return  # never created, or already gone
        except Invalid:
            return  # no finalizers left to remove (the JSON patch's path is missing)
        except Forbidden as e:
            raise _GiveUp(str(e)) from e
        self._log.info("{sandbox_id}: PeerPod {namespace}/{name}: finalizer released",
                       sandbox_id=record.sandbox_id, namespace=record.pod_namespace, name=record.peerpod)

    # -- warm-pool VMs' PeerPods (not upstream) ---------------------------------------------------------------

    def _pool_key(self, name: str) -> str:
        return f"{self.settings.namespace}/{name}"

    def pool_vm_created(self, name: str, instance_id: str, pool: str) -> None:
        key = self._pool_key(name)
        task = self._task(f"creating PeerPod {key} of pool VM {instance_id}",
                          lambda: self._create_pool(name, instance_id, pool))
        if not task.done.called:
            self.creating[key] = task
            task.done.addBoth(lambda _: self._forget(self.creating, key, task))

    async def _create_pool(self, name: str, instance_id: str, pool: str) -> None:
        s = self.settings
        try:
            node = await self.client.get_node(s.node_name)  # its uid, for the owner reference
            await self.client.create_peerpod(s.namespace, new_pool_peerpod(node, s.namespace, name, s.provider,
                                                                           instance_id, pool))
        except Conflict:
            pass  # ours already (a retried create whose first answer was lost)
        except (NotFound, Forbidden, Invalid) as e:
            raise _GiveUp(str(e)) from e
        self._log.info("PeerPod {namespace}/{name} created for pool VM {instance_id}", namespace=s.namespace,
                       name=name, instance_id=instance_id)

    def pool_vm_released(self, name: str) -> None:
        key = self._pool_key(name)
        creating = self.creating.pop(key, None)
        if creating is not None:
            creating.cancel()
        before = creating.wait() if creating is not None else succeed(None)

        async def release() -> None:
            await before
            await self._release_pool(name)

        task = self._task(f"releasing PeerPod {key} of a pool VM", release)
        if not task.done.called:
            self.releasing[key] = task
            task.done.addBoth(lambda _: self._forget(self.releasing, key, task))

    async def _release_pool(self, name: str) -> None:
        ns = self.settings.namespace
        try:
            # the finalizer first: deleting the object with it would have peerpod-ctrl delete the VM
            await self.client.remove_peerpod_finalizers(ns, name)
        except NotFound:
            return
        except Invalid:
            pass  # no finalizer left
        except Forbidden as e:
            raise _GiveUp(str(e)) from e
        try:
            await self.client.delete_peerpod(ns, name)
        except NotFound:
            self._log.debug("PeerPod {namespace}/{name} was already gone", namespace=ns, name=name)
        except Forbidden as e:
            raise _GiveUp(str(e)) from e
        self._log.info("PeerPod {namespace}/{name} of a pool VM released and deleted", namespace=ns, name=name)

    @staticmethod
    def _forget(tasks: dict[str, _Task], key: str, task: _Task) -> None:
        if tasks.get(key) is task:
            del tasks[key]

    # -- the startup probe (spec-adaptor §7.4) ------------------------------------------------------------------

    def startup_ready(self) -> Deferred[bool]:
        if self.probe_passed:
            return succeed(True)
        return Deferred.fromCoroutine(self._check_pods())

    async def _check_pods(self) -> bool:
        s = self.settings
        try:
            pods = await self.client.list_pods(field_selector=f"spec.nodeName={s.node_name}")
        except KubeError as e:
            self._log.warn("startup probe: listing the pods of node {node}: {error}", node=s.node_name,
                           error=str(e))
            return False
        why = pods_restarted(pods or {}, s.runtime_class, s.started)
        if why:
            self._log.info("startup probe: {why}", why=why)
            return False
        self.probe_passed = True  # never checked again (upstream)
        return True
