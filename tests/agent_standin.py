"""A kata-agent stand-in for the forwarder tests and benchmark: a caa.ttrpc server on a real unix socket.

Stands in for kata-agent's ttrpc API (`/run/kata-containers/agent.sock`), only the calls the tests use:
`grpc.Health` Check/Version and `grpc.AgentService` CreateSandbox, DestroySandbox, CreateContainer,
StartContainer, ReadStdout (answers `len` bytes), WaitProcess (blocks until released, for many-in-flight
tests). It records every decoded request and the metadata and deadline it saw; anything else is
Unimplemented, like the real agent for unknown methods.

Run alone (for the benchmark): `python -m tests.agent_standin <socket path>`.
"""

from __future__ import annotations

import sys
from typing import Any

from google.protobuf import empty_pb2
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort

from caa.proto import agent_pb2, health_pb2
from caa.reactors import INodeReactor, as_node_reactor
from caa.ttrpc import CallContext, Server
from caa.ttrpc.endpoints import unix_server_endpoint


class AgentStandin:
    def __init__(self, clock: Any, version: str = "3.99.0-standin") -> None:
        self.clock = clock
        self.version = version
        self.calls: list[tuple[str, Any, list[tuple[str, str]], float | None]] = []
        self.waiting: list[Deferred[None]] = []
        self.server = Server(clock=clock, name="agent-standin")
        self.server.register("grpc.Health", {
            "Check": (health_pb2.CheckRequest, self.check),
            "Version": (health_pb2.CheckRequest, self.version_check),
        })
        self.server.register("grpc.AgentService", {
            "CreateSandbox": (agent_pb2.CreateSandboxRequest, self.empty),
            "DestroySandbox": (agent_pb2.DestroySandboxRequest, self.empty),
            "CreateContainer": (agent_pb2.CreateContainerRequest, self.empty),
            "StartContainer": (agent_pb2.StartContainerRequest, self.empty),
            "ReadStdout": (agent_pb2.ReadStreamRequest, self.read_stdout),
            "WaitProcess": (agent_pb2.WaitProcessRequest, self.wait_process),
        })
        self.port: IListeningPort | None = None

    def _record(self, ctx: CallContext, req: Any) -> None:
        self.calls.append((ctx.method, req, list(ctx.metadata), ctx.remaining()))

    async def check(self, ctx: CallContext, req: Any) -> Any:
        self._record(ctx, req)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def version_check(self, ctx: CallContext, req: Any) -> Any:
        self._record(ctx, req)
        return health_pb2.VersionCheckResponse(grpc_version="0.1.0", agent_version=self.version)

    async def empty(self, ctx: CallContext, req: Any) -> Any:
        self._record(ctx, req)
        return empty_pb2.Empty()

    async def read_stdout(self, ctx: CallContext, req: Any) -> Any:
        self._record(ctx, req)
        return agent_pb2.ReadStreamResponse(data=b"x" * req.len)

    async def wait_process(self, ctx: CallContext, req: Any) -> Any:
        self._record(ctx, req)
        d: Deferred[None] = Deferred()
        self.waiting.append(d)
        await d
        return agent_pb2.WaitProcessResponse(status=int(req.exec_id or 0))

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)

    def methods(self) -> list[str]:
        return [c[0] for c in self.calls]

    async def listen(self, reactor: INodeReactor, path: str) -> IListeningPort:
        self.port = await unix_server_endpoint(reactor, path).listen(self.server.factory())
        return self.port

    async def stop(self) -> None:
        """Like kata-agent exiting: close the socket and every connection."""
        if self.port is not None:
            port, self.port = self.port, None
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        self.server.abort()


def main() -> None:
    from twisted.internet import reactor as _reactor
    from twisted.internet.defer import ensureDeferred

    reactor = as_node_reactor(_reactor)
    agent = AgentStandin(reactor)
    ensureDeferred(agent.listen(reactor, sys.argv[1])).addCallback(
        lambda _: print("listening", flush=True))
    reactor.run()


if __name__ == "__main__":
    main()
