"""VNI allocation: lowest free VNI from ``--vxlan-min-id``, persisted, reconciled at start.

Upstream counts (min-id + a per-process index), so after a restart it hands out VNIs that
surviving tunnels still use. Here every allocation is persisted through an :class:`IVniStore`
before it is returned, and :meth:`VniAllocator.reconcile` adds whatever the node really has.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping

from twisted.logger import Logger
from zope.interface import implementer

from caa.network.interfaces import (
    VXLAN_MAX_ID,
    VXLAN_MIN_ID,
    ConfigError,
    IVniAllocator,
    IVniStore,
    VniExhaustedError,
)


@implementer(IVniStore)
class JsonFileVniStore:
    """A JSON file ``{"<vni>": "<owner>", ...}``, written atomically (temp file + rename, 0600)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> Mapping[int, str]:
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ConfigError(f"VNI state file {self.path} is unreadable: {e}") from e
        return {int(k): str(v) for k, v in raw.items()}

    def save(self, allocation: Mapping[int, str]) -> None:
        tmp = f"{self.path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({str(k): v for k, v in sorted(allocation.items())}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


@implementer(IVniStore)
class CallableVniStore:
    """Adapts a ``load()``/``save(mapping)`` pair (e.g. the adaptor's journal) to :class:`IVniStore`."""

    def __init__(self, load: Callable[[], Mapping[int, str]], save: Callable[[Mapping[int, str]], None]) -> None:
        self._load = load
        self._save = save

    def load(self) -> Mapping[int, str]:
        return self._load()

    def save(self, allocation: Mapping[int, str]) -> None:
        self._save(allocation)


@implementer(IVniStore)
class MemoryVniStore:
    """In-memory store (tests, and callers that persist VNIs elsewhere)."""

    def __init__(self, initial: Mapping[int, str] | None = None) -> None:
        self.data: dict[int, str] = dict(initial or {})
        self.saves = 0

    def load(self) -> Mapping[int, str]:
        return dict(self.data)

    def save(self, allocation: Mapping[int, str]) -> None:
        self.data = dict(allocation)
        self.saves += 1


@implementer(IVniAllocator)
class VniAllocator:
    """Thread-safe allocator over [min_id, max_id]; see :class:`IVniAllocator`."""

    _log = Logger()

    def __init__(self, store: IVniStore, min_id: int = VXLAN_MIN_ID, max_id: int = VXLAN_MAX_ID) -> None:
        if not 1 <= min_id <= max_id <= VXLAN_MAX_ID:
            raise ConfigError(f"invalid VNI range {min_id}..{max_id} (VNIs are 1..{VXLAN_MAX_ID})")
        self.min_id = min_id
        self.max_id = max_id
        self._store = store
        self._lock = threading.Lock()
        self._alloc: dict[int, str] = dict(store.load())

    def allocate(self, owner: str) -> int:
        with self._lock:
            vni = self.min_id
            while vni in self._alloc:
                vni += 1
            if vni > self.max_id:
                raise VniExhaustedError(f"no free VNI in {self.min_id}..{self.max_id}")
            new = dict(self._alloc)
            new[vni] = owner
            self._store.save(new)
            self._alloc = new
        self._log.debug("allocated VNI {vni} to {owner}", vni=vni, owner=owner)
        return vni

    def release(self, vni: int) -> None:
        with self._lock:
            if vni not in self._alloc:
                return
            new = dict(self._alloc)
            del new[vni]
            self._store.save(new)
            self._alloc = new

    def reconcile(self, present: Iterable[int]) -> None:
        with self._lock:
            extra = {v for v in present if v not in self._alloc}
            if not extra:
                return
            new = dict(self._alloc)
            for v in extra:
                new[v] = ""
            self._store.save(new)
            self._alloc = new
        self._log.info("VNIs in use on the node but not recorded: {vnis}", vnis=sorted(extra))

    def allocated(self) -> Mapping[int, str]:
        with self._lock:
            return dict(self._alloc)
