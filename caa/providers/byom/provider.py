"""The BYOM provider: pod VMs are pre-created machines known by IP (spec-providers §9); "create" reserves a free
IP cluster-wide (pool.py) and pushes the user data to it over SFTP (sftp.py); "delete" pushes a reboot trigger
and returns the IP."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from caa.k8s.client import KubeClient, connect
from caa.k8s.errors import KubeError
from caa.podvm_api.naming import instance_name
from caa.providers.byom.config import ByomConfig
from caa.providers.byom.pool import IPPool
from caa.providers.byom.sftp import HostKeyPolicy, SSHIdentity, SSHPushError, push_file
from caa.providers.interfaces import Instance, InstanceSpec, InvalidConfig, IProvider, TransientError
from caa.reactors import INodeReactor

#: Upstream waits with client-go's default back-off between readiness probes (10 ms, growing 5x, 4 tries).
READY_DELAYS = (0.01, 0.05, 0.25)
REBOOT_TRIGGER = b"reboot"


def allocation_id(pod_name: str, sandbox_id: str) -> str:
    """Upstream's key of an allocation: `<podName>-<sandboxID>` (the sandbox id makes it unique)."""
    return f"{pod_name}-{sandbox_id}"


@implementer(IProvider)
class ByomProvider:
    _log = Logger()

    def __init__(self, reactor: INodeReactor, config: ByomConfig, kube: KubeClient | None = None,
                 identity: SSHIdentity | None = None, host_keys: HostKeyPolicy | None = None) -> None:
        self._reactor = reactor
        self.config = config
        self._kube = kube
        self._threadpool: ThreadPool | None = None
        self._identity = identity
        self._host_keys = host_keys
        self._pool: IPPool | None = None
        self._recovered: Deferred[None] | None = None

    # -- IProvider ----------------------------------------------------------------------------------------
    def instance_name(self, pod_name: str, sandbox_id: str) -> str:
        return instance_name(pod_name, sandbox_id)

    def create_instance(self, pod_name: str, sandbox_id: str, user_data: bytes,
                        spec: InstanceSpec) -> Deferred[Instance]:
        return Deferred.fromCoroutine(self._create(pod_name, sandbox_id, user_data))

    def delete_instance(self, instance_id: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._delete(instance_id))

    def find_instance(self, name: str) -> Deferred[Instance | None]:
        return Deferred.fromCoroutine(self._find(name))

    def verify_config(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    def teardown(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._teardown())

    # -- set-up -------------------------------------------------------------------------------------------
    def _load(self) -> IPPool:
        """The pool (after `_start()`)."""
        if self._pool is None:
            raise TransientError("byom: the provider is not ready (its set-up failed; see the log)")
        return self._pool

    def _read_setup(self) -> None:
        """On a worker thread: the key files, the host-key allow-list directory and the kubeconfig (file reads
        stay off the reactor); InvalidConfig naming what is wrong."""
        config = self.config
        if self._identity is None:
            try:
                self._identity = SSHIdentity.from_files(config.ssh_username, config.ssh_pub_key, config.ssh_priv_key)
            except ValueError as e:
                raise InvalidConfig(f"byom: {e}") from None
        if self._host_keys is None:
            try:
                self._host_keys = HostKeyPolicy.from_dir(config.host_key_allowlist_dir)
            except ValueError as e:
                raise InvalidConfig(f"byom: --ssh-host-key-allowlist-dir: {e}") from None
        if self._kube is None:
            self._threadpool = ThreadPool(minthreads=0, maxthreads=2, name="caa-byom-k8s")
            self._threadpool.start()
            try:
                self._kube = connect(self._reactor, self._threadpool, config.kubeconfig or None)
            except KubeError as e:
                raise InvalidConfig(f"byom: the pool ConfigMap needs the Kubernetes API: {e}") from None

    async def _start(self) -> None:
        """Load everything and recover the pool state (once; later calls wait for the first)."""
        if self._recovered is None:
            self._recovered = Deferred.fromCoroutine(self._recover())
        recovered = self._recovered
        try:
            await recovered
        except Exception:
            if self._recovered is recovered:
                self._recovered = None  # let a later call try again
            raise

    async def _recover(self) -> None:
        if self._pool is None:
            config = self.config
            config.check()
            await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._read_setup)
            assert self._kube is not None
            self._pool = IPPool(self._reactor, self._kube, config.pool_namespace, config.pool_configmap_name,
                                config.pool_ips, config.node_name, self.check_ready, timeout=config.allocate_timeout)
        await self._pool.recover()

    async def _teardown(self) -> None:
        if self._threadpool is not None:
            if self._kube is not None:
                self._kube.close()
            self._threadpool.stop()
            self._threadpool = None

    # -- create / delete ----------------------------------------------------------------------------------
    async def _create(self, pod_name: str, sandbox_id: str, user_data: bytes) -> Instance:
        await self._start()
        pool = self._load()
        alloc = allocation_id(pod_name, sandbox_id)
        ip = await pool.allocate(alloc, pod_name)
        try:
            await self._push(ip, self.config.user_data_path, user_data)
        except BaseException as e:  # a failure or a cancel: the IP goes back (the contract), then re-raise
            try:
                await pool.release(alloc)
            except TransientError as cleanup:
                self._log.warn("byom: could not release {ip} of {alloc}: {error}", ip=ip, alloc=alloc,
                               error=cleanup)
            if isinstance(e, SSHPushError):
                raise TransientError(str(e)) from None
            raise
        name = self.instance_name(pod_name, sandbox_id)
        self._log.info("byom: {name} is {ip} (user data pushed)", name=name, ip=ip)
        return Instance(ip, name, (ip,))

    async def _delete(self, instance_id: str) -> None:
        if not instance_id:
            return
        try:
            ip = str(ipaddress.ip_address(instance_id))
        except ValueError:
            self._log.warn("byom: delete of {id}: not an IP address, so no pool VM", id=instance_id)
            return
        await self._start()
        pool = self._load()
        state = await pool.read()
        holder = state.holder_of(ip) if state else None
        if holder is None:
            return  # not allocated: already deleted (never reboot a VM that may serve another pod by now)
        try:
            await self._push(ip, self.config.reboot_path, REBOOT_TRIGGER)
        except SSHPushError as e:
            self._log.warn("byom: reboot trigger for {ip} not delivered: {error}", ip=ip, error=e)
        await pool.release(holder.allocation_id)

    async def _find(self, name: str) -> Instance | None:
        await self._start()
        state = await self._load().read()
        for allocation in (state.allocated.values() if state else ()):
            sandbox_id = allocation.allocation_id[len(allocation.pod_name) + 1:]
            if allocation.allocation_id.startswith(f"{allocation.pod_name}-") and \
                    self.instance_name(allocation.pod_name, sandbox_id) == name:
                return Instance(allocation.ip, name, (allocation.ip,))
        return None

    # -- the VMs ------------------------------------------------------------------------------------------
    async def _push(self, ip: str, path: str, data: bytes) -> None:
        assert self._identity is not None and self._host_keys is not None
        await push_file(self._reactor, ip, self.config.ssh_port, self._identity, self._host_keys, path, data,
                        self.config.ssh_timeout)

    async def check_ready(self, ip: str) -> None:
        """A TCP connect to the VM's SSH port succeeds (a few tries); TransientError naming the VM otherwise."""
        error: Exception | None = None
        for delay in (*READY_DELAYS, None):
            try:
                await self._connect_once(ip)
                return
            except (ConnectError, CancelledError) as e:
                error = e
            if delay is not None:
                await deferLater(self._reactor, delay, lambda: None)
        raise TransientError(f"byom: VM {ip} is not ready: port {self.config.ssh_port}: {error}")

    async def _connect_once(self, ip: str) -> None:
        endpoint: Any
        timeout = self.config.readiness_timeout
        if ":" in ip:
            endpoint = TCP6ClientEndpoint(self._reactor, ip, self.config.ssh_port, timeout=timeout)
        else:
            endpoint = TCP4ClientEndpoint(self._reactor, ip, self.config.ssh_port, timeout=timeout)
        proto = await connectProtocol(endpoint, Protocol())
        if proto.transport is not None:
            proto.transport.loseConnection()
