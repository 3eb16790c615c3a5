"""Pod networking benchmark (root): Inspect / Setup / Teardown latency and tunnel throughput.

Topology as in tests/test_network_tunnel.py: a "worker" netns and a "VM" netns joined by a veth
underlay, a bridge with CNI-like pods on the worker, one empty pod netns per pod in the VM.

For each of N pods (sequentially, so the figures are per-operation latencies):
  inspect = NodeNetwork.inspect; setup = NodeNetwork.setup + PodNetwork.setup;
  teardown = NodeNetwork.teardown + PodNetwork.teardown. All through the public Deferred API.
Throughput: a TCP transfer client pod -> pod IP (through tc redirect + VXLAN) vs the bare veth
underlay (worker netns -> VM netns), same script, same run.

Usage: .venv/bin/python bench/network_bench.py [--pods 50] [--mib 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import task  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

from caa.network.interfaces import PodNetworkConfig  # noqa: E402
from caa.network.node import NodeNetwork  # noqa: E402
from caa.network.podvm import PodNetwork  # noqa: E402
from caa.network.vni import MemoryVniStore, VniAllocator  # noqa: E402
from caa.reactors import INodeReactor
from tests import netns_helpers as h  # noqa: E402
from tests.test_network_tunnel import CLIENT, SERVER  # noqa: E402


class Cleanups:
    def __init__(self) -> None:
        self.items: list[Callable[[], Any]] = []

    def addCleanup(self, fn: Callable[..., Any], *a: Any) -> None:  # noqa: N802 (TestCase-like)
        self.items.append(lambda: fn(*a))

    def run(self) -> None:
        for fn in reversed(self.items):
            try:
                fn()
            except Exception as e:  # keep cleaning
                print("cleanup:", e, file=sys.stderr)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def transfer(client: h.Netns, server_ns: h.Netns, ip: str, mib: int) -> float:
    server = server_ns.popen([sys.executable, "-c", SERVER, ip, "5201"], stdout=-1)
    try:
        assert server.stdout is not None
        server.stdout.readline()
        t0 = time.perf_counter()
        out = client.run([sys.executable, "-c", CLIENT, ip, "5201", str(mib << 20)])
        dt = time.perf_counter() - t0
        _tag, n, a, b = out.stdout.split()
        assert int(n) == mib << 20 and a == b, out.stdout
        return (mib * 8 * 1.048576) / dt  # Mbit/s
    finally:
        server.kill()
        server.wait()


async def main(reactor: INodeReactor, pods: int, mib: int) -> None:
    c = Cleanups()
    try:
        worker = h.make_netns(c, "bw")  # type: ignore[arg-type]
        vm = h.make_netns(c, "bv")  # type: ignore[arg-type]
        _wip, vm_ip = h.underlay(c, worker, vm)  # type: ignore[arg-type]
        h.bridge(worker, "cbr0", "10.88.0.1/24", mtu=1450)
        client = h.cni_pod(c, worker, "cbr0", "10.88.0.2/24", "10.88.0.1")  # type: ignore[arg-type]
        pool = reactor.getThreadPool()
        node = NodeNetwork(reactor, pool, VniAllocator(MemoryVniStore()), host_netns=worker.path)
        podvm = PodNetwork(reactor, pool, host_netns=vm.path)
        topo = []
        for i in range(pods):
            ip = f"10.88.0.{10 + i}"
            p = h.cni_pod(c, worker, "cbr0", f"{ip}/24", "10.88.0.1",  # type: ignore[arg-type]
                          neighbors=[("169.254.1.1", "ee:ee:ee:ee:ee:01")])
            topo.append((p, h.make_netns(c, "bp"), ip))  # type: ignore[arg-type]
        t_inspect, t_setup, t_teardown = [], [], []
        cfgs: list[PodNetworkConfig] = []
        for p, vp, _ip in topo:
            t0 = time.perf_counter()
            cfg = await node.inspect(p.path)
            t1 = time.perf_counter()
            await node.setup(p.path, [vm_ip], cfg)
            await podvm.setup(cfg, vp.path)
            t2 = time.perf_counter()
            t_inspect.append(t1 - t0)
            t_setup.append(t2 - t1)
            cfgs.append(cfg)
        tunnel = await deferToThread(transfer, client, topo[0][1], topo[0][2], mib)
        bare = await deferToThread(transfer, worker, vm, vm_ip, mib)
        for (p, vp, _ip), cfg in zip(topo, cfgs, strict=True):
            t0 = time.perf_counter()
            await node.teardown(p.path, cfg)
            await podvm.teardown(cfg, vp.path)
            t_teardown.append(time.perf_counter() - t0)
        print(f"pods={pods} transfer={mib} MiB")
        print("| operation | p50 (ms) | p99 (ms) | mean (ms) |")
        print("|---|---|---|---|")
        for name, vals in (("Inspect (node)", t_inspect), ("Setup (node + pod VM)", t_setup),
                           ("Teardown (node + pod VM)", t_teardown)):
            print(f"| {name} | {pct(vals, 50) * 1000:.1f} | {pct(vals, 99) * 1000:.1f} | "
                  f"{statistics.mean(vals) * 1000:.1f} |")
        print()
        print("| path | throughput (Mbit/s) |")
        print("|---|---|")
        print(f"| bare veth underlay (worker -> VM) | {bare:.0f} |")
        print(f"| pod tunnel (client pod -> bridge -> tc redirect -> VXLAN -> VM pod netns) | {tunnel:.0f} |")
        print(f"| ratio tunnel / underlay | {tunnel / bare:.2f} |")
    finally:
        await deferToThread(c.run)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=50)
    ap.add_argument("--mib", type=int, default=256)
    args = ap.parse_args()
    if not 1 <= args.pods <= 240:
        ap.error("--pods must be 1..240 (one /24 on the bridge)")
    task.react(main, (args.pods, args.mib))
