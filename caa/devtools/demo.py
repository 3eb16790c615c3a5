"""`make demo`: one peer pod through its whole life on this machine, as the Kata shim would drive it.

The adaptor runs as a real `twistd caa-adaptor --provider local` process; the "pod VM" is a network namespace
with its own forwarder and the development agent (caa/devtools/agent.py, not kata-agent). This script plays the
shim over ttrpc: CreateVM, StartVM, an agent call through the proxy socket, StopVM; in between it proves that the
pod IP answers through the VXLAN tunnel from another pod on the node, and at the end that nothing is left.

`--pool` walks a warm pool instead: the adaptor keeps one pre-booted pod VM (`--pool-size 1`); the pod's StartVM
claims it (a pool hit) and its time is shown next to a cold StartVM of a pod of another size (never pooled);
at the end the adaptor is restarted without pools and deletes the idle pool VM.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from caa.reactors import as_node_reactor

BRIDGE = "caademo-br"
POD_NS = "caademo-pod"
CLIENT_NS = "caademo-cli"
GATEWAY = "10.244.77.1"
POD_IP = "10.244.77.10"
CLIENT_IP = "10.244.77.20"
PREFIX = 24
ECHO_PORT = 8080
# the development pod VM image's stand-in workload: an HTTP server on 8080 inside the VM's pod netns
WORKLOAD_REPLY = "hello from the pod network namespace"
HTTP_GET = "import urllib.request, sys; print(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())"


class DemoError(Exception):
    pass


class Steps:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.results: list[tuple[str, float]] = []

    def run(self, title: str, fn: Callable[[], Any]) -> Any:
        print(f"==> {title}", flush=True)
        start = time.monotonic()
        result = fn()
        took = time.monotonic() - start
        self.results.append((title, took))
        print(f"    ok in {took:.2f}s (t+{time.monotonic() - self.t0:.2f}s)", flush=True)
        return result


def sh(*args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise DemoError(f"{' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def netns_list() -> set[str]:
    out = sh("ip", "netns", "list").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def cleanup_network() -> None:
    for ns in (POD_NS, CLIENT_NS):
        sh("ip", "netns", "del", ns, check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


def wire_pods() -> None:
    """A bridge with the pod gateway and two pods on it, as a bridge CNI plugin would wire them."""
    cleanup_network()
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{GATEWAY}/{PREFIX}", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    for ns, ip, peer in ((POD_NS, POD_IP, "cdpod0"), (CLIENT_NS, CLIENT_IP, "cdcli0")):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "master", BRIDGE, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/{PREFIX}", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", GATEWAY)


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


ECHO_SERVER = f"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{POD_IP}", {ECHO_PORT})); s.listen(4); print("listening", flush=True)
while True:
    c, _ = s.accept(); data = c.recv(1024); c.sendall(b"from pod VM: " + data); c.close()
"""

ECHO_CLIENT = f"""
import socket
c = socket.create_connection(("{POD_IP}", {ECHO_PORT}), timeout=5); c.sendall(b"hello")
print(c.recv(1024).decode())
"""


def find_vm_pod_netns(before: set[str]) -> str:
    for ns in sorted(netns_list() - before):
        if POD_IP in sh("ip", "-n", ns, "-4", "-o", "addr", check=False).stdout:
            return ns
    raise DemoError(f"no pod VM namespace holds the pod IP {POD_IP}")


def libvirt_leftovers(env: Any, domain_prefix: str) -> list[str]:
    """Domains and volumes of this pod's VM (`<domain_prefix>...`) still there. Other volumes of the pool are not
    ours to judge: benchmarks and tests may share the prepared pool."""
    conn = env.open()
    try:
        left = [f"domain {d.name()}" for d in conn.listAllDomains(0) if d.name().startswith(domain_prefix)]
        pool = conn.storagePoolLookupByName(env.pool)
        pool.refresh(0)
        extra = sorted(v for v in pool.listVolumes() if v.startswith(domain_prefix))
    finally:
        conn.close()
    if extra:
        left.append(f"volumes {extra} in pool {env.pool}")
    return left


