"""Adaptor benchmark: the real `twistd caa-adaptor` process with the test provider in process mode (each VM a
tiny asyncio ttrpc server on 127.77.x.y), driven over its unix socket by the caa.ttrpc client, one connection
per RPC as the shim does.

Measures: start-up time (exec -> socket answers Version), RSS, sequential CreateVM/StartVM/StopVM latency
(median), and N concurrent lifecycles. The provider adds no delay, so the figures are the adaptor's own cost
(journal writes with fsync, user data with TLS certificate issue, proxy start and first forwarder dial).

    .venv/bin/python bench/adaptor_bench.py [--n 20] [--concurrent 50] [--tls]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from caa.reactors import INodeReactor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def bench(reactor: INodeReactor, args: argparse.Namespace) -> None:
    from twisted.internet.defer import Deferred, gatherResults

    from caa.proto import hypervisor_pb2 as pb
    from caa.ttrpc import connect
    from caa.ttrpc.endpoints import unix_client_endpoint

    base = f"/tmp/caa-bench-{os.getpid()}"
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    sock = f"{base}/h.sock"
    netns = f"{base}/netns"
    open(netns, "w").close()
    env = dict(os.environ, PYTHONPATH=ROOT, CLOUD_PROVIDER="tests.fakes.provider:FakeProviderFactory",
               FAKE_STATE_DIR=f"{base}/cloud", FORWARDER_PORT=str(30000 + os.getpid() % 20000))
    argv = [sys.executable, "-m", "tests.fakes.run_adaptor", "-n", "--pidfile=", "caa-adaptor", "--socket", sock,
            "--pods-dir", f"{base}/pods", "--tls-dir", f"{base}/tls", "--tunnel-type", "none", "--probe-port", "0"]
    if not args.tls:
        argv.append("--disable-tls")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=open(f"{base}/log", "wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    async def call(method: str, req: Any, resp: Any) -> Any:
        c = await connect(unix_client_endpoint(reactor, sock), clock=reactor)
        try:
            return await c.call("hypervisor.Hypervisor", method, req, resp, timeout=600.0)
        finally:
            c.close()

    from twisted.internet.task import deferLater

    while True:
        try:
            await call("Version", pb.VersionRequest(), pb.VersionResponse)
            break
        except Exception:
            await deferLater(reactor, 0.01)
    startup = time.monotonic() - t0
    rss0 = rss_mib(proc.pid)

    def ann(i: int) -> dict[str, str]:
        return {"io.kubernetes.cri.sandbox-name": f"pod{i}", "io.kubernetes.cri.sandbox-namespace": "default"}

    lat: dict[str, list[float]] = {"CreateVM": [], "StartVM": [], "StopVM": []}
    for i in range(args.n):
        sid = f"s{i:03d}"
        create = pb.CreateVMRequest(id=sid, annotations=ann(i), networkNamespacePath=netns)
        for method, req, resp in (("CreateVM", create, pb.CreateVMResponse),
                                  ("StartVM", pb.StartVMRequest(id=sid), pb.StartVMResponse),
                                  ("StopVM", pb.StopVMRequest(id=sid), pb.StopVMResponse)):
            t = time.monotonic()
            await call(method, req, resp)
            lat[method].append(time.monotonic() - t)
    sids = [f"c{i:03d}" for i in range(args.concurrent)]
    await gatherResults([Deferred.fromCoroutine(call("CreateVM", pb.CreateVMRequest(
        id=s, annotations=ann(i), networkNamespacePath=netns), pb.CreateVMResponse)) for i, s in enumerate(sids)])
    t = time.monotonic()
    await gatherResults([Deferred.fromCoroutine(call("StartVM", pb.StartVMRequest(id=s), pb.StartVMResponse))
                         for s in sids])
    conc_start = time.monotonic() - t
    rss_full = rss_mib(proc.pid)
    t = time.monotonic()
    await gatherResults([Deferred.fromCoroutine(call("StopVM", pb.StopVMRequest(id=s), pb.StopVMResponse))
                         for s in sids])
    conc_stop = time.monotonic() - t
    proc.terminate()
    proc.wait()
    shutil.rmtree(base, ignore_errors=True)
    print(f"| adaptor start (exec -> Version answers) | {startup * 1000:.0f} ms |")
    print(f"| RSS idle / with {args.concurrent} running sandboxes | {rss0:.1f} MiB / {rss_full:.1f} MiB |")
    for m, v in lat.items():
        print(f"| {m}, sequential (median of {args.n}) | {statistics.median(v) * 1000:.1f} ms |")
    print(f"| {args.concurrent} concurrent StartVM (all answered) | {conc_start:.2f} s |")
    print(f"| {args.concurrent} concurrent StopVM | {conc_stop:.2f} s |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--concurrent", type=int, default=50)
    p.add_argument("--tls", action="store_true", help="auto mTLS (needs a TLS-capable forwarder; default off)")
    args = p.parse_args()
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    task.react(lambda reactor: Deferred.fromCoroutine(bench(reactor, args)))


if __name__ == "__main__":
    main()
