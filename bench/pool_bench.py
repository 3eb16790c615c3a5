"""Warm pools side by side in one run: StartVM on a pool hit, on a miss, and cold (no pool); local provider,
and with `--libvirt-pods N` the libvirt provider on QEMU/TCG.

The real `twistd caa-adaptor` process (local provider: each VM a namespace running caa-process-user-data, the
forwarder and the development agent), pods wired on a CNI-like bridge, tunnel VXLAN, mutual TLS (auto CA),
driven over ttrpc like the Kata shim (bench/podstart_bench.py's helpers). Three series of `--pods` pods each:

- cold: an adaptor with `--pool-size 0`;
- hit: an adaptor with `--pool-size 1`, each pod started once a pool VM is ready (claim + tunnel + proxy);
- miss: the same adaptor, pods whose image annotation is not the pool's key (a fresh VM, with the pool up).

libvirt (`caa.devtools.libvirt_env.prepare()`: the demo network and storage pool, the pod VM image's BIOS disk as
the base volume, as bench/podstart_bench.py): two adaptors at once, one with `--pool-size 1` and one without pools,
N rounds of hit, miss, cold. The pool VM of a hit is ready (its forwarder answered) before the hit; the miss (a pod
naming the image volume explicitly: the same VM, another pool key) waits for the refilled pool VM to be ready, so
the miss and the cold start both run beside exactly one idle pool VM. At the end an adaptor with pools off deletes
the pool VMs.

    sudo .venv/bin/python bench/pool_bench.py [--pods 5] [--libvirt-pods 0] [--json out.json]
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
VOLUME = "podvm-poolbench.qcow2"  # libvirt: this bench's copy of the image in the demo storage pool


def start_pod(adaptor: ps.Adaptor, netns: str, name: str, image: str = "", timeout: float = 300) -> float:
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
        ps.call(adaptor.sock, "StartVM", hypervisor_pb2.StartVMRequest(id=sid), hypervisor_pb2.StartVMResponse,
                timeout)
        return time.monotonic() - t
    finally:
        ps.call(adaptor.sock, "StopVM", hypervisor_pb2.StopVMRequest(id=sid), hypervisor_pb2.StopVMResponse, 300)


def ready_pool_vms(adaptor: ps.Adaptor) -> int:
    log = adaptor.log()
    return len(re.findall(r"pool \S+: VM \S+ ready", log)) - log.count("claimed pool VM") - log.count(
        "idle for its TTL")


def wait_ready(adaptor: ps.Adaptor, timeout: float = 60) -> None:
    """Until the adaptor has a ready pool VM (journalled and logged ready once its forwarder answered)."""
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


def run_libvirt(n: int, timeout: float = 900) -> dict[str, Any]:
    from caa.devtools import libvirt_env

    env = libvirt_env.prepare()
    # the image under a volume name of our own: the shared base volume is replaced whenever another tree
    # prepares the environment, which must not change the image between (or under) this run's VMs
    manifest = json.loads((env.image_dir / "manifest.json").read_text())
    ps.copy_volume(str(env.image_dir / manifest["qcow2"]), str(libvirt_env.POOL_DIR), VOLUME)
    ps.refresh_pool(env)
    args = env.adaptor_args()
    args[args.index("--vol-name") + 1] = VOLUME
    work = f"/run/{ps.TAG}-plv"  # short: the agent sockets live under it (108-byte AF_UNIX limit)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work, mode=0o700)
    netns = ps.wire(1)
    # VNI ranges of our own: VXLAN sockets share the root netns with other adaptors (the demo starts at 555000)
    vni = 900000 + (os.getpid() % 10000) * 16
    pooled_args = [*args, "--vxlan-min-id", str(vni)]
    args = [*args, "--vxlan-min-id", str(vni + 8)]
    cold = pool = None
    hits: list[float] = []
    misses: list[float] = []
    colds: list[float] = []
    try:
        cold = ps.Adaptor("libvirt", os.path.join(work, "cold"), args)
        pool = ps.Adaptor("libvirt", os.path.join(work, "pool"), [*pooled_args, "--pool-size", "1"])
        for i in range(n):
            wait_ready(pool, timeout)
            hits.append(start_pod(pool, netns[0], f"hit-{i}", timeout=timeout))
            print(f"  round {i}: hit {hits[-1]:.2f}s", flush=True)
            wait_ready(pool, timeout)  # the refill: the miss runs beside one idle pool VM, as the cold start does
            misses.append(start_pod(pool, netns[0], f"miss-{i}", image=VOLUME, timeout=timeout))
            print(f"  round {i}: miss {misses[-1]:.2f}s", flush=True)
            colds.append(start_pod(cold, netns[0], f"cold-{i}", timeout=timeout))
            print(f"  round {i}: cold {colds[-1]:.2f}s", flush=True)
        results: dict[str, Any] = {"n": n, "image": str(env.image_dir), "cold": series("cold", colds),
                                   "hit": series("hit", hits), "miss": series("miss", misses)}
        log = pool.log()
        results["claims"] = log.count("claimed pool VM")
        results["fallbacks"] = log.count("claiming pool VM")
        print(f"  {results['claims']} claims, {results['fallbacks']} failed claims; hit/cold p50 "
              f"{results['hit']['p50'] / results['cold']['p50']:.3f}, miss/cold p50 "
              f"{results['miss']['p50'] / results['cold']['p50']:.3f}", flush=True)
        return results
    finally:
        for adaptor in (cold, pool):
            if adaptor is not None:
                adaptor.stop()
        if pool is not None:  # pool VMs stay when the adaptor stops: an adaptor with pools off deletes them
            _drain_libvirt_pool(os.path.join(work, "pool"), pooled_args)
        ps.unwire(netns)
        if not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)


def _drain_libvirt_pool(work: str, args: list[str], timeout: float = 300) -> None:
    journal = os.path.join(work, "pool")  # next to the adaptor's pods dir, <work>/pods
    adaptor = ps.Adaptor("libvirt", work, [*args, "--pool-size", "0"])
    try:
        end = time.monotonic() + timeout
        while os.path.isdir(journal) and any(f.endswith(".json") for f in os.listdir(journal)):
            if time.monotonic() > end:
                print(f"pool VMs journalled in {journal} not deleted within {timeout:.0f}s", file=sys.stderr)
                return
            time.sleep(0.5)
    finally:
        adaptor.stop()


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
    ap.add_argument("--libvirt-pods", type=int, default=0,
                    help="rounds of hit, miss and cold on libvirt/TCG (0: skip)")
    ap.add_argument("--json", default="", help="write the figures to this file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (namespaces)", file=sys.stderr)
        return 2
    print(f"load average before: {os.getloadavg()}", flush=True)
    results: dict[str, Any] = {"load_before": os.getloadavg()}
    if args.pods:
        print("local provider", flush=True)
        results["local"] = run(args.pods)
    if args.libvirt_pods:
        print("libvirt (QEMU/TCG)", flush=True)
        results["libvirt"] = run_libvirt(args.libvirt_pods)
    results["load_after"] = os.getloadavg()
    print(f"load average after: {results['load_after']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
