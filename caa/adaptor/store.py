"""The sandbox journal and the pod directories: <pods-dir>/<sid>/{sandbox.json, apf.json, user-data, agent.ttrpc}.

The one module that reads or writes files in a pod directory, and the one home of sandbox.json's format
(`record_to_json` / `record_from_json`). The format is the one earlier versions wrote, key for key, so a
journal left by an older adaptor is re-adopted after an upgrade.

The file work runs through a *runner* (`threadpool_runner` in the daemon: off the reactor thread, so an fsync
under disk contention never stalls other sandboxes; `run_inline` in unit tests). Calls for one sandbox are
queued and run one at a time in call order, so a StartVM's intent record is durable before its side effect
starts (the service awaits the write) and a later write never overtakes an earlier one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from caa.adaptor.interfaces import SOCKET_NAME, ISandboxStore, SandboxRecord
from caa.adaptor.states import SandboxState
from caa.network.interfaces import PodNetworkConfig
from caa.providers.interfaces import InstanceSpec

T = TypeVar("T")

RECORD_NAME = "sandbox.json"
USER_DATA_NAME = "user-data"
APF_NAME = "apf.json"

# Threads of the daemon's journal pool: concurrent fsyncs of different sandboxes share the filesystem's journal
# commits, so a burst of StartVMs costs a few commit intervals instead of one fsync per write in a row.
JOURNAL_THREADS = 16


class Runner(Protocol):
    """Runs a blocking function somewhere (a thread pool, or inline) and fires with its result."""

    def __call__(self, f: Callable[[], T], /) -> Deferred[T]: ...


def run_inline(f: Callable[[], T]) -> Deferred[T]:
    """Run f now, on the calling thread (unit tests, the caactl command)."""
    try:
        return succeed(f())
    except BaseException:
        return fail(Failure())


def threadpool_runner(reactor: IReactorFromThreads, pool: ThreadPool) -> Runner:
    """Run each function in pool and fire on the reactor thread."""

    def run(f: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(reactor, pool, f)

    return run


# -- sandbox.json ------------------------------------------------------------------------------------------

_SPEC_KEYS = ("instance_type", "vcpus", "memory_mib", "gpus", "image", "multi_nic", "volumes", "arch")


def record_to_json(record: SandboxRecord) -> dict[str, Any]:
    """sandbox.json of record: the keys earlier versions wrote, plus "peerpod" only when the sandbox has one
    (in a cluster), so a record outside a cluster is byte for byte what earlier versions wrote."""
    spec = record.spec
    doc: dict[str, Any] = {
        "sandbox_id": record.sandbox_id, "pod_name": record.pod_name, "pod_namespace": record.pod_namespace,
        "netns": record.netns, "socket_path": record.socket_path, "server_name": record.server_name,
        "state": record.state.value, "created": record.created, "updated": record.updated,
        "annotations": dict(record.annotations),
        "spec": {"instance_type": spec.instance_type, "vcpus": spec.vcpus, "memory_mib": spec.memory_mib,
                 "gpus": spec.gpus, "image": spec.image, "multi_nic": spec.multi_nic,
                 "volumes": list(spec.volumes), "arch": spec.arch},
        "pod_network": None if record.pod_network is None else record.pod_network.to_json(),
        "vni": record.vni, "instance_id": record.instance_id, "instance_name": record.instance_name,
        "ips": list(record.ips), "error": record.error,
    }
    if record.peerpod:
        doc["peerpod"] = record.peerpod
    return doc


def record_from_json(d: Mapping[str, Any]) -> SandboxRecord:
    """The record in a sandbox.json document; raises KeyError, ValueError or TypeError when it is not one.
    Unknown keys are ignored ("vni" is derived from pod_network)."""
    spec = d.get("spec") or {}
    net = d.get("pod_network")
    return SandboxRecord(
        sandbox_id=d["sandbox_id"], pod_name=d["pod_name"], pod_namespace=d["pod_namespace"], netns=d["netns"],
        socket_path=d["socket_path"], server_name=d["server_name"], state=SandboxState(d["state"]),
        created=d["created"], updated=d.get("updated", 0.0), annotations=dict(d.get("annotations") or {}),
        spec=InstanceSpec(**{k: v for k, v in spec.items() if k in _SPEC_KEYS}),
        pod_network=PodNetworkConfig.from_json(net) if net else None,
        instance_id=d.get("instance_id", ""), instance_name=d.get("instance_name", ""),
        ips=tuple(d.get("ips") or ()), error=d.get("error", ""), peerpod=d.get("peerpod", ""))


def load_records(pods_dir: str) -> list[SandboxRecord]:
    """Every readable record under pods_dir, oldest first (blocking; `SandboxStore.load_all` runs it off the
    reactor). Unreadable records are logged and skipped."""
    out: list[SandboxRecord] = []
    try:
        names = os.listdir(pods_dir)
    except FileNotFoundError:
        return out
    for name in names:
        path = os.path.join(pods_dir, name, RECORD_NAME)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as f:
                out.append(record_from_json(json.loads(f.read())))
        except (OSError, ValueError, KeyError, TypeError) as e:
            SandboxStore._log.warn("journal: skipping unreadable record {path}: {error}", path=path, error=str(e))
    out.sort(key=lambda r: (r.created, r.sandbox_id))
    return out


# -- files -------------------------------------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600, sync_dir: bool = True) -> None:
    """Write data to path: tmp file (mode), fsync, rename over path, fsync the directory (unless the caller
    syncs it once after several files)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        _fsync_dir(os.path.dirname(path) or ".")


