"""
The development agent: a small stand-in for kata-agent used by the local provider, the demo and the
development pod VM images, because the real kata-agent (a Rust binary) cannot be built on these machines.
It is NOT kata-agent, and says so in its logs and in its Version answer.

It serves kata-agent's ttrpc API on a unix socket, but only:
- `grpc.Health` Check (SERVING) and Version (agent_version "caa-devtools-agent ... (not kata-agent)");
- `grpc.AgentService` CreateSandbox / DestroySandbox (recorded, answered with Empty);
- `grpc.AgentService` CreateContainer: nothing is run, but with `--workload-dir` every bind mount of the container
  whose source is a directory is bind-mounted at `<workload-dir>/containers/<container id><destination>`, so
  the development workload (the image's httpd serving that directory in the pod netns) shows what the container
  would see at its mount points (a CSI volume the forwarder mounted, say); undone at DestroySandbox;
- `grpc.AgentService` ListInterfaces / ListRoutes: the real interfaces, addresses and routes of the pod
  network namespace it was given (read with pyroute2 when asked; the namespace may appear later).
Everything else answers UNIMPLEMENTED, as kata-agent does for methods it does not know.

Run: `python -m caa.devtools.agent --socket /run/kata-containers/agent.sock --pod-netns podns`
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from typing import Any

from google.protobuf import empty_pb2
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from caa.proto import agent_pb2, health_pb2, types_pb2
from caa.ttrpc import CallContext, Server

AGENT_VERSION = "caa-devtools-agent 0.1 (not kata-agent)"


def netns_path(value: str) -> str:
    return value if "/" in value else f"/run/netns/{value}"


def read_network(netns: str | None) -> tuple[list[Any], list[Any]]:
    """(interfaces, routes) of `netns` (None: our own) as kata `types.Interface` / `types.Route`."""
    from pyroute2 import IPRoute

    if netns is not None and not os.path.exists(netns_path(netns)):
        return [], []
    ipr = IPRoute() if netns is None else IPRoute(netns=netns_path(netns), flags=0)
    try:
        names: dict[int, str] = {}
        interfaces = []
        addresses: dict[int, list[Any]] = {}
        for message in ipr.get_addr():
            family = types_pb2.IPFamily.v4 if message["family"] == socket.AF_INET else types_pb2.IPFamily.v6
            addresses.setdefault(message["index"], []).append(
                types_pb2.IPAddress(
                    family=family, address=str(message.get_attr("IFA_ADDRESS")), mask=str(message["prefixlen"])
                )
            )
        for link in ipr.get_links():
            name = str(link.get_attr("IFLA_IFNAME"))
            names[link["index"]] = name
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else ""
            interfaces.append(
                types_pb2.Interface(
                    device=name,
                    name=name,
                    IPAddresses=addresses.get(link["index"], []),
                    mtu=int(link.get_attr("IFLA_MTU") or 0),
                    hwAddr=str(link.get_attr("IFLA_ADDRESS") or ""),
                    type=str(kind or ""),
                    raw_flags=int(link["flags"]),
                )
            )
        routes = []
        for address_family in (socket.AF_INET, socket.AF_INET6):
            for message in ipr.get_routes(family=address_family, table=254):
                dst = message.get_attr("RTA_DST")
                routes.append(
                    types_pb2.Route(
                        dest=f"{dst}/{message['dst_len']}" if dst else "",
                        gateway=str(message.get_attr("RTA_GATEWAY") or ""),
                        device=names.get(message.get_attr("RTA_OIF") or -1, ""),
                        source=str(message.get_attr("RTA_PREFSRC") or ""),
                        scope=int(message["scope"]),
                        family=types_pb2.IPFamily.v4 if address_family == socket.AF_INET else types_pb2.IPFamily.v6,
                    )
                )
        return interfaces, routes
    finally:
        ipr.close()


class DevelopmentAgent:
    """The ttrpc services above on one `Server`; `sandboxes` holds the CreateSandbox requests seen."""

    _log = Logger()

    def __init__(self, clock: Any, pod_netns: str | None, workload_dir: str | None = None) -> None:
        self.pod_netns = pod_netns
        self.workload_dir = workload_dir
        self.sandboxes: dict[str, Any] = {}
        #: bind mounts made for CreateContainer, undone (in reverse) at DestroySandbox
        self.published: list[str] = []
        self.server = Server(clock=clock, name="devtools-agent")
        self.server.register(
            "grpc.Health",
            {
                "Check": (health_pb2.CheckRequest, self.check),
                "Version": (health_pb2.CheckRequest, self.version),
            },
        )
        self.server.register(
            "grpc.AgentService",
            {
                "CreateSandbox": (agent_pb2.CreateSandboxRequest, self.create_sandbox),
                "DestroySandbox": (agent_pb2.DestroySandboxRequest, self.destroy_sandbox),
                "CreateContainer": (agent_pb2.CreateContainerRequest, self.create_container),
                "ListInterfaces": (agent_pb2.ListInterfacesRequest, self.list_interfaces),
                "ListRoutes": (agent_pb2.ListRoutesRequest, self.list_routes),
            },
        )

    async def check(self, ctx: CallContext, request: Any) -> Any:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def version(self, ctx: CallContext, request: Any) -> Any:
        return health_pb2.VersionCheckResponse(grpc_version="caa-devtools", agent_version=AGENT_VERSION)

    async def create_sandbox(self, ctx: CallContext, request: Any) -> Any:
        self.sandboxes[request.sandbox_id] = request
        self._log.info("CreateSandbox {sandbox_id} (development agent: nothing is run)", sandbox_id=request.sandbox_id)
        return empty_pb2.Empty()

    async def destroy_sandbox(self, ctx: CallContext, request: Any) -> Any:
        self._log.info("DestroySandbox ({count} sandboxes)", count=len(self.sandboxes))
        self.sandboxes.clear()
        published, self.published = self.published, []
        await deferToThread(unpublish, published)
        return empty_pb2.Empty()

    async def create_container(self, ctx: CallContext, request: Any) -> Any:
        cid = request.container_id
        if not cid or os.path.basename(cid) != cid or cid in (".", ".."):
            from caa.ttrpc import Code, TTRPCError

            raise TTRPCError(Code.INVALID_ARGUMENT, f"container id {cid!r} is not a plain name")
        mounts = [(m.source, m.destination) for m in request.OCI.Mounts if m.type == "bind"]
        if self.workload_dir:
            made = await deferToThread(publish, os.path.join(self.workload_dir, "containers", cid), mounts)
            self.published.extend(made)
        self._log.info("CreateContainer {container_id} ({count} bind mounts; development agent: nothing is run)",
                       container_id=cid, count=len(mounts))
        return empty_pb2.Empty()

    async def list_interfaces(self, ctx: CallContext, request: Any) -> Any:
        interfaces, _routes = await deferToThread(read_network, self.pod_netns)
        return agent_pb2.Interfaces(Interfaces=interfaces)

    async def list_routes(self, ctx: CallContext, request: Any) -> Any:
        _interfaces, routes = await deferToThread(read_network, self.pod_netns)
        return agent_pb2.Routes(Routes=routes)


def publish(root: str, mounts: list[tuple[str, str]]) -> list[str]:
    """Bind-mount each directory source at root + destination; the targets made (failures are logged)."""
    log = Logger(namespace="caa.devtools.agent")
    made = []
    for source, destination in mounts:
        target = os.path.normpath(os.path.join(root, destination.lstrip("/")))
        if not os.path.isdir(source) or not target.startswith(root + "/"):
            continue
        os.makedirs(target, exist_ok=True)
        r = subprocess.run(["mount", "--bind", source, target], capture_output=True, text=True, check=False)
        if r.returncode:
            log.warn("bind mount {source} at {target}: {error}", source=source, target=target, error=r.stderr.strip())
            continue
        made.append(target)
    return made


def unpublish(targets: list[str]) -> None:
    for target in reversed(targets):
        subprocess.run(["umount", target], capture_output=True, check=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="caa development agent (NOT kata-agent)")
    parser.add_argument("--socket", required=True, help="unix socket to serve kata-agent's ttrpc API on")
    parser.add_argument("--pod-netns", default=None, help="pod network namespace (name or path)")
    parser.add_argument("--workload-dir", default=None,
                        help="show containers' bind mounts under <dir>/containers/<id>/ (the development workload)")
    args = parser.parse_args(argv)

    from twisted.internet import reactor as _reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from caa.reactors import as_node_reactor
    from caa.ttrpc.endpoints import unix_server_endpoint

    reactor = as_node_reactor(_reactor)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    log = Logger(namespace="caa.devtools.agent")
    agent = DevelopmentAgent(reactor, args.pod_netns, args.workload_dir)
    log.warn("{version}: this is the caa development agent, not kata-agent; containers are not run",
             version=AGENT_VERSION)

    def failed(failure: Any) -> None:
        log.failure("cannot listen on {socket}", failure, socket=args.socket)
        reactor.stop()

    d: Deferred[Any] = unix_server_endpoint(reactor, args.socket).listen(agent.server.factory())
    d.addCallbacks(lambda _: log.info("listening on {socket}", socket=args.socket), failed)
    reactor.run()


if __name__ == "__main__":
    main()
