"""The forwarder daemon: pod network first, then the (m)TLS ttrpc listener relaying to kata-agent.

Start (spec-podvm §1.3): pod network setup -> TLS options -> listen -> READY=1. A failure after the network
was set up tears it down again. Stop: STOPPING=1, close the listener and every connection, close the agent
connection, tear the pod network down.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from caa.forwarder.agent import AgentConnection
from caa.forwarder.claim import ClaimGate
from caa.forwarder.config import ForwarderConfig
from caa.forwarder.interceptors import Interceptors
from caa.notifier import Notifier
from caa.podvm_api.claim import SERVICE as CLAIM_SERVICE
from caa.podvm_api.claim import is_bootstrap
from caa.podvm_api.cloudconfig import PEERPOD_DIR
from caa.reactors import INodeReactor
from caa.tls import SwitchableServerTLS
from caa.ttrpc import Relay, Server

__all__ = ["StartupError", "TLSSettings", "ForwarderService", "sd_notify", "build_server_tls"]


class StartupError(Exception):
    """The forwarder cannot start; the message is the one line printed before exiting 1."""


def sd_notify(state: str, environ: Any = os.environ) -> bool:
    """Send `state` to systemd's $NOTIFY_SOCKET (leading '@' = abstract namespace). False when unset."""
    path = environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(state.encode())
    return True


@attrs.frozen(repr=False)
class TLSSettings:
    """TLS from the flags; empty fields are filled from apf.json (upstream's merge rule, §1.3 step 5)."""

    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    skip_verify: bool = False

    def __repr__(self) -> str:
        return f"TLSSettings(cert={self.cert_file!r}, key=<file>, ca={self.ca_file!r}, skip={self.skip_verify})"


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise StartupError(f"cannot read {what} {path}: {e.strerror}") from None


def build_server_tls(settings: TLSSettings, config: ForwarderConfig) -> Any:
    """The server TLS options from flags and apf.json (spec-podvm §1.4); StartupError when unusable."""
    from caa import tls

    if settings.cert_file and settings.key_file:
        cert, key = _read(settings.cert_file, "certificate"), _read(settings.key_file, "key")
    else:
        cert, key = config.tls_server_cert.encode(), config.tls_server_key.encode()
    ca = _read(settings.ca_file, "CA bundle") if settings.ca_file else config.tls_client_ca.encode()
    if ca and settings.skip_verify:
        raise StartupError("specifying a root certificates file with the insecure flag is not allowed")
    if not cert or not key:
        raise StartupError("TLS needs a server certificate and key (--cert-file/--cert-key or apf.json "
                           "tls-server-cert/tls-server-key), or --disable-tls")
    try:
        return tls.server_context_factory(cert, key, ca or None, config.tls_min_version,
                                          list(config.tls_cipher_suites))
    except (tls.TLSConfigError, ValueError) as e:
        raise StartupError(f"invalid TLS configuration: {e}") from None


