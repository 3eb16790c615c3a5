"""`caa-forwarder --provision-user-data`: the user data's files, the `provisioned` marker, then the forwarder.

One Python start in the pod VM instead of two (caa-process-user-data, then the forwarder). The order of
effects is upstream's: the /run/peerpod files exist before kata-agent starts and before the forwarder reads
apf.json. The init learns that the files are there from the empty file `provisioned`, written last and
atomically, and starts kata-agent then, in parallel with the forwarder's pod network and listener (the
forwarder's agent link keeps dialling until the agent listens). A provisioning failure is logged and ends the
process through `on_fatal`; nothing is marked provisioned then.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from caa.forwarder.initdata import write_file
from caa.forwarder.userdata import UserDataError
from caa.notifier import Notifier
from caa.podvm_api.cloudconfig import PEERPOD_DIR

__all__ = ["PROVISIONED", "PROVISIONED_PATH", "StartError", "ProvisioningService"]

#: The marker's name in the output directory, and its path in the pod VM (the init waits for it).
PROVISIONED = "provisioned"
PROVISIONED_PATH = f"{PEERPOD_DIR}/{PROVISIONED}"


class StartError(Exception):
    """Provisioning, or building the forwarder after it, failed; the message is the one line printed before the
    process ends."""


class ProvisioningService(MultiService):
    """Runs `provision()` when started, writes `<output_dir>/provisioned`, then starts `build()`'s service as
    its child. `build` raises StartError for what it refuses (a bad apf.json).

    Nothing of the forwarder itself (caa.forwarder.daemon: ttrpc, protobuf, the TLS and network modules) is
    imported before the marker is written, so kata-agent starts while this process still imports them."""

    _log = Logger()

    def __init__(
        self,
        provision: Callable[[], Deferred[list[str]]],
        output_dir: str,
        build: Callable[[], IService],
        on_fatal: Callable[[str], None],
        clock: IReactorTime,
    ) -> None:
        super().__init__()
        self._provision = provision
        self.marker = Path(output_dir, PROVISIONED)
        self._build = build
        self._on_fatal = on_fatal
        self._clock = clock
        self.child: IService | None = None
        self._started: Notifier[IService] = Notifier()
        self._starting: Deferred[None] | None = None
        self._failure: Failure | None = None

    def startService(self) -> None:
        super().startService()
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._fatal)

    async def _start(self) -> None:
        began = self._clock.seconds()
        try:
            written = await self._provision()
        except UserDataError as e:
            raise StartError(f"provisioning the user data failed: {e}") from None
        except OSError as e:
            raise StartError(f"provisioning the user data failed: cannot write {e.filename}: {e.strerror}") from None
        try:
            write_file(self.marker, b"")
        except OSError as e:
            raise StartError(f"cannot write {self.marker}: {e.strerror}") from None
        self._log.info("provisioned {files} in {elapsed:.3f}s; wrote {marker}", files=",".join(written),
                       elapsed=self._clock.seconds() - began, marker=str(self.marker))
        child = self._build()
        self.child = child
        child.setServiceParent(self)  # starts it: this parent is running
        self._started.notify(child)

    def when_started(self) -> Deferred[IService]:
        """Fires with the child service once it is started, or fails with the start-up failure."""
        if self._failure is not None:
            return fail(self._failure)
        return succeed(self.child) if self.child is not None else self._started.wait()

    def _fatal(self, f: Failure) -> None:
        if f.check(CancelledError) and not self.running:
            return  # stopped while provisioning
        expected = f.check(StartError) is not None
        message = f.getErrorMessage() if expected else f"forwarder start failed: {f.getErrorMessage()}"
        if not expected:
            self._log.failure("forwarder start failed", f)
        self._log.critical("{message}", message=message)
        self._failure = f
        self._started.fail(f)
        self._on_fatal(message)

    def stopService(self) -> Deferred[Any]:
        stopped: Deferred[Any] = super().stopService()  # not running any more: a cancelled start is no failure
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        return stopped
