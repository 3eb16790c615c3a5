"""caa.ttrpc against the Go reference (github.com/containerd/ttrpc) over unix sockets, both directions.

The Go side is tests/go/ttrpcpeer (built offline from Debian's Go packages by tests/goshim.py). The echo
service `caa.test.Echo` carries raw payloads: Echo returns its payload, Error answers the status given as JSON,
Sleep sleeps `ms` unless its context ends, Metadata returns the request metadata as JSON.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from caa.proto import hypervisor_pb2, podvminfo_pb2
from caa.reactors import as_node_reactor
from caa.ttrpc import CallContext, Code, Server, TTRPCClient, TTRPCError, connect
from caa.ttrpc.endpoints import unix_client_endpoint, unix_server_endpoint
from tests import goshim

reactor = as_node_reactor(_reactor)

ECHO = goshim.ECHO_SERVICE
_counter = 0


def _sock_path(case: TestCase) -> str:
    """A short, unique unix socket path (sun_path is limited to 108 bytes)."""
    global _counter
    _counter += 1
    base = f"/tmp/caa-interop-{os.getpid()}-{_counter}"
    os.makedirs(base, exist_ok=True)

    def cleanup() -> None:
        for name in os.listdir(base):
            os.unlink(os.path.join(base, name))
        os.rmdir(base)

    case.addCleanup(cleanup)
    return os.path.join(base, "s.sock")


async def _status_of(d: Deferred[bytes]) -> TTRPCError:
    """The TTRPCError a call fails with (fails the test if it succeeds or fails otherwise)."""
    try:
        result = await d
    except TTRPCError as e:
        return e
    raise AssertionError(f"call succeeded with {result!r}; a TTRPCError was expected")


def _require_go() -> None:
    if not goshim.go_available():
        if os.environ.get("CI"):
            raise AssertionError("go / golang-github-containerd-ttrpc-dev missing in CI (scripts/setup.sh)")
        raise SkipTest("go or golang-github-containerd-ttrpc-dev not installed")
    goshim.build_go_peer()


class PythonEcho:
    """caa.test.Echo on caa.ttrpc.Server, recording what its handlers saw."""

    def __init__(self, echo_delay: float = 0.0) -> None:
        self.server = Server(reactor, name="interop-echo")
        self.server.register_fallback(self.handle)
        self.echo_delay = echo_delay
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0
        self.connections = 0
        self.sleeps: list[dict[str, Any]] = []
        self.metadata: list[list[tuple[str, str]]] = []

    async def handle(self, ctx: CallContext, service: str, method: str, payload: bytes) -> bytes:
        if service != ECHO:
            raise TTRPCError(Code.UNIMPLEMENTED, f"service {service}")
        self.calls += 1
        if method == "Echo":
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if self.echo_delay:
                    await deferLater(reactor, self.echo_delay)
            finally:
                self.in_flight -= 1
            return payload
        if method == "Error":
            req = json.loads(payload)
            raise TTRPCError(req["code"], req["message"])
        if method == "Sleep":
            req = json.loads(payload)
            record: dict[str, Any] = {"remaining": ctx.remaining(), "start": time.monotonic()}
            self.sleeps.append(record)
            try:
                await deferLater(reactor, req["ms"] / 1000)
            except CancelledError:
                record["cancelled_after"] = time.monotonic() - record["start"]
                raise
            record["done"] = True
            return json.dumps({"timeout_ms": -1}).encode()
        if method == "Metadata":
            self.metadata.append(list(ctx.metadata))
            grouped: dict[str, list[str]] = {}
            for k, v in ctx.metadata:
                grouped.setdefault(k, []).append(v)
            return json.dumps({"metadata": grouped}).encode()
        raise TTRPCError(Code.UNIMPLEMENTED, f"method {method}")


class GoClientToPythonServerTests(TestCase):
    """The Go ttrpc client (as the Kata shim would be) calling caa.ttrpc.Server."""

    async def _serve(self, echo_delay: float = 0.0) -> tuple[PythonEcho, str]:
        _require_go()
        echo = PythonEcho(echo_delay)
        path = _sock_path(self)
        factory = echo.server.factory()
        build = factory.buildProtocol

        def counting_build(addr: Any) -> Any:
            echo.connections += 1
            return build(addr)

        factory.buildProtocol = counting_build  # type: ignore[method-assign]
        port = await unix_server_endpoint(reactor, path).listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(echo.server.abort)
        return echo, path

    async def test_unary(self) -> None:
        echo, path = await self._serve()
        result = await goshim.call_peer(reactor, "client", path, "unary", "hello from go")
        self.assertEqual(result["ok"], True, result)
        self.assertEqual(result["payload"], "hello from go")
        self.assertEqual(echo.calls, 1)

    async def test_100_concurrent_calls_on_one_connection(self) -> None:
        echo, path = await self._serve(echo_delay=0.05)
        result = await goshim.call_peer(reactor, "client", path, "concurrent", "100", "64")
        self.assertEqual((result["ok"], result["calls"], result["errors"], result["mismatches"]),
                         (True, 100, 0, 0), result)
        self.assertEqual(echo.calls, 100)
        self.assertEqual(echo.connections, 1, "all calls arrived on one connection")
        # Served concurrently: each Echo takes 50 ms, and many were in flight at once.
        self.assertGreater(echo.max_in_flight, 10)

    async def test_error_status_round_trip(self) -> None:
        echo, path = await self._serve()
        result = await goshim.call_peer(reactor, "client", path, "error", "5", "sandbox ns/pod: not found ✓")
        self.assertEqual((result["ok"], result["code"], result["message"]),
                         (False, 5, "sandbox ns/pod: not found ✓"), result)
        result = await goshim.call_peer(reactor, "client", path, "error", "14", "upstream gone")
        self.assertEqual((result["code"], result["message"]), (14, "upstream gone"))

    async def test_unknown_service_is_unimplemented_for_go(self) -> None:
        _, path = await self._serve()
        result = await goshim.call_peer(reactor, "raw-call", path, "no.Such", "Thing", "", "5")
        self.assertEqual((result["ok"], result["code"]), (False, Code.UNIMPLEMENTED), result)

    async def test_deadline(self) -> None:
        """Go sends timeout_nano; our handler sees that deadline and is cancelled by it (not by a closed
        connection: the Go client keeps the connection open 3 s longer); Go reports DeadlineExceeded."""
        echo, path = await self._serve()
        result = await goshim.call_peer(reactor, "client", path, "deadline", "400", "8000", "3000")
        self.assertEqual((result["ok"], result["code"]), (False, Code.DEADLINE_EXCEEDED), result)
        self.assertLess(result["elapsed_ms"], 3000)
        self.assertEqual(len(echo.sleeps), 1)
        record = echo.sleeps[0]
        self.assertIsNotNone(record["remaining"])
        self.assertTrue(0.05 < record["remaining"] <= 0.4, record)
        self.assertIn("cancelled_after", record)
        self.assertLess(record["cancelled_after"], 2.5, "cancelled by the deadline, before the connection closed")
        self.assertNotIn("done", record)

    async def test_metadata_reaches_the_handler(self) -> None:
        echo, path = await self._serve()
        result = await goshim.call_peer(reactor, "client", path, "metadata", "a=1", "b=two", "a=3")
        self.assertEqual(result["ok"], True, result)
        self.assertEqual(sorted(echo.metadata[0]), [("a", "1"), ("a", "3"), ("b", "two")])
        self.assertEqual(result["reply"], {"metadata": {"a": ["1", "3"], "b": ["two"]}})


class PythonClientToGoServerTests(TestCase):
    """caa.ttrpc's client calling the Go ttrpc server (as the APF / forwarder side would be)."""

    async def _connect(self) -> tuple[goshim.GoEchoServer, TTRPCClient]:
        _require_go()
        path = _sock_path(self)
        server = await goshim.GoEchoServer(reactor, path).start()
        self.addCleanup(server.stop)
        client = await connect(unix_client_endpoint(reactor, path), reactor)
        self.addCleanup(client.close)
        return server, client

    async def test_unary(self) -> None:
        _, client = await self._connect()
        self.assertEqual(await client.call_raw(ECHO, "Echo", b"\x00hello\xff"), b"\x00hello\xff")
        self.assertEqual(await client.call_raw(ECHO, "Echo", b""), b"")

    async def test_100_concurrent_calls_on_one_connection(self) -> None:
        _, client = await self._connect()
        payloads = [f"call-{i}-".encode() + os.urandom(i) for i in range(100)]
        calls = [client.call_raw(ECHO, "Echo", p) for p in payloads]
        self.assertEqual(client.in_flight, 100)
        replies = await gatherResults(calls)
        self.assertEqual(replies, payloads)

    async def test_error_status_round_trip(self) -> None:
        _, client = await self._connect()
        for code, message in [(5, "VM ID for ns:pod was not found"), (9, "précondition"), (16, "")]:
            payload = json.dumps({"code": code, "message": message}).encode()
            err = await _status_of(client.call_raw(ECHO, "Error", payload))
            self.assertEqual((err.code, err.message), (code, message))

    async def test_unknown_service_and_method(self) -> None:
        _, client = await self._connect()
        err = await _status_of(client.call_raw("no.Such", "Thing", b""))
        self.assertEqual((err.code, err.message), (Code.UNIMPLEMENTED, "service no.Such"))
        err = await _status_of(client.call_raw(ECHO, "Nope", b""))
        self.assertEqual((err.code, err.message), (Code.UNIMPLEMENTED, "method Nope"))

    async def test_deadline(self) -> None:
        """Our timeout goes out as timeout_nano: the Go handler sees it and is cancelled by it; we get
        DeadlineExceeded locally, and the connection stays usable."""
        server, client = await self._connect()
        started = time.monotonic()
        d = client.call_raw(ECHO, "Sleep", b'{"ms": 5000}', timeout=0.4)
        err = await _status_of(d)
        self.assertEqual(err.code, Code.DEADLINE_EXCEEDED)
        self.assertLess(time.monotonic() - started, 3.0)
        for _ in range(250):
            if any(e.get("event") == "sleep" for e in server.events):
                break
            await deferLater(reactor, 0.02)
        sleeps = [e for e in server.events if e.get("event") == "sleep"]
        self.assertEqual(len(sleeps), 1, server.events)
        self.assertEqual(sleeps[0]["outcome"], "cancelled")
        self.assertEqual(sleeps[0]["error"], "context deadline exceeded")
        self.assertTrue(50 < sleeps[0]["timeout_ms"] <= 400, sleeps[0])
        self.assertEqual(await client.call_raw(ECHO, "Echo", b"still here"), b"still here")

    async def test_metadata(self) -> None:
        _, client = await self._connect()
        reply = await client.call_raw(ECHO, "Metadata", b"", metadata=[("a", "1"), ("b", "two"), ("a", "3")])
        self.assertEqual(json.loads(reply), {"metadata": {"a": ["1", "3"], "b": ["two"]}})

    async def test_large_payload(self) -> None:
        _, client = await self._connect()
        big = os.urandom(3 << 20)
        self.assertEqual(await client.call_raw(ECHO, "Echo", big), big)

    async def test_server_going_away_fails_pending_calls(self) -> None:
        server, client = await self._connect()
        d: Deferred[bytes] = client.call_raw(ECHO, "Sleep", b'{"ms": 10000}')
        await deferLater(reactor, 0.1)
        await server.stop()
        err = await _status_of(d)
        self.assertEqual(err.code, Code.UNAVAILABLE)