class ForwarderService(MultiService):
    """Owns the agent connection (a child service), the ttrpc server and its listener, the pod network."""

    _log = Logger()

    def __init__(
        self,
        reactor: INodeReactor,
        config: ForwarderConfig,
        endpoint: IStreamServerEndpoint,
        agent_endpoint: IStreamClientEndpoint,
        pod_netns: str,
        tls_options: Callable[[], Any] | None = None,
        pod_network: Any = None,
        run_blocking: Callable[..., Deferred[Any]] | None = None,
        on_fatal: Callable[[str], None] | None = None,
        environ: Any = os.environ,
        cdh_endpoint: Callable[[], Any] | None = None,
        peerpod_dir: str = PEERPOD_DIR,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self.config = config
        self._endpoint = endpoint
        self._tls_options = tls_options
        self._pod_network = pod_network
        self._pod_netns = pod_netns
        self._on_fatal = on_fatal
        self._environ = environ
        self.agent = AgentConnection(agent_endpoint, reactor)
        self.agent.setServiceParent(self)
        kwargs: dict[str, Any] = {"cdh_endpoint": cdh_endpoint}
        if run_blocking is not None:
            kwargs["run_blocking"] = run_blocking
        self.interceptors = Interceptors(netns_path=pod_netns, clock=reactor, **kwargs)
        self.relay = Relay(self.agent.get, clock=reactor, interceptors=self.interceptors.table(),
                           name="forwarder")
        self.server = Server(clock=reactor, name="forwarder")
        # A pool VM's bootstrap apf.json: serve only Claim until claimed, then the pod's certificate.
        self.claim_gate: ClaimGate | None = None
        self._switchable_tls: SwitchableServerTLS | None = None
        if is_bootstrap(config):
            self.claim_gate = ClaimGate(config, self.relay.handle, self._claimed, peerpod_dir,
                                        lambda pod: build_server_tls(TLSSettings(), self._pod_tls_config(pod)))
            self.claim_gate.register(self.server)
        else:
            self.server.register_fallback(self.relay.handle)
        self.port: IListeningPort | None = None
        self._network_up = False
        self._ready: IListeningPort | Failure | None = None  # the listening port, or the startup Failure
        self._ready_waiters: Notifier[IListeningPort] = Notifier()
        self._starting: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._fatal)

    async def _start(self) -> None:
        if self.claim_gate is not None:
            if self._tls_options is None:
                raise StartupError("a pool VM (bootstrap apf.json) needs TLS: --disable-tls is refused")
            self._log.info("pool VM {vm}: unclaimed, serving only {service}/Claim",
                           vm=self.claim_gate.vm_name, service=CLAIM_SERVICE)
        else:
            await self._setup_network()
        try:
            factory: Any = self.server.factory()
            if self._tls_options is not None:
                from twisted.protocols.tls import TLSMemoryBIOFactory

                options = self._tls_options()
                if self.claim_gate is not None:
                    options = self._switchable_tls = SwitchableServerTLS(options)
                factory = TLSMemoryBIOFactory(options, False, factory)
            self.port = await self._endpoint.listen(factory)
        except BaseException as e:
            await self._teardown_network()
            if isinstance(e, StartupError):
                raise
            raise StartupError(f"failed to listen: {e}") from e
        host = self.port.getHost()
        self._log.info("listening on {host}:{port} ({mode})", host=getattr(host, "host", ""),
                       port=getattr(host, "port", ""), mode="TLS" if self._tls_options else "plain TCP")
        try:
            sd_notify("READY=1", self._environ)
        except OSError as e:
            self._log.warn("sd_notify READY=1 failed: {error}", error=str(e))
        self._set_ready(self.port)

    def _pod_tls_config(self, pod: ForwarderConfig) -> ForwarderConfig:
        """The pod's apf.json for its TLS options; the trusted client stays the bootstrap one unless given."""
        if pod.tls_client_ca:
            return pod
        return attrs.evolve(pod, tls_client_ca=self.config.tls_client_ca)

    async def _claimed(self, pod: ForwarderConfig, tls_options: Any) -> None:
        """A Claim was accepted: the pod's network, then its certificate for every new connection."""
        self.config = pod
        await self._setup_network()
        assert self._switchable_tls is not None
        self._switchable_tls.switch(tls_options)
        self._log.info("serving pod {ns}/{pod} with its own certificate", ns=pod.pod_namespace, pod=pod.pod_name)

    async def _setup_network(self) -> None:
        net = self.config.pod_network
        if net is not None and self._pod_network is not None:
            self._log.info("setting up the pod network in {netns} (VNI {vni})", netns=self._pod_netns,
                           vni=net.vxlan_id)
            try:
                await self._pod_network.setup(net, self._pod_netns)
            except Exception as e:
                raise StartupError(f"failed to set up pod network: {e}") from e
            self._network_up = True
        elif net is None:
            self._log.warn("apf.json has no pod-network: serving without a pod network")

    def _set_ready(self, result: IListeningPort | Failure) -> None:
        self._ready = result
        if isinstance(result, Failure):
            self._ready_waiters.fail(result)
        else:
            self._ready_waiters.notify(result)

    def when_ready(self) -> Deferred[IListeningPort]:
        """Fires with the listening port once serving, or fails with StartupError."""
        if self._ready is None:
            return self._ready_waiters.wait()
        if isinstance(self._ready, Failure):
            return fail(self._ready)
        return succeed(self._ready)

    def _fatal(self, f: Any) -> None:
        msg = f.getErrorMessage() if f.check(StartupError) else f"startup failed: {f.getErrorMessage()}"
        if not f.check(StartupError):
            self._log.failure("forwarder startup failed", f)
        self._log.critical("{message}", message=msg)
        if self._ready is None:
            self._set_ready(Failure(StartupError(msg)))
        if self._on_fatal is not None:
            self._on_fatal(msg)

    async def _teardown_network(self) -> None:
        net = self.config.pod_network
        if not self._network_up or net is None or self._pod_network is None:
            return
        self._network_up = False
        try:
            await self._pod_network.teardown(net, self._pod_netns)
            self._log.info("pod network torn down")
        except Exception as e:
            self._log.error("pod network teardown: {error}", error=str(e))

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        try:
            sd_notify("STOPPING=1", self._environ)
        except OSError:
            pass
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        if self.port is not None:
            port, self.port = self.port, None
            stopping: Any = port.stopListening()
            if stopping is not None:
                await stopping
        self.server.abort()
        stopped = super().stopService()
        if stopped is not None:
            await stopped
        await self._teardown_network()
