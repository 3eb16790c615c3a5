"""Rolling update with real processes: two `twistd caa-adaptor` on one node (a test "worker" network namespace),
the local provider (pod VMs are namespaces with a real forwarder and the development agent), the real VXLAN tunnel
into a CNI-like pod namespace, and mutual TLS (auto CA shared through --tls-dir).

A prober calls the pod's agent socket (grpc.Health/Check on a fresh connection, as a shim reconnecting would) every
50 ms across the whole sequence and records each call; a "stream" holds one connection opened on the old adaptor
before the rollout and calls over it every 50 ms. The checks: no probe fails and no gap between answers exceeds
1 s (an availability bound, taken from the recorded times), the stream keeps relaying through the old adaptor's
drain, exactly one adaptor acts on the sandbox, and after StopVM nothing is left (VM namespaces and processes,
tunnel, VNI, NOTRACK rules, pod directory, adaptor processes).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from twisted.trial.unittest import TestCase

from caa.proto import health_pb2
from caa.ttrpc.envelope import decode_response, encode_request
from caa.ttrpc.framing import TYPE_REQUEST, Frame, FrameDecoder, encode_frame
from tests.test_adaptor_process import ROOT, Adaptor

SERVING = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).SerializeToString()
INTERVAL = 0.05
MAX_GAP = 1.0
_tests = itertools.count()


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def running(pid: int) -> bool:
    """Alive and not a zombie (VM processes outlive a killed adaptor; exited is what counts)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


class AgentConnection:
    """One ttrpc connection to an agent socket, blocking (the prober runs in threads, beside the reactor)."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.decoder = FrameDecoder()
        self.next_id = 1
        try:
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise

    def check(self) -> None:
        """grpc.Health/Check; raises unless the answer is SERVING."""
        sid, self.next_id = self.next_id, self.next_id + 2
        request = encode_request("grpc.Health", "Check", health_pb2.CheckRequest().SerializeToString(),
                                 int(self.timeout * 1e9), [])
        self.sock.sendall(encode_frame(sid, TYPE_REQUEST, 0, request))
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed by the adaptor")
            for frame in self.decoder.feed(data):
                if isinstance(frame, Frame) and frame.stream_id == sid:
                    payload = decode_response(frame.data)
                    if payload != SERVING:
                        raise AssertionError(f"not SERVING: {payload!r}")
                    return

    def close(self) -> None:
        self.sock.close()


class Prober(threading.Thread):
    """Every 50 ms: a fresh connection, one Health/Check. `results`: (start, end, error or "")."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.results: list[tuple[float, float, str]] = []
        self.done = threading.Event()

    def call(self) -> None:
        conn = AgentConnection(self.path)
        try:
            conn.check()
        finally:
            conn.close()

    def run(self) -> None:
        due = time.monotonic()
        while not self.done.is_set():
            t0 = time.monotonic()
            error = ""
            try:
                self.call()
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            self.results.append((t0, time.monotonic(), error))
            due += INTERVAL
            self.done.wait(max(0.0, due - time.monotonic()))
            due = max(due, time.monotonic() - INTERVAL)

    def finish(self) -> list[tuple[float, float, str]]:
        self.done.set()
        self.join(30)
        return self.results

    def successes(self) -> int:
        return sum(1 for r in self.results if not r[2])


