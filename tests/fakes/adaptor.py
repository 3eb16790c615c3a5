"""Fakes of the hypervisor service's seams: the agent proxy (caa.adaptor.proxy), the node networking
(caa.network over INodeNetwork) and the TLS issuer (caa.tls). They record calls and let a test decide
when and how each step finishes."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from zope.interface import implementer

from caa.adaptor.interfaces import IAgentProxy, IAgentProxyFactory, IAgentTLS, IPodNetworking
from caa.network.interfaces import PodNetworkConfig
from caa.ttrpc import Code, TTRPCError


@implementer(IAgentProxy)
class FakeProxy:
    """Stands for caa.adaptor.proxy's AgentProxy: start() fires when the factory says the forwarder answers."""

    def __init__(self, factory: FakeProxyFactory, sandbox_id: str, socket_path: str,
                 volumes: tuple[str, ...] = ()) -> None:
        self.factory = factory
        self.sandbox_id = sandbox_id
        self.socket_path = socket_path
        self.volumes = volumes  # the attach order its CreateContainer would number cloud volumes by
        self.started: tuple[tuple[str, int], str, float] | None = None
        self.stopped = False
        self.drained: float | None = None  # the timeout drain() was given
        self._start: Deferred[None] | None = None

    def start(self, address: tuple[str, int], server_name: str, deadline: float) -> Deferred[None]:
        self.started = (address, server_name, deadline)
        if self.factory.fail_start is not None:
            return Deferred.fromCoroutine(self._fail(self.factory.fail_start, address))
        if self.factory.auto_ready:
            return succeed(None)
        self._start = Deferred(lambda d: None)
        return self._start

    async def _fail(self, msg: str, address: tuple[str, int]) -> None:
        raise TTRPCError(Code.UNAVAILABLE,
                         f"failed to establish agent proxy connection to {address[0]}:{address[1]}: {msg}")

    def ready(self) -> None:
        assert self._start is not None
        self._start.callback(None)

    def stop(self) -> Deferred[None]:
        self.stopped = True
        if self._start is not None and not self._start.called:
            self._start.errback(CancelledError())
        return succeed(None)

    def drain(self, timeout: float) -> Deferred[None]:
        self.drained = timeout
        return self.stop()


@implementer(IAgentProxyFactory)
class FakeProxyFactory:
    def __init__(self) -> None:
        self.proxies: list[FakeProxy] = []
        self.auto_ready = True
        self.fail_start: str | None = None

    def new(self, sandbox_id: str, socket_path: str, volumes: tuple[str, ...]) -> IAgentProxy:
        p = FakeProxy(self, sandbox_id, socket_path, volumes)
        self.proxies.append(p)
        return p

    def live(self, sandbox_id: str) -> list[FakeProxy]:
        return [p for p in self.proxies if p.sandbox_id == sandbox_id and p.started and not p.stopped]


@implementer(IPodNetworking)
class FakeNetworking:
    """Stands for NodeNetworking over caa.network: allocates VNIs from 555000 and records tunnels."""

    def __init__(self) -> None:
        self.vnis: dict[str, int] = {}
        self.tunnels: dict[str, tuple[str, ...]] = {}
        self.fail_inspect: str | None = None
        self.fail_setup: str | None = None
        self.calls: list[tuple[str, str]] = []

    def inspect(self, sandbox_id: str, netns: str) -> Deferred[PodNetworkConfig]:
        self.calls.append(("inspect", sandbox_id))
        if self.fail_inspect:
            return Deferred.fromCoroutine(self._raise(self.fail_inspect))
        if sandbox_id not in self.vnis:
            used = set(self.vnis.values())
            vni = next(v for v in range(555000, 556000) if v not in used)
            self.vnis[sandbox_id] = vni
        return succeed(PodNetworkConfig(pod_ip="10.244.1.21/24", pod_hw_addr="32:b9:59:6b:f0:d5", interface="eth0",
                                        worker_node_ip="10.224.0.5/16", mtu=1450, vxlan_id=self.vnis[sandbox_id]))

    async def _raise(self, msg: str) -> Any:
        raise OSError(msg)

    def setup(self, sandbox_id: str, netns: str, ips: tuple[str, ...],
              pod_network: PodNetworkConfig) -> Deferred[None]:
        self.calls.append(("setup", sandbox_id))
        if self.fail_setup:
            return Deferred.fromCoroutine(self._raise(self.fail_setup))
        self.tunnels[sandbox_id] = ips
        return succeed(None)

    def ensure(self, sandbox_id: str, netns: str, ips: tuple[str, ...],
               pod_network: PodNetworkConfig) -> Deferred[None]:
        self.calls.append(("ensure", sandbox_id))
        if sandbox_id in self.tunnels:
            return succeed(None)
        return self.setup(sandbox_id, netns, ips, pod_network)

    def teardown(self, sandbox_id: str, netns: str, pod_network: PodNetworkConfig | None) -> Deferred[None]:
        self.calls.append(("teardown", sandbox_id))
        self.tunnels.pop(sandbox_id, None)
        self.vnis.pop(sandbox_id, None)
        return succeed(None)


@implementer(IAgentTLS)
class FakeTLS:
    """Stands for AutoTLS over caa.tls: returns recognisable PEM-like strings."""

    def __init__(self) -> None:
        self.issued: list[str] = []

    def server_credentials(self, server_name: str) -> tuple[str, str]:
        self.issued.append(server_name)
        return (f"-----BEGIN CERTIFICATE-----\n{server_name}\n-----END CERTIFICATE-----\n",
                "-----BEGIN PRIVATE KEY-----\nk\n-----END PRIVATE KEY-----\n")

    def client_ca_pem(self) -> str:
        return "-----BEGIN CERTIFICATE-----\nclient\n-----END CERTIFICATE-----\n"
