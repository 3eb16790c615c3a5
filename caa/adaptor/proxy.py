"""The per-sandbox agent proxy (spec-adaptor §3): shim -> unix socket -> one ttrpc link -> pod VM forwarder.

Each `AgentProxy` serves `<pods-dir>/<sid>/agent.ttrpc` (mode 0600) with a generic `caa.ttrpc.Relay`: every
service and method passes through as raw bytes with its metadata and remaining deadline; only
`grpc.AgentService/CreateContainer` is rewritten (`caa.adaptor.interceptors`). Upstream is one ttrpc connection
to `<vm-ip>:<forwarder-port>`, mutual TLS unless `--disable-tls`.

Where we differ from upstream (the Go weak points, §3.3/§3.4):

- dial back-off starts at 100 ms, doubles and is capped at 1 s (upstream: capped at 5 s), each attempt bounded
  by `attempt_timeout` (TCP connect plus TLS handshake); StartVM returns the moment the first link is up;
- with a boot window (`caa.dialer.BootWindow`, the adaptor's `--dial-boot-window`/`--dial-boot-period`/
  `--dial-boot-rate`), the first dial retries every 50 ms while the VM is expected to be booting, each TCP
  connect bounded by 250 ms (the TLS handshake keeps the rest of `attempt_timeout`), so the link is up within
  ~50 ms of the forwarder listening; all proxies of the adaptor share one rate (`caa.dialer.BootPacer`), so
  many VMs booting at once slow each one's period instead of flooding the node; the retries of the window are
  logged once every `RETRY_LOG_EVERY` seconds, not each;
- the dial is cancellable: `stop()` or a cancelled `start()` ends it at once, nothing is left scheduled;
- the link heals: when it drops, only the calls in flight fail (Unavailable) and the proxy dials again; calls
  that arrive meanwhile wait for the new link within their own deadline;
- `stop()` closes the listener, every shim connection and the upstream link at once (no graceful wait on the
  shim's long-polling GetOOMEvent);
- the socket file is ours (`caa.adaptor.listeners.OwnedUnixSocket`): it appears at its path in one rename, so a
  newer adaptor re-adopting the sandbox replaces it without a moment where the path is missing, and we remove it
  only while it is still the one we made;
- `drain(timeout)` (after a rolling update handed the sandbox to a newer adaptor): the shim connections already
  open keep relaying until their clients close them or the timeout passes; then the proxy stops.

The dialling, back-off and redial are `caa.dialer.Link` (a `ClientService`), shared with the forwarder's link
to kata-agent.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import ssl as tssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IReactorFDSet,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from caa.adaptor import metrics
from caa.adaptor.interceptors import (
    DIRECT_VOLUMES_DIR,
    LOGGED_METHODS,
    CreateContainerInterceptor,
    describe_call,
)
from caa.adaptor.interfaces import IAgentProxy, IAgentProxyFactory, ProxyTLS
from caa.adaptor.listeners import OwnedUnixSocket
from caa.dialer import BootPacer, BootWindow, Link, LinkStopped, dial_backoff
from caa.notifier import Notifier
from caa.reactors import INodeReactor
from caa.ttrpc import CallContext, Code, Relay, Server, TTRPCClient, TTRPCError
from caa.ttrpc.endpoints import tcp_client_endpoint, tls_client_endpoint
from caa.ttrpc.relay import Interceptor

AGENT_SERVICE = "grpc.AgentService"
#: Go's dialer enables keepalive with a 15 s period; we also bound the probe count so a vanished VM is
#: noticed in about 30 s.
KEEPALIVE_IDLE = 15
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
#: While a boot window retries every 50 ms, one "Retrying" line per this many seconds (or on a new error).
RETRY_LOG_EVERY = 5.0

EndpointMaker = Callable[[str, int, str], IStreamClientEndpoint]


def _tcp_socket(transport: Any) -> socket.socket | None:
    """The TCP socket under `transport` (through a TLS wrapper), or None."""
    for _ in range(3):
        if transport is None:
            return None
        wrapped = getattr(transport, "wrappedProtocol", None)
        if wrapped is not None:  # TLSMemoryBIOProtocol: its own transport is the TCP one
            transport = transport.transport
            continue
        handle = getattr(transport, "getHandle", lambda: None)()
        return handle if isinstance(handle, socket.socket) else None
    return None


def _enable_keepalive(transport: Any) -> None:
    sock = _tcp_socket(transport)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:
        pass


@implementer(IHandshakeListener)
class _Upstream(TTRPCClient):
    """The ttrpc client of the forwarder link; `ready` fires once TCP (and the TLS handshake) is done.

    With TLS 1.3 the client finishes its handshake before the server has checked the client certificate, so a
    refused certificate shows up only as an alert one round trip later. `ready` therefore waits, for TLS 1.3,
    10 ms plus two round trips more (the TCP connect time measures one; at most 250 ms): a link the server
    refuses fails the attempt instead of counting as connected.
    """

    TLS13_SETTLE = (0.01, 0.25)

    def __init__(self, clock: IReactorTime, name: str, tls: bool, dialled_at: float = 0.0) -> None:
        super().__init__(clock, name)
        self._tls = tls
        self._dialled_at = dialled_at
        self.ready: Deferred[None] = Deferred()
        self._made_at = 0.0
        self._settle: IDelayedCall | None = None
        self.lost_reason = ""

    def connectionMade(self) -> None:
        super().connectionMade()
        self._made_at = self._clock.seconds()
        _enable_keepalive(self.transport)
        if not self._tls:
            self._set_ready()

    def handshakeCompleted(self) -> None:
        version = ""
        try:
            version = self.transport.getHandle().get_protocol_version_name()  # type: ignore[union-attr]
        except Exception:
            pass
        if version == "TLSv1.3":
            rtt = self._made_at - self._dialled_at
            lo, hi = self.TLS13_SETTLE
            self._settle = self._clock.callLater(min(hi, lo + 2 * rtt), self._set_ready)
        else:
            self._set_ready()

    def _set_ready(self) -> None:
        if not self.ready.called:
            self.ready.callback(None)

    def connectionLost(self, reason: Failure = Failure(Exception("closed"))) -> None:  # noqa: B008
        self.lost_reason = reason.getErrorMessage()
        super().connectionLost(reason)
        if self._settle is not None and self._settle.active():
            self._settle.cancel()
        if not self.ready.called:
            self.ready.errback(reason)


@implementer(IAgentProxy)
class AgentProxy:
    """One sandbox's agent proxy (see the module docstring and `IAgentProxy`)."""

    _log = Logger()

    def __init__(
        self,
        reactor: INodeReactor,
        sandbox_id: str,
        socket_path: str,
        make_endpoint: EndpointMaker,
        tls: bool,
        retry_policy: Callable[[int], float],
        attempt_timeout: float,
        interceptors: dict[tuple[str, str], Interceptor],
        boot_window: BootWindow | None = None,
        boot_pacer: BootPacer | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.sandbox_id = sandbox_id
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._make_endpoint = make_endpoint
        self._tls = tls
        self._policy = retry_policy
        self._attempt_timeout = attempt_timeout
        self._boot_window = boot_window
        self._boot_pacer = boot_pacer
        self._retry_logged: tuple[str, float] | None = None  # (error, when) of the last "Retrying" line
        self._server = Server(clock=reactor, name=f"agent-proxy {sandbox_id}")
        self._relay = Relay(self._get_client, clock=reactor, interceptors=interceptors,
                            observer=self._observe, name=f"agent-proxy {sandbox_id}")
        self._server.register_fallback(self._relay.handle)
        self._port: OwnedUnixSocket | None = None
        self.link: Link[_Upstream] | None = None  # made by start()
        self._address = ""
        self._started = False
        self._stopped = False
        self._stopping: Deferred[None] | None = None
        self._stop_finished = False
        self._stop_waiters: Notifier[None] = Notifier()

    @property
    def connections(self) -> int:
        """Upstream links made (1 + reconnects)."""
        return 0 if self.link is None else self.link.connections

    # -- IAgentProxy
    def start(self, address: tuple[str, int], server_name: str, deadline: float) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start(address, server_name, deadline))

    def stop(self) -> Deferred[None]:
        if self._stop_finished:
            return succeed(None)
        done = self._stop_waiters.wait()
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop())
            self._stopping.addBoth(self._stopped_all)
        return done

    # -- start
    def _failed(self, code: Code, why: str) -> TTRPCError:
        return TTRPCError(code, f"failed to establish agent proxy connection to {self._address}: {why}")

    async def _start(self, address: tuple[str, int], server_name: str, deadline: float) -> None:
        host, port = address
        self._address = f"{host}:{port}"
        if self._started or self._stopped:
            raise self._failed(Code.UNAVAILABLE,
                               "agent proxy stopped" if self._stopped else "agent proxy already started")
        self._started = True
        port_ = OwnedUnixSocket(IReactorFDSet(self._reactor), self._reactor, self.socket_path,
                                self._server.factory(), mode=0o600, dir_mode=0o700)
        try:
            port_.bind()
            port_.publish()  # replaces an older adaptor's socket of this sandbox in one rename
        except OSError as e:
            port_.close()
            self._stopped = True
            raise TTRPCError(Code.INTERNAL, f"agent proxy: listening on {self.socket_path}: {e}") from e
        self._port = port_
        link: Link[_Upstream] = Link(
            self._make_endpoint(host, port, server_name), self._new_upstream, self._clock, self._policy,
            attempt_timeout=self._attempt_timeout, client_ready=lambda client: client.ready,
            on_link=self._linked, on_drop=self._dropped, on_retry=self._retrying, boot_window=self._boot_window,
            boot_pacer=self._boot_pacer)
        self.link = link
        link.startService()
        t0 = self._clock.seconds()
        first = link.wait()
        first.addTimeout(max(0.0, deadline - t0), self._clock)
        try:
            await first
        except BaseException as e:
            if not self._stopped:
                await self.stop()
            if isinstance(e, DeferredTimeout):
                raise self._failed(Code.DEADLINE_EXCEEDED, link.last_error) from None
            if isinstance(e, LinkStopped):
                raise self._failed(Code.UNAVAILABLE, "agent proxy stopped") from None
            raise
        self._log.info("{sandbox_id}: agent proxy connected to {address} in {elapsed:.3f}s; serving {socket}",
                       sandbox_id=self.sandbox_id, address=self._address,
                       elapsed=self._clock.seconds() - t0, socket=self.socket_path)

    # -- the link (caa.dialer.Link: back-off, redial when it drops)
    def _new_upstream(self, dialled_at: float) -> _Upstream:
        return _Upstream(self._clock, f"agent-proxy {self.sandbox_id}", self._tls, dialled_at)

    def _linked(self, client: _Upstream) -> None:
        if self.connections > 1:
            metrics.PROXY_RECONNECTS.inc()
            self._log.info("{sandbox_id}: agent proxy reconnected to {address}", sandbox_id=self.sandbox_id,
                           address=self._address)

    def _dropped(self, client: _Upstream, lived: float) -> None:
        self._log.warn("{sandbox_id}: agent proxy link to {address} lost after {lived:.1f}s ({reason}); "
                       "reconnecting", sandbox_id=self.sandbox_id, address=self._address, lived=lived,
                       reason=client.close_reason or client.lost_reason or "closed")

    def _retrying(self, error: str, attempt: int, delay: float) -> None:
        now = self._clock.seconds()
        last = self._retry_logged
        link = self.link
        if (link is not None and link.in_boot_window() and last is not None and last[0] == error
                and now - last[1] < RETRY_LOG_EVERY):
            return
        self._retry_logged = (error, now)
        self._log.info("{sandbox_id}: Retrying failed agent proxy connection: {error} (attempt {attempt}, "
                       "next in {delay:.2f}s)", sandbox_id=self.sandbox_id, error=error, attempt=attempt,
                       delay=delay, address=self._address)

    def _get_client(self) -> Deferred[TTRPCClient] | TTRPCClient:
        link = self.link
        if self._stopped or link is None:
            raise TTRPCError(Code.UNAVAILABLE, "agent proxy stopped" if self._stopped else "agent proxy not started")
        client = link.current
        if client is not None and client.connected:
            return client
        # a call that arrives while the link heals waits for it (the server cancels it at the call's deadline)
        waiting: Deferred[TTRPCClient] = link.wait()  # type: ignore[assignment]
        return waiting.addErrback(_unavailable_when_stopped)

    def _observe(self, ctx: CallContext, n_in: int, n_out: int, code: int) -> None:
        method = f"{ctx.service}/{ctx.method}"
        name = Code(code).name if code in Code._value2member_map_ else str(code)
        metrics.PROXY_CALLS.labels(method=method, code=name).inc()
        metrics.PROXY_BYTES.labels(method=method, direction="to_agent").inc(n_in)
        metrics.PROXY_BYTES.labels(method=method, direction="from_agent").inc(n_out)
        if code != Code.OK and ctx.service == AGENT_SERVICE and (
                ctx.method in LOGGED_METHODS or ctx.method == "CreateContainer"):
            self._log.warn("{sandbox_id}: {method} fails: {code}", sandbox_id=self.sandbox_id,
                           method=ctx.method, code=name)

    # -- drain (rolling update)
    def drain(self, timeout: float) -> Deferred[None]:
        return Deferred.fromCoroutine(self._drain(timeout))

    async def _drain(self, timeout: float) -> None:
        if self._stopping is None and self._started:
            await self._close_port()  # no new connections here; the path is the newer adaptor's by now
            open_now = self._server.connection_count
            if open_now:
                self._log.info("{sandbox_id}: draining {n} shim connections (at most {timeout}s)",
                               sandbox_id=self.sandbox_id, n=open_now, timeout=timeout)
            dropped = await self._server.drain(timeout)
            if dropped:
                self._log.warn("{sandbox_id}: drain deadline passed: closing {n} shim connections still open",
                               sandbox_id=self.sandbox_id, n=dropped)
        await self.stop()

    # -- stop
    async def _stop(self) -> None:
        self._stopped = True
        self._server.abort()
        if self.link is not None:
            await self.link.stopService()  # cancels a dial, aborts the link, fails waiting calls and start()
        await self._close_port()
        if self._started:
            self._log.info("{sandbox_id}: agent proxy stopped", sandbox_id=self.sandbox_id)

    async def _close_port(self) -> None:
        """Stop listening; the socket file goes only while it is ours (a newer adaptor's stays)."""
        port, self._port = self._port, None
        if port is not None:
            port.close()

    def _stopped_all(self, result: object) -> None:
        if isinstance(result, Failure):
            self._log.failure("{sandbox_id}: stopping agent proxy", result, sandbox_id=self.sandbox_id)
        self._stop_finished = True
        self._stop_waiters.notify(None)