class Stream(Prober):
    """One connection opened now (on whichever adaptor serves the path), a call over it every 50 ms."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.conn = AgentConnection(path)

    def call(self) -> None:
        self.conn.check()

    def finish(self) -> list[tuple[float, float, str]]:
        results = super().finish()
        self.conn.close()
        return results


class RolloutNode(Adaptor):
    """One node's adaptor installation (socket, pods dir, TLS dir, local provider state) in a worker netns;
    `launch` starts one more adaptor process on it, each with its own log."""

    def __init__(self, test: RolloutTestCase, k: int) -> None:
        super().__init__(test)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.tls_args = []  # auto mTLS
        self.k = k

    def launch(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        e = dict(os.environ, PYTHONPATH=ROOT, **self.env, **env)
        log = open(self.logfile(name), "ab")  # noqa: SIM115 (handed to the child)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.run_adaptor", "-n", "--pidfile=", "caa-adaptor",
             "--socket", self.socket, "--pods-dir", self.pods, "--tls-dir", os.path.join(self.base, "tls"),
             *self.extra_args, *self.tls_args, "--probe-port", "0"],
            stdout=log, stderr=subprocess.STDOUT, env=e, cwd=ROOT)
        log.close()
        self.procs[name] = proc
        self.log = self.logfile(name)  # wait_for shows the tail of the latest one
        return proc

    def logfile(self, name: str) -> str:
        return os.path.join(self.base, f"adaptor-{name}.log")

    def text(self, name: str) -> str:
        with open(self.logfile(name), errors="replace") as f:
            return f.read()

    def ready(self, name: str) -> None:
        proc = self.procs[name]
        self.wait_for(lambda: proc.poll() is None and "journal recovery done" in self.text(name),
                      f"adaptor {name} ready", timeout=90)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def cleanup(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        super().cleanup()


class RolloutTestCase(TestCase):
    timeout = 600

    def setUp(self) -> None:
        from tests import netns_helpers as nh

        nh.need_root(self)
        k = next(_tests) % 10
        tag = f"{os.getpid() % 10000:04d}{k}"
        self.sid = f"ro{tag}x" + "r" * 8  # the VM's name holds the first 8 characters: unique per process and test
        self.worker = nh.make_netns(self, "crw")
        other = nh.make_netns(self, "cro")
        nh.underlay(self, self.worker, other, net="192.168.79.0/24")
        nh.bridge(self.worker, "cbr0", "10.88.0.1/24")
        nh.set_up(self.worker, "lo")
        self.pod = nh.cni_pod(self, self.worker, "cbr0", "10.88.0.5/24", "10.88.0.1")
        self.node = n = RolloutNode(self, k)
        self.addCleanup(self.remove_vms)
        netns_dir = os.path.join(n.base, "netns.d")  # the start-up tunnel sweep sees only this pod
        os.makedirs(netns_dir)
        os.symlink(self.pod.path, os.path.join(netns_dir, "pod"))
        n.netns = self.pod.path
        self.vni_base = 720000 + (os.getpid() % 1000) * 20 + 2 * k
        n.extra_args = ["--tunnel-type", "vxlan", "--netns-dir", netns_dir, "--vxlan-min-id", str(self.vni_base)]
        self.forwarder_port = 15150
        n.env = {"CAA_TEST_NETNS": self.worker.path, "CLOUD_PROVIDER": "local", "LOCAL_BRIDGE": "crl0",
                 "LOCAL_SUBNET": "10.77.0.0/24", "LOCAL_STATE_DIR": os.path.join(n.base, "local"),
                 "FORWARDER_PORT": str(self.forwarder_port), "LOCAL_BOOT_TIMEOUT": "90s", "PROXY_TIMEOUT": "60s"}
        self.probers: list[Prober] = []
        self.addCleanup(self.stop_probers)

    # -- helpers

    def stop_probers(self) -> None:
        for p in self.probers:
            p.finish()

    def prober(self, cls: type[Prober] = Prober) -> Prober:
        p = cls(self.agent_path)
        self.probers.append(p)
        p.start()
        self.node.wait_for(lambda: p.successes() >= 3, f"{cls.__name__} answering")
        return p

    def vm_names(self) -> set[str]:
        return {n for n in netns_names() if n.startswith("podvm-") and self.sid[:8] in n}

    def vm_pids(self) -> list[int]:
        out: list[int] = []
        local = self.node.env["LOCAL_STATE_DIR"]
        for name in os.listdir(local) if os.path.isdir(local) else []:
            try:
                with open(os.path.join(local, name, "instance.json")) as f:
                    out += json.load(f).get("pids", [])
            except (OSError, ValueError):
                pass
        return out

    def remove_vms(self) -> None:
        """Whatever a failed test left of its VMs (never another worker's: the names hold our sandbox id)."""
        for pid in self.vm_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in self.vm_names():
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)

    def start_pod(self, via: str) -> None:
        """CreateVM + StartVM through the adaptor serving the socket (`via` names it, for the record)."""
        n = self.node
        self.agent_path = n.create(self.sid, "web")
        r = n.ctl("start", "--id", self.sid, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr + n.text(via)[-3000:])
        self.assertEqual(self.record()["state"], "running")

    def record(self) -> dict[str, Any]:
        rec = self.node.record(self.sid)
        assert rec is not None
        return rec

    def adopted(self, name: str) -> bool:
        return f"{self.sid}: agent proxy connected" in self.node.text(name)

    def assert_available(self, results: list[tuple[float, float, str]], since: float = 0.0) -> None:
        """No failed call, and no gap over MAX_GAP between answers (or before the first), from `since` on."""
        window = [r for r in results if r[0] >= since]
        self.assertGreater(len(window), 5, "the prober hardly ran")
        failed = [(round(t0 - window[0][0], 3), err) for t0, _t1, err in window if err]
        self.assertEqual(failed, [], f"{len(failed)} of {len(window)} calls failed")
        ends = [t1 for _t0, t1, _err in window]
        gaps = [b - a for a, b in zip([window[0][0], *ends], ends, strict=False)]
        self.assertLessEqual(max(gaps), MAX_GAP, f"longest gap between answers: {max(gaps):.3f}s")
        print(f"\n{len(window)} calls over {ends[-1] - window[0][0]:.1f}s, longest gap {max(gaps):.3f}s")

    def term(self, name: str) -> int:
        proc = self.node.procs[name]
        proc.send_signal(signal.SIGTERM)
        return proc.wait(90)

    def stop_pod_and_assert_clean(self, via: str) -> None:
        """StopVM through `via`, then nothing of the pod may be left; every adaptor process ends."""
        n = self.node
        pids = self.vm_pids()
        self.assertTrue(pids)
        vni = self.record()["vni"]
        r = n.ctl("stop", "--id", self.sid, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr + n.text(via)[-3000:])
        self.assertEqual(self.vm_names(), set(), "VM namespaces left")
        self.assertEqual([p for p in pids if running(p)], [], "VM processes left")
        self.assertFalse(os.path.exists(os.path.join(n.pods, self.sid)), "pod directory left")
        with open(os.path.join(n.pods, "vni.json")) as f:
            vnis = json.load(f)
        self.assertNotIn(str(vni), json.dumps(vnis.get("allocation", vnis)), "VNI left allocated")
        self.assertNotEqual(self.pod.run(["ip", "link", "show", "vxlan1"], check=False).returncode, 0,
                            "vxlan1 left in the pod netns")
        self.assertNotIn("peerpod", self.worker.run(["iptables-save"], check=False).stdout, "NOTRACK rule left")
        self.assertEqual(self.worker.run(["ip", "-o", "link", "show", "type", "vxlan"], check=False).stdout.strip(),
                         "", "VXLAN device left on the node")
        for name in list(n.procs):
            if n.procs[name].poll() is None:
                self.assertIn(self.term(name), (0, -signal.SIGTERM))
        self.assertEqual([name for name, p in n.procs.items() if p.poll() is None], [])
        local = n.env["LOCAL_STATE_DIR"]
        left = [name for name in (os.listdir(local) if os.path.isdir(local) else []) if not name.startswith(".")]
        self.assertEqual(left, [], "local provider state left")