class ShimModesTests(TestCase):
    """tests/goshim's shim helpers (used by adaptor and e2e tests) encode what caa.proto decodes, and back."""

    async def _serve(self) -> tuple[list[Any], str]:
        _require_go()
        seen: list[Any] = []
        server = Server(reactor, name="interop-hypervisor")

        async def create(ctx: CallContext, req: hypervisor_pb2.CreateVMRequest) -> hypervisor_pb2.CreateVMResponse:
            seen.append(("CreateVM", req.id, dict(req.annotations), req.networkNamespacePath))
            return hypervisor_pb2.CreateVMResponse(agentSocketPath=f"/run/peerpod/pods/{req.id}/agent.ttrpc")

        async def start(ctx: CallContext, req: hypervisor_pb2.StartVMRequest) -> hypervisor_pb2.StartVMResponse:
            seen.append(("StartVM", req.id, ctx.remaining()))
            if req.id == "fail":
                raise TTRPCError(Code.UNKNOWN, "creating an instance: quota exceeded")
            return hypervisor_pb2.StartVMResponse()

        async def stop(ctx: CallContext, req: hypervisor_pb2.StopVMRequest) -> hypervisor_pb2.StopVMResponse:
            seen.append(("StopVM", req.id))
            return hypervisor_pb2.StopVMResponse()

        async def version(ctx: CallContext, req: hypervisor_pb2.VersionRequest) -> hypervisor_pb2.VersionResponse:
            seen.append(("Version", req.version))
            return hypervisor_pb2.VersionResponse(version="caa-test")

        async def info(ctx: CallContext, req: podvminfo_pb2.GetInfoRequest) -> podvminfo_pb2.GetInfoResponse:
            seen.append(("GetInfo", req.PodName, req.PodNamespace, req.Wait, ctx.remaining()))
            if req.PodName == "missing":
                raise TTRPCError(Code.NOT_FOUND, f"VM ID for {req.PodNamespace}:{req.PodName} was not found")
            return podvminfo_pb2.GetInfoResponse(VMID="i-0123")

        server.register("hypervisor.Hypervisor", {
            "CreateVM": (hypervisor_pb2.CreateVMRequest, create),
            "StartVM": (hypervisor_pb2.StartVMRequest, start),
            "StopVM": (hypervisor_pb2.StopVMRequest, stop),
            "Version": (hypervisor_pb2.VersionRequest, version),
        })
        server.register("podvminfo.PodVMInfo", {"GetInfo": (podvminfo_pb2.GetInfoRequest, info)})
        path = _sock_path(self)
        port = await unix_server_endpoint(reactor, path).listen(server.factory())
        self.addCleanup(port.stopListening)
        self.addCleanup(server.abort)
        return seen, path

    async def test_hypervisor_calls(self) -> None:
        seen, path = await self._serve()
        annotations = {"io.kubernetes.cri.sandbox-name": "web", "io.kubernetes.cri.sandbox-namespace": "default",
                       "io.katacontainers.config.hypervisor.cc_init_data": "a=b=c\n", "empty": ""}
        result = await goshim.hv_create(reactor, path, "sb1", "/var/run/netns/cni-1", annotations)
        self.assertEqual((result["ok"], result["agentSocketPath"]), (True, "/run/peerpod/pods/sb1/agent.ttrpc"))
        self.assertEqual(seen[-1], ("CreateVM", "sb1", annotations, "/var/run/netns/cni-1"))

        result = await goshim.hv_start(reactor, path, "sb1", timeout=600)
        self.assertEqual(result["ok"], True, result)
        self.assertEqual(seen[-1][:2], ("StartVM", "sb1"))
        self.assertTrue(590 < seen[-1][2] <= 600, seen[-1])

        result = await goshim.hv_start(reactor, path, "fail")
        self.assertEqual((result["ok"], result["code"], result["message"]),
                         (False, Code.UNKNOWN, "creating an instance: quota exceeded"))
        self.assertIsNone(seen[-1][2], "no timeout given: no deadline sent")

        self.assertEqual((await goshim.hv_stop(reactor, path, "sb1"))["ok"], True)
        self.assertEqual(seen[-1], ("StopVM", "sb1"))
        result = await goshim.hv_version(reactor, path, "0.1")
        self.assertEqual((result["ok"], result["version"]), (True, "caa-test"))
        self.assertEqual(seen[-1], ("Version", "0.1"))

    async def test_pod_info_and_raw_call(self) -> None:
        seen, path = await self._serve()
        result = await goshim.pod_info(reactor, path, "web", "default", wait=True, timeout=5)
        self.assertEqual((result["ok"], result["VMID"]), (True, "i-0123"))
        self.assertEqual(seen[-1][:4], ("GetInfo", "web", "default", True))
        result = await goshim.pod_info(reactor, path, "missing", "ns1")
        self.assertEqual((result["ok"], result["code"], result["message"]),
                         (False, Code.NOT_FOUND, "VM ID for ns1:missing was not found"))
        self.assertEqual(seen[-1], ("GetInfo", "missing", "ns1", False, None))

        payload = hypervisor_pb2.VersionRequest(version="raw").SerializeToString()
        result = await goshim.raw_call(reactor, path, "hypervisor.Hypervisor", "Version", payload, timeout=5)
        self.assertEqual(result["ok"], True, result)
        self.assertEqual(hypervisor_pb2.VersionResponse.FromString(bytes.fromhex(result["payload"])).version,
                         "caa-test")
        result = await goshim.raw_call(reactor, path, "hypervisor.Hypervisor", "Nope")
        self.assertEqual((result["ok"], result["code"], result["message"]),
                         (False, Code.UNIMPLEMENTED, "method Nope"))

    def test_run_peer_blocking(self) -> None:
        _require_go()
        result = goshim.run_peer("hv-version", "/nonexistent/caa-test.sock")
        self.assertEqual(result["ok"], False)
        self.assertIn("dial /nonexistent/caa-test.sock", result["message"])
