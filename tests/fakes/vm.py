"""A fake pod VM for process-level adaptor tests: `python -m tests.fakes.vm IP PORT`.

Stands for a pod VM's agent-protocol-forwarder + kata-agent: a plain-TCP (no TLS) ttrpc server on IP:PORT
answering grpc.Health/Check (SERVING) and grpc.Health/Version, and echoing every other method's payload.
"""

from __future__ import annotations

import sys
from typing import Any


def main() -> None:
    from twisted.internet import reactor

    from caa.proto import health_pb2
    from caa.ttrpc import CallContext, Server
    from caa.ttrpc.endpoints import tcp_server_endpoint

    server = Server(clock=reactor, name="fake-vm")

    async def check(ctx: CallContext, req: health_pb2.CheckRequest) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def version(ctx: CallContext, req: health_pb2.CheckRequest) -> health_pb2.VersionCheckResponse:
        return health_pb2.VersionCheckResponse(grpc_version="fake", agent_version="fake-vm")

    async def echo(ctx: CallContext, service: str, method: str, payload: bytes) -> bytes:
        return payload

    server.register("grpc.Health", {"Check": (health_pb2.CheckRequest, check),
                                    "Version": (health_pb2.CheckRequest, version)})
    server.register_fallback(echo)
    ip, port = sys.argv[1], int(sys.argv[2])
    d: Any = tcp_server_endpoint(reactor, port, interface=ip).listen(server.factory())
    d.addErrback(lambda f: (print(f"fake vm: listen failed: {f.value}", flush=True), reactor.stop()))
    print(f"fake vm listening on {ip}:{port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
