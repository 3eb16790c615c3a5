"""Forwarder benchmark: memory and start time of `twistd caa-forwarder`, and its relay overhead.

    .venv/bin/python bench/forwarder_bench.py [--runs 5] [--calls 2000] [--big 20]

1. Start: exec -> the listening socket accepts (polled every 2 ms), median of `--runs`, TLS mode with
   apf.json from caa.tls, next to a bare `python3 -c pass` (exec -> exit).
2. RSS: VmRSS of the forwarder once listening, and after the relay runs below (steady state).
3. Relay overhead: sequential grpc.Health.Check from this process through the forwarder (mTLS TCP) vs
   straight to the agent stand-in's unix socket; and 4 MiB ReadStdout-sized responses the same two ways.
   Reported as per-call latency and ratio (through / direct).
The kata-agent stand-in (tests/agent_standin.py) runs as its own process.
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

from caa.reactors import INodeReactor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TWISTD = os.path.join(os.path.dirname(PY), "twistd")
BIG = (4 << 20) - 64  # a 4 MiB ReadStdout response (ttrpc's message limit is 4 MiB including framing)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], limit: float = 20.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"forwarder exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.05):
                return time.monotonic()
        except OSError:
            time.sleep(0.002)
    raise RuntimeError("forwarder did not listen")


def bare_python(runs: int) -> tuple[float, int]:
    """exec -> exit of `python3 -c pass`, and the VmRSS of a bare interpreter (it reports its own)."""
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run([PY, "-c", "pass"], check=True)
        times.append(time.monotonic() - t0)
    out = subprocess.run([PY, "-c", "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0])"],
                         check=True, capture_output=True, text=True).stdout
    return statistics.median(times), int(out.split()[1])


def write_material(d: str) -> dict[str, Any]:
    sys.path.insert(0, ROOT)
    from caa import tls

    ca = tls.CertificateAuthority.create()
    server = ca.issue_server_certificate("podvm-bench")
    client = tls.make_client_certificate()
    with open(os.path.join(d, "apf.json"), "w") as f:
        json.dump({"pod-namespace": "default", "pod-name": "bench",
                   "tls-server-cert": server.cert_pem.decode(), "tls-server-key": server.key_pem.decode(),
                   "tls-client-ca": client.cert_pem.decode()}, f)
    return {"ca": ca.cert_pem, "client": client}


LAUNCHERS = {
    "twistd": [TWISTD, "--nodaemon", "--pidfile=", "--logfile=/dev/null", "caa-forwarder"],
    "python -m": [PY, "-m", "caa.forwarder"],
}


def start_forwarder(d: str, port: int, launcher: str = "twistd") -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen(
        [*LAUNCHERS[launcher],
         "--config", os.path.join(d, "apf.json"), "--listen", f"127.0.0.1:{port}",
         "--kata-agent-socket", os.path.join(d, "agent.sock"), "--pod-netns", "bench"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def relay_runs(reactor: INodeReactor, d: str, port: int, material: dict[str, Any], calls: int,
                     big: int) -> dict[str, float]:
    from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, wrapClientTLS

    from caa import tls
    from caa.proto import agent_pb2, health_pb2
    from caa.ttrpc import connect

    client_pair = material["client"]
    creator = tls.client_creator(material["ca"], client_pair.cert_pem, client_pair.key_pem, "podvm-bench")
    through = await connect(wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port)), reactor)
    direct = await connect(UNIXClientEndpoint(reactor, os.path.join(d, "agent.sock")), reactor)
    out: dict[str, float] = {}
    for name, client in (("direct", direct), ("through", through)):
        for _ in range(50):  # warm-up (and the forwarder's first agent dial)
            await client.call("grpc.Health", "Check", health_pb2.CheckRequest(),
                              health_pb2.HealthCheckResponse, timeout=30)
        t0 = time.perf_counter()
        for _ in range(calls):
            await client.call("grpc.Health", "Check", health_pb2.CheckRequest(),
                              health_pb2.HealthCheckResponse, timeout=30)
        out[f"check_{name}_us"] = (time.perf_counter() - t0) / calls * 1e6
        t0 = time.perf_counter()
        for _ in range(big):
            r = await client.call("grpc.AgentService", "ReadStdout", agent_pb2.ReadStreamRequest(len=BIG),
                                  agent_pb2.ReadStreamResponse, timeout=60)
            assert len(r.data) == BIG
        out[f"big_{name}_ms"] = (time.perf_counter() - t0) / big * 1e3
    through.close()
    direct.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--big", type=int, default=20)
    args = ap.parse_args()

    d = tempfile.mkdtemp(prefix="fwdbench-")
    material = write_material(d)
    agent = subprocess.Popen([PY, "-m", "tests.agent_standin", os.path.join(d, "agent.sock")], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert agent.stdout is not None
    agent.stdout.readline()
    results: dict[str, Any] = {}
    try:
        py_t, py_rss = bare_python(args.runs)
        results["python_c_pass_s"] = py_t
        results["python_c_pass_rss_kib"] = py_rss
        for key, launcher in (("", "twistd"), ("m_", "python -m")):
            starts, rss_ready = [], []
            for _ in range(args.runs):
                port = free_port()
                t0 = time.monotonic()
                proc = start_forwarder(d, port, launcher)
                try:
                    starts.append(wait_listening(port, proc) - t0)
                    time.sleep(0.2)  # settle: the agent dial happens right after listening
                    rss_ready.append(rss_kib(proc.pid))
                finally:
                    stop(proc)
            results[f"{key}exec_to_listening_s"] = statistics.median(starts)
            results[f"{key}exec_to_listening_min_s"] = min(starts)
            results[f"{key}rss_listening_kib"] = int(statistics.median(rss_ready))

        port = free_port()
        proc = start_forwarder(d, port)
        try:
            wait_listening(port, proc)
            from twisted.internet import task

            def run(reactor: INodeReactor) -> Any:
                from twisted.internet.defer import Deferred

                return Deferred.fromCoroutine(relay_runs(reactor, d, port, material, args.calls, args.big))

            holder: dict[str, Any] = {}

            def capture(reactor: INodeReactor) -> Any:
                return run(reactor).addCallback(holder.update)

            try:
                task.react(capture)
            except SystemExit:
                pass
            results.update(holder)
            results["rss_after_relay_kib"] = rss_kib(proc.pid)
        finally:
            stop(proc)
    finally:
        stop(agent)
        import shutil

        shutil.rmtree(d, ignore_errors=True)
    r = results
    r["check_ratio"] = r["check_through_us"] / r["check_direct_us"]
    r["big_ratio"] = r["big_through_ms"] / r["big_direct_ms"]
    print(json.dumps(r, indent=2))
    def ms(k: str) -> str:
        return f"{r[k] * 1000:.0f} ms"

    def mib(k: str) -> str:
        return f"{r[k] / 1024:.1f} MiB"

    n = args.runs
    rows = [
        (f"`python3 -c pass` exec -> exit (median of {n}); its RSS", f"{ms('python_c_pass_s')}; "
         f"{mib('python_c_pass_rss_kib')}"),
        (f"`twistd caa-forwarder` exec -> listening (median of {n}, mTLS)",
         f"{ms('exec_to_listening_s')} (min {ms('exec_to_listening_min_s')})"),
        (f"`python -m caa.forwarder` exec -> listening (median of {n}, mTLS)",
         f"{ms('m_exec_to_listening_s')} (min {ms('m_exec_to_listening_min_s')})"),
        ("RSS when listening: twistd / python -m", f"{mib('rss_listening_kib')} / {mib('m_rss_listening_kib')}"),
        ("RSS (twistd) after the relay runs below", mib("rss_after_relay_kib")),
        ("Health.Check, direct to the agent stand-in (unix)", f"{r['check_direct_us']:.0f} us/call"),
        ("Health.Check through the forwarder (mTLS TCP)",
         f"{r['check_through_us']:.0f} us/call (x{r['check_ratio']:.2f})"),
        ("4 MiB ReadStdout, direct", f"{r['big_direct_ms']:.1f} ms/call"),
        ("4 MiB ReadStdout through the forwarder", f"{r['big_through_ms']:.1f} ms/call (x{r['big_ratio']:.2f})"),
    ]
    print("\n| Measure | Value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
