"""Integration tests of caa.adaptor.proxy over real sockets: shim client -> proxy unix socket -> forwarder stand-in
(a caa.ttrpc server on loopback TCP, plain or mutual TLS with certificates from caa.tls)."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import stat
import tempfile
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from caa import tls
from caa.adaptor.interfaces import ProxyTLS
from caa.adaptor.proxy import AgentProxy, AgentProxyFactory, _tcp_socket, _Upstream
from caa.dialer import BootWindow, dial_backoff
from caa.proto import agent_pb2, oci_pb2
from caa.reactors import as_node_reactor
from caa.ttrpc import CallContext, Code, Server, TTRPCClient, TTRPCError, connect
from caa.ttrpc.endpoints import tcp_server_endpoint, tls_server_endpoint, unix_client_endpoint

reactor = as_node_reactor(_reactor)
_count = itertools.count()


class ForwarderStandIn:
    """Stands in for caa-forwarder (the pod VM end): a ttrpc server answering any service/method.

    Method names drive it: Echo* returns the payload, Fail answers NOT_FOUND, Hang never answers, Drop closes
    the connection mid-call; every call is recorded with its metadata and remaining deadline.
    """

    def __init__(self) -> None:
        self.server = Server(clock=reactor, name="forwarder-standin")
        self.server.register_fallback(self.handle)
        self.calls: list[tuple[str, str, bytes, list[tuple[str, str]], float | None]] = []
        self.port: Any = None

    async def handle(self, ctx: CallContext, service: str, method: str, payload: bytes) -> bytes:
        self.calls.append((service, method, payload, list(ctx.metadata), ctx.remaining()))
        if method == "Fail":
            raise TTRPCError(Code.NOT_FOUND, "container xyz not found")
        if method == "Hang":
            await Deferred()
        if method == "Drop":
            reactor.callLater(0, self.server.abort)
            await Deferred()
        if method == "Slow":
            await deferLater(reactor, 0.05)
        return b"echo:" + payload

    async def listen(self, context_factory: Any = None, port: int = 0) -> int:
        if context_factory is None:
            ep = tcp_server_endpoint(reactor, port, interface="127.0.0.1")
        else:
            ep = tls_server_endpoint(reactor, port, "127.0.0.1", context_factory)
        self.port = await ep.listen(self.server.factory())
        return int(self.port.getHost().port)

    async def close(self) -> None:
        if self.port is not None:
            await self.port.stopListening()
            self.port = None
        self.server.abort()


class ProxySocketTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"caa-proxy-{os.getpid()}-{next(_count)}-")
        os.chmod(self.dir, 0o700)
        self.addCleanup(self._rmtree)
        self.tls: ProxyTLS | None = None
        self.server_ctx: Any = None

    def _rmtree(self) -> None:
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)

    async def _forwarder(self, port: int = 0) -> tuple[ForwarderStandIn, int]:
        fwd = ForwarderStandIn()
        p = await fwd.listen(self.server_ctx, port)
        self.addCleanup(lambda: Deferred.fromCoroutine(fwd.close()))
        return fwd, p

    def _proxy(self, volumes: tuple[str, ...] = (), **kw: Any) -> AgentProxy:
        kw.setdefault("retry_policy", dial_backoff(initial=0.02, cap=0.2))
        kw.setdefault("attempt_timeout", 1.0)
        factory = AgentProxyFactory(reactor, self.tls, volumes_dir=os.path.join(self.dir, "dv"), **kw)
        proxy = factory.new("sb1", os.path.join(self.dir, "sb1", "agent.ttrpc"), volumes)
        assert isinstance(proxy, AgentProxy)
        self.addCleanup(proxy.stop)
        return proxy

    async def _shim(self, proxy: AgentProxy) -> TTRPCClient:
        client = await connect(unix_client_endpoint(reactor, proxy.socket_path), reactor)
        self.addCleanup(client.abort)
        return client

    async def _started(self) -> tuple[ForwarderStandIn, AgentProxy, TTRPCClient]:
        fwd, port = await self._forwarder()
        proxy = self._proxy()
        await proxy.start(("127.0.0.1", port), "vm-sb1", reactor.seconds() + 10)
        return fwd, proxy, await self._shim(proxy)

    async def _fails(self, d: Deferred[Any]) -> TTRPCError:
        try:
            await d
        except TTRPCError as e:
            return e
        self.fail("expected a TTRPCError")

    # -- the tests

    async def _passthrough(self) -> None:
        fwd, proxy, shim = await self._started()
        st = os.stat(proxy.socket_path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        # TCP keepalive on the upstream socket (through the TLS wrapper too)
        assert proxy.link is not None and proxy.link.current is not None
        sock = _tcp_socket(proxy.link.current.transport)
        assert sock is not None
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 15)
        # a method the proxy never heard of, with metadata and a deadline
        out = await shim.call_raw("grpc.FutureService", "EchoBrandNew", b"\x01\x02", timeout=7.0,
                                  metadata=[("k", "v"), ("k", "w")])
        self.assertEqual(out, b"echo:\x01\x02")
        service, method, payload, md, remaining = fwd.calls[-1]
        self.assertEqual((service, method, payload, md), ("grpc.FutureService", "EchoBrandNew", b"\x01\x02",
                                                          [("k", "v"), ("k", "w")]))
        assert remaining is not None
        self.assertTrue(5.0 < remaining <= 7.0, remaining)
        # no deadline stays no deadline
        await shim.call_raw("grpc.Health", "Echo", b"")
        self.assertIsNone(fwd.calls[-1][4])
        # upstream status codes come back unchanged
        err = await self._fails(shim.call_raw("grpc.AgentService", "Fail", b"", timeout=5))
        self.assertEqual((err.code, err.message), (Code.NOT_FOUND, "container xyz not found"))
        # 50 concurrent calls over the one upstream link
        outs = await gatherResults([shim.call_raw("grpc.AgentService", "Slow", str(i).encode(), timeout=10)
                                    for i in range(50)])
        self.assertEqual(outs, [b"echo:" + str(i).encode() for i in range(50)])
        self.assertEqual(proxy.connections, 1)

    def test_passthrough_tcp(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._passthrough())

    def test_passthrough_mtls(self) -> Deferred[None]:
        self._use_tls()
        return Deferred.fromCoroutine(self._passthrough())

    def test_passthrough_mtls13_manual_ca_name(self) -> Deferred[None]:
        self._use_tls(min_version="VersionTLS13", server_name=tls.MANUAL_SERVER_NAME)
        return Deferred.fromCoroutine(self._passthrough())

    def _use_tls(self, min_version: str = "", server_name: str = "vm-sb1") -> None:
        ca = tls.CertificateAuthority.create()
        server = ca.issue_server_certificate(server_name)
        client = tls.make_client_certificate()
        self.server_ctx = tls.server_context_factory(server.cert_pem, server.key_pem, client.cert_pem,
                                                     min_version=min_version)
        override = server_name if server_name != "vm-sb1" else ""
        self.tls = ProxyTLS(ca_pem=ca.cert_pem, cert_pem=client.cert_pem, key_pem=client.key_pem,
                            server_name_override=override, min_version=min_version)

    async def _create_container_rewritten(self) -> None:
        fwd, proxy, shim = await self._started()
        src = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pv1/mount"
        import base64
        os.makedirs(os.path.join(self.dir, "dv", base64.urlsafe_b64encode(src.encode()).decode()))
        req = agent_pb2.CreateContainerRequest(container_id="c1", OCI=oci_pb2.Spec(
            Mounts=[oci_pb2.Mount(destination="/data", source=src)],
            Annotations={"io.katacontainers.config.hypervisor.default_gpus": "1"}))
        await shim.call_raw("grpc.AgentService", "CreateContainer", req.SerializeToString(), timeout=5)
        got = agent_pb2.CreateContainerRequest.FromString(fwd.calls[-1][2][len(b""):])
        ann = dict(got.OCI.Annotations)
        self.assertEqual(ann["io.confidentialcontainers.org.peerpodvolumes.target_path"], src)
        self.assertEqual(ann["cdi.k8s.io/peer-pods"], "nvidia.com/gpu=all")
        # no OCI: forwarded unchanged, not a crash
        bare = agent_pb2.CreateContainerRequest(container_id="c2").SerializeToString()
        await shim.call_raw("grpc.AgentService", "CreateContainer", bare, timeout=5)
        self.assertEqual(fwd.calls[-1][2], bare)

    def test_create_container_rewritten(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._create_container_rewritten())

    async def _never_answers(self) -> None:
        fwd, proxy, shim = await self._started()
        t0 = reactor.seconds()
        err = await self._fails(shim.call_raw("grpc.AgentService", "Hang", b"", timeout=0.3))
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)
        self.assertLess(reactor.seconds() - t0, 2.0)
        # the link is still good
        self.assertEqual(await shim.call_raw("grpc.AgentService", "Echo", b"x", timeout=5), b"echo:x")

    def test_forwarder_never_answers(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._never_answers())

    async def _drop_mid_call(self) -> None:
        fwd, proxy, shim = await self._started()
        err = await self._fails(shim.call_raw("grpc.AgentService", "Drop", b"", timeout=5))
        self.assertEqual(err.code, Code.UNAVAILABLE)
        # the next call through the same agent socket waits for the reconnect and succeeds
        self.assertEqual(await shim.call_raw("grpc.AgentService", "Echo", b"again", timeout=5), b"echo:again")
        self.assertEqual(proxy.connections, 2)

    def test_drop_mid_call_reconnects(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._drop_mid_call())

    def test_drop_mid_call_reconnects_mtls(self) -> Deferred[None]:
        self._use_tls()
        return Deferred.fromCoroutine(self._drop_mid_call())

    async def _stop_closes_everything(self) -> None:
        fwd, proxy, shim = await self._started()
        pending = shim.call_raw("grpc.AgentService", "Hang", b"", timeout=20)
        await deferLater(reactor, 0.05)
        await proxy.stop()
        err = await self._fails(pending)
        self.assertEqual(err.code, Code.UNAVAILABLE)
        self.assertFalse(os.path.exists(proxy.socket_path))
        await shim.when_closed()
        self.assertFalse(shim.connected)
        await deferLater(reactor, 0.05)
        self.assertEqual(len(fwd.server._connections), 0)
        await proxy.stop()  # idempotent

    def test_stop_closes_everything(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop_closes_everything())

    async def _never_connects(self) -> None:
        fwd, port = await self._forwarder()
        await fwd.close()  # nothing listens there now: connection refused
        proxy = self._proxy()
        t0 = reactor.seconds()
        err = await self._fails(proxy.start(("127.0.0.1", port), "vm-sb1", t0 + 0.5))
        elapsed = reactor.seconds() - t0
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)
        self.assertTrue(err.message.startswith(f"failed to establish agent proxy connection to 127.0.0.1:{port}: "),
                        err.message)
        self.assertIn("refused", err.message)
        self.assertTrue(0.45 <= elapsed < 1.5, elapsed)
        self.assertFalse(os.path.exists(proxy.socket_path))

    def test_start_never_connects(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._never_connects())

    async def _late_forwarder(self) -> None:
        fwd, port = await self._forwarder()
        await fwd.close()
        proxy = self._proxy()
        started = proxy.start(("127.0.0.1", port), "vm-sb1", reactor.seconds() + 10)
        await deferLater(reactor, 0.3)
        self.assertNoResult(started)
        fwd2 = ForwarderStandIn()
        await fwd2.listen(None, port)
        self.addCleanup(lambda: Deferred.fromCoroutine(fwd2.close()))
        t0 = reactor.seconds()
        await started
        self.assertLess(reactor.seconds() - t0, 0.5)  # back-off cap 0.2 s in this test

    def test_start_waits_for_late_forwarder(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._late_forwarder())

    async def _boot_window_finds_late_forwarder(self) -> None:
        """A real port that refuses (bound, not listening: the guest's stack is up, the forwarder not yet) and
        then listens after the third refused attempt: with a boot window the very next attempt, one period
        later, connects. Asserted on the attempts and the scheduled delays, not on wall time."""
        hold = socket.socket()
        hold.bind(("127.0.0.1", 0))
        self.addCleanup(hold.close)
        port = int(hold.getsockname()[1])
        window = BootWindow(length=60.0, period=0.05)
        connects: list[float] = []
        listening: list[float] = []
        fwd = ForwarderStandIn()
        self.addCleanup(lambda: Deferred.fromCoroutine(fwd.close()))

        def boot_after_third_refusal(failure: Any) -> Any:
            if len(connects) == 3 and not listening:
                hold.close()
                listening.append(reactor.seconds())
                # a TCP endpoint listens at once (its Deferred has fired when listen() returns)
                tcp_server_endpoint(reactor, port, "127.0.0.1").listen(fwd.server.factory()).addCallback(
                    lambda listening_port: setattr(fwd, "port", listening_port))
                self.assertIsNotNone(fwd.port)
            return failure

        @implementer(IStreamClientEndpoint)
        class Watched:
            def __init__(self, inner: IStreamClientEndpoint) -> None:
                self.inner = inner

            def connect(self, factory: Any) -> Deferred[Any]:
                connects.append(reactor.seconds())
                return self.inner.connect(factory).addErrback(boot_after_third_refusal)

        backoff_asked: list[int] = []  # the back-off is never asked while the window lasts

        def backoff(failures: int) -> float:
            backoff_asked.append(failures)
            return 1.0

        base = AgentProxyFactory(reactor, None)
        proxy = self._proxy(boot_window=window, retry_policy=backoff,
                            make_endpoint=lambda h, p, n: Watched(base.client_endpoint(h, p, n)))
        await proxy.start(("127.0.0.1", port), "vm-sb1", reactor.seconds() + 20)
        link = proxy.link
        assert link is not None
        self.assertEqual(len(listening), 1)
        self.assertEqual(link.attempts, 4)  # three refused, then the first attempt after the listen
        self.assertEqual(len(connects), 4)
        self.assertGreater(connects[3], listening[0])
        self.assertEqual(link.connections, 1)
        self.assertEqual(backoff_asked, [])  # every retry was one period after the refusal

    def test_boot_window_finds_late_forwarder(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._boot_window_finds_late_forwarder())

    async def _tls_refused(self) -> None:
        self._use_tls()
        # the forwarder trusts another client certificate: every attempt fails, start errbacks at the deadline
        assert self.tls is not None
        other = tls.make_client_certificate()
        self.tls = ProxyTLS(ca_pem=self.tls.ca_pem, cert_pem=other.cert_pem, key_pem=other.key_pem,
                            min_version="VersionTLS12")
        self.server_ctx = tls.server_context_factory(*self._server_pair(), tls.make_client_certificate().cert_pem)
        fwd, port = await self._forwarder()
        proxy = self._proxy()
        err = await self._fails(proxy.start(("127.0.0.1", port), "vm-sb1", reactor.seconds() + 0.6))
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)
        self.assertEqual(proxy.connections, 0)

    def _server_pair(self) -> tuple[bytes, bytes]:
        assert self.tls is not None
        # a server certificate from an unrelated CA for the right name
        pair = tls.CertificateAuthority.create().issue_server_certificate("vm-sb1")
        return pair.cert_pem, pair.key_pem

    def test_tls_refused_until_deadline(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._tls_refused())

    async def _tls13_client_refused(self) -> None:
        # TLS 1.3: our handshake completes before the forwarder checks our certificate; the proxy must still
        # see the refusal (not report a connection, not redial in a tight loop) and fail at the deadline.
        ca = tls.CertificateAuthority.create()
        server = ca.issue_server_certificate("vm-sb1")
        ours, trusted = tls.make_client_certificate(), tls.make_client_certificate()
        self.server_ctx = tls.server_context_factory(server.cert_pem, server.key_pem, trusted.cert_pem,
                                                     min_version="VersionTLS13")
        self.tls = ProxyTLS(ca_pem=ca.cert_pem, cert_pem=ours.cert_pem, key_pem=ours.key_pem,
                            min_version="VersionTLS13")
        # a wide settle window so a descheduled test process cannot make this flaky
        self.patch(_Upstream, "TLS13_SETTLE", (0.2, 0.25))
        fwd, port = await self._forwarder()
        proxy = self._proxy()
        err = await self._fails(proxy.start(("127.0.0.1", port), "vm-sb1", reactor.seconds() + 0.8))
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)
        self.assertIn("alert", err.message)
        self.assertEqual(proxy.connections, 0)
        self.assertEqual(fwd.calls, [])

    def test_tls13_client_certificate_refused(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._tls13_client_refused())


class NeverAnsweringVMTests(TestCase):
    """StartVM's rollback contract with the real agent proxy: a VM whose forwarder never comes up (its port
    refuses every connect) is deleted when the proxy gives up at --proxy-timeout, and nothing is left."""

    timeout = 30

    async def test_instance_deleted_at_proxy_timeout(self) -> None:
        from caa.adaptor.adapters import NullNetworking
        from caa.adaptor.service import CloudService, ServiceConfig
        from caa.adaptor.store import SandboxStore
        from caa.adaptor.userdata import ANN_POD_NAME, ANN_POD_NAMESPACE
        from caa.providers.interfaces import Instance
        from tests.fakes.provider import FakeProvider

        hold = socket.socket()  # bound, never listening: every connect is refused
        hold.bind(("127.0.0.1", 0))
        self.addCleanup(hold.close)
        port = int(hold.getsockname()[1])

        class LoopbackProvider(FakeProvider):
            """The in-memory fake provider with its VMs at 127.0.0.1 (where nothing will listen)."""

            def create_instance(self, pod_name: str, sandbox_id: str, user_data: bytes, spec: Any) -> Any:
                d = super().create_instance(pod_name, sandbox_id, user_data, spec)

                def at_loopback(i: Instance) -> Instance:
                    inst = Instance(id=i.id, name=i.name, ips=("127.0.0.1",))
                    self.instances[i.id] = inst
                    return inst

                return d.addCallback(at_loopback)

        pods_dir = tempfile.mkdtemp(prefix=f"caa-nv-{os.getpid()}-")  # short: a unix socket path is < 108 bytes
        self.addCleanup(shutil.rmtree, pods_dir, True)
        provider = LoopbackProvider(reactor)
        proxies = AgentProxyFactory(reactor, None, volumes_dir=os.path.join(pods_dir, "dv"),
                                    boot_window=BootWindow(length=60.0, period=0.05))
        svc = CloudService(reactor, provider, proxies, SandboxStore(pods_dir), NullNetworking(), None,
                           ServiceConfig(pods_dir=pods_dir, forwarder_port=port, proxy_timeout=0.4,
                                         disable_tls=True))
        sid = "a" * 64
        await svc.create_vm(sid, {ANN_POD_NAME: "pod", ANN_POD_NAMESPACE: "default"}, "")
        try:
            await svc.start_vm(sid, None)
        except TTRPCError as e:  # the proxy's status, handed to the shim as is
            self.assertEqual(e.code, Code.DEADLINE_EXCEEDED)
            self.assertIn(f"failed to establish agent proxy connection to 127.0.0.1:{port}", e.message)
        else:
            self.fail("StartVM succeeded against a VM that never answers")
        [(_, name)] = [c for c in provider.calls if c[0] == "create"]
        self.assertEqual([c for c in provider.calls if c[0] == "delete"], [("delete", f"i-{name}")])
        self.assertEqual(provider.instances, {})
        self.assertFalse(os.path.exists(os.path.join(pods_dir, sid, "agent.ttrpc")))
        await svc.stop_vm(sid)  # trial fails the test if a dial is left scheduled


class AttachOrderTests(TestCase):
    """The cloud volumes a container gets, through the real wiring: CloudService journals the disks CreateVM
    attaches, the real AgentProxyFactory makes the sandbox's proxy, a shim's CreateContainer goes over the proxy's
    unix socket to a forwarder stand-in on loopback. Volumes the CSI driver adds after CreateVM must not shift the
    numbering, neither before the VM starts nor after an adaptor restart (proxies rebuilt from the journal)."""

    timeout = 30

    async def test_attach_order_from_the_record(self) -> None:
        from caa.adaptor.adapters import NullNetworking
        from caa.adaptor.directvolumes import encode_name
        from caa.adaptor.service import CloudService, ServiceConfig
        from caa.adaptor.store import SandboxStore
        from caa.adaptor.userdata import ANN_POD_NAME, ANN_POD_NAMESPACE, ANN_POD_UID
        from caa.podvm_api.volumes import CLOUD_VOLUMES_ANNOTATION, decode_cloud_volumes
        from caa.providers.interfaces import Instance
        from tests.fakes.provider import FakeProvider

        class LoopbackProvider(FakeProvider):
            """The in-memory fake provider with its VMs at 127.0.0.1 (where the forwarder stand-in listens)."""

            def create_instance(self, pod_name: str, sandbox_id: str, user_data: bytes, spec: Any) -> Any:
                d = super().create_instance(pod_name, sandbox_id, user_data, spec)

                def at_loopback(i: Instance) -> Instance:
                    inst = Instance(id=i.id, name=i.name, ips=("127.0.0.1",))
                    self.instances[i.id] = inst
                    return inst

                return d.addCallback(at_loopback)

        pods_dir = tempfile.mkdtemp(prefix=f"caa-ao-{os.getpid()}-")  # short: a unix socket path is < 108 bytes
        self.addCleanup(shutil.rmtree, pods_dir, True)
        volumes_dir = tempfile.mkdtemp(prefix=f"caa-ao-dv-{os.getpid()}-")  # not in pods_dir: recovery sweeps that
        self.addCleanup(shutil.rmtree, volumes_dir, True)
        uid = "0c4e2f6a-0000-4000-8000-0000000000a0"
        fwd = ForwarderStandIn()
        port = await fwd.listen()
        self.addCleanup(lambda: Deferred.fromCoroutine(fwd.close()))

        def volume(path: str, disk: str) -> None:
            os.makedirs(os.path.join(volumes_dir, encode_name(path)))
            with open(os.path.join(volumes_dir, encode_name(path), "mountInfo.json"), "w") as f:
                f.write(f'{{"volume-type": "block", "device": "{disk}", "fstype": "ext4"}}')

        # in directory-name order q0 < q1 < q2 < q3: q1 and q3 exist at CreateVM, q0 and q2 come later
        q0, q1, q2, q3 = sorted((f"/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~csi/pv{i}/mount"
                                 for i in range(4)), key=encode_name)
        volume(q1, "disk-q1")
        volume(q3, "disk-q3")
        provider = LoopbackProvider(reactor)
        store = SandboxStore(pods_dir)

        def service() -> CloudService:
            proxies = AgentProxyFactory(reactor, None, volumes_dir=volumes_dir,
                                        retry_policy=dial_backoff(initial=0.02, cap=0.2))
            svc = CloudService(reactor, provider, proxies, store, NullNetworking(), None,
                               ServiceConfig(pods_dir=pods_dir, forwarder_port=port, disable_tls=True,
                                             direct_volumes_dir=volumes_dir))
            self.addCleanup(lambda: Deferred.fromCoroutine(svc.shutdown()))  # its proxies, should an assert fail
            return svc

        async def announced() -> dict[str, tuple[str, int, str]]:
            """What a CreateContainer mounting all four volumes reaches the VM with."""
            req = agent_pb2.CreateContainerRequest(container_id="c1", OCI=oci_pb2.Spec(
                Mounts=[oci_pb2.Mount(destination=f"/m{i}", source=q) for i, q in enumerate((q0, q1, q2, q3))],
                Annotations={ANN_POD_UID: uid}))
            shim = await connect(unix_client_endpoint(reactor, socket_path), reactor)
            try:
                await shim.call_raw("grpc.AgentService", "CreateContainer", req.SerializeToString(), timeout=5)
            finally:
                shim.abort()
            got = agent_pb2.CreateContainerRequest.FromString(fwd.calls[-1][2])
            return {v.name: (v.mount_point, v.lun, v.disk_id)
                    for v in decode_cloud_volumes(got.OCI.Annotations[CLOUD_VOLUMES_ANNOTATION])}

        svc = service()
        sid = "ab" * 32
        socket_path = await svc.create_vm(sid, {ANN_POD_NAME: "pod", ANN_POD_NAMESPACE: "default", ANN_POD_UID: uid},
                                          "")
        volume(q0, "disk-q0")  # one sorting ahead of both attached volumes, one between them
        volume(q2, "disk-q2")
        await svc.start_vm(sid, None)
        [spec] = provider.specs.values()
        self.assertEqual(spec.volumes, ("disk-q1", "disk-q3"))  # what the VM was created with
        want = {"vol-0": ("/m1", 0, "disk-q1"), "vol-1": ("/m3", 1, "disk-q3")}
        self.assertEqual(await announced(), want)

        # an adaptor restart: the proxy is rebuilt from the journalled record, the directory has moved on again
        await svc.shutdown()
        shutil.rmtree(os.path.join(volumes_dir, encode_name(q1)))
        svc = service()
        await svc.recover()
        self.assertEqual(await announced(), {"vol-1": ("/m3", 1, "disk-q3")})
        await svc.stop_vm(sid)
        self.assertEqual(provider.instances, {})
