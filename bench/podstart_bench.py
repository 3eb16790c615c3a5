"""Pod start latency end to end: CreateVM -> StartVM returning, split into its phases, against upstream's dial policy.

The real `twistd caa-adaptor` process (local provider, and with `--libvirt-pods N` the libvirt provider on
QEMU/TCG with the development pod VM image), driven over ttrpc like the Kata shim, pods wired on a CNI-like
bridge, tunnel VXLAN, mutual TLS (auto CA). Per pod:

- provider_create, tunnel, vm_boot: the adaptor's own `caa_startvm_phase_seconds{phase}` (scraped from
  `--metrics-port` before and after each sequential pod; vm_boot runs from the tunnel's end until the agent
  proxy is connected);
- forwarder listening: a prober thread in this process reads the journal for the instance IP and tries a TCP
  connect to <ip>:15150 every 20 ms; so vm_boot = boot wait (tunnel end -> forwarder listening) + proxy connect
  (listening -> connected: our dial policy's lag plus the TLS handshake);
- upstream: what upstream's dial policy (100 ms doubling, cap 5 s, up to 100 ms jitter, first dial at once)
  would have added after the measured boot wait: the first attempt instant at or after the listening instant
  minus that instant, averaged over 2000 jitter draws; our policy (cap 1 s) modelled the same way, side by side.

Concurrent pods report StartVM latency from the client and the adaptor's log lines.

    .venv/bin/python bench/podstart_bench.py [--pods 10] [--concurrent 10] [--libvirt-pods 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

from guest_console import ConsoleTap

from caa.adaptor.proxy import dial_backoff
from caa.reactors import as_node_reactor

VENV_BIN = os.path.dirname(sys.executable)
FORWARDER_PORT = 15150
TAG = f"ps{os.getpid() % 100000}"
BRIDGE = f"{TAG}br"
NET3 = f"10.246.{os.getpid() % 200 + 20}"
GATEWAY = f"{NET3}.1"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


# ---- pods wired like a bridge CNI plugin does

def wire(n: int) -> list[str]:
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    names = []
    for i in range(n):
        ns = f"{TAG}-p{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name", f"{TAG}v{i}")
        sh("ip", "link", "set", f"{TAG}v{i}", "master", BRIDGE, "up")
        sh("ip", "-n", ns, "addr", "add", f"{NET3}.{10 + i}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", GATEWAY)
        names.append(ns)
    return names


def unwire(names: list[str]) -> None:
    for ns in names:
        sh("ip", "netns", "del", ns, check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


# ---- the shim side: caa.ttrpc client on a private reactor thread

_reactor_started = False


def start_reactor() -> None:
    global _reactor_started
    from twisted.internet import reactor

    if not _reactor_started:
        threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True).start()
        _reactor_started = True


def on_reactor(f: Any, *args: Any) -> Any:
    """f(*args) on the reactor thread, its Deferred's result here."""
    from twisted.internet import reactor
    from twisted.internet.threads import blockingCallFromThread

    start_reactor()
    return blockingCallFromThread(cast(Any, reactor), f, *args)


def call(sock: str, method: str, request: Any, response_type: Any, timeout: float) -> Any:
    from twisted.internet import reactor as global_reactor

    reactor = as_node_reactor(global_reactor)
    from twisted.internet.defer import Deferred
    from twisted.internet.threads import blockingCallFromThread

    from caa.ttrpc import connect
    from caa.ttrpc.endpoints import unix_client_endpoint

    start_reactor()

    async def go() -> Any:
        client = await connect(unix_client_endpoint(reactor, sock), reactor)
        try:
            return await client.call("hypervisor.Hypervisor", method, request, response_type, timeout=timeout)
        finally:
            client.close()

    return blockingCallFromThread(reactor, lambda: Deferred.fromCoroutine(go()))


# ---- the adaptor process

