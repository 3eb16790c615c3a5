"""The sandbox journal: one JSON record per sandbox at <pods-dir>/<sid>/sandbox.json, written atomically."""

from __future__ import annotations

import json
import os
import shutil

from twisted.logger import Logger
from zope.interface import implementer

from caa.adaptor.interfaces import ISandboxStore, SandboxRecord

RECORD_NAME = "sandbox.json"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write data to path: tmp file (mode), fsync, rename over path, fsync the directory."""
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
    _fsync_dir(os.path.dirname(path) or ".")


@implementer(ISandboxStore)
class SandboxStore:
    """ISandboxStore on a local directory (the pods dir). Pod dirs 0700, files 0600."""

    _log = Logger()

    def __init__(self, pods_dir: str) -> None:
        self.pods_dir = pods_dir
        os.makedirs(pods_dir, mode=0o700, exist_ok=True)

    def pod_dir(self, sandbox_id: str) -> str:
        if not sandbox_id or "/" in sandbox_id or sandbox_id in (".", ".."):
            raise ValueError(f"invalid sandbox id {sandbox_id!r}")
        return os.path.join(self.pods_dir, sandbox_id)

    def create_dir(self, sandbox_id: str) -> str:
        d = self.pod_dir(sandbox_id)
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
        return d

    def put(self, record: SandboxRecord) -> None:
        d = self.create_dir(record.sandbox_id)
        data = json.dumps(record.to_json(), indent=1, sort_keys=True).encode()
        write_atomic(os.path.join(d, RECORD_NAME), data)

    def get(self, sandbox_id: str) -> SandboxRecord | None:
        try:
            path = os.path.join(self.pod_dir(sandbox_id), RECORD_NAME)
        except ValueError:
            return None
        try:
            with open(path, "rb") as f:
                return SandboxRecord.from_json(json.loads(f.read()))
        except FileNotFoundError:
            return None

    def remove(self, sandbox_id: str) -> None:
        d = self.pod_dir(sandbox_id)
        # Remove the record first (atomic: the sandbox is gone), then the rest of the directory.
        try:
            os.unlink(os.path.join(d, RECORD_NAME))
            _fsync_dir(d)
        except FileNotFoundError:
            pass
        shutil.rmtree(d, ignore_errors=True)

    def load_all(self) -> list[SandboxRecord]:
        out: list[SandboxRecord] = []
        try:
            names = os.listdir(self.pods_dir)
        except FileNotFoundError:
            return out
        for name in names:
            path = os.path.join(self.pods_dir, name, RECORD_NAME)
            if not os.path.isfile(path):
                continue
            try:
                with open(path, "rb") as f:
                    out.append(SandboxRecord.from_json(json.loads(f.read())))
            except (OSError, ValueError, KeyError, TypeError) as e:
                self._log.warn("journal: skipping unreadable record {path}: {error}", path=path, error=str(e))
        out.sort(key=lambda r: (r.created, r.sandbox_id))
        return out

    def remove_strays(self) -> list[str]:
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
