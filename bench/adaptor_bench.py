"""Adaptor benchmark: the real `twistd caa-adaptor` process with the test provider in process mode (each VM a
tiny asyncio ttrpc server on 127.77.x.y), driven over its unix socket by the caa.ttrpc client, one connection
per RPC as the shim does.

Measures: start-up time (exec -> socket answers Version), RSS, sequential CreateVM/StartVM/StopVM latency
(median), and N concurrent lifecycles. The provider adds no delay, so the figures are the adaptor's own cost
(journal writes with fsync, user data with TLS certificate issue, proxy start and first forwarder dial).

    .venv/bin/python bench/adaptor_bench.py [--n 20] [--concurrent 50] [--tls]

`--side-by-side BASE_TREE` measures instead 100 concurrent StartVMs ("all done at delay + X s") with the journal's
fsync on, for the previous code and this tree in one run: each round runs the same in-process scenario (the real
CloudService, SandboxStore with fsync, real agent proxies dialling with mutual TLS one forwarder stand-in child
process; a test provider whose create takes --delay and whose VMs are at 127.0.0.1; no tunnel) in a fresh
subprocess whose PYTHONPATH is BASE_TREE, then this tree, alternately, and prints both and their ratio:

    git worktree add --detach /tmp/caa-base b09b276
    .venv/bin/python bench/adaptor_bench.py --side-by-side /tmp/caa-base [--pods 100] [--delay 0.5] [--rounds 3]
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
if "--startvm-child" not in sys.argv:  # the child imports caa from its PYTHONPATH (a tree under test)
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


# -- side by side: 100 concurrent StartVMs, previous code vs this tree ------------------------------------------

def startvm_child(args: argparse.Namespace) -> None:
    """One measurement with whatever caa PYTHONPATH selects; prints one JSON line."""
    import gc
    import json

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, gatherResults
    from twisted.python.threadpool import ThreadPool

    import caa
    import caa.adaptor.store as store_mod
    from caa import tls
    from caa.adaptor.adapters import NullNetworking
    from caa.adaptor.interfaces import ProxyTLS
    from caa.adaptor.proxy import AgentProxyFactory
    from caa.adaptor.service import CloudService, ServiceConfig
    from caa.providers.interfaces import Instance
    from tests.fakes.provider import FakeProvider

    r: Any = reactor

    def rd(name: str) -> bytes:
        with open(os.path.join(args.tls_dir, name), "rb") as f:
            return f.read()

    class LoopbackProvider(FakeProvider):
        def create_instance(self, pod_name: str, sandbox_id: str, user_data: bytes, spec: Any) -> Any:
            d = super().create_instance(pod_name, sandbox_id, user_data, spec)
            return d.addCallback(lambda i: Instance(id=i.id, name=i.name, ips=("127.0.0.1",)))

    pods = os.path.join(args.work, "pods")
    pool = None
    if hasattr(store_mod, "threadpool_runner"):  # this tree: journal in a thread pool
        pool = ThreadPool(minthreads=0, maxthreads=store_mod.JOURNAL_THREADS, name="caa-journal")
        pool.start()
        store = store_mod.SandboxStore(pods, store_mod.threadpool_runner(r, pool))
    else:  # the previous code: journal on the reactor thread
        store = store_mod.SandboxStore(pods)
    proxies = AgentProxyFactory(r, ProxyTLS(ca_pem=rd("ca.crt"), cert_pem=rd("client.crt"), key_pem=rd("client.key"),
                                            server_name_override=tls.MANUAL_SERVER_NAME))
    svc = CloudService(r, LoopbackProvider(r, create_delay=args.delay), proxies, store, NullNetworking(), None,
                       ServiceConfig(pods_dir=pods, forwarder_port=args.fport))
    out: dict[str, Any] = {"caa": os.path.dirname(os.path.dirname(caa.__file__))}

    def ann(sid: str) -> dict[str, str]:
        return {"io.kubernetes.cri.sandbox-name": f"pod-{sid}", "io.kubernetes.cri.sandbox-namespace": "default"}

    async def run() -> None:
        try:
            await svc.create_vm("warmup", ann("warmup"), "")
            await svc.start_vm("warmup", r.seconds() + 60)
            await svc.stop_vm("warmup")
            sids = [f"con{i:04d}" for i in range(args.pods)]
            for sid in sids:
                await svc.create_vm(sid, ann(sid), "")
            gc.collect()
            ends: list[float] = []
            t0 = time.perf_counter()

            async def one(sid: str) -> None:
                await svc.start_vm(sid, r.seconds() + 120)
                ends.append(time.perf_counter() - t0)

            await gatherResults([Deferred.fromCoroutine(one(s)) for s in sids])
            out["ends"] = ends
            await gatherResults([Deferred.fromCoroutine(svc.stop_vm(s)) for s in sids])
        except BaseException as e:
            out["error"] = repr(e)
        finally:
            r.stop()

    r.callWhenRunning(lambda: Deferred.fromCoroutine(run()))
    r.run()
    if pool is not None:
        pool.stop()
    print(json.dumps(out))


def side_by_side(args: argparse.Namespace) -> None:
    import json
    import socket
    import tempfile

    from adaptor_proxy_bench import write_tls_material  # this script's own directory is on sys.path

    base = os.path.abspath(args.side_by_side)
    work = tempfile.mkdtemp(prefix=f"caa-sbs-{os.getpid()}-")
    tls_dir = os.path.join(work, "tls")
    write_tls_material(tls_dir)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    fport = int(s.getsockname()[1])
    s.close()
    # the forwarder stand-in of bench/adaptor_proxy_bench.py (mTLS, echo), shared by every round
    fwd = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "adaptor_proxy_bench.py"), "--forwarder",
                            str(fport), tls_dir], env=dict(os.environ, PYTHONPATH=ROOT))
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", fport), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    results: dict[str, list[list[float]]] = {"previous": [], "this tree": []}
    try:
        for rnd in range(args.rounds):
            for label, tree in (("previous", base), ("this tree", ROOT)):
                run_dir = os.path.join(work, f"{label.replace(' ', '-')}-{rnd}")
                os.makedirs(run_dir)
                load = os.getloadavg()[0]
                p = subprocess.run([sys.executable, os.path.abspath(__file__), "--startvm-child", "--work", run_dir,
                                    "--tls-dir", tls_dir, "--fport", str(fport), "--pods", str(args.pods),
                                    "--delay", str(args.delay)],
                                   env=dict(os.environ, PYTHONPATH=tree), cwd=tree, capture_output=True, text=True)
                line = (p.stdout.strip().splitlines() or ["{}"])[-1]
                doc = json.loads(line) if line.startswith("{") else {"error": p.stderr[-2000:]}
                if "error" in doc or p.returncode:
                    print(f"{label} round {rnd + 1} failed: {doc.get('error')}\n{p.stderr[-2000:]}", file=sys.stderr)
                    continue
                assert os.path.realpath(doc["caa"]) == os.path.realpath(tree), (doc["caa"], tree)
                ends = sorted(doc["ends"])
                results[label].append(ends)
                print(f"round {rnd + 1} {label:9}: {len(ends)} concurrent StartVMs all done at delay + "
                      f"{ends[-1] - args.delay:.3f} s (p50 + {statistics.median(ends) - args.delay:.3f} s); "
                      f"load average before {load:.2f}", flush=True)
                shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        fwd.terminate()
        fwd.wait()
        shutil.rmtree(work, ignore_errors=True)
    worst = {k: [e[-1] - args.delay for e in v] for k, v in results.items() if v}
    if len(worst) == 2:
        prev, ours = worst["previous"], worst["this tree"]
        print(f"| {args.pods} concurrent StartVM, fsync on, all done at (median of {args.rounds} rounds; min-max) | "
              f"previous: delay + {statistics.median(prev):.3f} s ({min(prev):.3f}-{max(prev):.3f}) | "
              f"this tree: delay + {statistics.median(ours):.3f} s ({min(ours):.3f}-{max(ours):.3f}) | "
              f"ratio previous/this {statistics.median(prev) / statistics.median(ours):.2f}x |")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--concurrent", type=int, default=50)
    p.add_argument("--tls", action="store_true", help="auto mTLS (needs a TLS-capable forwarder; default off)")
    p.add_argument("--side-by-side", metavar="BASE_TREE", help="100 concurrent StartVMs: BASE_TREE's code vs this tree")
    p.add_argument("--pods", type=int, default=100)
    p.add_argument("--delay", type=float, default=0.5, help="provider create delay (s), side by side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--startvm-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--tls-dir", help=argparse.SUPPRESS)
    p.add_argument("--fport", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.startvm_child:
        startvm_child(args)
        return
    if args.side_by_side:
        side_by_side(args)
        return
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    task.react(lambda reactor: Deferred.fromCoroutine(bench(reactor, args)))


if __name__ == "__main__":
    main()
