"""Warm pools side by side in one run: StartVM on a pool hit, on a miss, and cold (no pool), local provider.

The real `twistd caa-adaptor` process (local provider: each VM a namespace running caa-process-user-data, the
forwarder and the development agent), pods wired on a CNI-like bridge, tunnel VXLAN, mutual TLS (auto CA),
driven over ttrpc like the Kata shim (bench/podstart_bench.py's helpers). Three series of `--pods` pods each:

- cold: an adaptor with `--pool-size 0`;
- hit: an adaptor with `--pool-size 1`, each pod started once a pool VM is ready (claim + tunnel + proxy);
- miss: the same adaptor, pods whose image annotation is not the pool's key (a fresh VM, with the pool up).

    sudo .venv/bin/python bench/pool_bench.py [--pods 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import podstart_bench as ps  # noqa: E402  (the pod wiring, the ttrpc shim side and the adaptor process)

LOCAL_SUBNET = f"10.247.{os.getpid() % 200 + 20}.0/24"


def start_pod(adaptor: ps.Adaptor, netns: str, name: str, image: str = "") -> float:
    """CreateVM + StartVM (timed) + StopVM; returns the StartVM seconds."""
    from caa.proto import hypervisor_pb2

    sid = secrets.token_hex(32)
    req = hypervisor_pb2.CreateVMRequest(id=sid, networkNamespacePath=f"/var/run/netns/{netns}")
    req.annotations["io.kubernetes.cri.sandbox-name"] = name
    req.annotations["io.kubernetes.cri.sandbox-namespace"] = "bench"
    if image:
        req.annotations["io.katacontainers.config.hypervisor.image"] = image
    ps.call(adaptor.sock, "CreateVM", req, hypervisor_pb2.CreateVMResponse, 60)
    t = time.monotonic()
    try:
        ps.call(adaptor.sock, "StartVM", hypervisor_pb2.StartVMRequest(id=sid), hypervisor_pb2.StartVMResponse, 300)
        return time.monotonic() - t
    finally:
        ps.call(adaptor.sock, "StopVM", hypervisor_pb2.StopVMRequest(id=sid), hypervisor_pb2.StopVMResponse, 300)


def ready_pool_vms(adaptor: ps.Adaptor) -> int:
    log = adaptor.log()
    return len(re.findall(r"pool \S+: VM \S+ ready", log)) - log.count("claimed pool VM") - log.count(
        "idle for its TTL")


def wait_ready(adaptor: ps.Adaptor, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while ready_pool_vms(adaptor) < 1:
        if time.monotonic() > end:
            raise RuntimeError("no pool VM became ready")
        time.sleep(0.1)


def series(name: str, times: list[float]) -> dict[str, float]:
    out = {"n": len(times), "p50": ps.pct(times, 50), "max": max(times), "mean": sum(times) / len(times)}
    print(f"  {name:5s} StartVM p50 {out['p50']:.3f}s  mean {out['mean']:.3f}s  max {out['max']:.3f}s "
          f"({', '.join(f'{t:.2f}' for t in times)})", flush=True)
    return out


def run(n: int) -> dict[str, Any]:
    work = f"/run/{ps.TAG}-pool"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work, mode=0o700)
    netns = ps.wire(1)
    local = ["--local-bridge", f"{ps.TAG}lb", "--local-subnet", LOCAL_SUBNET,
             "--local-state-dir", os.path.join(work, "local")]
    results: dict[str, Any] = {}
    adaptor = None
    try:
        adaptor = ps.Adaptor("local", os.path.join(work, "cold"), local)
        results["cold"] = series("cold", [start_pod(adaptor, netns[0], f"cold-{i}") for i in range(n)])
        adaptor.stop()
        adaptor = ps.Adaptor("local", os.path.join(work, "pool"), [*local, "--pool-size", "1"])
        hits = []
        for i in range(n):
            wait_ready(adaptor)
            hits.append(start_pod(adaptor, netns[0], f"hit-{i}"))
        results["hit"] = series("hit", hits)
        wait_ready(adaptor)
        results["miss"] = series("miss", [start_pod(adaptor, netns[0], f"miss-{i}", image="not-the-pool")
                                          for i in range(n)])
        log = adaptor.log()
        results["claims"] = log.count("claimed pool VM")
        results["fallbacks"] = log.count("claiming pool VM")
        print(f"  {results['claims']} claims, {results['fallbacks']} failed claims; hit/cold p50 "
              f"{results['hit']['p50'] / results['cold']['p50']:.3f}, miss/cold p50 "
              f"{results['miss']['p50'] / results['cold']['p50']:.3f}")
        return results
    finally:
        if adaptor is not None:
            adaptor.stop()
            # pool VMs stay when the adaptor stops (they are the next start's pool): delete them here
            for name in os.listdir(os.path.join(work, "local")) if os.path.isdir(os.path.join(work, "local")) else []:
                if name.startswith("podvm-"):
                    _kill_vm(os.path.join(work, "local", name))
                    for ns in (name, f"{name}-pod"):
                        ps.sh("ip", "netns", "del", ns, check=False)
        ps.sh("ip", "link", "del", f"{ps.TAG}lb", check=False)
        ps.unwire(netns)
        if not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)


def _kill_vm(state_dir: str) -> None:
    import signal

    try:
        with open(os.path.join(state_dir, "instance.json")) as f:
            pids = json.load(f).get("pids", [])
    except (OSError, ValueError):
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=5, help="pods per series")
    ap.add_argument("--json", default="", help="write the figures to this file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (namespaces)", file=sys.stderr)
        return 2
    print(f"load average before: {os.getloadavg()}", flush=True)
    results = run(args.pods)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