def pool_journal(pool_dir: str) -> list[dict[str, Any]]:
    """The adaptor's pool journal (`<pods-dir>/../pool/*.json`, caa.adaptor.pool)."""
    names = sorted(os.listdir(pool_dir)) if os.path.isdir(pool_dir) else []
    return [e for e in (_read_json(os.path.join(pool_dir, n)) for n in names if n.endswith(".json")) if e]


def wait_until(cond: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise DemoError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.1)


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class Shim:
    """The Kata shim's side of the two ttrpc sockets, with the caa ttrpc client on a private reactor thread."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def call(self, socket_path: str, service: str, method: str, request: Any, response_type: Any,
             timeout: float) -> Any:
        from twisted.internet import reactor as global_reactor

        reactor = as_node_reactor(global_reactor)
        from twisted.internet.threads import blockingCallFromThread

        from caa.ttrpc import connect
        from caa.ttrpc.endpoints import unix_client_endpoint

        async def go() -> Any:
            client = await connect(unix_client_endpoint(reactor, socket_path), reactor)
            try:
                return await client.call(service, method, request, response_type, timeout=timeout)
            finally:
                client.close()

        from twisted.internet.defer import Deferred

        return blockingCallFromThread(reactor, lambda: Deferred.fromCoroutine(go()))


def start_reactor_thread() -> None:
    import threading

    from twisted.internet import reactor as global_reactor


    reactor = as_node_reactor(global_reactor)

    threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default="local", help="local (default) or libvirt")
    parser.add_argument("--workdir", default="/run/caa-demo")
    parser.add_argument("--keep", action="store_true", help="leave the demo network and logs in place")
    parser.add_argument("--vxlan-min-id", type=int, default=555000,
                        help="first VNI of the demo adaptor (tests pick one no other suite uses)")
    parser.add_argument("--pool", action="store_true",
                        help="walk a warm pool: a pool hit next to a cold start (local provider)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("make demo needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    from caa.devtools.libvirt_env import file_lock

    # One demo at a time on a machine: they share fixed names (the pod netns, the bridge, the pod IP), and a
    # second demo's adaptor would sweep the first one's tunnel as an orphan.
    with file_lock("caa-demo"):
        return _walk(args)


def _walk(args: argparse.Namespace) -> int:
    from caa.proto import health_pb2, hypervisor_pb2

    steps = Steps()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work, mode=0o700)
    hv_sock = os.path.join(work, "hypervisor.sock")
    pods_dir = os.path.join(work, "pods")
    log_path = os.path.join(work, "adaptor.log")
    pool_dir = os.path.join(work, "pool")  # the adaptor journals its pool next to --pods-dir
    sid = secrets.token_hex(32)
    cold_sid = secrets.token_hex(32)
    pool_args = ["--pool-size", "1"] if args.pool else []
    pooled: set[str] = set()
    libvirt_env: Any = None
    adaptor: subprocess.Popen[bytes] | None = None
    echo: subprocess.Popen[bytes] | None = None
    shim = Shim(hv_sock)
    start_reactor_thread()
    ok = False
    try:
        steps.run("wire a pod network namespace like a CNI plugin would", wire_pods)
        ns_before = netns_list()
        extra_args: list[str] = []
        if args.provider == "libvirt":
            from caa.devtools import libvirt_env as lv

            def prepare() -> None:
                nonlocal libvirt_env
                libvirt_env = lv.prepare()
                print(f"    network {libvirt_env.network}, pool {libvirt_env.pool}, base volume "
                      f"{libvirt_env.volume} from {libvirt_env.image_dir} "
                      f"(image step {libvirt_env.image_seconds:.1f}s)")

            steps.run("prepare libvirt: libvirtd, NAT network, dir pool, pod VM image (build or cached)", prepare)
            extra_args = [*libvirt_env.adaptor_args(), "--proxy-timeout", "900s", "--probe-port", "0"]

        def start_adaptor() -> None:
            nonlocal adaptor
            twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
            # The demo's adaptor must not sweep tunnels of the machine's other pods: give it an empty netns dir.
            netns_dir = os.path.join(work, "netns")
            os.makedirs(netns_dir, exist_ok=True)
            cmd = [twistd, "-n", "--pidfile=", f"--logfile={log_path}", "caa-adaptor",
                   "--provider", args.provider, "--socket", hv_sock, "--pods-dir", pods_dir,
                   "--tls-dir", os.path.join(work, "tls"), "--netns-dir", netns_dir,
                   "--vxlan-min-id", str(args.vxlan_min_id), *extra_args, *pool_args]
            print(f"    $ {' '.join(a or repr(a) for a in cmd)}")
            adaptor = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 30
            while not os.path.exists(hv_sock):
                if adaptor.poll() is not None:
                    raise DemoError(f"the adaptor exited with {adaptor.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise DemoError("the adaptor did not open its socket within 30 s")
                time.sleep(0.05)
            version = shim.call(hv_sock, "hypervisor.Hypervisor", "Version",
                                hypervisor_pb2.VersionRequest(version="demo"), hypervisor_pb2.VersionResponse, 5)
            print(f"    adaptor answers Version: {version.version!r}")

        steps.run(f"start twistd caa-adaptor --provider {args.provider}", start_adaptor)

        def pool_ready() -> None:
            wait_until(lambda: any(e.get("state") == "ready" for e in pool_journal(pool_dir)),
                       "the pool VM ready", 600 if args.provider == "libvirt" else 120)
            pooled.update(e["name"] for e in pool_journal(pool_dir))
            print(f"    pool VM {', '.join(sorted(pooled))} ready: bootstrap user data only, its forwarder "
                  "serving nothing but Claim")

        if args.pool:
            steps.run("wait until the warm pool VM is booted (--pool-size 1)", pool_ready)

        def create() -> str:
            req = hypervisor_pb2.CreateVMRequest(id=sid, networkNamespacePath=f"/var/run/netns/{POD_NS}")
            req.annotations["io.kubernetes.cri.sandbox-name"] = "demo-pod"
            req.annotations["io.kubernetes.cri.sandbox-namespace"] = "default"
            resp = shim.call(hv_sock, "hypervisor.Hypervisor", "CreateVM", req, hypervisor_pb2.CreateVMResponse, 30)
            print(f"    sandbox {sid[:12]}..., agent socket {resp.agentSocketPath}")
            return str(resp.agentSocketPath)

        agent_sock = steps.run("CreateVM (inspect the pod netns, plan the VM, journal the sandbox)", create)

        timeout = 600 if args.provider == "libvirt" else 60
        hit_seconds = 0.0

        def start_vm() -> None:
            nonlocal hit_seconds
            t0 = time.monotonic()
            shim.call(hv_sock, "hypervisor.Hypervisor", "StartVM", hypervisor_pb2.StartVMRequest(id=sid),
                      hypervisor_pb2.StartVMResponse, timeout)
            if args.pool:
                hit_seconds = time.monotonic() - t0
                name = _read_json(os.path.join(pods_dir, sid, "sandbox.json")).get("instance_name", "")
                if name not in pooled:
                    raise DemoError(f"StartVM started {name or 'no VM'}, not the pool VM {sorted(pooled)}")
                print(f"    pool hit (claimed {name}) in {hit_seconds:.2f}s")

        steps.run("StartVM (a warm pool VM claimed, tunnel, agent proxy connected)" if args.pool else
                  "StartVM (pod VM up, tunnel, forwarder serving mTLS, agent proxy connected)", start_vm)

        def agent_call() -> None:
            # StartVM returns once the forwarder serves; on a VM the development agent (a Python stand-in started
            # in parallel, at low priority) may still be starting: the forwarder holds the call until it is up,
            # as the Kata shim's own agent timeouts (60 s and more) allow.
            check = shim.call(agent_sock, "grpc.Health", "Check", health_pb2.CheckRequest(),
                              health_pb2.HealthCheckResponse, 60)
            version = shim.call(agent_sock, "grpc.Health", "Version", health_pb2.CheckRequest(),
                                health_pb2.VersionCheckResponse, 10)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(check.status)
            print(f"    grpc.Health/Check through the proxy: {status}; agent version {version.agent_version!r}")
            if status != "SERVING":
                raise DemoError(f"agent answered {status}")

        steps.run("agent call through the proxy socket (shim -> adaptor -> mTLS -> forwarder -> agent)",
                  agent_call)

        def pod_ip() -> None:
            nonlocal echo
            if args.provider != "local":
                # the VM's pod netns is inside the guest: ping it, then its stand-in workload's HTTP listener
                out = sh("ip", "netns", "exec", CLIENT_NS, "ping", "-c", "2", "-W", "5", POD_IP).stdout
                print("    ping: " + out.strip().splitlines()[-1])
                url = f"http://{POD_IP}:{ECHO_PORT}/"
                get = sh("ip", "netns", "exec", CLIENT_NS, *_py(HTTP_GET), url, check=False)
                if get.returncode != 0:
                    print(f"    no TCP listener reached at {url} ({get.stderr.strip().splitlines()[-1:]}); "
                          "the image offers none: the ping above is the proof")
                    return
                reply = get.stdout.strip()
                print(f"    another pod -> {url} answered {reply!r}")
                if WORKLOAD_REPLY not in reply:
                    raise DemoError(f"unexpected reply {reply!r}")
                return
            vm_ns = find_vm_pod_netns(ns_before)
            echo = subprocess.Popen(["ip", "netns", "exec", vm_ns, *_py(ECHO_SERVER)], stdout=subprocess.PIPE)
            assert echo.stdout is not None
            echo.stdout.readline()
            reply = sh("ip", "netns", "exec", CLIENT_NS, *_py(ECHO_CLIENT)).stdout.strip()
            print(f"    another pod -> {POD_IP}:{ECHO_PORT} answered {reply!r} (listener in netns {vm_ns})")
            if not reply.startswith("from pod VM"):
                raise DemoError(f"unexpected reply {reply!r}")

        steps.run("the pod IP answers through the VXLAN tunnel from another pod", pod_ip)
        if echo is not None:
            echo.kill()
            echo.wait()

        def cold_start() -> None:
            # A pod of another size: never pooled, so a cold start whatever the pool's refill is doing. The
            # other pod's netns is free now (its echo client is done).
            req = hypervisor_pb2.CreateVMRequest(id=cold_sid, networkNamespacePath=f"/var/run/netns/{CLIENT_NS}")
            req.annotations["io.kubernetes.cri.sandbox-name"] = "demo-cold"
            req.annotations["io.kubernetes.cri.sandbox-namespace"] = "default"
            req.annotations["io.katacontainers.config.hypervisor.default_vcpus"] = "1"
            shim.call(hv_sock, "hypervisor.Hypervisor", "CreateVM", req, hypervisor_pb2.CreateVMResponse, 30)
            t0 = time.monotonic()
            shim.call(hv_sock, "hypervisor.Hypervisor", "StartVM", hypervisor_pb2.StartVMRequest(id=cold_sid),
                      hypervisor_pb2.StartVMResponse, timeout)
            cold_seconds = time.monotonic() - t0
            name = _read_json(os.path.join(pods_dir, cold_sid, "sandbox.json")).get("instance_name", "")
            print(f"    cold StartVM (created {name}) in {cold_seconds:.2f}s; the pool hit took {hit_seconds:.2f}s")
            shim.call(hv_sock, "hypervisor.Hypervisor", "StopVM", hypervisor_pb2.StopVMRequest(id=cold_sid),
                      hypervisor_pb2.StopVMResponse, 300)

        if args.pool:
            steps.run("a cold StartVM beside it (a pod of another size: no pool), then its StopVM", cold_start)

        vnis_used = {int(v) for v in _read_json(os.path.join(pods_dir, "vni.json"))}
        print(f"    (the sandbox holds VNI {sorted(vnis_used)})")
        steps.run("StopVM (proxy down, VM deleted, tunnel down, journal entry gone)",
                  lambda: shim.call(hv_sock, "hypervisor.Hypervisor", "StopVM",
                                    hypervisor_pb2.StopVMRequest(id=sid), hypervisor_pb2.StopVMResponse, 300))

        def pools_off() -> None:
            nonlocal adaptor
            assert adaptor is not None
            idle = {e["name"] for e in pool_journal(pool_dir)}  # the refill
            pooled.update(idle)
            adaptor.send_signal(signal.SIGTERM)
            adaptor.wait(60)
            pool_args.clear()
            start_adaptor()
            wait_until(lambda: not pool_journal(pool_dir) and not (idle & netns_list()),
                       "the idle pool VMs deleted", 120)
            print(f"    restarted without --pool-size: deleted the idle pool VMs {sorted(idle)}")

        if args.pool:
            steps.run("restart the adaptor with pools off: it deletes the idle pool VMs", pools_off)

        def nothing_left() -> None:
            left = []
            if os.path.exists(os.path.join(pods_dir, sid)):
                left.append(f"pod directory {os.path.join(pods_dir, sid)}")
            # only this pod's VM namespaces (<instance name>, <instance name>-pod): other suites may make theirs
            new_ns = {ns for ns in netns_list() - ns_before
                      if ns.startswith((f"podvm-demo-pod-{sid[:8]}", f"podvm-demo-cold-{cold_sid[:8]}"))
                      or ns.split("-pod")[0] in pooled}
            if new_ns:
                left.append(f"namespaces {sorted(new_ns)}")
            links = json.loads(sh("ip", "-n", POD_NS, "-j", "link").stdout)
            extra = [link["ifname"] for link in links if link["ifname"] not in ("lo", "eth0")]
            if extra:
                left.append(f"devices in the pod netns {extra}")
            qdiscs = sh("ip", "netns", "exec", POD_NS, "tc", "qdisc", "show", "dev", "eth0", "ingress").stdout
            if qdiscs.strip():
                left.append("tc ingress qdisc on the pod's eth0")
            root_vxlan = json.loads(sh("ip", "-j", "-d", "link", "show", "type", "vxlan").stdout or "[]")
            ours = [v["ifname"] for v in root_vxlan
                    if v.get("linkinfo", {}).get("info_data", {}).get("id") in vnis_used]
            if ours:
                left.append(f"vxlan devices {ours}")
            if libvirt_env is not None:
                left += libvirt_leftovers(libvirt_env, f"podvm-demo-pod-{sid[:8]}")
            if left:
                raise DemoError("left behind: " + "; ".join(left))
            print("    no pod directory, VM namespace, tunnel device, qdisc or journal entry left")
            if libvirt_env is not None:
                print(f"    no domain and no volume of the pod's VM in pool {libvirt_env.pool}")

        steps.run("check that nothing is left", nothing_left)
        ok = True
    except Exception as e:
        print(f"!! demo failed: {e}", file=sys.stderr)
        if os.path.exists(log_path):
            print(f"!! adaptor log: {log_path}", file=sys.stderr)
            with open(log_path) as f:
                print("".join(f.readlines()[-30:]), file=sys.stderr)
    finally:
        if echo is not None and echo.poll() is None:
            echo.kill()
        if not ok and adaptor is not None and adaptor.poll() is None:
            # The adaptor keeps its pods' VMs when it stops (pods outlive a restart): a failed walk stops its own
            # sandboxes first, so no VM is left running. StopVM of one that never got that far is a no-op.
            for stale in (sid, cold_sid):
                try:
                    shim.call(hv_sock, "hypervisor.Hypervisor", "StopVM", hypervisor_pb2.StopVMRequest(id=stale),
                              hypervisor_pb2.StopVMResponse, 300)
                except Exception as e:
                    print(f"!! StopVM {stale[:12]}... after the failure: {e}", file=sys.stderr)
        if adaptor is not None and adaptor.poll() is None:
            adaptor.send_signal(signal.SIGTERM)
            try:
                adaptor.wait(15)
            except subprocess.TimeoutExpired:
                adaptor.kill()
        if not args.keep:
            cleanup_network()
    total = time.monotonic() - steps.t0
    print()
    for title, took in steps.results:
        print(f"  {took:7.2f}s  {title}")
    print(f"  {total:7.2f}s  total — {'the peer pod lived and left nothing behind' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
