"""The hypervisor.Hypervisor and podvminfo.PodVMInfo services: the pod VM lifecycle, journalled.

Every side effect is bracketed by journal writes (intent before, result after), each a move in the state table
of caa/adaptor/states.py (checked by `SandboxRecord.advance`), so `recover()` after a restart can re-adopt live
VMs, roll back half-done starts and finish stops. The journal's writes run off the reactor thread (the store's
runner); the service awaits each intent write before its side effect. Per sandbox, one `DeferredLock` (taken with
`async with locked(...)`) serialises StartVM, StopVM, recovery and the sweeper; different sandboxes proceed
concurrently. Failures are `SandboxError`s with a kind; caa/adaptor/rpc.py maps them to ttrpc codes.

Rolling update (`hand_over`): once a newer adaptor takes over, this service is *passive*: it refuses CreateVM,
StartVM and StopVM (UNAVAILABLE), never sweeps or recovers, stops an in-flight StartVM at its next step
without rolling back (the newer adaptor finishes or rolls back from the journal), and holds every sandbox's
lock for good. Its agent proxies only drain (`shutdown`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from caa.adaptor import metrics
from caa.adaptor.adapters import NullClusterDuties
from caa.adaptor.claimer import Claimer
from caa.adaptor.directvolumes import DIRECT_VOLUMES_DIR, scan
from caa.adaptor.errors import Fault, SandboxError, check_sandbox_id
from caa.adaptor.interfaces import (
    IAgentProxy,
    IAgentProxyFactory,
    IAgentTLS,
    IClusterDuties,
    IPodNetworking,
    ISandboxStore,
    SandboxRecord,
)
from caa.adaptor.pool import PoolKey, PoolManager
from caa.adaptor.states import GOING, SandboxState, check_transition
from caa.adaptor.userdata import ANN_POD_UID, AnnotationError, instance_spec, pod_identity, user_data
from caa.network.interfaces import PodNetworkConfig
from caa.notifier import Notifier
from caa.podvm_api.apf import APFConfig
from caa.podvm_api.naming import instance_name
from caa.providers.interfaces import Instance, IProvider, ProviderError

T = TypeVar("T")

VERSION = "0.0.0"
#: Bound of one Claim call (dial + answer) to a pool VM; past it StartVM falls back to a fresh VM. The answer
#: comes after the VM has built the pod network: on libvirt/TCG with another VM booting beside it (the refill)
#: that took over 10 s (tests/test_e2e_libvirt_pool.py), still far below a cold boot there.
CLAIM_TIMEOUT = 60.0

AuthLookup = Callable[[str, str], Awaitable[Mapping[str, str]]]

S = SandboxState


@attrs.frozen
class ServiceConfig:
    pods_dir: str
    forwarder_port: int = 15150
    proxy_timeout: float = 300.0
    disable_tls: bool = False
    tls_min_version: str = ""
    tls_cipher_suites: tuple[str, ...] = ()
    initdata: str = ""
    enable_scratch_space: bool = False
    ext_network_via_podvm: bool = False
    delete_timeout: float = 600.0
    #: where CSI drivers leave the pods' direct volumes (caa.adaptor.directvolumes)
    direct_volumes_dir: str = DIRECT_VOLUMES_DIR
    # After a hand-over, how long the agent proxies keep relaying the shim connections already open (at stop).
    drain_timeout: float = 20.0


class locked:
    """`async with locked(lock):` holds a DeferredLock for the block (released however the block ends)."""

    def __init__(self, lock: DeferredLock) -> None:
        self.lock = lock

    async def __aenter__(self) -> None:
        await self.lock.acquire()

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.lock.release()


@attrs.define
class _Sandbox:
    """A sandbox in memory: its record (the state is `record.state`), its lock and its live agent proxy."""

    record: SandboxRecord
    lock: DeferredLock = attrs.field(factory=DeferredLock)
    proxy: IAgentProxy | None = None
    # The StartVM in progress, kept only so that a StopVM can cancel it (whether a start is under way is the
    # state: one of STARTING).
    start_call: Deferred[None] | None = None
    # Recovery is re-adopting it (its proxy may be dialling for up to --proxy-timeout).
    adopting: bool = False


class CloudService:
    """CreateVM / StartVM / StopVM / Version and PodVMInfo.GetInfo over a provider, a journal and a tunnel."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, provider: IProvider, proxies: IAgentProxyFactory,
                 store: ISandboxStore, network: IPodNetworking, tls: IAgentTLS | None,
                 config: ServiceConfig, auth_lookup: AuthLookup | None = None,
                 wallclock: Callable[[], float] = time.time, cluster: IClusterDuties | None = None,
                 pool: PoolManager | None = None, claimer: Claimer | None = None) -> None:
        self.clock = clock
        self.provider = provider
        self.proxies = proxies
        self.store = store
        self.network = network
        self.tls = tls
        self.config = config
        self.auth_lookup = auth_lookup
        self.wallclock = wallclock
        # PeerPods in a cluster: told when an instance exists and when it is gone (never awaited).
        self.cluster: IClusterDuties = cluster if cluster is not None else NullClusterDuties()
        self.sandboxes: dict[str, _Sandbox] = {}
        # Warm pools (--pool-size): StartVM claims a pre-booted VM when one matches (caa.adaptor.pool).
        self.pool = pool
        self.claimer = claimer
        # Fired whenever a sandbox gains an instance id (GetInfo with wait).
        self.instance_known: Notifier[None] = Notifier()
        # A newer adaptor manages the sandboxes now (rolling update): see `hand_over`.
        self.passive = False
        self._hand_over_done: Notifier[list[str]] = Notifier()
        self._handed_over: list[str] | None = None  # the answer, once every lock is ours
        # While recovery reads the journal, a StartVM / StopVM waits for the sandboxes to be known (the socket is
        # served already: a rolling update hands the path over before the newer adaptor reads the journal).
        self._loading = False
        self._loaded: Notifier[None] = Notifier()

    # -- helpers ---------------------------------------------------------------------------------

    def _put(self, sb: _Sandbox, state: SandboxState | None = None, **changes: Any) -> Deferred[None]:
        """The one way a sandbox changes: the move is checked against the state table (an illegal one raises
        here and now), applied in memory at once, and journalled; the Deferred fires once the record is
        durable. Await it before the side effect an intent state announces."""
        old = sb.record.state
        sb.record = sb.record.advance(state, updated=self.wallclock(), **changes)
        if sb.record.state is not old:  # the gauge moves by one (a full recount is O(sandboxes) per write)
            metrics.SANDBOXES.labels(state=old.value).dec()
            metrics.SANDBOXES.labels(state=sb.record.state.value).inc()
        return self.store.put(sb.record)

    def _forget(self, sb: _Sandbox) -> Deferred[None]:
        """The last move: the sandbox is dropped, its record and pod directory removed."""
        check_transition(sb.record.sandbox_id, sb.record.state, None)
        self.sandboxes.pop(sb.record.sandbox_id, None)
        self._update_gauge()
        return self.store.remove(sb.record.sandbox_id)

    def _update_gauge(self) -> None:
        """Recount the sandboxes by state (when sandboxes come and go; `_put` moves the gauge for a state change)."""
        counts = {s.value: 0 for s in SandboxState}
        for sb in self.sandboxes.values():
            counts[sb.record.state.value] += 1
        for state, n in counts.items():
            metrics.SANDBOXES.labels(state=state).set(n)

    async def _provider_call(self, method: str, call: Callable[[], Deferred[T]]) -> T:
        start = self.clock.seconds()
        try:
            return await call()
        except ProviderError as e:
            metrics.PROVIDER_ERRORS.labels(method=method, kind=e.kind.value).inc()
            raise
        except CancelledError:
            raise
        except Exception:
            metrics.PROVIDER_ERRORS.labels(method=method, kind="unexpected").inc()
            raise
        finally:
            metrics.PROVIDER_CALL_SECONDS.labels(method=method).observe(self.clock.seconds() - start)

    def _with_timeout(self, d: Deferred[T], timeout: float) -> Deferred[T]:
        d.addTimeout(timeout, self.clock)
        return d

    # -- Hypervisor ------------------------------------------------------------------------------

    def records(self) -> list[SandboxRecord]:
        """The journal records of every sandbox this adaptor manages (what `caactl list` shows)."""
        return [sb.record for sb in self.sandboxes.values()]

    def version(self) -> str:
        return VERSION

    def _refuse_when_passive(self, what: str, sandbox_id: str) -> None:
        if self.passive:
            raise SandboxError(Fault.UNAVAILABLE, f"{what}: sandbox {sandbox_id}: this adaptor handed its sandboxes "
                                                  "over to a newer one (rolling update); call again")

    def _stop_if_handed_over(self, sb: _Sandbox) -> None:
        """A StartVM's step boundary: after a hand-over it goes no further (the newer adaptor takes it from the
        journal)."""
        if self.passive:
            raise _HandedOver(sb.record.sandbox_id)

    async def create_vm(self, sandbox_id: str, annotations: Mapping[str, str], netns: str) -> str:
        """CreateVM (§1.4): local work only. Returns the agent socket path."""
        check_sandbox_id(sandbox_id)
        self._refuse_when_passive("adding sandbox", sandbox_id)
        try:
            pod_name, pod_ns = pod_identity(annotations)
        except AnnotationError as e:
            raise SandboxError(Fault.INVALID_ARGUMENT, str(e)) from e
        if sandbox_id in self.sandboxes:
            raise SandboxError(Fault.ALREADY_EXISTS, f"adding sandbox: sandbox {sandbox_id} already exists")
        self._log.info("create a sandbox {sandbox_id} for pod {pod} in namespace {namespace} (netns {netns})",
                       sandbox_id=sandbox_id, pod=pod_name, namespace=pod_ns, netns=netns)
        server_name = instance_name(pod_name, sandbox_id)
        disks = self._direct_volumes(sandbox_id, annotations)
        socket_path = self.store.socket_path(sandbox_id)
        record = SandboxRecord(
            sandbox_id=sandbox_id, pod_name=pod_name, pod_namespace=pod_ns, netns=netns,
            socket_path=socket_path, server_name=server_name, state=S.CREATED,
            created=self.wallclock(), updated=self.wallclock(), annotations=dict(annotations),
            spec=instance_spec(annotations, multi_nic=self.config.ext_network_via_podvm, volumes=disks),
            instance_name=self.provider.instance_name(pod_name, sandbox_id))
        check_transition(sandbox_id, None, record.state)
        sb = _Sandbox(record)
        self.sandboxes[sandbox_id] = sb  # reserve the id while we await
        # The lock is free (a new sandbox); a StartVM / StopVM of this id waits until CreateVM is done.
        async with locked(sb.lock):
            try:
                if await self.store.get(sandbox_id) is not None:  # a record recovery has not loaded yet
                    self.sandboxes.pop(sandbox_id, None)
                    raise SandboxError(Fault.ALREADY_EXISTS,
                                       f"adding sandbox: sandbox {sandbox_id} already exists")
                await self._prepare(sb, annotations)
            except BaseException:
                if self.sandboxes.get(sandbox_id) is sb:
                    del self.sandboxes[sandbox_id]
                    self._update_gauge()
                    await self._undo_create(sandbox_id, netns, sb.record.pod_network)
                raise
        self._update_gauge()
        self.instance_known.notify(None)
        return socket_path

    def _direct_volumes(self, sandbox_id: str, annotations: Mapping[str, str]) -> list[str]:
        """The disk ids of the pod's CSI block volumes, in attach order (spec-adaptor §5.8). A few small reads
        on a tmpfs, done inline; bad entries are skipped (logged by the scan), never a failed CreateVM."""
        volumes = scan(self.config.direct_volumes_dir, annotations.get(ANN_POD_UID, ""))
        disks = [v.disk_id for v in volumes]
        if disks:
            self._log.info("{sandbox_id}: {n} CSI volumes to attach: {disks}", sandbox_id=sandbox_id, n=len(disks),
                           disks=disks)
        return disks

    async def _prepare(self, sb: _Sandbox, annotations: Mapping[str, str]) -> None:
        """CreateVM's work: inspect the pod netns (VNI), issue the VM's certificate, write apf.json, user-data and
        the record, make the (not yet started) agent proxy."""
        rec = sb.record
        sid, netns, server_name = rec.sandbox_id, rec.netns, rec.server_name
        try:
            pod_network = await self.network.inspect(sid, netns)
        except Exception as e:
            raise SandboxError(Fault.PRECONDITION, f"failed to inspect netns {netns}: {e}") from e
        # sb.record, not rec: a StopVM may have moved the sandbox on meanwhile (it waits for our lock)
        sb.record = attrs.evolve(sb.record, pod_network=pod_network)
        cert, key, client_ca = "", "", ""
        if self.tls is not None and not self.config.disable_tls:
            try:
                cert, key = self.tls.server_credentials(server_name)
                client_ca = self.tls.client_ca_pem()
            except Exception as e:
                raise SandboxError(Fault.INTERNAL, f"issuing TLS server certificate for {server_name}: {e}") from e
        apf = APFConfig(
            pod_namespace=rec.pod_namespace, pod_name=rec.pod_name, pod_network=pod_network.to_json(),
            tls_server_key=key, tls_server_cert=cert, tls_client_ca=client_ca,
            tls_min_version="" if self.config.disable_tls else self.config.tls_min_version,
            tls_cipher_suites=() if self.config.disable_tls else self.config.tls_cipher_suites)
        auths: Mapping[str, str] = {}
        if self.auth_lookup is not None:
            try:
                auths = await self._with_timeout(
                    Deferred.fromCoroutine(_as_coroutine(self.auth_lookup(rec.pod_namespace, rec.pod_name))), 30.0)
            except Exception as e:
                self._log.warn("{sandbox_id}: image pull secrets of {namespace}/{pod} not read: {error}",
                               sandbox_id=sid, namespace=rec.pod_namespace, pod=rec.pod_name, error=str(e))
        text = user_data(apf, annotations, default_initdata=self.config.initdata, auths=auths,
                         scratch_space=self.config.enable_scratch_space)
        await self.store.create(sb.record, apf.to_json().encode(), text.encode())
        sb.proxy = self._new_proxy(rec)

    def _new_proxy(self, rec: SandboxRecord) -> IAgentProxy:
        """The sandbox's agent proxy; its CreateContainer numbers the cloud volumes by the journalled attach
        order (also after a restart, when the directory may list other volumes than CreateVM's scan did)."""
        return self.proxies.new(rec.sandbox_id, rec.socket_path, rec.spec.volumes)

    async def _undo_create(self, sandbox_id: str, netns: str, pod_network: PodNetworkConfig | None) -> None:
        try:
            await self.network.teardown(sandbox_id, netns, pod_network)
        except Exception as e:
            self._log.warn("{sandbox_id}: releasing network after failed CreateVM: {error}",
                           sandbox_id=sandbox_id, error=str(e))
        try:
            await self.store.remove(sandbox_id)
        except Exception as e:
            self._log.warn("{sandbox_id}: removing the pod directory after failed CreateVM: {error}",
                           sandbox_id=sandbox_id, error=str(e))

    def _live(self, sandbox_id: str, what: str) -> _Sandbox:
        """The sandbox, unless it is unknown or on its way out (NOT_FOUND, upstream's text)."""
        check_sandbox_id(sandbox_id)
        self._refuse_when_passive(what, sandbox_id)
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or sb.record.state in GOING:
            raise SandboxError(Fault.NOT_FOUND, f"{what}: sandbox {sandbox_id} does not exist")
        return sb

    async def _journal_loaded(self) -> None:
        if self._loading:
            await self._loaded.wait()

    async def start_vm(self, sandbox_id: str, deadline: float | None = None) -> None:
        """StartVM (§1.4): instance -> tunnel -> proxy ready; anything built is undone on failure."""
        await self._journal_loaded()
        sb = self._live(sandbox_id, "getting sandbox")
        async with locked(sb.lock):
            self._refuse_when_passive("getting sandbox", sandbox_id)  # handed over while we waited
            if sb.record.state in GOING:  # a StopVM came while we waited for the lock
                raise SandboxError(Fault.NOT_FOUND, f"getting sandbox: sandbox {sandbox_id} does not exist")
            if sb.record.state is S.RUNNING:
                return
            sb.start_call = Deferred.fromCoroutine(self._start(sb, deadline))
            try:
                await sb.start_call
            finally:
                sb.start_call = None

    async def _start(self, sb: _Sandbox, deadline: float | None) -> None:
        rec = sb.record
        sid = rec.sandbox_id
        t0 = self.clock.seconds()
        data = await self.store.read_user_data(sid)
        self._stop_if_handed_over(sb)
        await self._put(sb, S.CREATE_INTENT, error="")
        try:
            pooled = await self._from_pool(sb, data, deadline)
            rec = sb.record  # a pool VM brings its own instance and server name
            if pooled is not None:
                instance: Instance = pooled
            else:
                try:
                    instance = await self._provider_call(
                        "create_instance", lambda: self.provider.create_instance(rec.pod_name, sid, data, rec.spec))
                except ProviderError as e:
                    if e.instance_id:
                        await self._put(sb, instance_id=e.instance_id)
                    raise SandboxError(e.kind, f"creating an instance : {e}") from e
            t1 = self.clock.seconds()
            metrics.START_PHASE_SECONDS.labels(phase="pool_claim" if pooled else "provider_create").observe(t1 - t0)
            self._log.info("{sandbox_id}: created instance {instance_id} ({instance_name}) ips {ips} "
                           "in {elapsed:.1f}s", sandbox_id=sid, instance_id=instance.id,
                           instance_name=instance.name, ips=list(instance.ips), elapsed=t1 - t0)
            # One write records the create's result and announces the tunnel (nothing happens in between, so
            # recovery needs no separate INSTANCE record); INSTANCE is journalled only when the VM has no IP.
            # The PeerPod's name goes into the same write, before the PeerPod exists: a restarted adaptor
            # can always release the finalizer of a PeerPod it made.
            journalled = self._put(sb, S.TUNNEL_INTENT if instance.ips else S.INSTANCE, instance_id=instance.id,
                                   instance_name=instance.name, ips=instance.ips,
                                   peerpod=self.cluster.peerpod_name(rec.pod_name))
            self.instance_known.notify(None)
            await journalled
            self.cluster.instance_created(sb.record)  # in the background: the API never delays StartVM
            self._stop_if_handed_over(sb)
            if not instance.ips:
                raise SandboxError(Fault.UNAVAILABLE, "instance IP is not available")
            try:
                await self.network.setup(sid, rec.netns, instance.ips, _network(rec))
            except CancelledError:
                raise
            except Exception as e:
                raise SandboxError(Fault.INTERNAL, f"setting up pod network tunnel on netns {rec.netns}: {e}") from e
            self._stop_if_handed_over(sb)
            t2 = self.clock.seconds()
            metrics.START_PHASE_SECONDS.labels(phase="tunnel").observe(t2 - t1)
            # No TUNNEL record before the proxy starts: recovery rolls TUNNEL back exactly as TUNNEL_INTENT, and the
            # proxy leaves nothing a restart must find, so the write would cost an fsync and buy nothing.
            await self._start_proxy(sb, deadline)
            t3 = self.clock.seconds()
            metrics.START_PHASE_SECONDS.labels(phase="vm_boot").observe(t3 - t2)
            metrics.START_PHASE_SECONDS.labels(phase="total").observe(t3 - t0)
            await self._put(sb, S.RUNNING)
            self._log.info("{sandbox_id}: VM {instance_name} started in {elapsed:.1f}s; agent socket {socket}",
                           sandbox_id=sid, instance_name=instance.name, elapsed=t3 - t0, socket=rec.socket_path)
        except BaseException as e:
            if self.passive and sb.record.state is not S.STOPPING:
                # Handed over: whatever this start built is in the journal; the newer adaptor, which waits for
                # us to let go of the lock, finishes or rolls it back.
                self._log.info("{sandbox_id}: StartVM stopped at {state}: handed over to a newer adaptor",
                               sandbox_id=sid, state=sb.record.state.value)
                raise SandboxError(Fault.UNAVAILABLE, f"starting VM for sandbox {sid}: interrupted by a rolling "
                                   "update; the newer adaptor rolls it back, call StartVM again") from e
            cancelled = isinstance(e, CancelledError)
            reason = "StartVM cancelled (deadline or shim gone)" if cancelled else str(e)
            if sb.record.state is S.STOPPING:
                # A StopVM took over: it undoes everything once we let go of the lock.
                self._log.info("{sandbox_id}: StartVM stopped by StopVM: {error}", sandbox_id=sid, error=reason)
            else:
                self._log.warn("{sandbox_id}: StartVM failed: {error}; rolling back", sandbox_id=sid, error=reason)
                # If a StopVM cancels us during the rollback, the rollback stops early and StopVM (which needs
                # nothing from it) tears down whatever is left.
                await self._rollback(sb, reason)
            if cancelled:
                raise SandboxError(Fault.DEADLINE, f"starting VM for sandbox {sid}: {reason}") from e
            raise

    async def _from_pool(self, sb: _Sandbox, data: bytes, deadline: float | None) -> Instance | None:
        """A warm pool VM for the sandbox, claimed, or None (pools off, a miss, or a failed claim: the caller
        creates a VM as without pools). The sandbox journals the VM's id before the claim, so a restart at any
        point deletes it with the sandbox's rollback and the pool never hands it out again."""
        if self.pool is None or self.claimer is None:
            return None
        rec = sb.record
        if rec.spec.volumes or rec.spec.multi_nic:
            return None  # disks and NICs are attached at creation: never pooled
        try:
            pod = self.claimer.pod(data)  # digests the initdata: the key and the claim share it
            key = PoolKey.for_spec(rec.spec, pod.initdata_digest)
        except Exception as e:
            self._log.warn("{sandbox_id}: no pool lookup ({error})", sandbox_id=rec.sandbox_id, error=str(e))
            return None
        vm = await self.pool.take(key)
        if vm is None:
            return None
        cold_name, cold_server_name = rec.instance_name, rec.server_name
        await self._put(sb, instance_id=vm.instance_id, instance_name=vm.name, server_name=vm.name)
        await self.pool.handed_over(vm)
        timeout = self.config.proxy_timeout if deadline is None else max(0.1, deadline - self.clock.seconds())
        try:
            await self.claimer.claim(vm, pod, min(timeout, CLAIM_TIMEOUT))
        except CancelledError:
            raise
        except Exception as e:
            self._log.warn("{sandbox_id}: claiming pool VM {vm} failed ({error}): deleting it, starting a fresh VM",
                           sandbox_id=rec.sandbox_id, vm=vm.name, error=str(e))
            if not await self._delete_instance(sb, lookup=False):
                raise SandboxError(Fault.UNAVAILABLE, f"pool VM {vm.name} could not be claimed nor deleted: {e}"
                                   ) from e
            await self._put(sb, instance_id="", instance_name=cold_name, server_name=cold_server_name)
            return None
        self._log.info("{sandbox_id}: claimed pool VM {vm} ({key})", sandbox_id=rec.sandbox_id, vm=vm.name,
                       key=key.label())
        return vm.instance()

    async def _start_proxy(self, sb: _Sandbox, deadline: float | None) -> None:
        rec = sb.record
        if sb.proxy is None:
            sb.proxy = self._new_proxy(rec)
        limit = self.clock.seconds() + self.config.proxy_timeout
        if deadline is not None:
            limit = min(limit, deadline)
        await sb.proxy.start((rec.ips[0], self.config.forwarder_port), rec.server_name, limit)

    async def _rollback(self, sb: _Sandbox, reason: str) -> None:
        """Undo StartVM's side effects in reverse order; leave the sandbox CREATED (the shim will StopVM)."""
        rec = sb.record
        sid = rec.sandbox_id
        if sb.proxy is not None:
            await self._stop_proxy(sb)
            sb.proxy = self._new_proxy(rec)
        if rec.state in (S.TUNNEL_INTENT, S.TUNNEL, S.RUNNING):
            try:
                await self.network.teardown(sid, rec.netns, rec.pod_network)
            except Exception as e:
                self._log.warn("{sandbox_id}: tunnel teardown in rollback failed: {error}", sandbox_id=sid,
                               error=str(e))
        deleted = await self._delete_instance(sb, lookup=rec.state is S.CREATE_INTENT)
        if sb.record.state is S.STOPPING:  # a StopVM came meanwhile: it finishes the job
            return
        # Not deleted: StopVM retries (and releases the PeerPod after it succeeds).
        cleared: dict[str, Any] = {"instance_id": "", "ips": (), "peerpod": ""} if deleted else {}
        await self._put(sb, S.CREATED, error=reason, **cleared)

    async def _delete_instance(self, sb: _Sandbox, lookup: bool) -> bool:
        """Delete the sandbox's instance: by id, or (lookup) found by name after an interrupted create.
        True when no instance is left."""
        rec = sb.record
        iid = rec.instance_id
        if not iid and lookup and rec.instance_name:
            try:
                found = await self._with_timeout(
                    self.provider.find_instance(rec.instance_name), self.config.delete_timeout)
            except Exception as e:
                self._log.warn("{sandbox_id}: looking up instance {name}: {error}", sandbox_id=rec.sandbox_id,
                               name=rec.instance_name, error=str(e))
                return False
            if found is not None:
                iid = found.id
        if not iid:
            return True
        try:
            await self._provider_call("delete_instance", lambda: self._with_timeout(
                self.provider.delete_instance(iid), self.config.delete_timeout))
        except Exception as e:
            self._log.warn("{sandbox_id}: deleting instance {instance_id} failed: {error}",
                           sandbox_id=rec.sandbox_id, instance_id=iid, error=str(e))
            return False
        self._log.info("{sandbox_id}: deleted instance {instance_id}", sandbox_id=rec.sandbox_id, instance_id=iid)
        self.cluster.instance_deleted(sb.record)  # the PeerPod's finalizer, released in the background
        return True

    async def _stop_proxy(self, sb: _Sandbox) -> None:
        proxy, sb.proxy = sb.proxy, None
        if proxy is None:
            return
        try:
            await self._with_timeout(proxy.stop(), 10.0)
        except Exception as e:
            self._log.warn("{sandbox_id}: stopping agent proxy: {error}", sandbox_id=sb.record.sandbox_id,
                           error=str(e))

    async def stop_vm(self, sandbox_id: str) -> None:
        """StopVM (§1.4): best effort, each step's failure logged; succeeds whenever the sandbox is known."""
        await self._journal_loaded()
        sb = self._live(sandbox_id, "stopping VM")
        t0 = self.clock.seconds()
        prior = sb.record.state
        intent = self._put(sb, S.STOPPING)  # from now on StartVM / StopVM answer NOT_FOUND
        if sb.start_call is not None:
            sb.start_call.cancel()
        async with locked(sb.lock):
            await intent
            await self._finish_stop(sb, prior)
        metrics.STOP_SECONDS.observe(self.clock.seconds() - t0)

    async def _begin_stop(self, sb: _Sandbox) -> SandboxState:
        """Move to STOPPING (recovery, sweeper); return the state it was in."""
        prior = sb.record.state
        if prior is not S.STOPPING:
            await self._put(sb, S.STOPPING)
        return prior

    async def _finish_stop(self, sb: _Sandbox, prior: SandboxState) -> None:
        """Tear a STOPPING sandbox down (lock held): proxy, instance, tunnel, then the record. prior: its state
        before STOPPING (an instance whose id was never journalled is looked up by name)."""
        rec = sb.record
        sid = rec.sandbox_id
        await self._stop_proxy(sb)
        deleted = await self._delete_instance(sb, lookup=prior in (S.CREATE_INTENT, S.STOPPING, S.ORPHAN))
        try:
            await self.network.teardown(sid, rec.netns, rec.pod_network)
        except Exception as e:
            self._log.warn("{sandbox_id}: tunnel teardown failed: {error}", sandbox_id=sid, error=str(e))
        if not deleted:
            # Keep the record so the sweeper retries the delete; the VM must not leak.
            self._log.warn("{sandbox_id}: instance delete failed; will retry", sandbox_id=sid)
            await self._put(sb, S.ORPHAN, error="instance delete failed; retried by the sweeper")
            return
        await self._forget(sb)
        self._log.info("{sandbox_id}: stopped", sandbox_id=sid)

    # -- PodVMInfo -------------------------------------------------------------------------------

    async def get_info(self, pod_name: str, pod_namespace: str, wait: bool) -> str:
        """The VM id of pod namespace/name; with wait, until it is known (the ttrpc deadline bounds it)."""
        while True:
            for sb in self.sandboxes.values():
                r = sb.record
                if (r.pod_name == pod_name and r.pod_namespace == pod_namespace and r.instance_id
                        and r.state is not S.ORPHAN):
                    return r.instance_id
            if not wait:
                raise SandboxError(Fault.NOT_FOUND, f"VM ID for {pod_namespace}:{pod_name} was not found")
            await self.instance_known.wait()

    # -- recovery --------------------------------------------------------------------------------

    async def recover(self) -> None:
        """Re-adopt or undo every journalled sandbox (concurrently); never raises."""
        self._loading = True
        try:
            for sid in await self.store.remove_strays():
                self._log.info("{sandbox_id}: removed the directory of an interrupted CreateVM", sandbox_id=sid)
            records = await self.store.load_all()
            if self.passive:  # a newer adaptor took over while we read the journal: the sandboxes are its
                return
            self._log.info("journal: recovering {n} sandboxes", n=len(records))
            work = []
            for rec in records:
                sb = _Sandbox(rec)
                self.sandboxes[rec.sandbox_id] = sb
                work.append(Deferred.fromCoroutine(self._recover_one(sb)))
            self._update_gauge()
        finally:
            self._loading = False
            self._loaded.notify(None)
        if work:
            await gatherResults(work, consumeErrors=True).addErrback(lambda f: None)

    async def _recover_one(self, sb: _Sandbox) -> None:
        async with locked(sb.lock):
            if self.passive:
                return
            rec = sb.record
            sid = rec.sandbox_id
            pod_gone = bool(rec.netns) and not os.path.exists(rec.netns)
            try:
                if rec.state in GOING or pod_gone:
                    self._log.info("{sandbox_id}: recovery: cleaning up (state {state}, pod gone: {gone})",
                                   sandbox_id=sid, state=rec.state.value, gone=pod_gone)
                    await self._finish_stop(sb, await self._begin_stop(sb))
                elif rec.state is S.CREATED:
                    sb.proxy = self._new_proxy(rec)
                elif rec.state is S.RUNNING:
                    await self._readopt(sb)
                else:
                    self._log.info("{sandbox_id}: recovery: rolling back interrupted StartVM (state {state})",
                                   sandbox_id=sid, state=rec.state.value)
                    await self._rollback(sb, f"adaptor restarted during StartVM ({rec.state.value})")
            except Exception as e:
                self._log.failure("{sandbox_id}: recovery failed", sandbox_id=sid)
                await self._put(sb, error=f"recovery: {e}")

    async def _readopt(self, sb: _Sandbox) -> None:
        rec = sb.record
        sid = rec.sandbox_id
        self._log.info("{sandbox_id}: recovery: re-adopting VM {instance_id} at {ips}", sandbox_id=sid,
                       instance_id=rec.instance_id, ips=list(rec.ips))
        sb.adopting = True
        try:
            await self.network.ensure(sid, rec.netns, rec.ips, _network(rec))
            self._stop_if_handed_over(sb)
            await self._start_proxy(sb, None)
        except Exception as e:
            if self.passive:  # handed over meanwhile: the newer adaptor re-adopts it
                self._log.info("{sandbox_id}: re-adoption stopped: handed over to a newer adaptor", sandbox_id=sid)
                return
            self._log.warn("{sandbox_id}: re-adopting failed ({error}); deleting the VM", sandbox_id=sid,
                           error=str(e))
            await self._rollback(sb, f"re-adopt after restart failed: {e}")
            return
        finally:
            sb.adopting = False
        # The PeerPod may never have been created (the API was down, or an older adaptor kept no name): make
        # sure it exists; one that does counts as created.
        if not sb.record.peerpod:
            name = self.cluster.peerpod_name(rec.pod_name)
            if name:
                await self._put(sb, peerpod=name)
        self.cluster.instance_created(sb.record)

    async def sweep(self) -> None:
        """Periodic, never raises: retry deletes that failed in StopVM (ORPHAN), and stop sandboxes whose pod
        network namespace has vanished (the pod is gone without a StopVM: nothing may leak). Passive: nothing."""
        for sid, sb in list(self.sandboxes.items()):
            if self.passive:
                return
            rec = sb.record
            if sb.lock.locked:  # busy; an unlocked STOPPING sandbox is a StopVM that failed: finished here
                continue
            if rec.state not in GOING:
                if not rec.netns or os.path.exists(rec.netns):
                    continue
                self._log.warn("{sandbox_id}: pod netns {netns} is gone; stopping the sandbox", sandbox_id=sid,
                               netns=rec.netns)
            try:
                async with locked(sb.lock):
                    await self._finish_stop(sb, await self._begin_stop(sb))
            except Exception:
                self._log.failure("{sandbox_id}: sweep failed", sandbox_id=sid)

    async def shutdown(self) -> None:
        """Graceful stop: close every proxy's listener, keep VMs, tunnels and the journal. After a hand-over the
        proxies drain first: shim connections already open relay until closed, for at most drain_timeout."""
        stop = self._drain_proxy if self.passive else self._stop_proxy
        work = [Deferred.fromCoroutine(stop(sb)) for sb in self.sandboxes.values()]
        if work:
            await gatherResults(work, consumeErrors=True).addErrback(lambda f: None)

    async def _drain_proxy(self, sb: _Sandbox) -> None:
        proxy, sb.proxy = sb.proxy, None
        if proxy is None:
            return
        timeout = self.config.drain_timeout
        try:
            await self._with_timeout(proxy.drain(timeout), timeout + 10.0)
        except Exception as e:
            self._log.warn("{sandbox_id}: draining agent proxy: {error}", sandbox_id=sb.record.sandbox_id,
                           error=str(e))

    # -- rolling update --------------------------------------------------------------------------

    def hand_over(self) -> Deferred[list[str]]:
        """A newer adaptor takes over: become passive (see the module docstring) and fire, with the sandbox ids,
        once no work of ours is under way on any sandbox (every lock is ours, for good). A StartVM in flight
        stops at its next step (its agent dial at once); a StopVM in flight finishes. Idempotent."""
        if self._handed_over is not None:
            return succeed(self._handed_over)
        answer = self._hand_over_done.wait()
        if not self.passive:
            self.passive = True
            self._log.warn("handing over {n} sandboxes to a newer adaptor: no more sweeps, starts or stops here",
                           n=len(self.sandboxes))
            Deferred.fromCoroutine(self._hand_over())
        return answer

    async def _hand_over(self) -> list[str]:
        await self._journal_loaded()  # a recovery reading the journal stops after the read (we are passive)
        for sb in list(self.sandboxes.values()):
            dialling = (sb.start_call is not None and sb.record.state in (S.TUNNEL_INTENT, S.TUNNEL)) or sb.adopting
            if dialling and sb.proxy is not None:
                # The dial may go on for --proxy-timeout; nothing is relayed yet, so it stops now.
                Deferred.fromCoroutine(self._stop_proxy(sb))
        await gatherResults([sb.lock.acquire() for sb in list(self.sandboxes.values())])
        ids = sorted(self.sandboxes)
        self._log.info("handed over sandboxes {ids}", ids=ids)
        self._handed_over = ids
        self._hand_over_done.notify(ids)
        return ids


class _HandedOver(Exception):
    """Raised at a StartVM step boundary after a hand-over (turned into UNAVAILABLE by `_start`)."""

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(f"sandbox {sandbox_id}: handed over to a newer adaptor")


def _network(rec: SandboxRecord) -> PodNetworkConfig:
    """The record's pod network (every record past CreateVM has one)."""
    if rec.pod_network is None:
        raise SandboxError(Fault.INTERNAL, f"sandbox {rec.sandbox_id} has no pod network in its journal record")
    return rec.pod_network


async def _as_coroutine(a: Awaitable[T]) -> T:
    return await a
