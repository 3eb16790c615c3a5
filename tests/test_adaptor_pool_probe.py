"""`Claimer.wait_answering`, the pool's readiness probe, on real loopback sockets with real mutual TLS: a pool VM
is ready once its forwarder completes a TLS handshake with the adaptor's client certificate, verifying the VM's
pool certificate for its name; a port that is closed, or a server with another name's certificate, never is."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from caa import tls
from caa.adaptor.adapters import AutoTLS
from caa.adaptor.claimer import Claimer
from caa.adaptor.pool import PoolKey, PoolVM
from caa.reactors import as_node_reactor
from caa.ttrpc.endpoints import tls_client_endpoint

reactor = as_node_reactor(_reactor)
NAME = "podvm-pool-0123abcd"


@implementer(IHandshakeListener)
class _Server(Protocol):
    handshakes: list[str] = []

    def handshakeCompleted(self) -> None:
        self.handshakes.append("done")


class ProbeTests(TestCase):
    def setUp(self) -> None:
        self.ca = tls.CertificateAuthority.create()
        self.client = tls.make_client_certificate()
        _Server.handshakes = []

    def claimer(self) -> Claimer:
        def endpoint_for(host: str, port: int, server_name: str) -> Any:
            creator = tls.client_creator(self.ca.cert_pem, self.client.cert_pem, self.client.key_pem, server_name)
            return tls_client_endpoint(reactor, host, port, creator, timeout=2)

        return Claimer(reactor, endpoint_for, self.port, AutoTLS(self.ca, self.client.cert_pem))

    async def free_port(self) -> None:
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
        self.port = listening.getHost().port
        await listening.stopListening()

    async def listen(self, name: str) -> None:
        pair = self.ca.issue_server_certificate(name)
        options = tls.server_context_factory(pair.cert_pem, pair.key_pem, self.client.cert_pem)
        port = await SSL4ServerEndpoint(reactor, self.port, options, interface="127.0.0.1").listen(
            Factory.forProtocol(_Server))
        self.addCleanup(port.stopListening)

    def vm(self) -> PoolVM:
        return PoolVM(pool_id="p", key=PoolKey(), token=b"t", instance_id="i-1", name=NAME, ips=("127.0.0.1",))

    async def test_ready_once_the_forwarder_listens(self) -> None:
        await self.free_port()
        waiting = Deferred.fromCoroutine(self.claimer().wait_answering(self.vm(), 30, interval=0.1))
        await deferLater(reactor, 0.5, lambda: None)  # the VM is still booting: nothing listens yet
        self.assertFalse(waiting.called)
        await self.listen(NAME)
        await waiting
        self.assertEqual(_Server.handshakes, ["done"])

    async def test_nothing_listening_times_out_naming_the_vm(self) -> None:
        await self.free_port()
        with self.assertRaises(TimeoutError) as caught:
            await self.claimer().wait_answering(self.vm(), 1.0, interval=0.2)
        self.assertIn(f"pool VM {NAME} at 127.0.0.1:{self.port} did not answer within 1s", str(caught.exception))
        self.assertIn("Connection refused", str(caught.exception))

    async def test_a_server_with_another_names_certificate_is_not_ready(self) -> None:
        await self.free_port()
        await self.listen("podvm-pool-ffffffff")
        with self.assertRaises(TimeoutError) as caught:
            await self.claimer().wait_answering(self.vm(), 1.0, interval=0.2)
        self.assertIn("did not answer", str(caught.exception))

    async def test_no_address_refused(self) -> None:
        self.port = 1
        with self.assertRaises(ValueError):
            await self.claimer().wait_answering(PoolVM(pool_id="p", key=PoolKey(), token=b"t", name=NAME), 1.0)