class Adaptor:
    def __init__(self, provider: str, work: str, extra: list[str], venv_bin: str = VENV_BIN) -> None:
        self.work = work
        self.sock = os.path.join(work, "hv.sock")
        self.pods_dir = os.path.join(work, "pods")
        self.log_path = os.path.join(work, "adaptor.log")
        self.metrics_port = free_port()
        argv = [os.path.join(venv_bin, "twistd"), "-n", "--pidfile=", f"--logfile={self.log_path}", "caa-adaptor",
                "--provider", provider, "--socket", self.sock, "--pods-dir", self.pods_dir,
                "--tls-dir", os.path.join(work, "tls"), "--probe-port", "0",
                "--metrics-port", str(self.metrics_port), "--proxy-timeout", "900s", *extra]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"adaptor did not start; see {self.log_path}")
            time.sleep(0.05)

    def phases(self) -> dict[str, float]:
        """Sum of each StartVM phase so far (the histogram's _sum)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return {m.group(1): float(m.group(2))
                for m in re.finditer(r'caa_startvm_phase_seconds_sum\{phase="(\w+)"\} (\S+)', text)}

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- one pod

@dataclass
class Pod:
    sid: str
    netns: str
    create_s: float = 0.0
    start_s: float = 0.0
    stop_s: float = 0.0
    start_call: float = 0.0  # monotonic instant StartVM was sent
    listening: float | None = None  # monotonic instant the forwarder first accepted TCP
    phases: dict[str, float] = field(default_factory=dict)
    markers: dict[str, float] = field(default_factory=dict)  # guest phase -> guest uptime (libvirt only)
    console: list[tuple[float, str]] = field(default_factory=list)  # (seconds after StartVM was sent, line)


def probe_forwarder(pods_dir: str, pod: Pod, done: threading.Event) -> None:
    """Watch the journal for the instance IP, then TCP-connect to the forwarder port until it accepts."""
    path = os.path.join(pods_dir, pod.sid, "sandbox.json")
    ip = None
    while ip is None and not done.is_set():
        try:
            with open(path) as f:
                ips = json.load(f).get("ips") or []
            ip = ips[0] if ips else None
        except (OSError, ValueError):
            pass
        if ip is None:
            time.sleep(0.01)
    while ip is not None and not done.is_set():
        try:
            with socket.create_connection((ip, FORWARDER_PORT), timeout=0.2):
                pod.listening = time.monotonic()
                return
        except OSError:
            time.sleep(0.02)


def run_pod(adaptor: Adaptor, netns: str, name: str, start_timeout: float, scrape: bool,
            console_uri: str = "") -> Pod:
    """One pod's CreateVM, StartVM, StopVM; with `console_uri`, the VM's console markers (libvirt)."""
    from caa.podvm_api.naming import instance_name
    from caa.proto import hypervisor_pb2

    pod = Pod(secrets.token_hex(32), netns)
    req = hypervisor_pb2.CreateVMRequest(id=pod.sid, networkNamespacePath=f"/var/run/netns/{netns}")
    req.annotations["io.kubernetes.cri.sandbox-name"] = name
    req.annotations["io.kubernetes.cri.sandbox-namespace"] = "bench"
    t = time.monotonic()
    call(adaptor.sock, "CreateVM", req, hypervisor_pb2.CreateVMResponse, 60)
    pod.create_s = time.monotonic() - t
    done = threading.Event()
    prober = threading.Thread(target=probe_forwarder, args=(adaptor.pods_dir, pod, done), daemon=True)
    prober.start()
    tap = ConsoleTap(console_uri, instance_name(name, pod.sid, 63)) if console_uri else None
    before = adaptor.phases() if scrape else {}
    pod.start_call = time.monotonic()
    try:
        call(adaptor.sock, "StartVM", hypervisor_pb2.StartVMRequest(id=pod.sid), hypervisor_pb2.StartVMResponse,
             start_timeout)
        pod.start_s = time.monotonic() - pod.start_call
        if scrape:
            after = adaptor.phases()
            pod.phases = {k: after[k] - before.get(k, 0.0) for k in after}
    finally:
        done.set()
        prober.join()
        if tap is not None:
            tap.stop()
            pod.markers = tap.markers()
            pod.console = [(t - pod.start_call, line) for t, line in tap.lines]
        t = time.monotonic()
        call(adaptor.sock, "StopVM", hypervisor_pb2.StopVMRequest(id=pod.sid), hypervisor_pb2.StopVMResponse, 300)
        pod.stop_s = time.monotonic() - t
    return pod


# ---- dial policy model

def first_attempt_lag(boot_wait: float, cap: float, rng: random.Random) -> float:
    """Attempts at 0, then after each back-off; lag = first attempt at or after `boot_wait` minus `boot_wait`."""
    policy = dial_backoff(initial=0.1, cap=cap, jitter=rng.random)
    at, attempt = 0.0, 0
    while at < boot_wait:
        at += policy(attempt)
        attempt += 1
    return at - boot_wait


def expected_lag(boot_wait: float, cap: float, draws: int = 2000, seed: int = 7) -> float:
    rng = random.Random(seed)
    return statistics.fmean(first_attempt_lag(boot_wait, cap, rng) for _ in range(draws))


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(p / 100 * len(v) + 0.5) - 1))]


def analyse(pods: list[Pod]) -> dict[str, Any]:
    rows = []
    for p in pods:
        ph = p.phases
        t2 = p.start_call + ph["provider_create"] + ph["tunnel"]
        boot_wait = max(0.0, (p.listening - t2)) if p.listening is not None else float("nan")
        boot_wait = min(boot_wait, ph["vm_boot"])
        connect = ph["vm_boot"] - boot_wait
        ours = expected_lag(boot_wait, 1.0)
        upstream = expected_lag(boot_wait, 5.0)
        rows.append({"start": p.start_s, "create": p.create_s, "stop": p.stop_s,
                     "provider_create": ph["provider_create"], "tunnel": ph["tunnel"], "vm_boot": ph["vm_boot"],
                     "boot_wait": boot_wait, "proxy_connect": connect, "listening_seen": p.listening is not None,
                     "model_ours_lag": ours, "model_upstream_lag": upstream,
                     "upstream_start": p.start_s - connect + (connect - ours) + upstream})
    out: dict[str, Any] = {"n": len(rows), "rows": rows}
    for key in ("start", "create", "stop", "provider_create", "tunnel", "vm_boot", "boot_wait", "proxy_connect",
                "model_ours_lag", "model_upstream_lag", "upstream_start"):
        vals = [r[key] for r in rows]
        out[key] = {"p50": pct(vals, 50), "p99": pct(vals, 99), "mean": statistics.fmean(vals)}
    out["upstream_added_mean_s"] = out["model_upstream_lag"]["mean"]
    out["ours_connect_mean_s"] = out["proxy_connect"]["mean"]
    out["ratio_upstream_lag_over_our_connect"] = (out["model_upstream_lag"]["mean"] /
                                                  max(1e-9, out["proxy_connect"]["mean"]))
    out["ratio_upstream_over_ours_model"] = (out["model_upstream_lag"]["mean"] /
                                             max(1e-9, out["model_ours_lag"]["mean"]))
    out["ratio_start_upstream_over_ours"] = out["upstream_start"]["mean"] / out["start"]["mean"]
    return out


def concurrent(adaptor: Adaptor, netns: list[str], timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(netns)) as ex:
        pods = list(ex.map(lambda a: run_pod(adaptor, a[1], f"cc-{a[0]}", timeout, False), enumerate(netns)))
    wall = time.monotonic() - t0
    log = adaptor.log()
    connects = []
    for p in pods:
        m = re.search(rf"{p.sid}: agent proxy connected to \S+ in ([0-9.]+)s", log)
        if m:
            connects.append(float(m.group(1)))
    starts = [p.start_s for p in pods]
    return {"n": len(pods), "wall_s": wall,
            "start": {"p50": pct(starts, 50), "p99": pct(starts, 99), "max": max(starts)},
            "proxy_connected_after_s": {"p50": pct(connects, 50), "p99": pct(connects, 99)} if connects else {}}


def bench_provider(provider: str, n_seq: int, n_conc: int, extra: list[str], timeout: float) -> dict[str, Any]:
    work = f"/run/{TAG}-{provider}"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work, mode=0o700)
    netns = wire(max(n_seq, n_conc, 1))
    adaptor = None
    try:
        adaptor = Adaptor(provider, work, extra)
        seq = []
        for i in range(n_seq):
            pod = run_pod(adaptor, netns[0], f"seq-{i}", timeout, True)
            print(f"  {provider} pod {i}: StartVM {pod.start_s:.2f}s phases "
                  f"{ {k: round(v, 3) for k, v in pod.phases.items()} } listening "
                  f"{'+%.2fs' % (pod.listening - pod.start_call) if pod.listening else 'not seen'}", flush=True)
            seq.append(pod)
        result: dict[str, Any] = {"sequential": analyse(seq)}
        if n_conc > 1:
            result["concurrent"] = concurrent(adaptor, netns[:n_conc], timeout)
        return result
    finally:
        if adaptor is not None:
            adaptor.stop()
        unwire(netns)
        if not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)


# ---- libvirt: the floor VM, the pod VM of this tree and (optionally) of a baseline tree, interleaved

FLOOR_VOLUME = "podvm-floor.qcow2"
BASELINE_VOLUME = "podvm-baseline.qcow2"
MARKER_PHASES = ("init-start", "dhcp-bound", "net-up", "cidata-mounted", "user-data-done", "agent-listening",
                 "forwarder-start", "floor-listening")


def copy_volume(source: str, pool_dir: str, volume: str, make: list[str] | None = None) -> None:
    """Put `source` (or what `make` + [source, target] writes from it) into the pool as `volume`, once per source."""
    mark = os.path.join(os.path.dirname(pool_dir), f".{os.path.basename(pool_dir)}-{volume}.source")
    st = os.stat(source)
    stamp = f"{source} {st.st_size} {st.st_mtime_ns} {make}"
    target = os.path.join(pool_dir, volume)
    if os.path.exists(target) and os.path.exists(mark) and open(mark).read() == stamp:
        return
    tmp = os.path.join(pool_dir, f".{volume}.tmp")
    if make:
        sh(*make, source, tmp)
    else:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    with open(mark, "w") as f:
        f.write(stamp)


def refresh_pool(env: Any) -> None:
    conn = env.open()
    try:
        conn.storagePoolLookupByName(env.pool).refresh(0)
    finally:
        conn.close()


def build_baseline(tree: str) -> str:
    """The BIOS disk of `tree`'s own podvm/build.sh (its own cache, so this tree's builds are never evicted)."""
    environ = dict(os.environ, CAA_SRC=tree, CAA_PODVM_CACHE="/var/cache/caa-podvm-baseline",
                   PODVM_PIP=os.path.join(tree, ".venv", "bin", "pip"))
    r = subprocess.run([os.path.join(tree, "podvm", "build.sh")], capture_output=True, text=True, env=environ)
    if r.returncode != 0:
        raise RuntimeError(f"baseline podvm/build.sh failed: {r.stderr[-2000:]}")
    out = r.stdout.strip().splitlines()[-1]
    with open(os.path.join(out, "manifest.json")) as f:
        return os.path.join(out, json.load(f)["qcow2"])


@dataclass
class Floor:
    returned_s: float = 0.0  # create_instance returned (IP known)
    listening_s: float = 0.0  # first TCP accept on <ip>:15150: the floor's "StartVM"
    markers: dict[str, float] = field(default_factory=dict)
    console: list[tuple[float, str]] = field(default_factory=list)  # (seconds after the create call, line)


def run_floor(provider: Any, uri: str, i: int, timeout: float) -> Floor:
    """The floor VM through the same provider and domain XML: create, then TCP-probe :15150 every 20 ms."""
    from caa.providers.interfaces import InstanceSpec

    sid = secrets.token_hex(32)
    pod = f"floor-{i}"
    tap = ConsoleTap(uri, provider.instance_name(pod, sid))
    floor = Floor()
    t0 = time.monotonic()
    instance = on_reactor(provider.create_instance, pod, sid, b"#cloud-config\n", InstanceSpec(image=FLOOR_VOLUME))
    floor.returned_s = time.monotonic() - t0
    try:
        deadline = t0 + timeout
        while True:
            try:
                with socket.create_connection((instance.ips[0], FORWARDER_PORT), timeout=0.2):
                    floor.listening_s = time.monotonic() - t0
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"floor VM {instance.name} never listened on {FORWARDER_PORT}") from None
                time.sleep(0.02)
    finally:
        time.sleep(0.5)  # the marker line follows the bind
        tap.stop()
        floor.markers = tap.markers()
        floor.console = [(t - t0, line) for t, line in tap.lines]
        on_reactor(provider.delete_instance, instance.id)
    return floor


def stats(values: list[float]) -> dict[str, float]:
    return {"p50": pct(values, 50), "p99": pct(values, 99), "mean": statistics.fmean(values)} if values else {}


def marker_stats(markers: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(m[k] for m in markers if k in m)
            for k in MARKER_PHASES if any(k in m for m in markers)}


def bench_libvirt(n: int, floor: bool, baseline_tree: str, timeout: float) -> dict[str, Any]:
    from twisted.internet import reactor

    from caa.devtools import libvirt_env
    from caa.providers.libvirt.config import LibvirtConfig
    from caa.providers.libvirt.provider import LibvirtProvider

    env = libvirt_env.prepare()
    manifest = json.loads((env.image_dir / "manifest.json").read_text())
    bios = str(env.image_dir / manifest["qcow2"])
    pool_dir = str(libvirt_env.POOL_DIR)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if floor:
        copy_volume(bios, pool_dir, FLOOR_VOLUME, [os.path.join(here, "podvm", "make-floor-disk.sh")])
    if baseline_tree:
        copy_volume(build_baseline(baseline_tree), pool_dir, BASELINE_VOLUME)
    refresh_pool(env)
    start_reactor()
    provider = LibvirtProvider(as_node_reactor(reactor), LibvirtConfig(
        uri=env.uri, pool_name=env.pool, network_name=env.network, vol_name=FLOOR_VOLUME, firmware="",
        domain_type="qemu", cpu=1, memory=1024, root_disk_size=1, ip_timeout=600.0))
    work = f"/run/{TAG}l"  # short: the agent sockets live under <work>/<series>/pods/<64 hex>/ (108-byte limit)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work, mode=0o700)
    netns = wire(1)
    adaptors: dict[str, Adaptor] = {}
    floors: list[Floor] = []
    pods: dict[str, list[Pod]] = {"pod": [], "baseline": []}
    try:
        adaptors["pod"] = Adaptor("libvirt", os.path.join(work, "n"), env.adaptor_args())
        if baseline_tree:
            args = env.adaptor_args()
            args[args.index("--vol-name") + 1] = BASELINE_VOLUME
            adaptors["baseline"] = Adaptor("libvirt", os.path.join(work, "b"), args,
                                           os.path.join(baseline_tree, ".venv", "bin"))
        for i in range(n):
            if floor:
                f = run_floor(provider, env.uri, i, timeout)
                floors.append(f)
                print(f"  floor {i}: listening {f.listening_s:.2f}s (create returned {f.returned_s:.2f}s) "
                      f"markers {f.markers}", flush=True)
            for series, adaptor in adaptors.items():
                pod = run_pod(adaptor, netns[0], f"{series}-{i}", timeout, True, env.uri)
                pods[series].append(pod)
                print(f"  {series} {i}: StartVM {pod.start_s:.2f}s phases "
                      f"{ {k: round(v, 3) for k, v in pod.phases.items()} } markers {pod.markers}", flush=True)
    finally:
        for adaptor in adaptors.values():
            adaptor.stop()
        unwire(netns)
        on_reactor(provider.teardown)
        if not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    out: dict[str, Any] = {"n": n, "image": str(env.image_dir),
                           "consoles": {"floor": [f.console for f in floors],
                                        **{k: [p.console for p in v] for k, v in pods.items()}}}
    if floors:
        out["floor"] = {"listening": stats([f.listening_s for f in floors]),
                        "returned": stats([f.returned_s for f in floors]),
                        "markers": marker_stats([f.markers for f in floors])}
    for series, series_pods in pods.items():
        if series_pods:
            out[series] = analyse(series_pods)
            out[series]["markers"] = marker_stats([p.markers for p in series_pods])
            if floors:
                out[series]["ratio_p50_to_floor"] = out[series]["start"]["p50"] / out["floor"]["listening"]["p50"]
    return out


def report_libvirt(r: dict[str, Any]) -> None:
    print(f"\nlibvirt (QEMU/TCG), {r['n']} of each, interleaved; p50 / p99 seconds")
    if "floor" in r:
        f = r["floor"]
        print(f"  floor VM: listening {fmt(f['listening'])}  (create returned {fmt(f['returned'])})  "
              f"guest markers {f['markers']}")
    for series in ("pod", "baseline"):
        if series in r:
            s = r[series]
            ratio = f"  = {s['ratio_p50_to_floor']:.2f}x the floor" if "ratio_p50_to_floor" in s else ""
            print(f"  {series}: StartVM {fmt(s['start'])}{ratio}; provider_create {fmt(s['provider_create'])}, "
                  f"tunnel {fmt(s['tunnel'])}, vm_boot {fmt(s['vm_boot'])}, boot wait {fmt(s['boot_wait'])}, "
                  f"proxy connect {fmt(s['proxy_connect'])}")
            print(f"    guest markers (median uptime) {s['markers']}")


def fmt(d: dict[str, float]) -> str:
    return f"{d['p50']:.3f} / {d['p99']:.3f}"


def report(name: str, r: dict[str, Any]) -> None:
    s = r["sequential"]
    print(f"\n{name}: {s['n']} sequential pods, p50 / p99 seconds")
    for key in ("create", "start", "provider_create", "tunnel", "vm_boot", "boot_wait", "proxy_connect",
                "model_ours_lag", "model_upstream_lag", "upstream_start", "stop"):
        print(f"  {key:20s} {fmt(s[key])}   mean {s[key]['mean']:.3f}")
    print(f"  upstream would add {s['upstream_added_mean_s']:.3f}s after listening vs our measured connect "
          f"{s['ours_connect_mean_s']:.3f}s: ratio {s['ratio_upstream_lag_over_our_connect']:.2f}x; "
          f"model upstream/ours {s['ratio_upstream_over_ours_model']:.2f}x; "
          f"StartVM upstream/ours {s['ratio_start_upstream_over_ours']:.2f}x")
    c = r.get("concurrent")
    if c:
        print(f"  {c['n']} concurrent: all done in {c['wall_s']:.2f}s; StartVM p50/p99/max "
              f"{c['start']['p50']:.2f}/{c['start']['p99']:.2f}/{c['start']['max']:.2f}s; proxy connected after "
              f"{c['proxy_connected_after_s']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=10, help="sequential pods, local provider")
    ap.add_argument("--concurrent", type=int, default=10, help="concurrent pods, local provider (0: none)")
    ap.add_argument("--libvirt-pods", type=int, default=0, help="sequential pods on libvirt/TCG (0: skip)")
    ap.add_argument("--no-floor", action="store_true", help="libvirt: no floor VMs between the pods")
    ap.add_argument("--baseline-tree", default="",
                    help="libvirt: also run this checkout's adaptor and image (its .venv, its podvm/build.sh), "
                         "interleaved, e.g. a worktree of the previous release")
    ap.add_argument("--json", default="", help="write all figures to this file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (namespaces, libvirt)", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    load = os.getloadavg()
    if args.pods:
        state = f"/run/{TAG}-localstate"
        extra = ["--local-bridge", f"{TAG}lb", "--local-subnet", f"10.247.{os.getpid() % 200 + 20}.0/24",
                 "--local-state-dir", state]
        try:
            results["local"] = bench_provider("local", args.pods, args.concurrent, extra, 120)
        finally:
            sh("ip", "link", "del", f"{TAG}lb", check=False)
            shutil.rmtree(state, ignore_errors=True)
        report("local", results["local"])
    if args.libvirt_pods:
        results["libvirt"] = bench_libvirt(args.libvirt_pods, not args.no_floor, args.baseline_tree, 900)
        report_libvirt(results["libvirt"])
    print(f"\nload average before {load[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
