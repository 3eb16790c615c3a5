"""Claiming a warm-pool VM: one `caa.podvm.v1.PodVM/Claim` call to its forwarder over mutual TLS.

The request is built from what CreateVM already wrote for the pod (its user data: apf.json, auth.json,
initdata), with a fresh server certificate for the pool VM's name in place of the one CreateVM issued, so
the pod's secrets go only to the VM that proved its name with the adaptor's CA and accepted the token.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHandshakeListener, IReactorTime, ISSLTransport, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from caa.adaptor.interfaces import IAgentTLS
from caa.adaptor.pool import PoolVM, initdata_digest
from caa.podvm_api import claim as claim_format
from caa.podvm_api import cloudconfig
from caa.podvm_api.apf import APFConfig
from caa.podvm_api.cloudconfig import APF_PATH, AUTH_PATH, INITDATA_PATH
from caa.proto import podvm_pb2
from caa.ttrpc import connect

__all__ = ["PodUserData", "Claimer"]

EndpointFor = Callable[[str, int, str], IStreamClientEndpoint]

#: Bound of one answering probe's TLS handshake once TCP is connected (a VM paused mid-handshake).
HANDSHAKE_TIMEOUT = 5.0


@implementer(IHandshakeListener)
class _Handshake(Protocol):
    """Connects, completes the TLS handshake (the endpoint verifies the VM's pool certificate), hangs up:
    `done` fires once the connection is closed, failing unless the handshake completed."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._handshook = False
        self.done: Deferred[None] = Deferred(lambda _d: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionMade(self) -> None:
        self.done.addTimeout(HANDSHAKE_TIMEOUT, self._clock)
        if not ISSLTransport.providedBy(self.transport):  # a plain TCP endpoint: connected is answering
            self.handshakeCompleted()

    def handshakeCompleted(self) -> None:
        self._handshook = True
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(Exception("closed"))) -> None:  # noqa: B008
        if self.done.called:
            return
        if self._handshook:
            self.done.callback(None)
        else:
            self.done.errback(reason)


@attrs.frozen(repr=False)
class PodUserData:
    """The pod's files from the user data CreateVM wrote (the one source of what a VM gets), and the digest of
    its initdata (computed once: StartVM's pool key and the Claim request both carry it)."""

    apf: APFConfig
    auth_json: str
    initdata: str
    initdata_digest: str

    @classmethod
    def parse(cls, user_data: bytes, digest: Callable[[str], str]) -> PodUserData:
        """Read the pod's files; `digest` turns the encoded initdata into the digest a VM computes at boot."""
        files = {f.path: f.content for f in cloudconfig.parse(user_data)}
        encoded = files.get(INITDATA_PATH, "").strip()
        return cls(APFConfig.from_json(files[APF_PATH]), files.get(AUTH_PATH, "").strip(), encoded, digest(encoded))

    def __repr__(self) -> str:
        return f"PodUserData({self.apf!r}, auth={'yes' if self.auth_json else 'no'})"


class Claimer:
    """Claims pool VMs for pods. `digest` computes an encoded initdata's digest (`caa.adaptor.pool.initdata_digest`;
    a parameter so that a caller can count or share its work)."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, endpoint_for: EndpointFor, port: int, tls: IAgentTLS,
                 digest: Callable[[str], str] = initdata_digest) -> None:
        self.clock = clock
        self.endpoint_for = endpoint_for
        self.port = port
        self.tls = tls
        self.digest = digest

    def pod(self, user_data: bytes) -> PodUserData:
        """The pod's side of a claim, read from the user data CreateVM wrote (its initdata digested once here)."""
        return PodUserData.parse(user_data, self.digest)

    def request(self, vm: PoolVM, pod: PodUserData) -> podvm_pb2.ClaimRequest:
        cert, key = self.tls.server_credentials(vm.name)
        apf = attrs.evolve(pod.apf, tls_server_cert=cert, tls_server_key=key)
        return podvm_pb2.ClaimRequest(vm_name=vm.name, token=vm.token, apf_json=apf.to_json(),
                                      auth_json=pod.auth_json, initdata_digest=pod.initdata_digest)

    async def wait_answering(self, vm: PoolVM, timeout: float, interval: float = 1.0) -> None:
        """Dial the VM's forwarder until a TLS handshake with it completes, at most `timeout` seconds. A provider
        may return before the VM has booted (libvirt reserves the address and returns at once): a pool VM is
        ready only once its forwarder answers, else the first claim would find nothing listening."""
        if not vm.ips:
            raise ValueError(f"pool VM {vm.name} has no address")
        deadline = self.clock.seconds() + timeout
        attempts, last = 0, ""
        while True:
            attempts += 1
            try:
                await self._handshake(vm)
                return
            except CancelledError:
                raise
            except Exception as e:
                last = str(e) or type(e).__name__
            if self.clock.seconds() + interval > deadline:
                raise TimeoutError(f"pool VM {vm.name} at {vm.ips[0]}:{self.port} did not answer within "
                                   f"{timeout:.0f}s ({attempts} attempts; last: {last})")
            await deferLater(self.clock, interval, lambda: None)

    async def _handshake(self, vm: PoolVM) -> None:
        probe = _Handshake(self.clock)
        factory = Factory.forProtocol(lambda: probe)
        factory.noisy = False  # one attempt a second while the VM boots: no start/stop lines in the log
        await self.endpoint_for(vm.ips[0], self.port, vm.name).connect(factory)
        await probe.done

    async def claim(self, vm: PoolVM, pod: PodUserData, timeout: float) -> podvm_pb2.ClaimResponse:
        """Dial the VM (verifying its pool certificate for its name), claim it, hang up."""
        if not vm.ips:
            raise ValueError(f"pool VM {vm.name} has no address")
        request = self.request(vm, pod)
        endpoint = self.endpoint_for(vm.ips[0], self.port, vm.name)
        client = await connect(endpoint, self.clock, name="claim")
        try:
            resp: podvm_pb2.ClaimResponse = await client.call(
                claim_format.SERVICE, claim_format.METHOD, request, podvm_pb2.ClaimResponse, timeout=timeout)
        finally:
            client.close()
        return resp
