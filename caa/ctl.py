"""`caactl`: operator CLI, a ttrpc client of the adaptor's hypervisor socket and of agent sockets.

Exit codes: 0 ok, 1 the call failed (status code and message printed on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_SOCKET = "/run/peerpod/hypervisor.sock"
DEFAULT_PODS_DIR = "/run/peerpod/pods"


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
    ls = sub.add_parser("list", help="sandboxes in the journal")
    ls.add_argument("--pods-dir", default=None, help=f"default {DEFAULT_PODS_DIR}, env PODS_DIR")
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


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds // n}{unit}"
    return f"{seconds}s"


def cmd_list(pods_dir: str, out: Any) -> int:
    from caa.adaptor.store import load_records

    rows = [("SANDBOX", "POD", "INSTANCE", "VM IP", "STATE", "AGE")]
    now = time.time()
    for r in load_records(pods_dir):
        rows.append((r.sandbox_id[:12], f"{r.pod_namespace}/{r.pod_name}", r.instance_id or "-",
                     r.ips[0] if r.ips else "-", r.state.value + (f" ({r.error})" if r.error else ""),
                     _age(now - r.created)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[5] + "\n")
    return 0


async def _run(reactor: Any, args: argparse.Namespace, out: Any) -> None:
    import os

    from caa.proto import health_pb2, hypervisor_pb2, podvminfo_pb2
    from caa.ttrpc import connect
    from caa.ttrpc.endpoints import unix_client_endpoint

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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # usage errors exit 2
    import os

    if args.cmd == "list":
        return cmd_list(args.pods_dir or os.environ.get("PODS_DIR") or DEFAULT_PODS_DIR, sys.stdout)
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from caa.ttrpc import TTRPCError

    result: dict[str, int] = {"rc": 0}

    def done(_: object) -> None:
        reactor.stop()

    def failed(f: Any) -> None:
        e = f.value
        if isinstance(e, TTRPCError):
            sys.stderr.write(f"caactl: {e.code_name}: {e.message}\n")
        else:
            sys.stderr.write(f"caactl: {type(e).__name__}: {e}\n")
        result["rc"] = 1
        reactor.stop()

    def go() -> None:
        Deferred.fromCoroutine(_run(reactor, args, sys.stdout)).addCallbacks(done, failed)

    reactor.callWhenRunning(go)
    reactor.run()  # type: ignore[attr-defined]
    return result["rc"]


if __name__ == "__main__":
    sys.exit(main())