def _unavailable_when_stopped(failure: Failure) -> TTRPCClient:
    failure.trap(LinkStopped)
    raise TTRPCError(Code.UNAVAILABLE, "agent proxy stopped")



def _insecure_creator(tls: ProxyTLS) -> Any:
    from caa.tls import parse_min_version

    pc = tssl.PrivateCertificate.loadPEM(tls.cert_pem + b"\n" + tls.key_pem)
    return tssl.CertificateOptions(privateKey=pc.privateKey.original, certificate=pc.original, verify=False,
                                   raiseMinimumTo=parse_min_version(tls.min_version))


@implementer(IAgentProxyFactory)
class AgentProxyFactory:
    """Makes `AgentProxy`s; holds the TLS client material they share (None = --disable-tls)."""

    _log = Logger()

    def __init__(
        self,
        reactor: INodeReactor,
        tls: ProxyTLS | None,
        volumes_dir: str = DIRECT_VOLUMES_DIR,
        retry_policy: Callable[[int], float] | None = None,
        attempt_timeout: float = 2.0,
        make_endpoint: EndpointMaker | None = None,
        boot_window: BootWindow | None = None,
    ) -> None:
        self._reactor = reactor
        self._boot_window = boot_window
        # one per adaptor: the links booting together share the window's rate
        self._boot_pacer = None if boot_window is None else BootPacer(boot_window.max_rate)
        self._tls = tls
        self._policy = retry_policy or dial_backoff()
        self._attempt_timeout = attempt_timeout
        self._make_endpoint = make_endpoint or self.client_endpoint
        self._volumes_dir = volumes_dir
        self._logged: dict[tuple[str, str], Interceptor] = {(AGENT_SERVICE, m): self._log_call for m in LOGGED_METHODS}
        if tls is not None and tls.skip_verify:
            self._log.warn("agent proxy: --tls-skip-verify: forwarder certificates are NOT verified")

    async def _log_call(self, ctx: CallContext, payload: bytes) -> bytes:
        self._log.info("{method}: {summary}", method=ctx.method, summary=describe_call(ctx.method, payload))
        return payload

    def client_endpoint(self, host: str, port: int, server_name: str) -> IStreamClientEndpoint:
        """The dialer of one forwarder: TCP, or TLS verifying `server_name` (or the manual-CA override)."""
        if self._tls is None:
            return tcp_client_endpoint(self._reactor, host, port, timeout=self._attempt_timeout)
        if self._tls.skip_verify:
            creator = _insecure_creator(self._tls)
        else:
            from caa.tls import client_creator

            creator = client_creator(self._tls.ca_pem, self._tls.cert_pem or None, self._tls.key_pem or None,
                                     self._tls.server_name_override or server_name, self._tls.min_version or None,
                                     self._tls.cipher_suites or None)
        return tls_client_endpoint(self._reactor, host, port, creator, timeout=self._attempt_timeout)

    def new(self, sandbox_id: str, socket_path: str, volumes: tuple[str, ...]) -> IAgentProxy:
        # CreateContainer numbers the cloud volumes by this sandbox's attach order, so each proxy has its own
        create = CreateContainerInterceptor(tuple(volumes), self._volumes_dir)
        interceptors: dict[tuple[str, str], Interceptor] = {**self._logged, (AGENT_SERVICE, "CreateContainer"): create}
        return AgentProxy(self._reactor, sandbox_id, socket_path, self._make_endpoint, self._tls is not None,
                          self._policy, self._attempt_timeout, interceptors, self._boot_window, self._boot_pacer)
