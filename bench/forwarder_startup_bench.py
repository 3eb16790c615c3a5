"""Forwarder start-up: what it imports and how long the pod VM's Python starts take, natively.

    .venv/bin/python bench/forwarder_startup_bench.py [--runs 5]

1. `import caa.forwarder.tap`: modules imported and their cumulative time (`-X importtime`, the sum over the
   top-level imports of the statement), min of `--runs`.
2. twistd's plugin discovery: `twistd --help` exec -> exit, and the modules it imports.
3. The guest's critical path from user data to a listening forwarder (mTLS, user data read from a file):
   - two processes: `caa-process-user-data provision-files`, then `twistd caa-forwarder` (what the pod VM ran
     before `--provision-user-data`);
   - one process: `twistd caa-forwarder --provision-user-data`, and the same with `python -m caa.forwarder`
     (only when this tree's forwarder has the flag).
   Each as exec -> the listening socket accepts (median and min of `--runs`), exec -> the files are there (the
   moment an init may start kata-agent: caa-process-user-data's exit, or the `provisioned` marker), plus the
   modules imported and their cumulative import time on that path by then (both processes for the two-process
   variant; min of `--runs`). Every process runs under `-X importtime`, which adds a little to each.
4. With `--pod-network` (root): the one-process twistd variant again with a pod network in apf.json, built
   for real (VXLAN into an empty pod netns) from a "VM" netns with a veth as its primary interface and a default
   route; this is the guest's real path (provision + pod network + mTLS listen). Each run's stop tears the
   pod network down again; the namespaces are deleted at the end. Also reported: pyroute2's modules and the
   sum of their self times (min of `--runs`).
   With `--compare-path DIR` also the same start with DIR first on PYTHONPATH (e.g. another pyroute2 unpacked
   there: the old dependency against the installed one, in the same run).
Without it no pod network (it needs root and a netns), and pyroute2 is not imported.
The variants' runs are interleaved (run 1 of each, then run 2 of each ...), so they share the machine's state.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
BIN = os.path.dirname(PY)
TWISTD = os.path.join(BIN, "twistd")
ENV = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")


def importtime_totals(text: str) -> tuple[int, float]:
    """(modules imported, ms) from `-X importtime` output: every line is one module; the time is the sum of
    the cumulative column over the top-level imports (a name indented by one space)."""
    modules, total_us = 0, 0
    for line in text.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        modules += 1
        if not name[1:].startswith(" "):
            total_us += int(cumulative)
    return modules, total_us / 1000


def importtime_package(text: str, package: str) -> tuple[int, float]:
    """(modules, ms) of one package in `-X importtime` output: its modules and the sum of their self times
    (wherever they were imported from)."""
    modules, self_us = 0, 0
    for line in text.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        own, _, name = line[len("import time:"):].split("|")
        if name.strip() == package or name.strip().startswith(package + "."):
            modules += 1
            self_us += int(own)
    return modules, self_us / 1000


def measure_import(runs: int, statement: str) -> tuple[int, float]:
    results = []
    for _ in range(runs):
        r = subprocess.run([PY, "-X", "importtime", "-c", statement], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, check=True)
        results.append(importtime_totals(r.stderr))
    return results[0][0], min(ms for _, ms in results)


def measure_twistd_help(runs: int) -> tuple[float, int]:
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run([TWISTD, "--help"], cwd=ROOT, env=ENV, capture_output=True, check=True)
        times.append(time.monotonic() - t0)
    r = subprocess.run([PY, "-X", "importtime", TWISTD, "--help"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, check=True)
    return statistics.median(times), importtime_totals(r.stderr)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], marker: str = "",
                   limit: float = 60.0) -> tuple[float, float]:
    """When the socket accepts, and when `marker` first existed (polled alike; 0 when not asked)."""
    start = time.monotonic()
    marked = 0.0
    while time.monotonic() - start < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"forwarder exited with {proc.returncode}")
        if marker and not marked and os.path.exists(marker):
            marked = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.05):
                return time.monotonic(), marked
        except OSError:
            time.sleep(0.002)
    raise RuntimeError("forwarder did not listen")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


BENCH_VM_NETNS = "caafwdbench-vm"
BENCH_POD_NETNS = "caafwdbench-pod"
POD_NETWORK = {
    "podip": "10.244.97.21/24", "pod-hw-addr": "32:b9:59:6b:f0:d7", "interface": "eth0",
    "worker-node-ip": "192.168.197.1/24", "tunnel-type": "vxlan", "mtu": 1500, "vxlan-port": 4789,
    "vxlan-id": 559777,
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.97.1", "dev": "eth0"},
               {"dst": "10.244.97.0/24", "gw": "", "dev": "eth0", "protocol": "kernel", "scope": "link"}],
}


def make_bench_netns() -> None:
    """The "VM" netns (a veth pair as its primary interface with a default route) and an empty pod netns."""
    for cmd in (["netns", "add", BENCH_VM_NETNS], ["netns", "add", BENCH_POD_NETNS],
                ["-n", BENCH_POD_NETNS, "link", "set", "lo", "up"],
                ["-n", BENCH_VM_NETNS, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"],
                ["-n", BENCH_VM_NETNS, "link", "set", "eth0p", "up"],
                ["-n", BENCH_VM_NETNS, "addr", "add", "192.168.197.2/24", "dev", "eth0"],
                ["-n", BENCH_VM_NETNS, "link", "set", "eth0", "up"],
                ["-n", BENCH_VM_NETNS, "link", "set", "lo", "up"],
                ["-n", BENCH_VM_NETNS, "route", "add", "default", "via", "192.168.197.1"]):
        subprocess.run(["ip", *cmd], check=True, capture_output=True)


def remove_bench_netns() -> None:
    for name in (BENCH_POD_NETNS, BENCH_VM_NETNS):
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def write_user_data(d: str, pod_network: bool = False) -> str:
    sys.path.insert(0, ROOT)
    from caa import tls
    from caa.podvm_api.cloudconfig import APF_PATH, WriteFile, render

    ca = tls.CertificateAuthority.create()
    server = ca.issue_server_certificate("podvm-bench")
    client = tls.make_client_certificate()
    apf = json.dumps({"pod-namespace": "default", "pod-name": "bench",
                      "tls-server-cert": server.cert_pem.decode(), "tls-server-key": server.key_pem.decode(),
                      "tls-client-ca": client.cert_pem.decode(),
                      **({"pod-network": POD_NETWORK} if pod_network else {})}, indent=4)
    path = os.path.join(d, "user-data-podnet" if pod_network else "user-data")
    with open(path, "w") as f:
        f.write(render([WriteFile(APF_PATH, apf + "\n")]))
    return path


def has_flag() -> bool:
    r = subprocess.run([TWISTD, "caa-forwarder", "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    return "--provision-user-data" in r.stdout


# name, one process?, launcher, pod network?, PYTHONPATH
Variant = tuple[str, bool, str, bool, str]

LAUNCHERS = {
    "twistd": [TWISTD, "--nodaemon", "--pidfile=", "--logfile=/dev/null", "caa-forwarder"],
    "python -m": ["-m", "caa.forwarder"],
}


Run = tuple[float, int, float, float, tuple[int, float]]


def one_start(d: str, user_data: str, one_process: bool, launcher: str, pod_network: bool = False,
              python_path: str = "") -> Run:
    """exec -> listening for one variant; the (modules, import ms) of its processes until then; exec -> files;
    pyroute2's (modules, ms) in the forwarder."""
    out = os.path.join(d, f"out-{time.monotonic_ns()}")
    os.makedirs(out)
    port = free_port()
    fwd = [PY, "-X", "importtime", *LAUNCHERS[launcher],
           "--config", os.path.join(out, "apf.json"), "--listen", f"127.0.0.1:{port}",
           "--kata-agent-socket", os.path.join(d, "agent.sock"),
           *(["--pod-netns", BENCH_POD_NETNS, "--host-netns", BENCH_VM_NETNS] if pod_network
             else ["--pod-netns", "bench"])]
    err_path = os.path.join(out, "importtime")
    t0 = time.monotonic()
    files, pud_modules, pud_ms = 0.0, 0, 0.0
    if one_process:
        fwd += ["--provision-user-data", "--user-data-file", user_data]
    else:
        r = subprocess.run([PY, "-X", "importtime", os.path.join(BIN, "caa-process-user-data"), "provision-files",
                            "--user-data-file", user_data, "--output-dir", out], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, check=True)
        files = time.monotonic() - t0
        pud_modules, pud_ms = importtime_totals(r.stderr)
    with open(err_path, "wb") as err:
        # python -m logs to stdout, twistd to --logfile; stderr has only the import times
        env = dict(ENV, PYTHONPATH=python_path) if python_path else ENV
        proc = subprocess.Popen(fwd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            listening, marked = wait_listening(port, proc, os.path.join(out, "provisioned") if one_process else "")
            with open(err_path) as f:
                text = f.read()
            modules, ms = importtime_totals(text)
        finally:
            stop(proc)
    # on the critical path: caa-process-user-data's imports, then the forwarder's
    return (listening - t0, modules + pud_modules, ms + pud_ms, (marked - t0 if one_process else files),
            importtime_package(text, "pyroute2"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--pod-network", action="store_true",
                    help="also the one-process start with a real pod network (root; netns caafwdbench-*)")
    ap.add_argument("--only-pod-network", action="store_true", help="only that variant (implies --pod-network)")
    ap.add_argument("--compare-path", default="",
                    help="with --pod-network: also run it with this directory first on PYTHONPATH")
    args = ap.parse_args()
    if (args.pod_network or args.only_pod_network) and os.geteuid() != 0:
        ap.error("--pod-network needs root (it creates network namespaces)")
    results: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    variants: list[Variant] = []
    if not args.only_pod_network:
        results["import_tap_modules"], results["import_tap_ms"] = measure_import(args.runs,
                                                                                 "import caa.forwarder.tap")
        results["twistd_help_s"], results["twistd_help_modules"] = measure_twistd_help(args.runs)
        variants.append(("two_processes", False, "twistd", False, ""))
        if has_flag():
            variants += [("one_process", True, "twistd", False, ""), ("one_process_m", True, "python -m", False, "")]
    if args.pod_network or args.only_pod_network:
        variants.append(("one_process_podnet", True, "twistd", True, ""))
        if args.compare_path:
            variants.append(("one_process_podnet_compare", True, "twistd", True, os.path.abspath(args.compare_path)))
        remove_bench_netns()  # leftovers of an interrupted run
    try:
        if args.pod_network or args.only_pod_network:
            make_bench_netns()
        with tempfile.TemporaryDirectory(prefix="fwdstart-") as d:
            run_variants(args.runs, d, variants, results)
    finally:
        if args.pod_network or args.only_pod_network:
            remove_bench_netns()
    results["load_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))


def run_variants(n: int, d: str, variants: list[Variant], results: dict[str, Any]) -> None:
    user_data = {False: write_user_data(d), True: write_user_data(d, pod_network=True)}
    all_runs: dict[str, list[Run]] = {v[0]: [] for v in variants}
    for _ in range(n):
        for name, one, launcher, podnet, python_path in variants:
            all_runs[name].append(one_start(d, user_data[podnet], one, launcher, podnet, python_path))
    podnet_of = {v[0]: v[3] for v in variants}
    for name, runs in all_runs.items():
        results[f"{name}_exec_to_listening_s"] = statistics.median(r[0] for r in runs)
        results[f"{name}_exec_to_listening_min_s"] = min(r[0] for r in runs)
        results[f"{name}_modules"] = runs[0][1]
        results[f"{name}_import_ms"] = min(r[2] for r in runs)
        results[f"{name}_exec_to_files_s"] = statistics.median(r[3] for r in runs)
        if podnet_of[name]:
            results[f"{name}_pyroute2_modules"] = runs[0][4][0]
            results[f"{name}_pyroute2_ms"] = min(r[4][1] for r in runs)


if __name__ == "__main__":
    main()
