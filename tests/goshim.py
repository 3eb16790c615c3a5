"""Run the Go reference ttrpc peer (tests/go/ttrpcpeer) from Python: build it, act as the Kata shim, serve echo.

The peer is github.com/containerd/ttrpc itself, so a test that passes against it passes against the real shim
and the real forwarder on the wire. Every mode prints one JSON object (see tests/go/README.md).

Two ways to run a mode:
- `run_peer(*args)`: blocking (subprocess.run); for scripts, benchmarks and threads.
- the `async` helpers (`hv_create`, `hv_start`, ..., `call_peer`): spawn through the given reactor, so a test
  can serve caa's own ttrpc server in the same reactor while the Go client talks to it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from caa.reactors import INodeReactor

GO_DIR = Path(__file__).resolve().parent / "go"
SOURCE_DIR = GO_DIR / "ttrpcpeer"
BIN_DIR = GO_DIR / "bin"
BINARY = BIN_DIR / "ttrpcpeer"
ECHO_SERVICE = "caa.test.Echo"

Result = dict[str, Any]


class GoPeerUnavailable(RuntimeError):
    """go or the Debian Go packages (golang-github-containerd-ttrpc-dev) are missing."""


def go_available() -> bool:
    return shutil.which("go") is not None and Path("/usr/share/gocode/src/github.com/containerd/ttrpc").is_dir()


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(GO111MODULE="off", GOPATH="/usr/share/gocode", GOPROXY="off", GOFLAGS="", CGO_ENABLED="0")
    if not any(env.get(k) for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(BIN_DIR / ".gocache")
    return env


def _newest_source() -> float:
    return max(p.stat().st_mtime for p in SOURCE_DIR.rglob("*.go"))


def _fresh() -> bool:
    return BINARY.exists() and BINARY.stat().st_mtime >= _newest_source()


def build_go_peer() -> str:
    """Build tests/go/bin/ttrpcpeer once (again only when a source file is newer); return its path.

    Safe across processes (trial -j2 workers): the build runs under an exclusive lock on tests/go/bin/.lock
    and the binary is renamed into place, so nobody ever executes a half-written file."""
    if _fresh():
        return str(BINARY)
    if not go_available():
        raise GoPeerUnavailable("go and golang-github-containerd-ttrpc-dev are needed (scripts/setup.sh)")
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    with open(BIN_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _fresh():
                return str(BINARY)
            fd, tmp = tempfile.mkstemp(prefix=".ttrpcpeer-", dir=BIN_DIR)
            os.close(fd)
            try:
                proc = subprocess.run(
                    ["go", "build", "-o", tmp, "."], cwd=SOURCE_DIR, env=_build_env(),
                    capture_output=True, text=True, timeout=300,
                )
                if proc.returncode != 0:
                    raise GoPeerUnavailable(f"go build failed:\n{proc.stdout}{proc.stderr}")
                os.chmod(tmp, 0o755)
                os.replace(tmp, BINARY)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(BINARY)


def _parse(stdout: str, returncode: int | None, stderr: str = "") -> Result:
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return {"ok": False, "code": -1, "message": f"no output (exit {returncode}): {stderr.strip()}"}
    result: Result = json.loads(lines[-1])
    return result


def run_peer(*args: str, timeout: float = 120) -> Result:
    """Run one peer mode and return its JSON result (blocking)."""
    proc = subprocess.run([build_go_peer(), *args], capture_output=True, text=True, timeout=timeout)
    return _parse(proc.stdout, proc.returncode, proc.stderr)


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.done: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        if reason.check(ProcessDone, ProcessTerminated):
            self.done.callback(getattr(reason.value, "exitCode", None))
        else:
            self.done.errback(reason)


async def call_peer(reactor: INodeReactor, *args: str, timeout: float = 120) -> Result:
    """Run one peer mode through `reactor` (IReactorProcess + IReactorTime); the process is killed at `timeout`."""
    exe = build_go_peer()
    proto = _Collect()
    process = IReactorProcess(reactor).spawnProcess(proto, exe, [exe, *args], env=dict(os.environ))

    def kill() -> None:
        try:
            process.signalProcess("KILL")
        except Exception:  # already gone
            pass

    timer = IReactorTime(reactor).callLater(timeout, kill)
    try:
        code = await proto.done
    finally:
        if timer.active():
            timer.cancel()
    return _parse(proto.out.decode(), code, proto.err.decode())


# ---- the Kata shim's calls (one fresh connection each, like kata's remote.go)

async def hv_create(
    reactor: INodeReactor, sock: str, sandbox_id: str, netns: str, annotations: Mapping[str, str] | None = None
) -> Result:
    """CreateVM; result has `agentSocketPath` when ok."""
    kvs = [f"{k}={v}" for k, v in (annotations or {}).items()]
    return await call_peer(reactor, "hv-create", sock, sandbox_id, netns, *kvs)


async def hv_start(reactor: INodeReactor, sock: str, sandbox_id: str, timeout: float | None = None) -> Result:
    """StartVM with the deadline the shim would send (`timeout` seconds; None = no deadline)."""
    extra = [_seconds(timeout)] if timeout is not None else []
    return await call_peer(reactor, "hv-start", sock, sandbox_id, *extra, timeout=(timeout or 600) + 30)


async def hv_stop(reactor: INodeReactor, sock: str, sandbox_id: str, timeout: float | None = None) -> Result:
    extra = [_seconds(timeout)] if timeout is not None else []
    return await call_peer(reactor, "hv-stop", sock, sandbox_id, *extra, timeout=(timeout or 600) + 30)


async def hv_version(reactor: INodeReactor, sock: str, version: str = "") -> Result:
    """Version; result has `version` when ok."""
    return await call_peer(reactor, "hv-version", sock, *([version] if version else []))


async def pod_info(
    reactor: INodeReactor, sock: str, pod: str, namespace: str, wait: bool = False, timeout: float | None = None
) -> Result:
    """podvminfo.PodVMInfo/GetInfo; result has `VMID` when ok."""
    extra = ["wait" if wait else "false"] + ([_seconds(timeout)] if timeout is not None else [])
    return await call_peer(reactor, "info", sock, pod, namespace, *extra, timeout=(timeout or 600) + 30)


async def raw_call(
    reactor: INodeReactor, sock: str, service: str, method: str, payload: bytes = b"", timeout: float | None = None
) -> Result:
    """Any unary call with a serialized payload; result has `payload` (hex) when ok."""
    extra = [_seconds(timeout)] if timeout is not None else []
    return await call_peer(reactor, "raw-call", sock, service, method, payload.hex(), *extra,
                           timeout=(timeout or 600) + 30)


def _seconds(value: float) -> str:
    return f"{value:.6f}"


# ---- the Go echo server (caa.test.Echo)

class _ServerProtocol(ProcessProtocol):
    def __init__(self) -> None:
        self.lines: list[Result] = []
        self._buf = b""
        self.listening: Deferred[Result] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.stderr = bytearray()

    def outReceived(self, data: bytes) -> None:
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            if not line.strip():
                continue
            event: Result = json.loads(line)
            self.lines.append(event)
            if event.get("event") == "listening" and not self.listening.called:
                self.listening.callback(event)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(f"Go echo server exited: {self.stderr.decode()!r} {self.lines}"))
        self.ended.callback(None)


class GoEchoServer:
    """`ttrpcpeer server <sock>` as a child of `reactor`; `events` are its JSON lines (e.g. Sleep outcomes)."""

    def __init__(self, reactor: INodeReactor, sock: str) -> None:
        self._reactor = reactor
        self.sock = sock
        self._proto = _ServerProtocol()
        self._process: Any = None

    @property
    def events(self) -> Sequence[Result]:
        return self._proto.lines

    async def start(self) -> GoEchoServer:
        exe = build_go_peer()
        self._process = IReactorProcess(self._reactor).spawnProcess(
            self._proto, exe, [exe, "server", self.sock], env=dict(os.environ))
        await self._proto.listening
        return self

    async def stop(self) -> None:
        if self._process is not None and not self._proto.ended.called:
            try:
                self._process.signalProcess("TERM")
            except Exception:
                pass
            await self._proto.ended
