"""`twistd caa-adaptor`: builds the node daemon's service tree (the only place the real reactor is used)."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from caa.adaptor.adapters import AutoTLS, NodeNetworking, NullNetworking
from caa.adaptor.interfaces import IAgentProxyFactory, IAgentTLS, IPodNetworking, ProxyTLS
from caa.adaptor.options import AdaptorOptions
from caa.adaptor.rpc import HypervisorHandlers
from caa.adaptor.service import VERSION, CloudService, ServiceConfig
from caa.adaptor.store import JOURNAL_THREADS, SandboxStore, threadpool_runner
from caa.providers.interfaces import IProvider
from caa.ttrpc import Server
from caa.ttrpc.endpoints import prepare_unix_path

Options = AdaptorOptions


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


class _Probe(Resource):
    """GET /startup: 200 once the hypervisor socket accepts connections and the journal is recovered."""

    isLeaf = True

    def __init__(self, daemon: AdaptorDaemon) -> None:
        super().__init__()
        self.daemon = daemon

    def render(self, request: Request) -> bytes:
        ok = self.daemon.recovered and _can_connect(self.daemon.socket_path)
        request.setResponseCode(200 if ok else 500)
        return b"" if ok else b"not ready\n"


def _list_dir(directory: str) -> list[str]:
    try:
        return [os.path.join(directory, n) for n in sorted(os.listdir(directory))]
    except FileNotFoundError:
        return []


def _identity(path: str) -> tuple[int, int, int]:
    """Who made the file at path: inode numbers are reused at once, so the change time is part of it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _can_connect(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class AdaptorDaemon(MultiService):
    """The hypervisor ttrpc server, journal recovery, probe, metrics and the orphan sweeper."""

    _log = Logger()

    def __init__(self, reactor: Any, options: AdaptorOptions) -> None:
        super().__init__()
        self.reactor = reactor
        self.options = options
        self.socket_path: str = options["socket"]
        self.recovered = False
        self._port: Any = None
        self._identity: tuple[int, int, int] | None = None
        self._threadpool: ThreadPool | None = None
        assert options.provider_factory is not None and options.provider_options is not None
        self.provider: IProvider = options.provider_factory.create(reactor, options.provider_options)
        proxy_tls, issuer = build_tls(options)
        from caa.adaptor.proxy import AgentProxyFactory

        self.proxies: IAgentProxyFactory = AgentProxyFactory(reactor, proxy_tls)
        # Journal writes (fsync) run here, off the reactor thread; the store keeps each sandbox's writes in order.
        self._journal_pool = ThreadPool(minthreads=0, maxthreads=JOURNAL_THREADS, name="caa-journal")
        self.store = SandboxStore(options["pods-dir"], threadpool_runner(reactor, self._journal_pool))
        self.network = self._network()
        auth_lookup = None
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            from caa.adaptor.pullsecrets import KubernetesPullSecrets

            self._k8s_pool = ThreadPool(minthreads=0, maxthreads=4, name="caa-k8s")
            reactor.callWhenRunning(self._k8s_pool.start)
            reactor.addSystemEventTrigger("during", "shutdown", self._k8s_pool.stop)
            try:
                auth_lookup = KubernetesPullSecrets(reactor, self._k8s_pool)
            except Exception as e:
                self._log.warn("no Kubernetes client ({error}): image pull secrets are not sent to pod VMs",
                               error=str(e))
        self.cloud = CloudService(
            reactor, self.provider, self.proxies, self.store, self.network, issuer,
            ServiceConfig(pods_dir=options["pods-dir"], forwarder_port=options["forwarder-port"],
                          proxy_timeout=options["proxy-timeout"], disable_tls=bool(options["disable-tls"]),
                          tls_min_version=options["tls-min-version"], tls_cipher_suites=options.cipher_suites,
                          initdata=options["initdata"], enable_scratch_space=bool(options["enable-scratch-space"]),
                          ext_network_via_podvm=bool(options["ext-network-via-podvm"])),
            auth_lookup=auth_lookup)
        self.server = Server(clock=reactor, name="hypervisor")
        HypervisorHandlers(self.cloud).register(self.server)
        sweeper = TimerService(60.0, self._sweep)
        sweeper.setServiceParent(self)

    def _network(self) -> IPodNetworking:
        if self.options["tunnel-type"] == "none":
            return NullNetworking()
        from caa.network.node import NodeNetwork
        from caa.network.vni import JsonFileVniStore, VniAllocator

        self._threadpool = ThreadPool(minthreads=1, maxthreads=8, name="caa-network")
        allocator = VniAllocator(JsonFileVniStore(os.path.join(self.options["pods-dir"], "vni.json")),
                                 min_id=self.options["vxlan-min-id"])
        node = NodeNetwork(self.reactor, self._threadpool, allocator,
                           host_interface=self.options["host-interface"], vxlan_port=self.options["vxlan-port"],
                           pod_subnet_cidrs=self.options.pod_subnet_cidrs,
                           external_net_via_pod_vm=bool(self.options["ext-network-via-podvm"]),
                           netns_lister=lambda: _list_dir(self.options["netns-dir"]))
        return NodeNetworking(node)

    def _sweep(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self.cloud.sweep())
        d.addErrback(lambda f: self._log.failure("sweep failed", f))
        return d

    def startService(self) -> None:
        self._log.info("starting Cloud API Adaptor daemon for {provider} (version {version})",
                       provider=self.options["provider"], version=VERSION)
        if self.options["disable-tls"]:
            self._log.warn("TLS is disabled: the agent connection to pod VMs is plain TCP")
        # Listen synchronously so a bad socket path aborts startup.
        # Worker threads start only once listening worked: a live non-daemon thread would keep a process
        # whose startup failed from exiting.
        try:
            prepare_unix_path(self.socket_path)
            self._port = self.reactor.listenUNIX(self.socket_path, self.server.factory(),
                                                 mode=self.options["socket-mode"], wantPID=False)
        except Exception as e:
            self._log.critical("cannot listen on {socket}: {error}", socket=self.socket_path, error=str(e))
            raise
        os.chmod(self.socket_path, self.options["socket-mode"])
        if self._threadpool is not None:
            self._threadpool.start()
        self._journal_pool.start()
        self._identity = _identity(self.socket_path)
        self._log.info("server started on {socket}", socket=self.socket_path)
        self._start_probe()
        self._start_metrics()
        super().startService()
        ensureDeferred(self._after_start())

    async def _after_start(self) -> None:
        try:
            if self.options["cloud-config-verify"]:
                try:
                    await self.provider.verify_config()
                except Exception as e:
                    self._log.critical("provider configuration check failed: {error}", error=str(e))
                    self.exit_code = 1
                    self.reactor.callLater(0, self.reactor.stop)  # may run before the reactor does
                    return
            await self.cloud.recover()
            if isinstance(self.network, NodeNetworking):
                records = [sb.record for sb in self.cloud.sandboxes.values()]
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
        finally:
            self.recovered = True
            self._log.info("journal recovery done; {n} sandboxes", n=len(self.cloud.sandboxes))

    exit_code = 0

    def _start_probe(self) -> None:
        port = int(self.options["probe-port"])
        if not port:
            return
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(16)
            s.setblocking(False)
            self._probe_port = self.reactor.adoptStreamPort(s.fileno(), socket.AF_INET, Site(_Probe(self)))
        except OSError as e:
            self._log.warn("startup probe on 127.0.0.1:{port} not started: {error}", port=port, error=str(e))
        finally:
            s.close()

    def _start_metrics(self) -> None:
        port = int(self.options["metrics-port"])
        if not port:
            return
        from prometheus_client.twisted import MetricsResource

        from caa.adaptor.metrics import REGISTRY

        root = Resource()
        root.putChild(b"metrics", MetricsResource(registry=REGISTRY))
        self._metrics_port = self.reactor.listenTCP(port, Site(root), interface=self.options["metrics-interface"])
        self._log.info("metrics on {iface}:{port}/metrics", iface=self.options["metrics-interface"], port=port)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._log.info("shutting down: VMs, tunnels and the journal stay for the next start")
        await super().stopService()
        if self._port is not None:
            owner = False
            try:
                owner = _identity(self.socket_path) == self._identity
            except OSError:
                pass
            if not owner:
                # A newer adaptor took the path over: do not let Twisted unlink its socket.
                self._port._bindPath = "\0caa-not-owner"
            await self._port.stopListening()
        for name in ("_probe_port", "_metrics_port"):
            p = getattr(self, name, None)
            if p is not None:
                await p.stopListening()
        await self.cloud.shutdown()
        await self.server.stop(timeout=1.0)
        self.server.abort()
        try:
            await self.provider.teardown()
        except Exception as e:
            self._log.warn("provider teardown: {error}", error=str(e))
        if self._threadpool is not None:
            self._threadpool.stop()
        self._journal_pool.stop()


def makeService(options: AdaptorOptions) -> IService:
    from twisted.internet import reactor

    daemon = AdaptorDaemon(reactor, options)

    def _exit_code() -> None:
        if daemon.exit_code:
            os._exit(daemon.exit_code)

    reactor.addSystemEventTrigger("after", "shutdown", _exit_code)
    return daemon


__all__ = ["Options", "makeService", "AdaptorDaemon"]