class RollingUpdateTests(RolloutTestCase):
    def test_rollout_keeps_the_agent_answering(self) -> None:
        """start B -> B ready -> SIGTERM A -> A gone -> StopVM through B, probed every 50 ms."""
        n = self.node
        n.launch("a", DRAIN_TIMEOUT="60s")
        n.ready("a")
        self.start_pod("a")
        instance = self.record()["instance_id"]
        prober = self.prober()
        stream = self.prober(Stream)  # opened on A
        n.launch("b")
        n.ready("b")
        n.wait_for(lambda: self.adopted("b"), "B re-adopted the sandbox")
        self.assertIn("handed over sandboxes", n.text("a"))
        self.assertIn("handed over 1 sandboxes", n.text("b"))
        self.assertEqual(self.record()["instance_id"], instance)  # the same VM, not a new one
        n.procs["a"].send_signal(signal.SIGTERM)
        # A drains: the connection opened on it keeps relaying, A keeps running while it is open
        relayed = stream.successes()
        n.wait_for(lambda: stream.successes() >= relayed + 20, "the stream relayed through A's drain")
        self.assertIsNone(n.procs["a"].poll())
        stream_results = stream.finish()  # the client closes its connection: A's drain is over
        self.assertIn(n.procs["a"].wait(60), (0, -signal.SIGTERM))
        results = prober.finish()
        self.assert_available(results)
        self.assert_available(stream_results)
        a_log = n.text("a")
        self.assertNotIn("drain deadline passed", a_log)
        self.assertIn("belongs to a newer adaptor now: left in place", a_log)
        self.assertEqual(self.node.ctl("version").returncode, 0)  # B's hypervisor socket is in place
        # only B acted on the sandbox after the hand-over: A never stopped, swept or re-adopted it
        after = a_log.split("handed over sandboxes", 1)[1]
        for act in ("stopped", "deleted instance", "recovery:", "agent proxy connected"):
            self.assertNotIn(f"{self.sid}: {act}", after)
        self.stop_pod_and_assert_clean("b")

    def test_old_killed_during_surge(self) -> None:
        n = self.node
        n.launch("a")
        n.ready("a")
        self.start_pod("a")
        prober = self.prober()
        n.launch("b")
        n.kill("a")  # while B starts: whether or not B got its hand-over, B takes over
        n.ready("b")
        n.wait_for(lambda: self.adopted("b"), "B re-adopted the sandbox")
        adopted_at = time.monotonic()
        n.wait_for(lambda: sum(1 for r in prober.results if r[0] > adopted_at) >= 20, "probes after adoption")
        results = prober.finish()
        self.assert_available(results, since=adopted_at)
        self.stop_pod_and_assert_clean("b")

    def test_new_killed_during_surge_and_restarted(self) -> None:
        n = self.node
        n.launch("a", DRAIN_TIMEOUT="60s")
        n.ready("a")
        self.start_pod("a")
        prober = self.prober()
        stream = self.prober(Stream)  # on A
        n.launch("b")
        n.ready("b")
        n.wait_for(lambda: self.adopted("b"), "B re-adopted the sandbox")
        n.kill("b")
        # A stays passive and keeps relaying what it has
        relayed = stream.successes()
        n.wait_for(lambda: stream.successes() >= relayed + 20, "the stream still relays through A")
        self.assertIn("this adaptor is passive now", n.text("a"))
        n.launch("b2")  # the DaemonSet restarts it
        n.ready("b2")
        n.wait_for(lambda: self.adopted("b2"), "B2 re-adopted the sandbox")
        self.assertIn("no hand-over from an adaptor", n.text("b2"))  # B's socket: nobody answers
        adopted_at = time.monotonic()
        n.procs["a"].send_signal(signal.SIGTERM)
        n.wait_for(lambda: sum(1 for r in prober.results if r[0] > adopted_at) >= 20, "probes after adoption")
        stream_results = stream.finish()
        self.assertIn(n.procs["a"].wait(60), (0, -signal.SIGTERM))
        self.assert_available(stream_results)
        self.assert_available(prober.finish(), since=adopted_at)
        self.stop_pod_and_assert_clean("b2")

    def test_start_in_flight_on_the_old_one(self) -> None:
        """A's StartVM is inside the provider's create (the VM exists, the create has not returned) when B asks
        for the hand-over: B waits for it, A stops after the create without rolling back, B rolls it back."""
        n = self.node
        n.launch("a")
        n.ready("a")
        self.agent_path = n.create(self.sid, "web")
        # the provider's create waits for the VM's forwarder to answer: hold that answer back
        block = ["OUTPUT", "-p", "tcp", "--dport", str(self.forwarder_port), "-j", "REJECT", "--reject-with",
                 "tcp-reset"]
        self.worker.run(["iptables", "-I", *block])
        starting = n.ctl_bg("start", "--id", self.sid)
        n.wait_for(lambda: bool(self.vm_names()) and (n.record(self.sid) or {}).get("state") == "create-intent",
                   "A's create under way, its VM exists")
        hypervisor = os.stat(n.socket)
        n.launch("b")
        n.wait_for(lambda: "handing over 1 sandboxes" in n.text("a"), "A asked to hand over")
        time.sleep(1.0)  # B must wait for A's create: meanwhile B neither takes the path nor reads the journal
        self.assertEqual(os.stat(n.socket).st_ino, hypervisor.st_ino)
        self.assertNotIn("journal recovery", n.text("b"))
        self.worker.run(["iptables", "-D", *block])
        out, err = starting.communicate(timeout=120)
        self.assertEqual(starting.returncode, 1, out + err)
        self.assertIn("UNAVAILABLE", err)
        self.assertIn("interrupted by a rolling update", err)
        n.ready("b")
        n.wait_for(lambda: (n.record(self.sid) or {}).get("state") == "created", "B rolled the start back")
        self.assertEqual(self.vm_names(), set())  # the VM A made is deleted
        self.assertIn("StartVM stopped at tunnel-intent", n.text("a"))
        self.assertIn(self.term("a"), (0, -signal.SIGTERM))
        r = n.ctl("start", "--id", self.sid, timeout=120)  # the shim's retry, through B
        self.assertEqual(r.returncode, 0, r.stderr + n.text("b")[-3000:])
        prober = self.prober()
        n.wait_for(lambda: prober.successes() >= 20, "the agent answers through B")
        self.assert_available(prober.finish())
        self.stop_pod_and_assert_clean("b")

    def test_two_rollouts_back_to_back(self) -> None:
        """A -> B -> C with the prober across both; a connection left open on A is closed at its drain deadline."""
        n = self.node
        n.launch("a", DRAIN_TIMEOUT="2s")
        n.ready("a")
        self.start_pod("a")
        prober = self.prober()
        idle = AgentConnection(self.agent_path)  # a shim connection that never closes by itself
        self.addCleanup(idle.close)
        idle.check()
        for old, new in (("a", "b"), ("b", "c")):
            n.launch(new, DRAIN_TIMEOUT="2s")
            n.ready(new)
            n.wait_for(lambda new=new: self.adopted(new), f"{new} re-adopted the sandbox")  # type: ignore[misc]
            self.assertIn(self.term(old), (0, -signal.SIGTERM))
        self.assertIn("drain deadline passed: closing 1 shim connections", n.text("a"))
        idle.sock.settimeout(5)
        try:
            closed = idle.sock.recv(1)
        except ConnectionResetError:
            closed = b""
        self.assertEqual(closed, b"")  # closed by A at the deadline
        self.assert_available(prober.finish())
        self.assertEqual(len([line for line in n.text("c").splitlines() if "handed over 1 sandboxes" in line]), 1)
        self.stop_pod_and_assert_clean("c")