def _record_bytes(record: SandboxRecord) -> bytes:
    return json.dumps(record_to_json(record), indent=1, sort_keys=True).encode()


@implementer(ISandboxStore)
class SandboxStore:
    """ISandboxStore on a local directory (the pods dir). Pod dirs 0700, files 0600.

    run: where the file work runs (default: inline, on the caller's thread; the daemon passes
    `threadpool_runner(reactor, pool)`).
    """

    _log = Logger()

    def __init__(self, pods_dir: str, run: Runner = run_inline) -> None:
        self.pods_dir = pods_dir
        self._run = run
        self._queues: dict[str, DeferredLock] = {}
        os.makedirs(pods_dir, mode=0o700, exist_ok=True)

    def pod_dir(self, sandbox_id: str) -> str:
        if not sandbox_id or "/" in sandbox_id or "\0" in sandbox_id or sandbox_id in (".", ".."):
            raise ValueError(f"invalid sandbox id {sandbox_id!r}")
        return os.path.join(self.pods_dir, sandbox_id)

    def socket_path(self, sandbox_id: str) -> str:
        return os.path.join(self.pod_dir(sandbox_id), SOCKET_NAME)

    # -- ordering: one queue per sandbox ----------------------------------------------------------------

    def _serial(self, sandbox_id: str, f: Callable[[], T]) -> Deferred[T]:
        """Run f through the runner after every earlier call for sandbox_id; the caller gets its own Deferred,
        so cancelling it leaves the queued work alone."""
        queue = self._queues.get(sandbox_id)
        if queue is None:
            queue = self._queues[sandbox_id] = DeferredLock()
        done: Deferred[T] = queue.run(self._run, f)

        def cleanup(result: object) -> object:
            if not queue.locked and not queue.waiting and self._queues.get(sandbox_id) is queue:
                del self._queues[sandbox_id]
            return result

        done.addBoth(cleanup)
        mine: Deferred[T] = Deferred()
        done.chainDeferred(mine)
        return mine

    # -- ISandboxStore ----------------------------------------------------------------------------------

    def create(self, record: SandboxRecord, apf_json: bytes, user_data: bytes) -> Deferred[None]:
        d = self.pod_dir(record.sandbox_id)

        def work() -> None:
            self._mkdir(d)
            write_atomic(os.path.join(d, APF_NAME), apf_json, sync_dir=False)
            write_atomic(os.path.join(d, USER_DATA_NAME), user_data, sync_dir=False)
            # the record last: it commits the sandbox
            write_atomic(os.path.join(d, RECORD_NAME), _record_bytes(record))

        return self._serial(record.sandbox_id, work)

    @staticmethod
    def _mkdir(d: str) -> None:
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)

    def put(self, record: SandboxRecord) -> Deferred[None]:
        d = self.pod_dir(record.sandbox_id)

        def work() -> None:
            # serialised here, off the reactor thread (the JSON encoder with indent is pure Python); the record is
            # a frozen value, so what is written is what was put
            self._mkdir(d)
            write_atomic(os.path.join(d, RECORD_NAME), _record_bytes(record))

        return self._serial(record.sandbox_id, work)

    def get(self, sandbox_id: str) -> Deferred[SandboxRecord | None]:
        try:
            path = os.path.join(self.pod_dir(sandbox_id), RECORD_NAME)
        except ValueError:
            return succeed(None)

        def work() -> SandboxRecord | None:
            try:
                with open(path, "rb") as f:
                    return record_from_json(json.loads(f.read()))
            except FileNotFoundError:
                return None

        return self._serial(sandbox_id, work)

    def read_user_data(self, sandbox_id: str) -> Deferred[bytes]:
        path = os.path.join(self.pod_dir(sandbox_id), USER_DATA_NAME)

        def work() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return self._serial(sandbox_id, work)

    def remove(self, sandbox_id: str) -> Deferred[None]:
        d = self.pod_dir(sandbox_id)

        def work() -> None:
            # Remove the record first (atomic: the sandbox is gone), then the rest of the directory.
            try:
                os.unlink(os.path.join(d, RECORD_NAME))
                _fsync_dir(d)
            except FileNotFoundError:
                pass
            shutil.rmtree(d, ignore_errors=True)

        return self._serial(sandbox_id, work)

    def load_all(self) -> Deferred[list[SandboxRecord]]:
        return self._run(lambda: load_records(self.pods_dir))

    def remove_strays(self) -> Deferred[list[str]]:
        def work() -> list[str]:
            removed: list[str] = []
            try:
                names = sorted(os.listdir(self.pods_dir))
            except FileNotFoundError:
                return removed
            for name in names:
                d = os.path.join(self.pods_dir, name)
                if os.path.isdir(d) and not os.path.exists(os.path.join(d, RECORD_NAME)):
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(name)
            return removed

        return self._run(work)
