"""The node daemon as one `MultiService`: the hypervisor socket, the startup probe and the metrics listener
(child services whose failed listen aborts start-up), the orphan sweeper on the injected clock, the hand-over
from the adaptor it replaces (rolling update), journal recovery after start, and the ordered stop.
`build_daemon` wires it from the command line; tests hand `AdaptorDaemon` their own collaborators and a
`MemoryReactorClock`.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence, Sized
from typing import TYPE_CHECKING, Protocol

from attrs import evolve, frozen
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort, IReactorFDSet
from twisted.internet.protocol import Protocol as _Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from caa.adaptor.adapters import AutoTLS, NodeNetworking, NullClusterDuties, NullNetworking
from caa.adaptor.admin import HandOverCall, register_admin, request_hand_over
from caa.adaptor.claimer import Claimer
from caa.adaptor.interfaces import (
    IAgentProxyFactory,
    IAgentTLS,
    IClusterDuties,
    IPodNetworking,
    IPoolPeerPods,
    ISandboxStore,
    ProxyTLS,
    SandboxRecord,
)
from caa.adaptor.listeners import ListenError, ListeningService, UnixSocketService, listen_reuseport
from caa.adaptor.options import AdaptorOptions
from caa.adaptor.pool import PoolManager, initdata_digest
from caa.adaptor.rpc import HypervisorHandlers
from caa.adaptor.service import VERSION, CloudService, ServiceConfig
from caa.adaptor.store import JOURNAL_THREADS, Runner, SandboxStore, threadpool_runner
from caa.providers.interfaces import IProvider
from caa.reactors import INodeReactor
from caa.ttrpc import Server

if TYPE_CHECKING:
    from caa.k8s.client import KubeClient

__all__ = ["AdaptorDaemon", "CloudLifecycle", "DaemonSettings", "StartupProbe", "build_daemon", "build_tls",
           "can_connect"]


@frozen
class DaemonSettings:
    """What the daemon's lifecycle needs from the command line."""

    socket_path: str
    socket_mode: int = 0o600
    probe_port: int = 0
    metrics_port: int = 0
    metrics_interface: str = "127.0.0.1"
    verify_config: bool = False
    provider_name: str = ""
    disable_tls: bool = False
    sweep_interval: float = 60.0
    # How often we check that the hypervisor socket file is still ours (the fallback when a newer adaptor took
    # it over without a hand-over call), and how long we wait for the older adaptor to hand over.
    socket_check_interval: float = 1.0
    handover_timeout: float = 120.0
    drain_timeout: float = 20.0  # what the sandbox service's proxies do with it; here for the log line

    @classmethod
    def from_options(cls, options: AdaptorOptions) -> DaemonSettings:
        return cls(socket_path=options["socket"], socket_mode=options["socket-mode"],
                   probe_port=int(options["probe-port"]), metrics_port=int(options["metrics-port"]),
                   metrics_interface=options["metrics-interface"], verify_config=bool(options["cloud-config-verify"]),
                   provider_name=options["provider"], disable_tls=bool(options["disable-tls"]),
                   drain_timeout=float(options["drain-timeout"]))


class CloudLifecycle(Protocol):
    """What the daemon calls on the sandbox service (CloudService) around its own start and stop."""

    @property
    def sandboxes(self) -> Sized: ...

    def records(self) -> list[SandboxRecord]: ...

    async def recover(self) -> None: ...

    async def sweep(self) -> None: ...

    async def shutdown(self) -> None: ...

    def hand_over(self) -> Deferred[list[str]]: ...


def can_connect(reactor: INodeReactor, path: str, timeout: float = 1.0) -> Deferred[bool]:
    """Whether the unix socket at `path` accepts a connection, found out through the reactor (never blocking)."""
    d = connectProtocol(UNIXClientEndpoint(reactor, path, timeout=timeout), _Protocol())

    def connected(proto: _Protocol) -> bool:
        if proto.transport is not None:
            proto.transport.loseConnection()
        return True

    answered: Deferred[bool] = d.addCallbacks(connected, lambda _: False)
    return answered


