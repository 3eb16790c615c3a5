"""The hypervisor.Hypervisor and podvminfo.PodVMInfo services: the pod VM lifecycle, journalled.

Every side effect is bracketed by journal writes (intent before, result after; see
`caa.adaptor.interfaces.SandboxState`), so `recover()` after a restart can re-adopt live VMs, roll back
half-done creates and clean records whose pod is gone. Per sandbox, one `DeferredLock` serialises
StartVM, StopVM and recovery; different sandboxes proceed concurrently on the reactor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredLock, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from caa.adaptor import metrics
from caa.adaptor.interfaces import (
    SOCKET_NAME,
    IAgentProxy,
    IAgentProxyFactory,
    IAgentTLS,
    IPodNetworking,
    ISandboxStore,
    SandboxRecord,
    SandboxState,
)
from caa.adaptor.store import write_atomic
from caa.adaptor.userdata import AnnotationError, instance_spec, pod_identity, user_data
from caa.podvm_api.apf import APFConfig
from caa.podvm_api.naming import instance_name
from caa.providers.interfaces import ErrorKind, Instance, InstanceSpec, IProvider, ProviderError
from caa.ttrpc.status import Code, TTRPCError

T = TypeVar("T")

VERSION = "0.0.0"
USER_DATA_NAME = "user-data"
APF_NAME = "apf.json"

_KIND_CODES = {
    ErrorKind.NOT_FOUND: Code.NOT_FOUND,
    ErrorKind.QUOTA: Code.RESOURCE_EXHAUSTED,
    ErrorKind.INVALID_CONFIG: Code.INVALID_ARGUMENT,
    ErrorKind.TRANSIENT: Code.UNAVAILABLE,
}

AuthLookup = Callable[[str, str], Awaitable[Mapping[str, str]]]


@dataclass(frozen=True)
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


@dataclass
class _Sandbox:
    record: SandboxRecord
    lock: DeferredLock = field(default_factory=DeferredLock)
    proxy: IAgentProxy | None = None
    starting: Deferred[None] | None = None
    stopping: bool = False


def _spec_to_dict(spec: InstanceSpec) -> dict[str, Any]:
    return {"instance_type": spec.instance_type, "vcpus": spec.vcpus, "memory_mib": spec.memory_mib,
            "gpus": spec.gpus, "image": spec.image, "multi_nic": spec.multi_nic,
            "volumes": list(spec.volumes), "arch": spec.arch}


def _spec_from_dict(d: Mapping[str, Any]) -> InstanceSpec:
    return InstanceSpec(**{k: v for k, v in d.items() if k in _spec_to_dict(InstanceSpec())})


class CloudService:
    """CreateVM / StartVM / StopVM / Version and PodVMInfo.GetInfo over a provider, a journal and a tunnel."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, provider: IProvider, proxies: IAgentProxyFactory,
                 store: ISandboxStore, network: IPodNetworking, tls: IAgentTLS | None,
                 config: ServiceConfig, auth_lookup: AuthLookup | None = None,
                 wallclock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.provider = provider
        self.proxies = proxies
        self.store = store
        self.network = network
        self.tls = tls
        self.config = config
        self.auth_lookup = auth_lookup
        self.wallclock = wallclock
        self.sandboxes: dict[str, _Sandbox] = {}
        self._info_waiters: list[Deferred[None]] = []
        self._orphans: dict[str, _Sandbox] = {}

    # -- helpers ---------------------------------------------------------------------------------

    def _put(self, sb: _Sandbox, state: SandboxState | None = None, **changes: Any) -> SandboxRecord:
        if state is not None:
            changes["state"] = state
        sb.record = sb.record.evolve(updated=self.wallclock(), **changes)
        self.store.put(sb.record)
        self._update_gauge()
        return sb.record

    def _update_gauge(self) -> None:
        counts = {s.value: 0 for s in SandboxState}
        for sb in self.sandboxes.values():
            counts[sb.record.state.value] += 1
        for state, n in counts.items():
            metrics.SANDBOXES.labels(state=state).set(n)

    def _wake_info_waiters(self) -> None:
        waiters, self._info_waiters = self._info_waiters, []
        for d in waiters:
            d.callback(None)

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

    async def _with_timeout(self, d: Deferred[T], timeout: float) -> T:
        d.addTimeout(timeout, self.clock)
        return await d

    # -- Hypervisor ------------------------------------------------------------------------------

    def version(self) -> str:
        return VERSION

    async def create_vm(self, sandbox_id: str, annotations: Mapping[str, str], netns: str) -> str:
        """CreateVM (§1.4): local work only. Returns the agent socket path."""
        if not sandbox_id:
            raise TTRPCError(Code.INVALID_ARGUMENT, "empty sandbox id")
        try:
            self.store.pod_dir(sandbox_id)
        except ValueError as e:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"invalid sandbox id {sandbox_id!r}") from e
        try:
            pod_name, pod_ns = pod_identity(annotations)
        except AnnotationError as e:
            raise TTRPCError(Code.INVALID_ARGUMENT, str(e)) from e
        if sandbox_id in self.sandboxes or self.store.get(sandbox_id) is not None:
            raise TTRPCError(Code.ALREADY_EXISTS, f"adding sandbox: sandbox {sandbox_id} already exists")
        self._log.info("create a sandbox {sandbox_id} for pod {pod} in namespace {namespace} (netns {netns})",
                       sandbox_id=sandbox_id, pod=pod_name, namespace=pod_ns, netns=netns)
        spec = instance_spec(annotations, multi_nic=self.config.ext_network_via_podvm)
        server_name = instance_name(pod_name, sandbox_id)
        pod_dir = self.store.pod_dir(sandbox_id)
        socket_path = os.path.join(pod_dir, SOCKET_NAME)
        record = SandboxRecord(
            sandbox_id=sandbox_id, pod_name=pod_name, pod_namespace=pod_ns, netns=netns,
            socket_path=socket_path, server_name=server_name, state=SandboxState.CREATED,
            created=self.wallclock(), updated=self.wallclock(), annotations=dict(annotations),
            spec=_spec_to_dict(spec), instance_name=self.provider.instance_name(pod_name, sandbox_id))
        sb = _Sandbox(record)
        self.sandboxes[sandbox_id] = sb  # reserve the id while we await
        ok = False
        pod_network: dict[str, Any] = {}
        try:
            try:
                pod_network = await self.network.inspect(sandbox_id, netns)
            except Exception as e:
                raise TTRPCError(Code.FAILED_PRECONDITION, f"failed to inspect netns {netns}: {e}") from e
            cert, key, client_ca = "", "", ""
            if self.tls is not None and not self.config.disable_tls:
                try:
                    cert, key = self.tls.server_credentials(server_name)
                    client_ca = self.tls.client_ca_pem()
                except Exception as e:
                    raise TTRPCError(Code.INTERNAL, f"issuing TLS server certificate for {server_name}: {e}") from e
            apf = APFConfig(
                pod_namespace=pod_ns, pod_name=pod_name, pod_network=pod_network,
                tls_server_key=key, tls_server_cert=cert, tls_client_ca=client_ca,
                tls_min_version="" if self.config.disable_tls else self.config.tls_min_version,
                tls_cipher_suites=() if self.config.disable_tls else self.config.tls_cipher_suites)
            auths: Mapping[str, str] = {}
            if self.auth_lookup is not None:
                try:
                    auths = await self._with_timeout(
                        Deferred.fromCoroutine(_as_coroutine(self.auth_lookup(pod_ns, pod_name))), 30.0)
                except Exception as e:
                    self._log.warn("{sandbox_id}: image pull secrets of {namespace}/{pod} not read: {error}",
                                   sandbox_id=sandbox_id, namespace=pod_ns, pod=pod_name, error=str(e))
            text = user_data(apf, annotations, default_initdata=self.config.initdata, auths=auths,
                             scratch_space=self.config.enable_scratch_space)
            self.store.create_dir(sandbox_id)
            write_atomic(os.path.join(pod_dir, APF_NAME), apf.to_json().encode(), 0o600)
            write_atomic(os.path.join(pod_dir, USER_DATA_NAME), text.encode(), 0o600)
            sb.proxy = self.proxies.new(sandbox_id, socket_path)
            self._put(sb, pod_network=dict(pod_network), vni=pod_network.get("vxlan-id"))
            ok = True
        finally:
            if not ok:
                self.sandboxes.pop(sandbox_id, None)
                try:
                    await self.network.teardown(sandbox_id, netns, pod_network)
                except Exception as e:
                    self._log.warn("{sandbox_id}: releasing network after failed CreateVM: {error}",
                                   sandbox_id=sandbox_id, error=str(e))
                self.store.remove(sandbox_id)
        self._wake_info_waiters()
        return socket_path

    def _get(self, sandbox_id: str, what: str) -> _Sandbox:
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or sb.stopping:
            raise TTRPCError(Code.NOT_FOUND, f"{what}: sandbox {sandbox_id} does not exist")
        return sb

    async def start_vm(self, sandbox_id: str, deadline: float | None = None) -> None:
        """StartVM (§1.4): instance -> tunnel -> proxy ready; anything built is undone on failure."""
        sb = self._get(sandbox_id, "getting sandbox")
        await sb.lock.acquire()
        try:
            if sb.stopping:
                raise TTRPCError(Code.NOT_FOUND, f"getting sandbox: sandbox {sandbox_id} does not exist")
            if sb.record.state is SandboxState.RUNNING:
                return
            sb.starting = Deferred.fromCoroutine(self._start(sb, deadline))
            try:
                await sb.starting
            finally:
                sb.starting = None
        finally:
            sb.lock.release()

    async def _start(self, sb: _Sandbox, deadline: float | None) -> None:
        rec = sb.record
        sid = rec.sandbox_id
        t0 = self.clock.seconds()
        with open(os.path.join(self.store.pod_dir(sid), USER_DATA_NAME), "rb") as f:
            data = f.read()
        spec = _spec_from_dict(rec.spec)
        self._put(sb, SandboxState.CREATE_INTENT, error="")
        instance: Instance | None = None
        try:
            try:
                instance = await self._provider_call(
                    "create_instance", lambda: self.provider.create_instance(rec.pod_name, sid, data, spec))
            except ProviderError as e:
                if e.instance_id:
                    self._put(sb, instance_id=e.instance_id)
                raise TTRPCError(_KIND_CODES.get(e.kind, Code.UNKNOWN), f"creating an instance : {e}") from e
            t1 = self.clock.seconds()
            metrics.START_PHASE_SECONDS.labels(phase="provider_create").observe(t1 - t0)
            self._log.info("{sandbox_id}: created instance {instance_id} ({instance_name}) ips {ips} "
                           "in {elapsed:.1f}s", sandbox_id=sid, instance_id=instance.id,
                           instance_name=instance.name, ips=list(instance.ips), elapsed=t1 - t0)
            self._put(sb, SandboxState.INSTANCE, instance_id=instance.id, instance_name=instance.name,
                      ips=tuple(instance.ips))
            self._wake_info_waiters()
            if not instance.ips:
                raise TTRPCError(Code.UNAVAILABLE, "instance IP is not available")
            self._put(sb, SandboxState.TUNNEL_INTENT)
            try:
                await self.network.setup(sid, rec.netns, tuple(instance.ips), dict(rec.pod_network or {}))
            except CancelledError:
                raise
            except Exception as e:
                raise TTRPCError(Code.INTERNAL,
                                 f"setting up pod network tunnel on netns {rec.netns}: {e}") from e
            t2 = self.clock.seconds()
            metrics.START_PHASE_SECONDS.labels(phase="tunnel").observe(t2 - t1)
            self._put(sb, SandboxState.TUNNEL)
            await self._start_proxy(sb, deadline)
            t3 = self.clock.seconds()
            metrics.START_PHASE_SECONDS.labels(phase="vm_boot").observe(t3 - t2)
            metrics.START_PHASE_SECONDS.labels(phase="total").observe(t3 - t0)
            self._put(sb, SandboxState.RUNNING)
            self._log.info("{sandbox_id}: VM {instance_name} started in {elapsed:.1f}s; agent socket {socket}",
                           sandbox_id=sid, instance_name=instance.name, elapsed=t3 - t0, socket=rec.socket_path)
        except BaseException as e:
            reason = str(e) if not isinstance(e, CancelledError) else "StartVM cancelled (deadline or shim gone)"
            self._log.warn("{sandbox_id}: StartVM failed: {error}; rolling back", sandbox_id=sid, error=reason)
            # The rollback runs outside the request's cancellation.
            await Deferred.fromCoroutine(self._rollback(sb, reason))
            if isinstance(e, CancelledError):
                raise TTRPCError(Code.DEADLINE_EXCEEDED, f"starting VM for sandbox {sid}: {reason}") from e
            raise

    async def _start_proxy(self, sb: _Sandbox, deadline: float | None) -> None:
        rec = sb.record
        if sb.proxy is None:
            sb.proxy = self.proxies.new(rec.sandbox_id, rec.socket_path)
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
            sb.proxy = self.proxies.new(sid, rec.socket_path)
        if rec.state in (SandboxState.TUNNEL_INTENT, SandboxState.TUNNEL, SandboxState.RUNNING):
            try:
                await self.network.teardown(sid, rec.netns, dict(rec.pod_network or {}))
            except Exception as e:
                self._log.warn("{sandbox_id}: tunnel teardown in rollback failed: {error}", sandbox_id=sid,
                               error=str(e))
        await self._delete_instance(sb)
        if sb.record.instance_id == "":
            self._put(sb, SandboxState.CREATED, ips=(), error=reason)
        else:
            self._put(sb, SandboxState.CREATED, error=reason)  # delete failed: StopVM retries it

    async def _delete_instance(self, sb: _Sandbox) -> bool:
        """Delete the sandbox's instance (by id, or found by name after an interrupted create)."""
        rec = sb.record
        iid = rec.instance_id
        if not iid and rec.state in (SandboxState.CREATE_INTENT, SandboxState.STOP_INTENT) and rec.instance_name:
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
            await self._provider_call("delete_instance", lambda: self._with_timeout_d(
                self.provider.delete_instance(iid), self.config.delete_timeout))
        except Exception as e:
            self._log.warn("{sandbox_id}: deleting instance {instance_id} failed: {error}",
                           sandbox_id=rec.sandbox_id, instance_id=iid, error=str(e))
            return False
        self._log.info("{sandbox_id}: deleted instance {instance_id}", sandbox_id=rec.sandbox_id, instance_id=iid)
        self._put(sb, instance_id="", ips=())
        return True

    def _with_timeout_d(self, d: Deferred[T], timeout: float) -> Deferred[T]:
        d.addTimeout(timeout, self.clock)
        return d

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
        sb = self._get(sandbox_id, "stopping VM")
        sb.stopping = True
        if sb.starting is not None:
            sb.starting.cancel()
        t0 = self.clock.seconds()
        await sb.lock.acquire()
        try:
            await self._finish_stop(sb)
        finally:
            sb.lock.release()
        metrics.STOP_SECONDS.observe(self.clock.seconds() - t0)

    async def _finish_stop(self, sb: _Sandbox) -> None:
        rec = sb.record
        sid = rec.sandbox_id
        prior = rec.state
        self._put(sb, SandboxState.STOP_INTENT)
        await self._stop_proxy(sb)
        if prior is SandboxState.CREATE_INTENT or rec.instance_id or prior is SandboxState.STOP_INTENT:
            deleted = await self._delete_instance(sb)
        else:
            deleted = True
        try:
            await self.network.teardown(sid, rec.netns, dict(rec.pod_network or {}))
        except Exception as e:
            self._log.warn("{sandbox_id}: tunnel teardown failed: {error}", sandbox_id=sid, error=str(e))
        if not deleted:
            # Keep the record (STOP_INTENT) so the sweeper retries the delete; the VM must not leak.
            self._log.warn("{sandbox_id}: instance delete failed; will retry", sandbox_id=sid)
            self.sandboxes.pop(sid, None)
            self._orphans[sid] = sb
            self._update_gauge()
            return
        self.store.remove(sid)
        self.sandboxes.pop(sid, None)
        self._orphans.pop(sid, None)
        self._update_gauge()
        self._log.info("{sandbox_id}: stopped", sandbox_id=sid)

    # -- PodVMInfo -------------------------------------------------------------------------------

    async def get_info(self, pod_name: str, pod_namespace: str, wait: bool) -> str:
        """The VM id of pod namespace/name; with wait, until it is known (the ttrpc deadline bounds it)."""
        while True:
            for sb in self.sandboxes.values():
                r = sb.record
                if r.pod_name == pod_name and r.pod_namespace == pod_namespace and r.instance_id:
                    return r.instance_id
            if not wait:
                raise TTRPCError(Code.NOT_FOUND, f"VM ID for {pod_namespace}:{pod_name} was not found")
            d: Deferred[None] = Deferred()
            self._info_waiters.append(d)
            try:
                await d
            except CancelledError:
                if d in self._info_waiters:
                    self._info_waiters.remove(d)
                raise

    # -- recovery --------------------------------------------------------------------------------

    async def recover(self) -> None:
        """Re-adopt or undo every journalled sandbox (concurrently); never raises."""
        for sid in self.store.remove_strays():
            self._log.info("{sandbox_id}: removed the directory of an interrupted CreateVM", sandbox_id=sid)
        records = self.store.load_all()
        self._log.info("journal: recovering {n} sandboxes", n=len(records))
        work = []
        for rec in records:
            sb = _Sandbox(rec)
            self.sandboxes[rec.sandbox_id] = sb
            work.append(Deferred.fromCoroutine(self._recover_one(sb)))
        self._update_gauge()
        if work:
            await gatherResults(work, consumeErrors=True).addErrback(lambda f: None)

    async def _recover_one(self, sb: _Sandbox) -> None:
        await sb.lock.acquire()
        try:
            rec = sb.record
            sid = rec.sandbox_id
            pod_gone = bool(rec.netns) and not os.path.exists(rec.netns)
            try:
                if rec.state is SandboxState.STOP_INTENT or pod_gone:
                    self._log.info("{sandbox_id}: recovery: cleaning up (state {state}, pod gone: {gone})",
                                   sandbox_id=sid, state=rec.state.value, gone=pod_gone)
                    sb.stopping = True
                    await self._finish_stop(sb)
                elif rec.state is SandboxState.CREATED:
                    sb.proxy = self.proxies.new(sid, rec.socket_path)
                elif rec.state is SandboxState.RUNNING:
                    await self._readopt(sb)
                else:
                    self._log.info("{sandbox_id}: recovery: rolling back interrupted StartVM (state {state})",
                                   sandbox_id=sid, state=rec.state.value)
                    await self._rollback(sb, f"adaptor restarted during StartVM ({rec.state.value})")
            except Exception as e:
                self._log.failure("{sandbox_id}: recovery failed", sandbox_id=sid)
                self._put(sb, error=f"recovery: {e}")
        finally:
            sb.lock.release()

    async def _readopt(self, sb: _Sandbox) -> None:
        rec = sb.record
        sid = rec.sandbox_id
        self._log.info("{sandbox_id}: recovery: re-adopting VM {instance_id} at {ips}", sandbox_id=sid,
                       instance_id=rec.instance_id, ips=list(rec.ips))
        try:
            await self.network.ensure(sid, rec.netns, rec.ips, dict(rec.pod_network or {}))
            await self._start_proxy(sb, None)
        except Exception as e:
            self._log.warn("{sandbox_id}: re-adopting failed ({error}); deleting the VM", sandbox_id=sid,
                           error=str(e))
            await self._rollback(sb, f"re-adopt after restart failed: {e}")
            return

    async def sweep(self) -> None:
        """Periodic, never raises: retry deletes that failed in StopVM, and stop sandboxes whose pod network
        namespace has vanished (the pod is gone without a StopVM: nothing may leak)."""
        for sid, sb in list(self.sandboxes.items()):
            if sb.lock.locked or sb.stopping or not sb.record.netns or os.path.exists(sb.record.netns):
                continue
            self._log.warn("{sandbox_id}: pod netns {netns} is gone; stopping the sandbox", sandbox_id=sid,
                           netns=sb.record.netns)
            sb.stopping = True
            await sb.lock.acquire()
            try:
                await self._finish_stop(sb)
            except Exception:
                self._log.failure("{sandbox_id}: sweep failed", sandbox_id=sid)
            finally:
                sb.lock.release()
        for sid, sb in list(self._orphans.items()):
            if sb.lock.locked:
                continue
            await sb.lock.acquire()
            try:
                await self._finish_stop(sb)
            except Exception:
                self._log.failure("{sandbox_id}: sweep failed", sandbox_id=sid)
            finally:
                sb.lock.release()

    async def shutdown(self) -> None:
        """Graceful stop: close every proxy's listener, keep VMs, tunnels and the journal."""
        work = [Deferred.fromCoroutine(self._stop_proxy(sb)) for sb in self.sandboxes.values()]
        if work:
            await gatherResults(work, consumeErrors=True).addErrback(lambda f: None)


async def _as_coroutine(a: Awaitable[T]) -> T:
    return await a
