"""`caactl`: operator CLI, a ttrpc client of the adaptor's hypervisor socket and of agent sockets.

Exit codes: 0 ok, 1 the call failed (status code and message printed on stderr), 2 usage.
It runs on `twisted.internet.task.react`, which starts the reactor, stops it once the command is done and
exits with the command's code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from typing import NoReturn, TextIO

from twisted.internet.interfaces import IReactorCore
from twisted.internet.task import react

from caa.proto import admin_pb2
from caa.reactors import INodeReactor, as_node_reactor

DEFAULT_SOCKET = "/run/peerpod/hypervisor.sock"

_LIST_HELP = """\
Lists the adaptor's sandboxes: sandbox id, pod, instance, VM IP, state (with the last error) and age. By
default it asks the running adaptor on --socket (the read-only call caa.adaptor.v1.Admin/ListSandboxes).
With --pods-dir it reads a journal directory directly instead, for an adaptor that is not running: give
the --pods-dir (env PODS_DIR) that adaptor was started with."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="caactl", description="Talk to the caa adaptor and to agent sockets.")
    p.add_argument("--socket", default=None, help=f"hypervisor socket (default {DEFAULT_SOCKET}, "
                   "env REMOTE_HYPERVISOR_ENDPOINT)")
    p.add_argument("--timeout", type=float, default=None, help="call deadline in seconds")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("version", help="adaptor version")
    c = sub.add_parser("create", help="CreateVM")
    c.add_argument("--id", required=True)
    c.add_argument("--pod", required=True)
    c.add_argument("--namespace", required=True)
    c.add_argument("--netns", required=True)
    c.add_argument("--annotation", action="append", default=[], metavar="K=V")
    s = sub.add_parser("start", help="StartVM")
    s.add_argument("--id", required=True)
    s = sub.add_parser("stop", help="StopVM")
    s.add_argument("--id", required=True)
    i = sub.add_parser("info", help="PodVMInfo.GetInfo")
    i.add_argument("--pod", required=True)
    i.add_argument("--namespace", required=True)
    i.add_argument("--wait", action="store_true")
    ls = sub.add_parser("list", help="the adaptor's sandboxes (asks the adaptor)", description=_LIST_HELP)
    ls.add_argument("--pods-dir", default=None, metavar="DIR",
                    help="read this journal directory instead of asking the adaptor (adaptor not running)")
    a = sub.add_parser("agent", help="talk to an agent socket (<pods-dir>/<sid>/agent.ttrpc)")
    a.add_argument("--socket", dest="agent_socket", required=True)
    asub = a.add_subparsers(dest="agent_cmd", required=True)
    asub.add_parser("check", help="grpc.Health/Check")
    asub.add_parser("version", help="grpc.Health/Version")
    call = asub.add_parser("call", help="any method with a raw payload")
    call.add_argument("service")
    call.add_argument("method")
    call.add_argument("--payload-hex", default="", help="request payload bytes as hex (default empty)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line; a usage error prints usage and exits 2 (argparse)."""
    return _parser().parse_args(argv)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


def write_table(sandboxes: Iterable[admin_pb2.Sandbox], now: float, out: TextIO) -> None:
    """The `caactl list` table: one row per sandbox, AGE measured from `now` (wall-clock seconds)."""
    rows = [("SANDBOX", "POD", "INSTANCE", "VM IP", "STATE", "AGE")]
    for s in sandboxes:
        created = s.created.seconds + s.created.nanos / 1e9
        rows.append((s.id[:12], f"{s.pod_namespace}/{s.pod_name}", s.instance_id or "-",
                     s.vm_ips[0] if s.vm_ips else "-", s.state + (f" ({s.error})" if s.error else ""),
                     _age(now - created)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[5] + "\n")


def journal_sandboxes(pods_dir: str) -> list[admin_pb2.Sandbox]:
    """The sandboxes journaled under `pods_dir` (none if it does not exist), as the adaptor would list them."""
    from caa.adaptor.admin import list_sandboxes_response
    from caa.adaptor.store import load_records

    if not os.path.isdir(pods_dir):
        return []
    return list(list_sandboxes_response(load_records(pods_dir)).sandboxes)


async def _call(reactor: INodeReactor, args: argparse.Namespace, out: TextIO) -> None:
    from caa.adaptor.admin import ADMIN_SERVICE
    from caa.proto import health_pb2, hypervisor_pb2, podvminfo_pb2
    from caa.ttrpc import connect
    from caa.ttrpc.endpoints import unix_client_endpoint

    if args.cmd == "list" and args.pods_dir:
        write_table(journal_sandboxes(args.pods_dir), reactor.seconds(), out)
        return
    if args.cmd == "agent":
        path = args.agent_socket
    else:
        path = args.socket or os.environ.get("REMOTE_HYPERVISOR_ENDPOINT") or DEFAULT_SOCKET
    client = await connect(unix_client_endpoint(reactor, path, timeout=10), clock=reactor)
    t = args.timeout
    try:
        if args.cmd == "version":
            v = await client.call("hypervisor.Hypervisor", "Version", hypervisor_pb2.VersionRequest(version="caactl"),
                                  hypervisor_pb2.VersionResponse, timeout=t)
            out.write(f"{v.version}\n")
        elif args.cmd == "create":
            anns = {"io.kubernetes.cri.sandbox-name": args.pod, "io.kubernetes.cri.sandbox-namespace": args.namespace}
            for kv in args.annotation:
                k, _, val = kv.partition("=")
                anns[k] = val
            r = await client.call("hypervisor.Hypervisor", "CreateVM",
                                  hypervisor_pb2.CreateVMRequest(id=args.id, annotations=anns,
                                                                 networkNamespacePath=args.netns),
                                  hypervisor_pb2.CreateVMResponse, timeout=t)
            out.write(f"{r.agentSocketPath}\n")
        elif args.cmd == "start":
            await client.call("hypervisor.Hypervisor", "StartVM", hypervisor_pb2.StartVMRequest(id=args.id),
                              hypervisor_pb2.StartVMResponse, timeout=t if t is not None else 600.0)
        elif args.cmd == "stop":
            await client.call("hypervisor.Hypervisor", "StopVM", hypervisor_pb2.StopVMRequest(id=args.id),
                              hypervisor_pb2.StopVMResponse, timeout=t)
        elif args.cmd == "info":
            r2 = await client.call("podvminfo.PodVMInfo", "GetInfo",
                                   podvminfo_pb2.GetInfoRequest(PodName=args.pod, PodNamespace=args.namespace,
                                                                Wait=args.wait),
                                   podvminfo_pb2.GetInfoResponse, timeout=t)
            out.write(f"{r2.VMID}\n")
        elif args.cmd == "list":
            listed = await client.call(ADMIN_SERVICE, "ListSandboxes", admin_pb2.ListSandboxesRequest(),
                                       admin_pb2.ListSandboxesResponse, timeout=t)
            write_table(listed.sandboxes, reactor.seconds(), out)
        elif args.agent_cmd == "check":
            h = await client.call("grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse,
                                  timeout=t)
            out.write(f"{health_pb2.HealthCheckResponse.ServingStatus.Name(h.status)}\n")
        elif args.agent_cmd == "version":
            vv = await client.call("grpc.Health", "Version", health_pb2.CheckRequest(),
                                   health_pb2.VersionCheckResponse, timeout=t)
            out.write(f"agent {vv.agent_version} grpc {vv.grpc_version}\n")
        else:
            raw = await client.call_raw(args.service, args.method, bytes.fromhex(args.payload_hex), timeout=t)
            out.write(f"{raw.hex()}\n")
    finally:
        client.close()


async def run(reactor: INodeReactor, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run one parsed command; its exit code (0 ok, 1 the call failed, said on `err`)."""
    from caa.ttrpc import Code, TTRPCError

    try:
        await _call(reactor, args, out)
    except TTRPCError as e:
        hint = ""
        if args.cmd == "list" and e.code == Code.UNIMPLEMENTED:
            hint = " (this adaptor has no caa.adaptor.v1.Admin service: use list --pods-dir)"
        err.write(f"caactl: {e.code_name}: {e.message}{hint}\n")
        return 1
    except Exception as e:
        err.write(f"caactl: {type(e).__name__}: {e}\n")
        return 1
    return 0


async def _react_main(reactor: IReactorCore, args: argparse.Namespace) -> None:
    code = await run(as_node_reactor(reactor), args, sys.stdout, sys.stderr)
    if code:
        raise SystemExit(code)  # react exits with it


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The `caactl` console script: parse (usage errors exit 2), then run the command under `react`."""
    args = parse_args(argv)
    react(_react_main, (args,))


if __name__ == "__main__":
    main()
