"""Agent proxy benchmark: what the adaptor adds to StartVM beyond the provider, and the dial policy's gain.

Part 1, StartVM overhead: the real CloudService (journal with fsync, user data, proxy) in this process, a test
provider with a fixed create delay whose VMs are at 127.0.0.1, `--tunnel-type none`, the agent proxy with
mutual TLS (manual-CA mode, server name podvm-server) to a forwarder stand-in in a child process (a caa.ttrpc
server with an echo fallback, already up: the VM is booted when the provider returns). Overhead = StartVM
latency - provider delay, sequentially and for N concurrent pods. RSS of this process idle (after one warm-up
lifecycle) and with N running sandboxes (each: a unix listener, a journal entry, one mTLS upstream link).

Part 2, dial policy: N pods whose VM "boots" (forwarder starts listening) a random 2-20 s after the provider
returned; for each pod three proxies dial at once: the old policy (100 ms doubling plus up to 100 ms jitter, cap
1 s), the new one (the same after a boot window: every 50 ms, connect bounded by 250 ms, for --boot-window s)
and upstream's (100 ms doubling plus up to 100 ms jitter, cap 5 s). Lag = connected - forwarder listening;
attempts per VM per second = dial attempts / (connected - dial start). All in one run, so the ratios are fair.
Plain TCP (no TLS) and refused connects on loopback: the cost of an attempt here is the node's, not a network's.

    .venv/bin/python bench/adaptor_proxy_bench.py [--delay 0.5] [--pods 100] [--seq 20] [--boot-max 20]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from caa.reactors import as_node_reactor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def write_tls_material(tls_dir: str) -> None:
    """A fresh CA, a server certificate for the manual server name and a client certificate, as PEM files."""
    from caa import tls

    os.makedirs(tls_dir)
    ca = tls.CertificateAuthority.create()
    server = ca.issue_server_certificate(tls.MANUAL_SERVER_NAME)
    client = tls.make_client_certificate()
    for name, data in (("ca.crt", ca.cert_pem), ("server.crt", server.cert_pem), ("server.key", server.key_pem),
                       ("client.crt", client.cert_pem), ("client.key", client.key_pem)):
        with open(os.path.join(tls_dir, name), "wb") as f:
            f.write(data)


def read_pem(tls_dir: str, name: str) -> bytes:
    with open(os.path.join(tls_dir, name), "rb") as f:
        return f.read()


def forwarder_main(port: int, tls_dir: str) -> None:
    """Child process: the forwarder stand-in (echo for any method) on 127.0.0.1:port with mTLS."""
    from twisted.internet import reactor as global_reactor

    reactor = as_node_reactor(global_reactor)

    from caa import tls
    from caa.ttrpc import CallContext, Server
    from caa.ttrpc.endpoints import tls_server_endpoint

    def rd(name: str) -> bytes:
        with open(os.path.join(tls_dir, name), "rb") as f:
            return f.read()

    async def echo(ctx: CallContext, service: str, method: str, payload: bytes) -> bytes:
        return payload

    server = Server(clock=reactor, name="forwarder-standin")
    server.register_fallback(echo)
    ctx = tls.server_context_factory(rd("server.crt"), rd("server.key"), rd("client.crt"))
    tls_server_endpoint(reactor, port, "127.0.0.1", ctx, backlog=1024).listen(server.factory())
    reactor.run()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay", type=float, default=0.5, help="provider create delay (s)")
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--seq", type=int, default=20)
    ap.add_argument("--boot-min", type=float, default=2.0)
    ap.add_argument("--boot-max", type=float, default=20.0)
    ap.add_argument("--forwarder", nargs=2, metavar=("PORT", "TLS_DIR"))
    ap.add_argument("--skip-dial", action="store_true")
    ap.add_argument("--skip-startvm", action="store_true", help="only the dial-policy part")
    ap.add_argument("--dial-pods", type=int, default=0, help="VMs of the dial-policy part (default: --pods)")
    ap.add_argument("--dial-tls", action="store_true", help="the dial part with mutual TLS (default plain TCP)")
    ap.add_argument("--dial-rounds", type=int, default=1, help="rounds of the dial part (boot times drawn anew)")
    ap.add_argument("--boot-window", type=float, default=120.0, help="the new policy's boot window (s)")
    ap.add_argument("--boot-period", type=float, default=0.05, help="the new policy's period (s)")
    ap.add_argument("--boot-rate", type=float, default=200.0, help="the new policy's node-wide attempts/s")
    ap.add_argument("--no-fsync", action="store_true",
                    help="make os.fsync a no-op in this process (separates the journal's cost from the proxy's)")
    args = ap.parse_args()
    if args.forwarder:
        forwarder_main(int(args.forwarder[0]), args.forwarder[1])
        return

    if args.no_fsync:
        os.fsync = lambda fd: None
    from twisted.internet import reactor as global_reactor

    reactor = as_node_reactor(global_reactor)
    from twisted.internet.defer import Deferred, gatherResults
    from twisted.internet.interfaces import IStreamClientEndpoint
    from twisted.internet.task import deferLater
    from zope.interface import implementer

    from caa import tls
    from caa.adaptor.adapters import NullNetworking
    from caa.adaptor.interfaces import ProxyTLS
    from caa.adaptor.proxy import AgentProxy, AgentProxyFactory
    from caa.adaptor.service import CloudService, ServiceConfig
    from caa.adaptor.store import SandboxStore
    from caa.adaptor.userdata import ANN_POD_NAME, ANN_POD_NAMESPACE
    from caa.dialer import BootWindow, dial_backoff
    from caa.providers.interfaces import Instance
    from caa.ttrpc import CallContext, Server
    from caa.ttrpc.endpoints import tcp_server_endpoint, tls_server_endpoint
    from tests.fakes.provider import FakeProvider

    r: Any = reactor
    work = tempfile.mkdtemp(prefix=f"caa-proxybench-{os.getpid()}-")
    tls_dir = os.path.join(work, "tls")
    write_tls_material(tls_dir)
    fport = free_port()
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--forwarder", str(fport), tls_dir])
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", fport), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)

    class LoopbackProvider(FakeProvider):
        def create_instance(self, pod_name: str, sandbox_id: str, user_data: bytes, spec: Any) -> Any:
            d = super().create_instance(pod_name, sandbox_id, user_data, spec)
            return d.addCallback(lambda i: Instance(id=i.id, name=i.name, ips=("127.0.0.1",)))

    results: dict[str, Any] = {}

    async def part1() -> None:
        provider = LoopbackProvider(r, create_delay=args.delay)
        def pem(name: str) -> bytes:
            with open(os.path.join(tls_dir, name), "rb") as f:
                return f.read()

        proxies = AgentProxyFactory(r, ProxyTLS(ca_pem=pem("ca.crt"), cert_pem=pem("client.crt"),
                                                key_pem=pem("client.key"), server_name_override=tls.MANUAL_SERVER_NAME))
        from twisted.python.threadpool import ThreadPool

        from caa.adaptor.store import JOURNAL_THREADS, threadpool_runner

        journal_pool = ThreadPool(minthreads=0, maxthreads=JOURNAL_THREADS, name="caa-journal")
        journal_pool.start()
        r.addSystemEventTrigger("after", "shutdown", journal_pool.stop)
        store = SandboxStore(os.path.join(work, "pods"), threadpool_runner(r, journal_pool))
        put = store.put
        journal = {"t": 0.0, "n": 0}

        def timed_put(record: Any) -> Any:
            t = time.perf_counter()

            def done(result: Any) -> Any:
                journal["t"] += time.perf_counter() - t
                journal["n"] += 1
                return result

            return put(record).addBoth(done)

        store.put = timed_put  # type: ignore[method-assign]
        starts: dict[str, float] = {}
        orig_start = proxies.new

        def new(sandbox_id: str, socket_path: str, volumes: tuple[str, ...]) -> Any:
            p = orig_start(sandbox_id, socket_path, volumes)
            real = p.start

            def start(address: Any, server_name: str, deadline: float) -> Any:
                t = time.perf_counter()
                return real(address, server_name, deadline).addCallback(
                    lambda _: starts.__setitem__(sandbox_id, time.perf_counter() - t))

            p.start = start  # type: ignore[method-assign]
            return p

        proxies.new = new  # type: ignore[method-assign]
        svc = CloudService(r, provider, proxies, store, NullNetworking(), None,
                           ServiceConfig(pods_dir=store.pods_dir, forwarder_port=fport))
        n = 0

        async def lifecycle_start(sid: str) -> float:
            await svc.create_vm(sid, {ANN_POD_NAME: f"pod-{sid}", ANN_POD_NAMESPACE: "default"}, "")
            t0 = time.perf_counter()
            await svc.start_vm(sid, r.seconds() + 60)
            return time.perf_counter() - t0

        # warm-up, then idle RSS
        await lifecycle_start("warmup")
        await svc.stop_vm("warmup")
        gc.collect()
        await deferLater(r, 0.2)
        results["rss_idle"] = rss_kib()
        seq = []
        for _ in range(args.seq):
            n += 1
            sid = f"seq{n:04d}"
            seq.append(await lifecycle_start(sid) - args.delay)
            await svc.stop_vm(sid)
        results["seq"] = seq
        results["seq_proxy"] = [starts[f"seq{i:04d}"] for i in range(1, n + 1)]
        results["seq_journal"] = journal["t"] / max(1, journal["n"])
        sids = [f"con{i:04d}" for i in range(args.pods)]
        for sid in sids:
            await svc.create_vm(sid, {ANN_POD_NAME: f"pod-{sid}", ANN_POD_NAMESPACE: "default"}, "")
        t0 = time.perf_counter()
        ends: list[float] = []

        async def one(sid: str) -> None:
            await svc.start_vm(sid, r.seconds() + 60)
            ends.append(time.perf_counter() - t0)

        await gatherResults([Deferred.fromCoroutine(one(s)) for s in sids])
        results["con"] = [e - args.delay for e in ends]
        results["con_total"] = max(ends)
        results["con_proxy"] = [starts[s] for s in sids]
        gc.collect()
        await deferLater(r, 0.2)
        results["rss_full"] = rss_kib()
        await gatherResults([Deferred.fromCoroutine(svc.stop_vm(s)) for s in sids])

    async def part2(rnd: int) -> None:
        rng = random.Random(4242 + rnd)
        dial_pods = args.dial_pods or args.pods
        client_tls: ProxyTLS | None = None
        server_ctx: Any = None
        if args.dial_tls:  # mutual TLS as in part 1: the lag then includes the handshake and the TLS 1.3 settle
            client_tls = ProxyTLS(ca_pem=read_pem(tls_dir, "ca.crt"), cert_pem=read_pem(tls_dir, "client.crt"),
                                  key_pem=read_pem(tls_dir, "client.key"), server_name_override=tls.MANUAL_SERVER_NAME)
            server_ctx = tls.server_context_factory(read_pem(tls_dir, "server.crt"), read_pem(tls_dir, "server.key"),
                                                    read_pem(tls_dir, "client.crt"))
        tcp_up: dict[tuple[str, int], float] = {}  # (policy, port) -> when its last TCP connect succeeded

        @implementer(IStreamClientEndpoint)
        class TimedEndpoint:
            """The proxy's real endpoint, noting when a TCP connect succeeds (TLS: before the handshake)."""

            def __init__(self, inner: IStreamClientEndpoint, key: tuple[str, int]) -> None:
                self.inner, self.key = inner, key

            def connect(self, factory: Any) -> Any:
                def note(proto: Any) -> Any:
                    tcp_up[self.key] = time.perf_counter()
                    return proto

                return self.inner.connect(factory).addCallback(note)

        def proxies_of(kind: str, attempt_timeout: float, **kw: Any) -> AgentProxyFactory:
            base = AgentProxyFactory(r, client_tls, attempt_timeout=attempt_timeout)
            return AgentProxyFactory(r, client_tls, attempt_timeout=attempt_timeout, make_endpoint=lambda h, p, n: (
                TimedEndpoint(base.client_endpoint(h, p, n), (kind, p))), **kw)

        policies = {
            "old": proxies_of("old", 2.0, retry_policy=dial_backoff(0.1, 1.0)),
            "new": proxies_of("new", 2.0, retry_policy=dial_backoff(0.1, 1.0),
                              boot_window=BootWindow(length=args.boot_window, period=args.boot_period,
                                                     max_rate=args.boot_rate)),
            "upstream": proxies_of("upstream", 300.0, retry_policy=dial_backoff(0.1, 5.0)),
        }
        lags: dict[str, list[float]] = results.setdefault("lags", {kind: [] for kind in policies})
        rates: dict[str, list[float]] = results.setdefault("rates", {kind: [] for kind in policies})
        tcp_lags: dict[str, list[float]] = results.setdefault("tcp_lags", {kind: [] for kind in policies})
        cpu0 = time.process_time()
        ports: list[Any] = []
        servers: list[Server] = []
        proxies: list[AgentProxy] = []

        async def echo(ctx: CallContext, service: str, method: str, payload: bytes) -> bytes:
            return payload

        async def pod(i: int) -> None:
            # hold the port until the VM boots so no two pods draw the same one
            hold = socket.socket()
            hold.bind(("127.0.0.1", 0))
            port = int(hold.getsockname()[1])
            boot = rng.uniform(args.boot_min, args.boot_max)
            up: list[float] = []

            def boot_vm() -> None:
                hold.close()
                srv = Server(clock=r, name=f"vm{i}")
                srv.register_fallback(echo)
                servers.append(srv)
                endpoint = (tcp_server_endpoint(r, port, "127.0.0.1") if server_ctx is None
                            else tls_server_endpoint(r, port, "127.0.0.1", server_ctx))
                ports.append(endpoint.listen(srv.factory()))
                up.append(time.perf_counter())

            r.callLater(boot, boot_vm)

            async def dial(kind: str, factory: AgentProxyFactory) -> None:
                p = factory.new(f"{kind}{rnd}-{i}", os.path.join(work, "dial", f"{kind}{rnd}-{i}", "agent.ttrpc"),
                                ())
                assert isinstance(p, AgentProxy)
                proxies.append(p)
                t0 = time.perf_counter()
                await p.start(("127.0.0.1", port), "vm", r.seconds() + 120)
                t1 = time.perf_counter()
                lags[kind].append(t1 - up[0])
                tcp_lags[kind].append(tcp_up[(kind, port)] - up[0])
                assert p.link is not None
                rates[kind].append(p.link.attempts / (t1 - t0))

            await gatherResults([Deferred.fromCoroutine(dial(kind, f)) for kind, f in policies.items()])

        await gatherResults([Deferred.fromCoroutine(pod(i)) for i in range(dial_pods)])
        results["dial_cpu"] = results.get("dial_cpu", 0.0) + time.process_time() - cpu0
        await gatherResults([p.stop() for p in proxies])
        for d in ports:
            d.addCallback(lambda port: port.stopListening())
        for s in servers:
            s.abort()

    async def part3() -> None:
        """The node's cost of the new policy alone: N links dial a port that refuses (a booted guest whose
        forwarder is not up yet) for 3 s; CPU time of this process per attempt."""
        hold = socket.socket()
        hold.bind(("127.0.0.1", 0))
        port = int(hold.getsockname()[1])
        n = args.dial_pods or args.pods
        factory = AgentProxyFactory(r, None, retry_policy=dial_backoff(0.1, 1.0),
                                    boot_window=BootWindow(length=args.boot_window, period=args.boot_period,
                                                           max_rate=args.boot_rate))
        proxies = [factory.new(f"cost{i}", os.path.join(work, "cost", f"{i}", "agent.ttrpc"), ())
                   for i in range(n)]
        cpu0, t0 = time.process_time(), time.perf_counter()
        for p in proxies:
            p.start(("127.0.0.1", port), "vm", r.seconds() + 60).addErrback(lambda _: None)
        await deferLater(r, 3.0)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        attempts = sum(p.link.attempts for p in proxies if isinstance(p, AgentProxy) and p.link is not None)
        await gatherResults([p.stop() for p in proxies])
        hold.close()
        results["cost"] = (n, attempts, wall, cpu)

    async def run() -> None:
        try:
            if not args.skip_startvm:
                await part1()
            if not args.skip_dial:
                for rnd in range(args.dial_rounds):
                    await part2(rnd)
                await part3()
        except BaseException as e:
            print(f"bench failed: {e!r}", file=sys.stderr)
            raise
        finally:
            r.stop()

    def go() -> None:
        d = Deferred.fromCoroutine(run())
        d.addErrback(lambda f: (f.printTraceback(), None)[1])

    r.callWhenRunning(go)
    r.run()
    child.terminate()
    child.wait()
    shutil.rmtree(work, ignore_errors=True)

    ms = 1000.0
    if "seq" in results:
        seq, con = results["seq"], results["con"]
        print(f"provider delay {args.delay * ms:.0f} ms; mTLS to a forwarder stand-in on loopback (child process)")
        print(f"StartVM overhead, sequential x{len(seq)}: p50 {pct(seq, 50) * ms:.1f} ms, "
              f"p99 {pct(seq, 99) * ms:.1f} ms")
        print(f"StartVM overhead, {len(con)} concurrent: p50 {pct(con, 50) * ms:.1f} ms, "
              f"p99 {pct(con, 99) * ms:.1f} ms; all done {results['con_total']:.3f} s "
              f"(delay + {results['con_total'] - args.delay:.3f} s)")
        sp, cp = results["seq_proxy"], results["con_proxy"]
        print(f"  of which proxy.start (listen + mTLS dial): sequential p50 {pct(sp, 50) * ms:.1f} ms, "
              f"p99 {pct(sp, 99) * ms:.1f} ms; concurrent p50 {pct(cp, 50) * ms:.1f} ms, "
              f"p99 {pct(cp, 99) * ms:.1f} ms")
        print(f"  journal write (store.put, fsync) mean {results['seq_journal'] * ms:.1f} ms each, in the journal's "
              "thread pool")
        idle, full = results["rss_idle"], results["rss_full"]
        print(f"RSS idle {idle / 1024:.1f} MiB; with {len(con)} running sandboxes {full / 1024:.1f} MiB; "
              f"per sandbox {(full - idle) / len(con):.1f} KiB")
    if "lags" in results:
        transport = "mTLS" if args.dial_tls else "plain TCP"
        print(f"dial policy ({transport}): {args.dial_rounds} x {args.dial_pods or args.pods} VMs booting "
              f"{args.boot_min:g}-{args.boot_max:g} s "
              f"after the provider returned; new = boot window {args.boot_window:g} s, "
              f"period {args.boot_period * ms:.0f} ms, "
              f"rate {args.boot_rate:g}/s; "
              f"process CPU during the part {results['dial_cpu']:.2f} s")
        for kind, xs in results["lags"].items():
            rate = results["rates"][kind]
            print(f"dial lag after VM boot, {kind}: mean {statistics.mean(xs) * ms:.0f} ms, p50 {pct(xs, 50) * ms:.0f} "
                  f"ms, p99 {pct(xs, 99) * ms:.0f} ms, max {max(xs) * ms:.0f} ms; attempts per VM per second "
                  f"mean {statistics.mean(rate):.2f}, max {max(rate):.2f}")
            tcp = results["tcp_lags"][kind]
            print(f"  of which TCP connect after VM boot: mean {statistics.mean(tcp) * ms:.0f} ms, p50 "
                  f"{pct(tcp, 50) * ms:.0f} ms, p99 {pct(tcp, 99) * ms:.0f} ms, max {max(tcp) * ms:.0f} ms")
        n, attempts, wall, cpu = results["cost"]
        print(f"new policy alone, {n} links against a refusing port for {wall:.1f} s: {attempts} attempts = "
              f"{attempts / n / wall:.1f} per link per second; process CPU {cpu:.2f} s = "
              f"{cpu / attempts * ms:.3f} ms per attempt ({cpu / wall * 100:.0f}% of a core)")
        lg = results["lags"]
        for kind in ("old", "upstream"):
            print(f"gain ({kind} / new): mean {statistics.mean(lg[kind]) / statistics.mean(lg['new']):.1f}x, "
                  f"p50 {pct(lg[kind], 50) / pct(lg['new'], 50):.1f}x, "
                  f"p99 {pct(lg[kind], 99) / pct(lg['new'], 99):.1f}x")


if __name__ == "__main__":
    main()
