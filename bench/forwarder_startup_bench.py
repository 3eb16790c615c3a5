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
No pod network (it needs root and a netns); with one, pyroute2 adds its imports to both variants alike.
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


def write_user_data(d: str) -> str:
    sys.path.insert(0, ROOT)
    from caa import tls
    from caa.podvm_api.cloudconfig import APF_PATH, WriteFile, render

    ca = tls.CertificateAuthority.create()
    server = ca.issue_server_certificate("podvm-bench")
    client = tls.make_client_certificate()
    apf = json.dumps({"pod-namespace": "default", "pod-name": "bench",
                      "tls-server-cert": server.cert_pem.decode(), "tls-server-key": server.key_pem.decode(),
                      "tls-client-ca": client.cert_pem.decode()}, indent=4)
    path = os.path.join(d, "user-data")
    with open(path, "w") as f:
        f.write(render([WriteFile(APF_PATH, apf + "\n")]))
    return path


def has_flag() -> bool:
    r = subprocess.run([TWISTD, "caa-forwarder", "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    return "--provision-user-data" in r.stdout


LAUNCHERS = {
    "twistd": [TWISTD, "--nodaemon", "--pidfile=", "--logfile=/dev/null", "caa-forwarder"],
    "python -m": ["-m", "caa.forwarder"],
}


def one_start(d: str, user_data: str, one_process: bool, launcher: str) -> tuple[float, int, float, float]:
    """exec -> listening for one variant; the (modules, import ms) of its processes until then; exec -> files."""
    out = os.path.join(d, f"out-{time.monotonic_ns()}")
    os.makedirs(out)
    port = free_port()
    fwd = [PY, "-X", "importtime", *LAUNCHERS[launcher],
           "--config", os.path.join(out, "apf.json"), "--listen", f"127.0.0.1:{port}",
           "--kata-agent-socket", os.path.join(d, "agent.sock"), "--pod-netns", "bench"]
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
        proc = subprocess.Popen(fwd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        try:
            listening, marked = wait_listening(port, proc, os.path.join(out, "provisioned") if one_process else "")
            with open(err_path) as f:
                modules, ms = importtime_totals(f.read())
        finally:
            stop(proc)
    # on the critical path: caa-process-user-data's imports, then the forwarder's
    return listening - t0, modules + pud_modules, ms + pud_ms, (marked - t0 if one_process else files)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    results: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    results["import_tap_modules"], results["import_tap_ms"] = measure_import(args.runs, "import caa.forwarder.tap")
    results["twistd_help_s"], results["twistd_help_modules"] = measure_twistd_help(args.runs)
    variants = [("two_processes", False, "twistd")]
    if has_flag():
        variants += [("one_process", True, "twistd"), ("one_process_m", True, "python -m")]
    with tempfile.TemporaryDirectory(prefix="fwdstart-") as d:
        user_data = write_user_data(d)
        for name, one, launcher in variants:
            runs = [one_start(d, user_data, one, launcher) for _ in range(args.runs)]
            results[f"{name}_exec_to_listening_s"] = statistics.median(r[0] for r in runs)
            results[f"{name}_exec_to_listening_min_s"] = min(r[0] for r in runs)
            results[f"{name}_modules"] = runs[0][1]
            results[f"{name}_import_ms"] = min(r[2] for r in runs)
            results[f"{name}_exec_to_files_s"] = statistics.median(r[3] for r in runs)
    results["load_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