class StartupProbe(Resource):
    """GET /startup: 200 once the journal is recovered, the hypervisor socket accepts connections and (in a
    cluster) the node's peer pods came back Ready after this adaptor started (`IClusterDuties.startup_ready`).

    The connection check goes through the reactor and the answer follows when it completes (NOT_DONE_YET), so
    a slow socket never blocks the event loop."""

    isLeaf = True

    def __init__(self, recovered: Callable[[], bool], check: Callable[[], Deferred[bool]]) -> None:
        super().__init__()
        self._recovered = recovered
        self._check = check

    def render(self, request: Request) -> bytes | int:
        if not self._recovered():
            return self._answer(request, False)
        gone: list[Failure] = []
        d = self._check()

        def client_gone(f: Failure) -> None:
            gone.append(f)
            d.cancel()

        request.notifyFinish().addErrback(client_gone)

        def answer(ok: bool) -> None:
            if not gone:
                request.write(self._answer(request, ok))
                request.finish()

        d.addCallbacks(answer, lambda _: answer(False))
        return NOT_DONE_YET

    @staticmethod
    def _answer(request: Request, ok: bool) -> bytes:
        request.setResponseCode(200 if ok else 500)
        return b"" if ok else b"not ready\n"


class AdaptorDaemon(MultiService):
    """The hypervisor ttrpc server's listener, the probe, metrics and the orphan sweeper (children), journal
    recovery after start, and the worker thread pools (started only once every listener is up: a live
    non-daemon thread would keep a process whose start failed from exiting)."""

    _log = Logger()

    def __init__(self, reactor: INodeReactor, settings: DaemonSettings, *, server: Server, cloud: CloudLifecycle,
                 provider: IProvider, store: ISandboxStore, network: IPodNetworking,
                 thread_pools: Sequence[ThreadPool] = (), on_fatal: Callable[[], None] = lambda: None,
                 cluster: IClusterDuties | None = None, hand_over_call: HandOverCall | None = None,
                 pool: PoolManager | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.reactor = reactor
        self.settings = settings
        self.server = server
        self.cloud = cloud
        self.provider = provider
        self.store = store
        self.network = network
        self.thread_pools = tuple(thread_pools)
        self._on_fatal = on_fatal
        self.cluster: IClusterDuties = cluster if cluster is not None else NullClusterDuties()
        self.recovered = False
        self.failed = False
        self.recovery: Deferred[None] | None = None
        # A newer adaptor took over (rolling update): we manage nothing any more, see `hand_over`.
        self.passive = False
        self._hand_over_call: HandOverCall = hand_over_call or request_hand_over
        # Bound at start, put at the path (one rename) only after the adaptor there handed over.
        self.hypervisor = UnixSocketService(IReactorFDSet(reactor), reactor, settings.socket_path, server.factory(),
                                            mode=settings.socket_mode, publish_at_start=False)
        self.hypervisor.setServiceParent(self)
        if settings.probe_port:
            probe = Site(StartupProbe(lambda: self.recovered, self._started))
            ListeningService(f"127.0.0.1:{settings.probe_port} (startup probe)",
                             lambda: listen_reuseport(reactor, "127.0.0.1", settings.probe_port, probe)
                             ).setServiceParent(self)
        if settings.metrics_port:
            # SO_REUSEPORT as the probe: in a surge rolling update the old and the new adaptor of a node (host
            # network) both hold the port until the old one stops; a plain listen would fail the new one.
            def listen_metrics() -> Deferred[IListeningPort]:
                from caa.adaptor.metrics import metrics_site

                return listen_reuseport(reactor, settings.metrics_interface, settings.metrics_port, metrics_site())

            ListeningService(f"{settings.metrics_interface}:{settings.metrics_port} (metrics)",
                             listen_metrics).setServiceParent(self)
        self.sweeper = TimerService(settings.sweep_interval, self._sweep)
        self.sweeper.clock = reactor
        self.sweeper.setServiceParent(self)
        self.socket_watch = TimerService(settings.socket_check_interval, self._check_socket)
        self.socket_watch.clock = reactor
        self.socket_watch.setServiceParent(self)

    def _hypervisor_answers(self) -> Deferred[bool]:
        return can_connect(self.reactor, self.settings.socket_path)

    def _started(self) -> Deferred[bool]:
        """The probe's checks: the hypervisor socket answers, then (in a cluster) the node's peer pods are back."""
        return self._hypervisor_answers().addCallback(
            lambda ok: self.cluster.startup_ready() if ok else False)

    def startService(self) -> None:
        self._log.info("starting Cloud API Adaptor daemon for {provider} (version {version})",
                       provider=self.settings.provider_name, version=VERSION)
        if self.settings.disable_tls:
            self._log.warn("TLS is disabled: the agent connection to pod VMs is plain TCP")
        try:
            super().startService()
        except ListenError as e:
            self._log.critical("{error}", error=str(e))
            self._abort_start()
            raise
        except Exception:
            self._abort_start()
            raise
        for pool in self.thread_pools:
            pool.start()
        self.cluster.start()  # the node's kata.peerpods.io/vm, in the background
        self._log.info("server started on {socket}", socket=self.settings.socket_path)
        self.recovery = Deferred.fromCoroutine(self._after_start())

    def _abort_start(self) -> None:
        """Undo the children that did start (the hypervisor socket file goes), leaving nothing running."""
        self.running = False
        for child in reversed(list(self)):
            if child.running:
                d = child.stopService()
                if isinstance(d, Deferred):
                    d.addErrback(lambda f: None)

    async def _after_start(self) -> None:
        try:
            if self.settings.verify_config:
                try:
                    await self.provider.verify_config()
                except Exception as e:
                    self._log.critical("provider configuration check failed: {error}", error=str(e))
                    self.failed = True
                    self._on_fatal()
                    return
            # Only a daemon that can run takes over: the older adaptor stops managing the sandboxes first, then
            # our socket replaces its file in one rename (the path never goes missing), then we adopt them.
            await self._take_over()
            try:
                self.hypervisor.publish()
            except OSError as e:
                self._log.critical("cannot listen on {path}: {error}", path=self.settings.socket_path, error=str(e))
                self.failed = True
                self._on_fatal()
                return
            self._log.info("serving {socket}", socket=self.settings.socket_path)
            await self.cloud.recover()
            if self.pool is not None:
                owned = {r.instance_id for r in self.cloud.records() if r.instance_id}
                await self.pool.start(lambda iid: iid in owned)
            if isinstance(self.network, NodeNetworking):
                records = self.cloud.records()
                released = self.network.release_unowned([r.sandbox_id for r in records])
                if released:
                    self._log.info("released VNIs {vnis} of sandboxes not in the journal", vnis=released)
                live = [r.vni for r in records if r.vni]
                try:
                    removed = await self.network.sweep(live)
                    if removed:
                        self._log.info("swept stale tunnels of VNIs {vnis}", vnis=removed)
                except Exception as e:
                    self._log.warn("tunnel sweep failed: {error}", error=str(e))
        except Exception:
            self._log.failure("journal recovery failed")
        finally:
            if not self.failed:
                self.recovered = True
                self._log.info("journal recovery done; {n} sandboxes", n=len(self.cloud.sandboxes))

    async def _take_over(self) -> None:
        """Ask the adaptor serving our socket path, if any, to hand its sandboxes over (caa.adaptor.v1.Admin/
        HandOver); it answers once none of its work is under way. Whatever fails, we go on: nobody there (it
        exited or was killed), an older version without the call, or no answer in time (it then goes passive when
        it sees its socket replaced)."""
        path = self.settings.socket_path
        if self.hypervisor.socket.published:
            # A path too short for a temporary name beside it was bound directly: the socket there is our own
            # (asking it would hand everything over to ourselves and leave this adaptor passive).
            return
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                return
        except OSError:
            return
        successor = f"pid {os.getpid()}"
        self._log.info("asking the adaptor on {path} to hand over", path=path)
        try:
            handed = await self._hand_over_call(self.reactor, path, successor, self.settings.handover_timeout)
        except Exception as e:
            self._log.warn("no hand-over from an adaptor on {path} ({error}): taking the socket over", path=path,
                           error=str(e) or type(e).__name__)
            return
        self._log.info("the adaptor on {path} (pid {pid}) handed over {n} sandboxes", path=path, pid=handed.pid,
                       n=len(handed.sandbox_ids))

    def hand_over(self, successor: str) -> Deferred[list[str]]:
        """A newer adaptor takes over (the Admin/HandOver call, or our socket file replaced): from now on no sweep,
        recovery, StartVM, StopVM or CreateVM here; our agent proxies drain at stop. Fires with the sandbox ids once
        no work of ours is under way."""
        if not self.passive:
            self.passive = True
            self._log.warn("{successor} takes over {socket}: this adaptor is passive now; stop it when the newer "
                           "one is ready", successor=successor, socket=self.settings.socket_path)
        handed = self.cloud.hand_over()
        if self.pool is None:
            return handed
        # The newer adaptor runs the pool from the same journal once we answer: no refill or recycling here.
        pool_stopped: Deferred[None] = Deferred.fromCoroutine(self.pool.stop())
        return pool_stopped.addCallback(lambda _: handed)

    def _check_socket(self) -> None:
        """The fallback of the hand-over call: our socket file replaced by someone who did not call us."""
        if self.passive or not self.hypervisor.socket.published or self.hypervisor.ours():
            return
        self._log.warn("{path} is no longer our socket and nobody asked us to hand over",
                       path=self.settings.socket_path)
        self.hand_over("another process (socket replaced)").addErrback(
            lambda f: self._log.failure("hand-over failed", f))

    def _sweep(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._sweep_once())

    async def _sweep_once(self) -> None:
        """One sweeper round; it never fails, so the TimerService's loop never stops."""
        if not self.recovered or self.passive:
            return  # recovery handles the same cases first; passive: the newer adaptor sweeps
        try:
            await self.cloud.sweep()
        except Exception:
            self._log.failure("orphan sweep failed; the next one runs in {interval}s",
                              interval=self.settings.sweep_interval)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.passive:
            self._log.info("shutting down after a hand-over: agent connections still open drain for at most "
                           "{timeout}s", timeout=self.settings.drain_timeout)
        else:
            self._log.info("shutting down: VMs, tunnels and the journal stay for the next start")
        await super().stopService()  # listeners and the sweeper
        if self.pool is not None:
            await self.pool.stop()  # no more refills; the ready pool VMs stay, journalled, for the next start
        await self.cloud.shutdown()  # passive: the agent proxies drain first
        await self.cluster.stop()  # background API work ends; the node's value is withdrawn if still ours
        await self.server.stop(timeout=1.0)
        self.server.abort()
        try:
            await self.provider.teardown()
        except Exception as e:
            self._log.warn("provider teardown: {error}", error=str(e))
        for pool in self.thread_pools:  # last: the provider and the network used them until now
            pool.stop()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def build_tls(options: AdaptorOptions) -> tuple[ProxyTLS | None, IAgentTLS | None]:
    """Client TLS settings for the proxies and the issuer for apf.json (auto CA persisted in --tls-dir)."""
    from caa import tls

    if options["disable-tls"]:
        return None, None
    manual_ca = bool(options["ca-cert-file"])
    if options["cert-file"]:
        cert, key = _read(options["cert-file"]), _read(options["cert-key"])
    else:
        pair = tls.load_or_create_client_certificate(options["tls-dir"])
        cert, key = pair.cert_pem, pair.key_pem
    if manual_ca:
        ca_pem = _read(options["ca-cert-file"])
        issuer = AutoTLS(None, cert)
    else:
        ca = tls.CertificateAuthority.load_or_create(options["tls-dir"])
        ca_pem = ca.cert_pem
        issuer = AutoTLS(ca, cert)
    proxy_tls = ProxyTLS(ca_pem=ca_pem, cert_pem=cert, key_pem=key,
                         server_name_override=tls.MANUAL_SERVER_NAME if manual_ca else "",
                         min_version=options["tls-min-version"], cipher_suites=options.cipher_suites,
                         skip_verify=bool(options["tls-skip-verify"]))
    return proxy_tls, issuer


def _list_dir(directory: str) -> list[str]:
    try:
        return [os.path.join(directory, n) for n in sorted(os.listdir(directory))]
    except FileNotFoundError:
        return []


def _network(reactor: INodeReactor, options: AdaptorOptions, pools: list[ThreadPool]) -> IPodNetworking:
    if options["tunnel-type"] == "none":
        return NullNetworking()
    from caa.network.node import NodeNetwork
    from caa.network.vni import JsonFileVniStore, VniAllocator

    pool = ThreadPool(minthreads=1, maxthreads=8, name="caa-network")
    pools.append(pool)
    allocator = VniAllocator(JsonFileVniStore(os.path.join(options["pods-dir"], "vni.json")),
                             min_id=options["vxlan-min-id"])
    node = NodeNetwork(reactor, pool, allocator,
                       host_interface=options["host-interface"], vxlan_port=options["vxlan-port"],
                       pod_subnet_cidrs=options.pod_subnet_cidrs,
                       external_net_via_pod_vm=bool(options["ext-network-via-podvm"]),
                       netns_lister=lambda: _list_dir(options["netns-dir"]))
    return NodeNetworking(node)


def _kube_client(reactor: INodeReactor, options: AdaptorOptions, pools: list[ThreadPool]) -> KubeClient | None:
    """The daemon's one Kubernetes client (--kubeconfig / KUBECONFIG, else in-cluster), None outside a cluster.
    Its pool joins the daemon's pools (started after the listeners, stopped last)."""
    from caa.k8s.config import cluster_configured

    if not cluster_configured(options["kubeconfig"] or None):
        return None
    from caa.k8s.client import connect
    from caa.k8s.errors import KubeError

    # Calls: PeerPod creates and releases, pull-secret lookups, the probe's list; bounded, each with a deadline.
    pool = ThreadPool(minthreads=0, maxthreads=4, name="caa-k8s")
    try:
        kube = connect(reactor, pool, options["kubeconfig"] or None)
    except KubeError as e:
        AdaptorDaemon._log.error("no Kubernetes client ({error}): no node capacity, no PeerPods, no image pull "
                                 "secrets", error=str(e))
        return None
    pools.append(pool)
    return kube


def _pool(reactor: INodeReactor, options: AdaptorOptions, provider: IProvider, issuer: IAgentTLS | None,
          proxies: IAgentProxyFactory, run: Runner, peerpods: IPoolPeerPods | None = None
          ) -> tuple[PoolManager | None, Claimer | None]:
    """The warm pools of --pools and --pool-size (the adaptor's default key: pods without size, image or
    initdata annotations), all with the adaptor's --initdata; journalled next to --pods-dir (`<parent>/pool`).
    With no pool configured: a manager without keys when the journal holds pool VMs (it deletes them at
    start: pools were turned off), else None."""
    from caa.adaptor.pool import PoolConfig, PoolKey, PoolVM
    from caa.adaptor.poolspec import parse_pools
    from caa.adaptor.userdata import instance_spec

    entries = [e for e in parse_pools(options["pools"], options["pool-size"]) if e.size.max > 0]
    pool_dir = os.path.join(os.path.dirname(os.path.abspath(options["pods-dir"])), "pool")
    if not entries or issuer is None:
        if not any(name.endswith(".json") for name in (os.listdir(pool_dir) if os.path.isdir(pool_dir) else [])):
            return None, None
        cleanup = PoolManager(reactor, provider, None, PoolConfig(ttl=options["pool-ttl"], pool_dir=pool_dir), [],
                              lambda _key: "", run, peerpods=peerpods)
        return cleanup, None
    from caa.adaptor.proxy import AgentProxyFactory

    assert isinstance(proxies, AgentProxyFactory)
    default_initdata = options["initdata"]
    digest = initdata_digest(default_initdata)
    sizes = {PoolKey.for_spec(evolve(instance_spec({}), instance_type=e.instance_type, vcpus=e.vcpus,
                                     memory_mib=e.memory_mib, image=e.image), digest): e.size for e in entries}
    config = PoolConfig(ttl=options["pool-ttl"], pool_dir=pool_dir, tls_min_version=options["tls-min-version"],
                        tls_cipher_suites=options.cipher_suites)
    claimer = Claimer(reactor, proxies.client_endpoint, options["forwarder-port"], issuer)
    boot_timeout = options["proxy-timeout"]  # the bound of a cold VM's boot bounds a pool VM's too

    def probe(vm: PoolVM) -> Deferred[None]:
        return Deferred.fromCoroutine(claimer.wait_answering(vm, boot_timeout))

    pool = PoolManager(reactor, provider, issuer, config, [], lambda _key: default_initdata, run, sizes=sizes,
                       peerpods=peerpods, probe=probe)
    return pool, claimer


def build_daemon(reactor: INodeReactor, options: AdaptorOptions, *, on_fatal: Callable[[], None],
                 provider: IProvider | None = None, environ: Mapping[str, str] | None = None,
                 journal_runner: Runner | None = None) -> AdaptorDaemon:
    """The daemon for a parsed command line: provider, TLS, agent proxies, journal, pod network, the optional
    Kubernetes pull-secret lookup, the sandbox service and its ttrpc handlers. `journal_runner` replaces the
    journal's thread pool (unit tests on a memory reactor run the writes inline)."""
    env = os.environ if environ is None else environ
    if provider is None:
        assert options.provider_factory is not None and options.provider_options is not None
        provider = options.provider_factory.create(reactor, options.provider_options)
    proxy_tls, issuer = build_tls(options)
    from caa.adaptor.proxy import AgentProxyFactory

    proxies: IAgentProxyFactory = AgentProxyFactory(reactor, proxy_tls, options["direct-volumes-dir"],
                                                    boot_window=options.boot_window)
    pools: list[ThreadPool] = []
    # Journal writes (write, fsync, rename, dir fsync) leave the reactor thread; the store keeps them in
    # order per sandbox, and the service waits for each intent to be durable before its side effect.
    if journal_runner is None:
        journal_pool = ThreadPool(minthreads=0, maxthreads=JOURNAL_THREADS, name="caa-journal")
        pools.append(journal_pool)
        journal_runner = threadpool_runner(reactor, journal_pool)
    store = SandboxStore(options["pods-dir"], journal_runner)
    network = _network(reactor, options, pools)
    auth_lookup = None
    cluster: IClusterDuties = NullClusterDuties()
    kube = _kube_client(reactor, options, pools)
    if kube is not None:
        from caa.adaptor.cluster import ClusterDuties, ClusterSettings
        from caa.adaptor.pullsecrets import KubernetesPullSecrets

        auth_lookup = KubernetesPullSecrets(kube)
        if env.get("NODE_NAME"):
            factory_name = getattr(options.provider_factory, "name", "") or options["provider"]
            cluster = ClusterDuties(reactor, kube, ClusterSettings(
                node_name=env["NODE_NAME"], provider=str(factory_name), limit=options["peerpods-limit-per-node"],
                pod_uid=env.get("POD_UID", ""), runtime_class=env.get("RUNTIMECLASS_NAME") or "kata-remote",
                started=time.time(), namespace=env.get("POD_NAMESPACE") or "confidential-containers-system"))
        else:
            AdaptorDaemon._log.warn("NODE_NAME is not set: no kata.peerpods.io/vm on the node, no PeerPods")
    pool, claimer = _pool(reactor, options, provider, issuer, proxies, journal_runner, IPoolPeerPods(cluster, None))
    cloud = CloudService(
        reactor, provider, proxies, store, network, issuer,
        ServiceConfig(pods_dir=options["pods-dir"], forwarder_port=options["forwarder-port"],
                      proxy_timeout=options["proxy-timeout"], disable_tls=bool(options["disable-tls"]),
                      tls_min_version=options["tls-min-version"], tls_cipher_suites=options.cipher_suites,
                      initdata=options["initdata"], enable_scratch_space=bool(options["enable-scratch-space"]),
                      ext_network_via_podvm=bool(options["ext-network-via-podvm"]),
                      direct_volumes_dir=options["direct-volumes-dir"],
                      drain_timeout=options["drain-timeout"]),
        auth_lookup=auth_lookup, cluster=cluster, pool=pool, claimer=claimer)
    server = Server(clock=reactor, name="hypervisor")
    HypervisorHandlers(cloud).register(server)
    daemon = AdaptorDaemon(reactor, DaemonSettings.from_options(options), server=server, cloud=cloud,
                           provider=provider, store=store, network=network, thread_pools=pools, on_fatal=on_fatal,
                           cluster=cluster, pool=pool)
    # caactl list asks the adaptor itself (its in-memory view), not a journal directory of its own; a newer
    # adaptor asks it to hand over.
    register_admin(server, cloud.records, daemon.hand_over)
    return daemon
