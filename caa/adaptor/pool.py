"""Warm pools of pre-booted pod VMs (issue 16): kept full per pool key, handed to StartVM on a hit.

A pool VM is created with bootstrap user data only (`caa.podvm_api.claim`): the pool server certificate for
its name, the adaptor's client certificate, the SHA-256 of a one-time token, and the pool key's initdata
(initdata can be bound to the TEE's launch measurement, so it cannot be given later). StartVM `take`s one
ready VM for the pod's key and claims it (`caa.podvm.v1.PodVM/Claim`); a claimed VM belongs to its sandbox
from then on and is deleted at StopVM like any other, never returned here.

The pool is journalled, one JSON file per VM in `pool_dir` (`write_atomic`, like the sandboxes):

- `creating`: written before provider.create_instance (the instance may exist; recovery finds it by name and
  deletes it), again with the instance's id while the probe waits for the VM to answer (libvirt returns before
  the guest has booted; a VM that does not answer within the probe's bound is deleted, and the key backs off),
- `ready`: created and answering, with id and IPs; kept across a restart and aged by its TTL,
- `taken`: handed to a StartVM, written before the claim so a restart never hands it out twice; recovery
  deletes it unless a sandbox journals its instance id (that sandbox's own recovery then owns it).

Each key has a size (`caa.adaptor.poolspec.PoolSize`): `min` VMs are kept booted (creating or ready); a miss
grows the key's target by one, up to `max`; a VM recycled at its TTL shrinks it by one, down to `min`. Refill
runs after every change; a failed create backs off (doubling, up to `max_backoff`). A ready VM idle for `ttl`
seconds is deleted (and replaced while the target wants it), so a pool never ages past its certificates or
image. At start, journalled VMs of a key no longer configured (pools turned off, or the key dropped) and those
beyond their key's `max` are deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import attrs
from prometheus_client import Counter, Gauge
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from caa.adaptor.interfaces import IAgentTLS, IPoolPeerPods
from caa.adaptor.metrics import REGISTRY
from caa.adaptor.poolspec import PoolSize
from caa.adaptor.store import Runner, run_inline, write_atomic
from caa.forwarder.initdata import DUMMY_TOML as DEFAULT_INITDATA_TOML
from caa.podvm_api import claim as claim_format
from caa.podvm_api import cloudconfig
from caa.podvm_api import initdata as initdata_format
from caa.podvm_api.cloudconfig import APF_PATH, INITDATA_PATH, WriteFile
from caa.providers.interfaces import Instance, InstanceSpec, IProvider, string_tuple

__all__ = ["PoolKey", "PoolVM", "PoolConfig", "PoolManager", "POOL_POD_NAME", "initdata_digest"]

#: The "pod name" pool VMs are created under: their instance names read podvm-pool-<id8>.
POOL_POD_NAME = "pool"

POOL_HITS = Counter("caa_pool_hits", "StartVMs served by a warm pool VM, by pool key", ["key"], registry=REGISTRY)
POOL_MISSES = Counter("caa_pool_misses", "StartVMs that found no warm pool VM (cold start), by pool key", ["key"],
                      registry=REGISTRY)
POOL_VMS = Gauge("caa_pool_vms", "Warm pool VMs by pool key and state (creating, ready)", ["key", "state"],
                 registry=REGISTRY)
POOL_IDLE_SECONDS = Counter("caa_pool_idle_vm_seconds",
                            "Seconds pool VMs spent ready and unclaimed (what a pool costs), by pool key", ["key"],
                            registry=REGISTRY)


def initdata_digest(encoded: str) -> str:
    """The digest a pod VM computes at boot for an encoded initdata (the annotation or --initdata form): a VM
    given none processes upstream's default document, so "none" has that document's digest."""
    toml = initdata_format.decode(encoded) if encoded else DEFAULT_INITDATA_TOML
    return initdata_format.parse(toml).digest


@attrs.frozen
class PoolKey:
    """What a pooled VM can serve: the same size, image and initdata (digest; empty for none)."""

    instance_type: str = ""
    vcpus: int = 0
    memory_mib: int = 0
    image: str = ""
    initdata_digest: str = ""

    @classmethod
    def for_spec(cls, spec: InstanceSpec, digest: str) -> PoolKey:
        return cls(spec.instance_type, spec.vcpus, spec.memory_mib, spec.image, digest)

    def spec(self) -> InstanceSpec:
        return InstanceSpec(instance_type=self.instance_type, vcpus=self.vcpus, memory_mib=self.memory_mib,
                            image=self.image)

    def label(self) -> str:
        """Short and stable, for metrics and logs."""
        size = self.instance_type or (f"{self.vcpus}c{self.memory_mib}m" if self.vcpus or self.memory_mib
                                      else "default")
        return f"{size}/{self.image or 'default'}/{self.initdata_digest[:12] or 'none'}"

    def short_hash(self) -> str:
        """16 hex digits naming the key where a label value must be short (its PeerPods' pool label)."""
        return hashlib.sha256(json.dumps(attrs.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@attrs.frozen(repr=False)
class PoolVM:
    """One pool VM as journalled. `token` is the claim token (the VM holds only its digest)."""

    pool_id: str
    key: PoolKey
    token: bytes
    state: str = "creating"
    instance_id: str = ""
    name: str = ""
    ips: tuple[str, ...] = attrs.field(default=(), converter=string_tuple)
    created: float = 0.0  # clock time it became ready (for TTL and idle seconds)

    def __repr__(self) -> str:
        return f"PoolVM({self.name or self.pool_id}, {self.state}, {self.key.label()}, token=<redacted>)"

    def to_json(self) -> dict[str, Any]:
        return {"pool_id": self.pool_id, "key": attrs.asdict(self.key), "token": self.token.hex(),
                "state": self.state, "instance_id": self.instance_id, "name": self.name, "ips": list(self.ips),
                "created": self.created}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PoolVM:
        return cls(pool_id=d["pool_id"], key=PoolKey(**d["key"]), token=bytes.fromhex(d["token"]),
                   state=d["state"], instance_id=d.get("instance_id", ""), name=d.get("name", ""),
                   ips=tuple(d.get("ips", ())), created=float(d.get("created", 0.0)))

    def instance(self) -> Instance:
        return Instance(self.instance_id, self.name, self.ips)


@attrs.frozen
class PoolConfig:
    size: int = 0                 # min and max of the keys given without sizes; 0 = pools off
    ttl: float = 3600.0           # seconds a ready VM may idle before it is recycled
    pool_dir: str = ""
    min_backoff: float = 1.0
    max_backoff: float = 300.0
    tls_min_version: str = ""
    tls_cipher_suites: tuple[str, ...] = ()


class PoolManager:
    _log = Logger()

    def __init__(self, clock: IReactorTime, provider: IProvider, tls: IAgentTLS | None, config: PoolConfig,
                 keys: Iterable[PoolKey], initdata_for: Callable[[PoolKey], str], run: Runner = run_inline,
                 sizes: Mapping[PoolKey, PoolSize] | None = None, peerpods: IPoolPeerPods | None = None,
                 probe: Callable[[PoolVM], Awaitable[None]] | None = None) -> None:
        """`keys` get `config.size` as min and max, `sizes` their own; no key at all only cleans up the
        journal (pools off). `tls` None: no key may be configured (the bootstrap needs the auto CA).
        `peerpods`: in a cluster, each pool VM gets a PeerPod while it is the pool's (caa.adaptor.cluster).
        `probe(vm)`: returns once a created VM answers (a provider may return before the VM booted), raises if
        it never does; None: ready when the provider returns."""
        if config.size < 0:
            raise ValueError(f"--pool-size must be 0 or more, got {config.size}")
        if config.ttl <= 0:
            raise ValueError(f"--pool-ttl must be positive, got {config.ttl}")
        self.clock = clock
        self.provider = provider
        self.tls = tls
        self.config = config
        self.sizes: dict[PoolKey, PoolSize] = {k: PoolSize(config.size, config.size) for k in keys
                                               if config.size > 0}
        self.sizes.update({k: v for k, v in (sizes or {}).items() if v.max > 0})
        if self.sizes and tls is None:
            raise ValueError("warm pools need mutual TLS with the auto CA")
        self.keys = list(self.sizes)
        self._target: dict[PoolKey, int] = {k: v.min for k, v in self.sizes.items()}
        self._peerpods = peerpods
        self._initdata_for = initdata_for
        self._probe = probe
        self._run = run  # the journal's file I/O (write, fsync, rename, unlink, reads) leaves the reactor thread
        self.vms: dict[str, PoolVM] = {}
        self._timers: dict[str, IDelayedCall] = {}
        self._backoff: dict[PoolKey, float] = {}
        self._retry: dict[PoolKey, IDelayedCall] = {}
        self._running = False
        self._work: set[Deferred[None]] = set()
        if config.pool_dir:
            os.makedirs(config.pool_dir, mode=0o700, exist_ok=True)

    # -- journal ---------------------------------------------------------------------------------------

    def _path(self, pool_id: str) -> str:
        return os.path.join(self.config.pool_dir, f"{pool_id}.json")

    async def _put(self, vm: PoolVM) -> PoolVM:
        """The VM's new state: in memory at once (what a concurrent take sees), then durable."""
        self.vms[vm.pool_id] = vm
        self._gauge()
        if self.config.pool_dir:
            path, data = self._path(vm.pool_id), json.dumps(vm.to_json(), sort_keys=True).encode()
            await self._run(lambda: write_atomic(path, data))
        return vm

    async def _forget(self, vm: PoolVM) -> None:
        self.vms.pop(vm.pool_id, None)
        timer = self._timers.pop(vm.pool_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._gauge()
        if self.config.pool_dir:
            await self._run(lambda: _unlink(self._path(vm.pool_id)))

    def _read_journal(self) -> tuple[list[PoolVM], list[tuple[str, str]]]:
        """(In a journal thread.) The journalled VMs, and the unreadable files removed with their errors."""
        vms: list[PoolVM] = []
        removed: list[tuple[str, str]] = []
        if not self.config.pool_dir:
            return vms, removed
        for name in sorted(os.listdir(self.config.pool_dir)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.config.pool_dir, name)
            try:
                with open(path, "rb") as f:
                    vms.append(PoolVM.from_json(json.loads(f.read())))
            except (OSError, ValueError, KeyError, TypeError) as e:
                removed.append((path, str(e)))
                _unlink(path)
        return vms, removed

    def _gauge(self) -> None:
        for key in {*self.keys, *(vm.key for vm in self.vms.values())}:
            for state in ("creating", "ready"):
                POOL_VMS.labels(key=key.label(), state=state).set(
                    sum(1 for vm in self.vms.values() if vm.key == key and vm.state == state))

    # -- life ------------------------------------------------------------------------------------------

    def ready(self, key: PoolKey) -> list[PoolVM]:
        return [vm for vm in self.vms.values() if vm.key == key and vm.state == "ready"]

    async def start(self, owned: Callable[[str], bool] = lambda _id: False) -> None:
        """Recover the journal (see the module docstring), then fill the pools. `owned(instance_id)`: a
        sandbox journals that instance (a taken VM whose StartVM got as far as the sandbox's journal)."""
        self._running = True
        vms, removed = await self._run(self._read_journal)
        for path, error in removed:
            self._log.error("pool journal {path} unreadable ({error}); removed", path=path, error=error)
        keep = self._kept(vms)
        for vm in vms:
            self.vms[vm.pool_id] = vm
            if vm.state == "ready" and vm.pool_id not in keep:
                why = ("beyond its pool's max" if vm.key in self.sizes
                       else "of a pool no longer configured (pools off, or its key dropped)")
                self._log.info("pool VM {name} is {why}: deleting it", name=vm.name, why=why)
                self._spawn(self._delete(vm))
            elif vm.state == "ready":
                self._log.info("pool VM {name} recovered ({key})", name=vm.name, key=vm.key.label())
                self._peerpod_created(vm)  # again: a kill may have cut its creation short (an existing one is kept)
                self._arm_ttl(vm)
            elif vm.state == "taken" and vm.instance_id and owned(vm.instance_id):
                await self.handed_over(vm)  # its sandbox's recovery rolls it back or re-adopts it
            else:
                self._log.info("pool VM {name} was {state} when the adaptor stopped: deleting it",
                               name=vm.name or vm.pool_id, state=vm.state)
                self._spawn(self._delete(vm))
        self._gauge()
        self.refill()

    def _kept(self, vms: list[PoolVM]) -> set[str]:
        """The recovered ready VMs that stay: per configured key, the newest up to its max."""
        keep: set[str] = set()
        for key, size in self.sizes.items():
            ready = sorted((vm for vm in vms if vm.key == key and vm.state == "ready"), key=lambda vm: -vm.created)
            keep.update(vm.pool_id for vm in ready[:size.max])
        return keep

    async def stop(self) -> None:
        """Stop refilling and recycling; pool VMs stay (journalled) for the next adaptor."""
        self._running = False
        for timer in [*self._timers.values(), *self._retry.values()]:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._retry.clear()
        work = list(self._work)
        for d in work:
            d.cancel()
        # a cancelled create still deletes what it made (or leaves it journalled): wait for that
        await DeferredList(work, consumeErrors=True)

    async def drain(self) -> None:
        """Delete every pool VM (pools turned off, or tests)."""
        await self.stop()
        for vm in list(self.vms.values()):
            await self._delete(vm)

    def _spawn(self, coro: Any) -> None:
        d: Deferred[None] = Deferred.fromCoroutine(coro)
        self._work.add(d)

        def done(result: object) -> None:
            self._work.discard(d)
            if isinstance(result, Failure) and not result.check(CancelledError):
                self._log.failure("pool work failed", result)

        d.addBoth(done)

    def alive(self, key: PoolKey) -> int:
        """The key's pool VMs booting or ready (a taken VM is its sandbox's, not the pool's)."""
        return sum(1 for vm in self.vms.values() if vm.key == key and vm.state in ("creating", "ready"))

    def target(self, key: PoolKey) -> int:
        """How many VMs the key's pool wants now: min, grown by misses, never over max (0: not configured)."""
        return self._target.get(key, 0)

    def refill(self) -> None:
        if not self._running:
            return
        for key in self.keys:
            if key in self._retry:
                continue
            for _ in range(self.target(key) - self.alive(key)):
                self._spawn(self._create(key))

    def _bootstrap_user_data(self, vm: PoolVM, name: str) -> bytes:
        assert self.tls is not None  # checked in __init__: keys are configured only with TLS
        cert, key = self.tls.server_credentials(name)
        apf = claim_format.bootstrap_apf(name, cert, key, self.tls.client_ca_pem(), vm.token,
                                         self.config.tls_min_version, self.config.tls_cipher_suites)
        files = [WriteFile(APF_PATH, apf.to_json())]
        encoded = self._initdata_for(vm.key)
        if encoded:
            files.append(WriteFile(INITDATA_PATH, encoded))
        return cloudconfig.render(files).encode()

    async def _create(self, key: PoolKey) -> None:
        pool_id = secrets.token_hex(32)  # a sandbox-id-shaped id: the provider names the VM from it
        name = self.provider.instance_name(POOL_POD_NAME, pool_id)
        vm = await self._put(PoolVM(pool_id=pool_id, key=key, token=claim_format.new_token(), name=name))
        try:
            data = self._bootstrap_user_data(vm, name)
            instance = await self.provider.create_instance(POOL_POD_NAME, pool_id, data, key.spec())
            if self._probe is not None and vm.pool_id in self.vms:
                # still `creating` (recovery deletes it) but with its id: a failed probe deletes it by id
                vm = await self._put(attrs.evolve(vm, instance_id=instance.id, name=instance.name, ips=instance.ips))
                await self._probe(vm)
        except Exception as e:
            if not self._running:  # stopped (cancelled) while creating or probing: no back-off, no retry
                self._log.info("pool {key}: stopped while creating pool VM {name}: deleting it", key=key.label(),
                               name=vm.name)
                await self._delete(vm)
                return
            delay = self._backoff.get(key, self.config.min_backoff)
            self._backoff[key] = min(delay * 2, self.config.max_backoff)
            self._log.warn("pool {key}: creating a pool VM failed ({error}); retrying in {delay:.0f}s",
                           key=key.label(), error=str(e), delay=delay)
            await self._delete(vm)
            if self._running:
                self._retry[key] = self.clock.callLater(delay, self._retry_key, key)
            return
        self._backoff.pop(key, None)
        if vm.pool_id not in self.vms:  # drained meanwhile
            await self._delete(attrs.evolve(vm, instance_id=instance.id))
            return
        vm = await self._put(attrs.evolve(vm, state="ready", instance_id=instance.id, name=instance.name,
                                    ips=instance.ips, created=self.clock.seconds()))
        self._log.info("pool {key}: VM {name} ready ({n} ready)", key=key.label(), name=vm.name,
                       n=len(self.ready(key)))
        self._peerpod_created(vm)
        self._arm_ttl(vm)

    def _peerpod_created(self, vm: PoolVM) -> None:
        if self._peerpods is not None and vm.instance_id:
            self._peerpods.pool_vm_created(vm.name, vm.instance_id, vm.key.short_hash())

    def _peerpod_released(self, vm: PoolVM) -> None:
        if self._peerpods is not None and vm.name:
            self._peerpods.pool_vm_released(vm.name)

    def _retry_key(self, key: PoolKey) -> None:
        self._retry.pop(key, None)
        self.refill()

    def _arm_ttl(self, vm: PoolVM) -> None:
        if not self._running:
            return
        left = max(0.0, vm.created + self.config.ttl - self.clock.seconds())
        self._timers[vm.pool_id] = self.clock.callLater(left, self._expire, vm.pool_id)

    def _expire(self, pool_id: str) -> None:
        self._timers.pop(pool_id, None)
        vm = self.vms.get(pool_id)
        if vm is None or vm.state != "ready":
            return
        self._log.info("pool VM {name} idle for its TTL ({ttl:.0f}s): recycling it", name=vm.name,
                       ttl=self.config.ttl)
        self._count_idle(vm)
        size = self.sizes.get(vm.key)
        if size is not None:  # an idle VM: the pool is larger than the demand
            self._target[vm.key] = max(size.min, self.target(vm.key) - 1)
        self._spawn(self._delete(vm))
        self.refill()

    def _count_idle(self, vm: PoolVM) -> None:
        POOL_IDLE_SECONDS.labels(key=vm.key.label()).inc(max(0.0, self.clock.seconds() - vm.created))

    async def _delete(self, vm: PoolVM) -> None:
        """Delete the VM's instance (by id, or found by name when its create was interrupted), then its
        journal file. A failed delete keeps the file: the next adaptor start retries."""
        self.vms.pop(vm.pool_id, None)
        iid = vm.instance_id
        try:
            if not iid and vm.name:
                found = await self.provider.find_instance(vm.name)
                iid = found.id if found is not None else ""
            if iid:
                await self.provider.delete_instance(iid)
        except Exception as e:
            self._log.error("pool VM {name}: delete failed ({error}); retried at the next start", name=vm.name,
                            error=str(e))
            self._gauge()
            return
        self._peerpod_released(vm)
        await self._forget(vm)

    # -- StartVM -----------------------------------------------------------------------------------------

    async def take(self, key: PoolKey) -> PoolVM | None:
        """A ready VM for `key`, journalled `taken` (never handed out again), or None (a miss)."""
        ready = sorted(self.ready(key), key=lambda vm: vm.created)
        if not ready or key not in self.sizes:
            POOL_MISSES.labels(key=key.label()).inc()
            size = self.sizes.get(key)
            if size is not None and self.target(key) < size.max:  # demand above the pool: grow it by one
                self._target[key] = self.target(key) + 1
                self._log.info("pool {key}: a miss; growing the pool to {n} VMs (max {max})", key=key.label(),
                               n=self._target[key], max=size.max)
                self.refill()
            return None
        vm = ready[0]
        timer = self._timers.pop(vm.pool_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._count_idle(vm)
        vm = await self._put(attrs.evolve(vm, state="taken"))
        POOL_HITS.labels(key=key.label()).inc()
        self.refill()
        return vm

    async def handed_over(self, vm: PoolVM) -> None:
        """The sandbox journals the VM now (it deletes it at StopVM or rollback, and creates the pod's own
        PeerPod for it): drop it from the pool, and its pool PeerPod."""
        self._peerpod_released(vm)
        await self._forget(vm)

    def discard(self, vm: PoolVM) -> None:
        """A taken VM that could not be claimed: delete it (in the background)."""
        self._spawn(self._delete(vm))


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
