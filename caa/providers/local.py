"""
The local provider (`--provider local`): pod "VMs" on this host, for development, demos and end-to-end tests
without a cloud. Each instance is a network namespace (named like the VM, `podvm-<pod>-<sid8>`) with an
`eth0` veth on a bridge in the host namespace (the underlay; the bridge holds the gateway address) and its
own IP from `--local-subnet`. Inside it, as on a pod VM, run:

1. `caa-process-user-data --user-data-file <state>/user-data --output-dir <state>/peerpod` (one shot);
2. the kata-agent: `--local-agent-command` (default: the development agent, `caa/devtools/agent.py`, which
   is not kata-agent) with `--socket <state>/agent.sock --pod-netns <vm>-pod` appended (or `{socket}` /
   `{pod_netns}` placeholders filled in);
3. `twistd -n caa-forwarder --config <state>/peerpod/apf.json --listen 0.0.0.0:<port>
   --kata-agent-socket <state>/agent.sock --pod-netns <vm>-pod` plus `--local-forwarder-args`.

Each instance has its own state directory `<state-dir>/<name>/` (user data, apf.json, agent socket, logs,
`instance.json` with the IP and process ids) and its own pod netns `<name>-pod`, so many coexist on one host.
`create_instance` returns when the forwarder accepts TCP connections on the instance IP. Processes run in
their own sessions and outlive the adaptor (like VMs); `delete_instance` stops them and removes both
namespaces and the state directory, and succeeds for unknown instances. The instance id is its name.

Options (default < env < flag):
    --local-bridge          LOCAL_BRIDGE           caa-local0
    --local-subnet          LOCAL_SUBNET           192.168.222.0/24 (the bridge gets the first address)
    --local-state-dir       LOCAL_STATE_DIR        /run/caa-local
    --local-agent-command   LOCAL_AGENT_COMMAND    "" (= <python> -m caa.devtools.agent)
    --local-forwarder-port  FORWARDER_PORT         15150
    --local-forwarder-args  LOCAL_FORWARDER_ARGS   "" (extra caa-forwarder flags, e.g. --disable-tls)
    --local-boot-timeout    LOCAL_BOOT_TIMEOUT     60s
Needs root (namespaces, veths) and iproute2.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from caa.podvm_api.naming import instance_name
from caa.providers.interfaces import (
    Instance,
    InstanceSpec,
    InvalidConfig,
    IProvider,
    IProviderFactory,
    QuotaExceeded,
    TransientError,
)
from caa.providers.options import ProviderOptions, parse_duration, parse_uint
from caa.reactors import INodeReactor


class LocalOptions(ProviderOptions):
    optParameters = [
        ["local-bridge", None, "caa-local0", "Host bridge the instances' veths join (created if missing)."],
        ["local-subnet", None, "192.168.222.0/24", "Instance addresses; the bridge gets the first one."],
        ["local-state-dir", None, "/run/caa-local", "Per-instance state directories."],
        ["local-agent-command", None, "", "kata-agent command (default: the development agent)."],
        ["local-forwarder-port", None, 15150, "Port the forwarders listen on.", parse_uint],
        ["local-forwarder-args", None, "", "Extra caa-forwarder flags (shell words)."],
        ["local-boot-timeout", None, 60.0, "Deadline for an instance to serve (Go duration).", parse_duration],
    ]
    envVars = {
        "local-bridge": "LOCAL_BRIDGE",
        "local-subnet": "LOCAL_SUBNET",
        "local-state-dir": "LOCAL_STATE_DIR",
        "local-agent-command": "LOCAL_AGENT_COMMAND",
        "local-forwarder-port": "FORWARDER_PORT",
        "local-forwarder-args": "LOCAL_FORWARDER_ARGS",
        "local-boot-timeout": "LOCAL_BOOT_TIMEOUT",
    }



@frozen
class LocalConfig:
    bridge: str = "caa-local0"
    subnet: str = "192.168.222.0/24"
    state_dir: str = "/run/caa-local"
    agent_command: str = ""
    forwarder_port: int = 15150
    forwarder_args: str = ""
    boot_timeout: float = 60.0

    @classmethod
    def from_options(cls, options: usage.Options) -> LocalConfig:
        return cls(
            bridge=options["local-bridge"],
            subnet=options["local-subnet"],
            state_dir=options["local-state-dir"],
            agent_command=options["local-agent-command"],
            forwarder_port=int(options["local-forwarder-port"]),
            forwarder_args=options["local-forwarder-args"],
            boot_timeout=float(options["local-boot-timeout"]),
        )

    def check(self) -> None:
        if not self.bridge or len(self.bridge) > 15 or "/" in self.bridge or self.bridge == "eth0":
            raise InvalidConfig(f"local: --local-bridge {self.bridge!r} is not a usable interface name")
        try:
            network = ipaddress.ip_network(self.subnet, strict=True)
        except ValueError as e:
            raise InvalidConfig(f"local: --local-subnet {self.subnet!r}: {e}") from None
        if network.version != 4 or network.prefixlen > 29:
            raise InvalidConfig(f"local: --local-subnet {self.subnet!r} must be an IPv4 network of /29 or larger")
        if not 0 < self.forwarder_port < 65536:
            raise InvalidConfig(f"local: --local-forwarder-port {self.forwarder_port} is not a port")
        if self.boot_timeout <= 0:
            raise InvalidConfig("local: --local-boot-timeout must be positive")
        try:
            shlex.split(self.agent_command)
            shlex.split(self.forwarder_args)
        except ValueError as e:
            raise InvalidConfig(f"local: bad shell words: {e}") from None

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> str:
        return str(next(self.network.hosts()))


class _CommandFailed(Exception):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise _CommandFailed(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _tail(path: str, limit: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace").strip().replace("\n", " | ")
    except OSError:
        return ""


def _bin(name: str) -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else (shutil.which(name) or name)


@implementer(IProvider)
class LocalProvider:
    _log = Logger()

    def __init__(self, reactor: INodeReactor, config: LocalConfig, threadpool: Any = None) -> None:
        self._reactor = reactor
        self.config = config
        self._threadpool = threadpool if threadpool is not None else reactor.getThreadPool()
        self._children: dict[str, list[subprocess.Popen[bytes]]] = {}

    def _run(self, function: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._threadpool, function, *args)

    # -- IProvider ------------------------------------------------------------------------------------

    def instance_name(self, pod_name: str, sandbox_id: str) -> str:
        return instance_name(pod_name, sandbox_id)

    def create_instance(
        self, pod_name: str, sandbox_id: str, user_data: bytes, spec: InstanceSpec
    ) -> Deferred[Instance]:
        return Deferred.fromCoroutine(self._create(pod_name, sandbox_id, user_data, spec))

    def delete_instance(self, instance_id: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._delete(instance_id))

    def find_instance(self, name: str) -> Deferred[Instance | None]:
        return self._run(self._t_find, name)

    def verify_config(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._verify())

    def teardown(self) -> Deferred[None]:
        # Instances keep running (like VMs); only forget the child handles.
        self._children.clear()
        return Deferred.fromCoroutine(_none())

    # -- coroutines ------------------------------------------------------------------------------------

    async def _verify(self) -> None:
        self.config.check()
        if os.geteuid() != 0:
            raise InvalidConfig("local: the local provider needs root (network namespaces)")
        if shutil.which("ip") is None:
            raise InvalidConfig("local: iproute2 (`ip`) is not installed")
        await self._run(self._t_bridge)

    async def _create(self, pod_name: str, sandbox_id: str, user_data: bytes, spec: InstanceSpec) -> Instance:
        started = self._reactor.seconds()
        if spec.gpus > 0:
            raise InvalidConfig(f"local: no GPUs on the local provider ({spec.gpus} asked for)")
        if spec.instance_type:
            self._log.info("local: ignoring instance type {type}", type=spec.instance_type)
        if spec.volumes:
            self._log.warn("local: CSI volumes {volumes} are not attached (the local provider has no disks)",
                           volumes=list(spec.volumes))
        name = self.instance_name(pod_name, sandbox_id)
        existing = await self._run(self._t_record, name)
        if existing is not None and existing.get("sandbox_id") == sandbox_id and existing.get("state") == "running":
            return Instance(name, name, tuple(existing["ips"]))
        if existing is not None:
            await self._run(self._t_delete, name)
        try:
            ip = await self._run(self._t_start, name, pod_name, sandbox_id, user_data)
            await self._wait_ready(name, ip, started + self.config.boot_timeout)
            await self._run(self._t_mark_running, name)
        except BaseException as e:
            self._log.warn("local: creating {name} failed ({error}); removing it", name=name, error=str(e))
            try:
                await self._run(self._t_delete, name)
            except Exception:
                self._log.failure("local: rollback of {name} failed", name=name)
            if isinstance(e, _CommandFailed):
                raise TransientError(f"local: creating {name}: {e}") from None
            raise
        self._log.info(
            "{sandbox_id}: local instance {name} at {ip} serving in {elapsed:.2f}s",
            sandbox_id=sandbox_id,
            name=name,
            ip=ip,
            elapsed=self._reactor.seconds() - started,
        )
        return Instance(name, name, (ip,))

    async def _wait_ready(self, name: str, ip: str, deadline: float) -> None:
        delay = 0.02
        while True:
            if await self._run(self._t_probe, name, ip):
                return
            if self._reactor.seconds() >= deadline:
                raise TransientError(
                    f"local: {name} did not serve on {ip}:{self.config.forwarder_port} in "
                    f"{self.config.boot_timeout:.0f}s: {_tail(self._path(name, 'forwarder.log'))}"
                )
            await deferLater(self._reactor, delay, lambda: None)
            delay = min(delay * 2, 0.25)

    async def _delete(self, instance_id: str) -> None:
        if not instance_id or "/" in instance_id or instance_id.startswith("."):
            raise InvalidConfig(f"local: bad instance id {instance_id!r}")
        removed = await self._run(self._t_delete, instance_id)
        if removed:
            self._log.info("local: deleted instance {instance_id}", instance_id=instance_id)

    # -- blocking steps (thread pool) ----------------------------------------------------------------

    def _path(self, name: str, *parts: str) -> str:
        return os.path.join(self.config.state_dir, name, *parts)

    def _lock(self) -> Any:
        os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
        f = open(os.path.join(self.config.state_dir, ".lock"), "w")  # noqa: SIM115
        fcntl.flock(f, fcntl.LOCK_EX)
        return f

    def _t_bridge(self) -> None:
        lock = self._lock()
        try:
            self._ensure_bridge()
        finally:
            lock.close()

    def _ensure_bridge(self) -> None:
        bridge = self.config.bridge
        if _ip("link", "show", "dev", bridge, check=False).returncode != 0:
            _ip("link", "add", bridge, "type", "bridge")
        prefix = self.config.network.prefixlen
        address = f"{self.config.gateway}/{prefix}"
        if address not in _ip("-4", "-o", "addr", "show", "dev", bridge).stdout:
            _ip("addr", "add", address, "dev", bridge)
        _ip("link", "set", bridge, "up")

    def _t_record(self, name: str) -> dict[str, Any] | None:
        try:
            with open(self._path(name, "instance.json")) as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            if os.path.isdir(self._path(name)) or os.path.exists(f"/run/netns/{name}"):
                return {"state": "broken"}
            return None

    def _write_record(self, name: str, record: dict[str, Any]) -> None:
        path = self._path(name, "instance.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)

    def _allocate(self, name: str, record: dict[str, Any]) -> str:
        """Pick a free address and write the record, under the state-dir lock."""
        lock = self._lock()
        try:
            self._ensure_bridge()
            used = {self.config.gateway}
            for entry in os.listdir(self.config.state_dir):
                try:
                    with open(os.path.join(self.config.state_dir, entry, "instance.json")) as f:
                        used.update(json.load(f).get("ips", []))
                except (OSError, ValueError):
                    continue
            for host in self.config.network.hosts():
                if str(host) not in used:
                    break
            else:
                raise QuotaExceeded(f"local: no free address left in {self.config.subnet}")
            os.makedirs(self._path(name), mode=0o700, exist_ok=True)
            record["ips"] = [str(host)]
            self._write_record(name, record)
            return str(host)
        finally:
            lock.close()

    def _veth(self, name: str) -> str:
        return "cl" + hashlib.sha256(name.encode()).hexdigest()[:12]

    def _t_start(self, name: str, pod_name: str, sandbox_id: str, user_data: bytes) -> str:
        record: dict[str, Any] = {
            "id": name, "name": name, "pod_name": pod_name, "sandbox_id": sandbox_id, "state": "creating",
            "netns": name, "pod_netns": f"{name}-pod", "veth": self._veth(name), "pids": [],
        }
        ip = self._allocate(name, record)
        prefix = self.config.network.prefixlen
        vm_ns, pod_ns, veth = name, f"{name}-pod", self._veth(name)
        _ip("netns", "add", vm_ns)
        _ip("netns", "add", pod_ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", vm_ns)
        _ip("link", "set", veth, "master", self.config.bridge, "up")
        _ip("-n", vm_ns, "link", "set", "lo", "up")
        _ip("-n", vm_ns, "addr", "add", f"{ip}/{prefix}", "dev", "eth0")
        _ip("-n", vm_ns, "link", "set", "eth0", "up")
        _ip("-n", vm_ns, "route", "add", "default", "via", self.config.gateway)
        _ip("-n", pod_ns, "link", "set", "lo", "up")

        user_data_path = self._path(name, "user-data")
        with open(os.open(user_data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(user_data)
        peerpod = self._path(name, "peerpod")
        os.makedirs(peerpod, mode=0o700, exist_ok=True)
        in_ns = ["ip", "netns", "exec", vm_ns]
        with open(self._path(name, "process-user-data.log"), "wb") as log:
            result = subprocess.run(
                [*in_ns, _bin("caa-process-user-data"), "--user-data-file", user_data_path, "--output-dir", peerpod,
                 "--no-mount-cidata"],
                stdout=log, stderr=subprocess.STDOUT, timeout=60,
            )
        if result.returncode != 0:
            raise InvalidConfig(
                f"local: caa-process-user-data failed for {name} ({result.returncode}): "
                f"{_tail(self._path(name, 'process-user-data.log'))}"
            )
        socket_path = self._path(name, "agent.sock")
        agent = self._agent_command(socket_path, pod_ns)
        forwarder = [
            _bin("twistd"), "-n", "--pidfile=", "--logfile=" + self._path(name, "forwarder.log"), "caa-forwarder",
            "--config", os.path.join(peerpod, "apf.json"), "--listen", f"0.0.0.0:{self.config.forwarder_port}",
            "--kata-agent-socket", socket_path, "--pod-netns", pod_ns, *shlex.split(self.config.forwarder_args),
        ]
        children = []
        for label, command in (("agent", agent), ("forwarder", forwarder)):
            with open(self._path(name, f"{label}.out"), "wb") as out:
                child = subprocess.Popen(
                    [*in_ns, *command], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, cwd=self._path(name),
                )
            children.append(child)
            record["pids"].append(child.pid)
            self._write_record(name, record)
        self._children[name] = children
        return ip

    def _agent_command(self, socket_path: str, pod_ns: str) -> list[str]:
        if not self.config.agent_command:
            return [sys.executable, "-m", "caa.devtools.agent", "--socket", socket_path, "--pod-netns", pod_ns]
        words = shlex.split(self.config.agent_command)
        if any("{socket}" in w or "{pod_netns}" in w for w in words):
            return [w.replace("{socket}", socket_path).replace("{pod_netns}", pod_ns) for w in words]
        return [*words, "--socket", socket_path, "--pod-netns", pod_ns]

    def _t_probe(self, name: str, ip: str) -> bool:
        for child, label in zip(self._children.get(name, []), ("agent", "forwarder"), strict=False):
            code = child.poll()
            if code is not None:
                detail = _tail(self._path(name, f"{label}.out")) or _tail(self._path(name, f"{label}.log"))
                raise InvalidConfig(f"local: the {label} of {name} exited with {code}: {detail}")
        try:
            with socket.create_connection((ip, self.config.forwarder_port), timeout=0.5):
                return True
        except OSError:
            return False

    def _t_mark_running(self, name: str) -> None:
        record = self._t_record(name) or {}
        record["state"] = "running"
        self._write_record(name, record)

    def _t_find(self, name: str) -> Instance | None:
        record = self._t_record(name)
        if record is None:
            return None
        ips = tuple(record.get("ips", ())) if record.get("state") == "running" else ()
        return Instance(name, name, ips)

    def _t_delete(self, name: str) -> bool:
        record = self._t_record(name)
        directory = self._path(name)
        if record is None:
            return False
        pids = [int(p) for p in record.get("pids", [])]
        children = self._children.pop(name, [])
        pids += [child.pid for child in children if child.pid not in pids]
        self._stop(pids, directory)
        for child in children:
            child.poll()  # reap our own children
        errors = []
        for ns in (f"{name}-pod", name):
            result = _ip("netns", "del", ns, check=False)
            if result.returncode != 0 and os.path.exists(f"/run/netns/{ns}"):
                errors.append(result.stderr.strip())
        veth = record.get("veth") or self._veth(name)
        _ip("link", "del", veth, check=False)
        if errors:
            raise TransientError(f"local: deleting {name}: " + "; ".join(errors))
        shutil.rmtree(directory, ignore_errors=True)
        return True

    def _stop(self, pids: list[int], directory: str) -> None:
        """SIGTERM our processes (checked by their working directory), then SIGKILL after 5 s."""
        ours = []
        for pid in pids:
            try:
                if os.readlink(f"/proc/{pid}/cwd").rstrip("/") == directory.rstrip("/"):
                    os.kill(pid, signal.SIGTERM)
                    ours.append(pid)
            except OSError:
                continue
        deadline = time.monotonic() + 5
        while ours and time.monotonic() < deadline:
            ours = [pid for pid in ours if _alive(pid)]
            if ours:
                time.sleep(0.05)
        for pid in ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


async def _none() -> None:
    return None


@implementer(IProviderFactory)
class LocalProviderFactory:
    name = "local"
    description = "Pod 'VMs' as network namespaces on this host (development, demos, e2e tests)"

    def options(self) -> usage.Options:
        return LocalOptions()

    def create(self, reactor: INodeReactor, options: usage.Options) -> IProvider:
        return LocalProvider(reactor, LocalConfig.from_options(options))


LocalOptions.config_type = LocalConfig
