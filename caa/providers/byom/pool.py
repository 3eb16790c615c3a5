"""
The cluster-wide BYOM IP pool (spec-providers §9.2): which pre-created VM serves which pod, kept in the ConfigMap
`<namespace>/byom-ip-pool-state` under the key `allocation-state`, as upstream's indented JSON::

    {"allocatedIPs": {"<pod>-<sandbox id>": {"allocationID": ..., "ip": ..., "nodeName": ..., "podName": ...,
                                             "podNamespace": ..., "allocatedAt": "<RFC 3339>"}},
     "availableIPs": ["10.0.0.6", ...], "lastUpdated": "<RFC 3339>", "version": 7}

Every change is a read-modify-write **inside** the conflict-retry loop: read the ConfigMap, compute the new state
from what was read, write it back guarded by the read's resourceVersion (a create when it did not exist), and on
409 start over from a fresh read. Upstream computes the new state once before its loop and re-reads only for the
resourceVersion, so two adaptors can hand out one IP (§16.2 #18); here the loser of a race recomputes from the
winner's state. Allocation picks `MD5(allocationID)[:4]` (big-endian) modulo the number of free IPs, so adaptors
allocating at once mostly pick different IPs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from attrs import evolve, field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from caa.k8s.client import KubeClient
from caa.k8s.errors import Conflict, KubeError, NotFound
from caa.providers.interfaces import InvalidConfig, QuotaExceeded, TransientError

STATE_KEY = "allocation-state"
LABELS = {"app.kubernetes.io/name": "cloud-api-adaptor", "app.kubernetes.io/component": "byom-ip-pool-state"}

T = TypeVar("T")


def rfc3339(seconds: float) -> str:
    """Go's metav1.Time JSON form: UTC, whole seconds."""
    return datetime.datetime.fromtimestamp(int(seconds), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@frozen
class Allocation:
    allocation_id: str
    ip: str
    node_name: str
    pod_name: str
    allocated_at: str
    pod_namespace: str = ""

    def to_json(self) -> dict[str, str]:
        return {"allocationID": self.allocation_id, "ip": self.ip, "nodeName": self.node_name,
                "podName": self.pod_name, "podNamespace": self.pod_namespace, "allocatedAt": self.allocated_at}

    @classmethod
    def from_json(cls, key: str, value: Mapping[str, Any]) -> Allocation:
        return cls(str(value.get("allocationID") or key), str(value.get("ip") or ""),
                   str(value.get("nodeName") or ""), str(value.get("podName") or ""),
                   str(value.get("allocatedAt") or ""), str(value.get("podNamespace") or ""))


def _allocations(values: Mapping[str, Allocation]) -> Mapping[str, Allocation]:
    return dict(values)


def _ips(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@frozen
class PoolState:
    allocated: Mapping[str, Allocation] = field(factory=dict, converter=_allocations)
    available: tuple[str, ...] = field(default=(), converter=_ips)
    last_updated: str = ""
    version: int = 0

    @classmethod
    def fresh(cls, pool: Sequence[str]) -> PoolState:
        return cls({}, tuple(pool))

    def encode(self) -> str:
        """Upstream's layout (Go's MarshalIndent with two spaces: struct order, map keys sorted)."""
        doc = {
            "allocatedIPs": {key: self.allocated[key].to_json() for key in sorted(self.allocated)},
            "availableIPs": list(self.available),
            "lastUpdated": self.last_updated,
            "version": self.version,
        }
        return json.dumps(doc, indent=2)

    @classmethod
    def decode(cls, text: str) -> PoolState:
        """ValueError when the text is not the layout above."""
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("the pool state is not a JSON object")
        allocated = doc.get("allocatedIPs") or {}
        available = doc.get("availableIPs") or []
        if not isinstance(allocated, dict) or not isinstance(available, list):
            raise ValueError("allocatedIPs must be an object and availableIPs a list")
        return cls({str(k): Allocation.from_json(str(k), v) for k, v in allocated.items() if isinstance(v, dict)},
                   tuple(str(ip) for ip in available), str(doc.get("lastUpdated") or ""),
                   int(doc.get("version") or 0))

    def ip_of(self, allocation_id: str) -> str | None:
        allocation = self.allocated.get(allocation_id)
        return allocation.ip if allocation else None

    def holder_of(self, ip: str) -> Allocation | None:
        return next((a for a in self.allocated.values() if a.ip == ip), None)


def select_index(available: Sequence[str], allocation_id: str) -> int:
    """Upstream's spread: the first four bytes of MD5(allocationID), big-endian, modulo the free count."""
    if len(available) <= 1:
        return 0
    digest = hashlib.md5(allocation_id.encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:4], "big") % len(available)


ReadyCheck = Callable[[str], Awaitable[None]]


class IPPool:
    """The pool of `pool_ips` shared through one ConfigMap; see the module docstring."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, kube: KubeClient, namespace: str, name: str, pool_ips: Sequence[str],
                 node_name: str, ready: ReadyCheck, timeout: float = 30.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.clock = clock
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.pool_ips = tuple(pool_ips)
        self.node_name = node_name
        self.ready = ready
        self.timeout = timeout
        self._rand = rand
        self.conflicts = 0  # writes refused for a stale resourceVersion (each one re-read and recomputed)

    async def read(self) -> PoolState | None:
        """The stored state, None when there is none yet."""
        state, _ = await self._read()
        return state

    async def allocate(self, allocation_id: str, pod_name: str) -> str:
        """The IP reserved for `allocation_id` (the same one when it holds one already). QuotaExceeded when no IP
        is free; TransientError when the chosen VM does not answer on its SSH port (nothing reserved)."""

        async def change(state: PoolState) -> tuple[PoolState | None, str]:
            held = state.ip_of(allocation_id)
            if held is not None:
                return None, held
            if not state.available:
                raise QuotaExceeded("no available IPs in pool")
            ip = state.available[select_index(state.available, allocation_id)]
            await self.ready(ip)
            now = rfc3339(self.clock.seconds())
            allocation = Allocation(allocation_id, ip, self.node_name, pod_name, now)
            return evolve(state, allocated={**state.allocated, allocation_id: allocation},
                          available=tuple(a for a in state.available if a != ip), last_updated=now,
                          version=state.version + 1), ip

        ip = await self._update(change, f"allocate an IP for {allocation_id}")
        self._log.info("byom: {ip} allocated to {allocation_id} on {node}", ip=ip, allocation_id=allocation_id,
                       node=self.node_name)
        return ip

    async def release(self, allocation_id: str) -> str | None:
        """Return the IP of `allocation_id` to the pool; None (and no write) when it holds none."""

        async def change(state: PoolState) -> tuple[PoolState | None, str | None]:
            allocation = state.allocated.get(allocation_id)
            if allocation is None:
                return None, None
            allocated = {k: v for k, v in state.allocated.items() if k != allocation_id}
            available = state.available
            if allocation.ip in self.pool_ips and allocation.ip not in available:
                available = (*available, allocation.ip)
            now = rfc3339(self.clock.seconds())
            return evolve(state, allocated=allocated, available=available, last_updated=now,
                          version=state.version + 1), allocation.ip

        ip = await self._update(change, f"release the IP of {allocation_id}")
        if ip is not None:
            self._log.info("byom: {ip} released by {allocation_id}", ip=ip, allocation_id=allocation_id)
        return ip

    async def recover(self) -> PoolState:
        """At start: keep every allocation (their cleanup is peerpod-ctrl's job) and make the free list the
        configured pool minus the allocated IPs (an IP removed from the configuration disappears, a new one
        becomes free)."""

        async def change(state: PoolState) -> tuple[PoolState | None, PoolState]:
            taken = {a.ip for a in state.allocated.values()}
            available = tuple(ip for ip in self.pool_ips if ip not in taken)
            if available == state.available and state.last_updated:
                return None, state
            new = evolve(state, available=available, last_updated=rfc3339(self.clock.seconds()),
                         version=state.version + 1)
            return new, new

        state = await self._update(change, "recover the pool state")
        self._log.info("byom: pool {namespace}/{name}: {allocated} allocated, {free} free",
                       namespace=self.namespace, name=self.name, allocated=len(state.allocated),
                       free=len(state.available))
        return state

    # -- the read-modify-write loop -------------------------------------------------------------------------
    async def _read(self) -> tuple[PoolState | None, dict[str, Any] | None]:
        try:
            cm = await self.kube.get_config_map(self.namespace, self.name)
        except NotFound:
            return None, None
        except KubeError as e:
            raise TransientError(f"byom: reading ConfigMap {self.namespace}/{self.name}: {e}") from None
        text = (cm.get("data") or {}).get(STATE_KEY)
        if not text:
            return None, cm
        try:
            return PoolState.decode(text), cm
        except (ValueError, TypeError) as e:
            raise InvalidConfig(f"byom: ConfigMap {self.namespace}/{self.name} key {STATE_KEY}: {e}") from None

    async def _update(self, change: Callable[[PoolState], Awaitable[tuple[PoolState | None, T]]], what: str) -> T:
        end = self.clock.seconds() + self.timeout
        attempt = 0
        while True:
            state, cm = await self._read()
            new, result = await change(state if state is not None else PoolState.fresh(self.pool_ips))
            if new is None:
                return result
            try:
                await self._write(new, cm)
                return result
            except Conflict:
                attempt += 1
                self.conflicts += 1
                delay = self._rand() * min(0.5, 0.01 * 2 ** min(attempt, 6))
                if self.clock.seconds() + delay > end:
                    raise TransientError(f"byom: could not {what}: the pool state kept changing for "
                                         f"{self.timeout:g}s") from None
                self._log.debug("byom: {what}: ConfigMap changed meanwhile, retry {attempt}", what=what,
                                attempt=attempt)
                await deferLater(self.clock, delay, lambda: None)
            except KubeError as e:
                raise TransientError(f"byom: could not {what}: {e}") from None

    async def _write(self, state: PoolState, cm: dict[str, Any] | None) -> None:
        """Create the ConfigMap, or replace the one read (its resourceVersion guards the write: Conflict)."""
        core = self.kube.core
        if cm is None:
            body = {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": self.name, "namespace": self.namespace, "labels": dict(LABELS)},
                    "data": {STATE_KEY: state.encode()}}
            await self.kube.call(core.create_namespaced_config_map, self.namespace, body)
            return
        metadata = dict(cm.get("metadata") or {})
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata,
                "data": {**(cm.get("data") or {}), STATE_KEY: state.encode()}}
        await self.kube.call(core.replace_namespaced_config_map, self.name, self.namespace, body)
