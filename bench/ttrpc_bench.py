"""ttrpc unary echo over a unix socket: caa.ttrpc against the Go reference (containerd/ttrpc).

Pairs (client -> server, each side its own process): ours->ours, Go->ours, Go->Go. Cases: 1 and 64 calls in
flight on one connection, 100 B and 1 MiB payloads. Prints calls/s, p50/p99 latency and MB/s (payload bytes
one way) side by side with the ratio to Go->Go, as a markdown table.

    .venv/bin/python bench/ttrpc_bench.py [--seconds 3] [--profile-server out.prof]

Internal modes (used by the script itself): `--serve <sock>` runs our echo server; `--client <sock> <inflight>
<size> <seconds>` runs our client and prints JSON like `ttrpcpeer bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from caa.reactors import as_node_reactor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ECHO = "caa.test.Echo"
CASES = [(1, 100), (64, 100), (1, 1 << 20), (64, 1 << 20)]
PAIRS = ["ours->ours", "Go->ours", "Go->Go"]


# ---- our server and client (run in child processes)

def serve(sock: str, profile: str | None) -> None:
    from twisted.internet import reactor as global_reactor

    reactor = as_node_reactor(global_reactor)

    from caa.ttrpc import CallContext, Server
    from caa.ttrpc.endpoints import unix_server_endpoint

    server = Server(reactor, name="bench")

    async def echo(ctx: CallContext, service: str, method: str, payload: bytes) -> bytes:
        return payload

    server.register_fallback(echo)
    unix_server_endpoint(reactor, sock).listen(server.factory())
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()

    def dump() -> None:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)  # type: ignore[arg-type]

    reactor.addSystemEventTrigger("before", "shutdown", dump)
    print(json.dumps({"event": "listening", "socket": sock}), flush=True)
    reactor.run()


def client(sock: str, inflight: int, size: int, seconds: float) -> None:
    from twisted.internet import reactor as global_reactor

    reactor = as_node_reactor(global_reactor)
    from twisted.internet.defer import Deferred, gatherResults

    from caa.ttrpc import TTRPCClient, connect
    from caa.ttrpc.endpoints import unix_client_endpoint

    payload = b"b" * size
    latencies: list[float] = []
    errors = [0]

    async def worker(c: TTRPCClient, until: float) -> None:
        now = time.perf_counter
        while now() < until:
            t0 = now()
            try:
                out = await c.call_raw(ECHO, "Echo", payload)
            except Exception:
                errors[0] += 1
                continue
            if len(out) != size:
                errors[0] += 1
                continue
            latencies.append(now() - t0)

    async def main() -> dict[str, Any]:
        c = await connect(unix_client_endpoint(reactor, sock), reactor)
        for _ in range(20):
            await c.call_raw(ECHO, "Echo", payload)
        start = time.perf_counter()
        until = start + seconds
        await gatherResults([Deferred.fromCoroutine(worker(c, until)) for _ in range(inflight)])
        elapsed = time.perf_counter() - start
        c.close()
        latencies.sort()

        def pct(p: float) -> float:
            return latencies[int(p * (len(latencies) - 1))] * 1e6 if latencies else 0.0

        return {"ok": errors[0] == 0, "calls": len(latencies), "errors": errors[0], "seconds": elapsed,
                "calls_per_s": len(latencies) / elapsed, "p50_us": pct(0.5), "p99_us": pct(0.99),
                "mb_per_s": len(latencies) * size / elapsed / 1e6}

    result: dict[str, Any] = {}

    def run() -> None:
        d = Deferred.fromCoroutine(main())
        d.addCallback(result.update)
        d.addErrback(lambda f: result.update(ok=False, error=f.getErrorMessage()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    print(json.dumps(result), flush=True)


# ---- the driver

class Child:
    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if '"listening"' not in line:
            raise RuntimeError(f"server did not start: {line!r}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_json(argv: list[str], timeout: float) -> dict[str, Any]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"{argv}: no output; stderr: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    go = subprocess.run(["go", "version"], capture_output=True, text=True).stdout.strip()
    from google.protobuf import __version__ as pb_version

    import twisted

    return (f"{cpu}, {os.cpu_count()} vCPU, Linux {platform.release()}; CPython {platform.python_version()}, "
            f"Twisted {twisted.__version__}, protobuf {pb_version} "
            f"({_pb_impl()}); {go}, containerd/ttrpc 1.1.1 (Debian)")


def _pb_impl() -> str:
    from google.protobuf.internal import api_implementation

    return f"{api_implementation.Type()} backend"


def fmt_size(size: int) -> str:
    return "1 MiB" if size == 1 << 20 else f"{size} B"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=1, help="repeat every cell, interleaved; report the median")
    parser.add_argument("--serve", metavar="SOCK")
    parser.add_argument("--client", nargs=4, metavar=("SOCK", "INFLIGHT", "SIZE", "SECONDS"))
    parser.add_argument("--profile-server", metavar="FILE", help="cProfile our server during Go->ours")
    parser.add_argument("--only", choices=PAIRS, action="append")
    parser.add_argument("--case", action="append", metavar="INFLIGHT,SIZE", help="e.g. 64,100 (repeatable)")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, os.environ.get("CAA_BENCH_PROFILE"))
        return 0
    if args.client:
        sock, inflight, size, seconds = args.client
        client(sock, int(inflight), int(size), float(seconds))
        return 0

    from tests import goshim

    peer = goshim.build_go_peer()
    py = sys.executable
    me = str(Path(__file__).resolve())
    pairs = args.only or PAIRS
    cases = [tuple(int(x) for x in c.split(",")) for c in args.case] if args.case else CASES
    runs: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="caa-bench-") as tmp:
        ours_sock = os.path.join(tmp, "ours.sock")
        go_sock = os.path.join(tmp, "go.sock")
        env = dict(os.environ)
        if args.profile_server:
            env["CAA_BENCH_PROFILE"] = args.profile_server
        ours = Child([py, me, "--serve", ours_sock], env) if {"ours->ours", "Go->ours"} & set(pairs) else None
        go = Child([peer, "server", go_sock]) if "Go->Go" in pairs else None
        try:
            for round_ in range(args.rounds):
                for inflight, size in cases:
                    secs = str(args.seconds)
                    for pair in pairs:
                        if pair == "ours->ours":
                            argv = [py, me, "--client", ours_sock, str(inflight), str(size), secs]
                        elif pair == "Go->ours":
                            argv = [peer, "bench", ours_sock, str(inflight), str(size), secs]
                        else:
                            argv = [peer, "bench", go_sock, str(inflight), str(size), secs]
                        r = run_json(argv, timeout=args.seconds * 10 + 60)
                        runs.setdefault((pair, inflight, size), []).append(r)
                        print(f"[{round_ + 1}/{args.rounds}] {pair:11} inflight={inflight:<3} "
                              f"size={fmt_size(size):>6}: {r.get('calls_per_s', 0):9.0f} calls/s  "
                              f"p50 {r.get('p50_us', 0):8.0f} us  p99 {r.get('p99_us', 0):8.0f} us  "
                              f"{r.get('mb_per_s', 0):8.1f} MB/s  errors {r.get('errors')}  "
                              f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        finally:
            if ours is not None:
                ours.stop()
            if go is not None:
                go.stop()

    results = {key: sorted(rs, key=lambda r: r.get("calls_per_s", 0))[len(rs) // 2] for key, rs in runs.items()}
    load_after = os.getloadavg()
    print(f"Machine: {machine()}. {args.seconds:g} s per cell, median of {args.rounds} interleaved round(s), one "
          f"connection, unix socket; 1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after.\n")
    print("| in flight | payload | pair | calls/s | p50 | p99 | MB/s | calls/s vs Go->Go | MB/s vs Go->Go |")
    print("|---|---|---|---|---|---|---|---|---|")
    for inflight, size in cases:
        base = results.get(("Go->Go", inflight, size))
        for pair in pairs:
            r = results[(pair, inflight, size)]
            ratio = (f"{r['calls_per_s'] / base['calls_per_s']:.2f}x" if base and base.get("calls_per_s") else "-")
            mb_ratio = (f"{r['mb_per_s'] / base['mb_per_s']:.2f}x" if base and base.get("mb_per_s") else "-")
            print(f"| {inflight} | {fmt_size(size)} | {pair} | {r['calls_per_s']:.0f} | {_us(r['p50_us'])} | "
                  f"{_us(r['p99_us'])} | {r['mb_per_s']:.1f} | {ratio} | {mb_ratio} |")
    return 0


def _us(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


if __name__ == "__main__":
    sys.exit(main())
