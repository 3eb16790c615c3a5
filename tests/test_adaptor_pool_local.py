"""Warm pools with real processes: `twistd caa-adaptor --pool-size 1` with the local provider (pool VMs are
namespaces running caa-process-user-data on the bootstrap user data, the unclaimed forwarder and the development
agent), the real VXLAN tunnel into a CNI-like pod namespace and mutual TLS with the auto CA (the rolling-update
test's node, tests/test_adaptor_rollout.py).

A StartVM with a ready pool VM claims it (the forwarder sets up the pod network and switches to the pod's
certificate) and the pod's agent answers through it; the pool refills; an idle pool VM is recycled at its TTL;
StopVM deletes the claimed VM (it never returns to the pool). No timing is asserted: speed is bench/pool_bench.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import threading
from typing import Any

from caa.proto import hypervisor_pb2
from caa.ttrpc.envelope import decode_response, encode_request
from caa.ttrpc.framing import TYPE_REQUEST, Frame, FrameDecoder, encode_frame
from tests import netns_helpers as nh
from tests.test_adaptor_rollout import AgentConnection, RolloutTestCase, netns_names, running

POOL_PREFIX = "podvm-pool-"

#: Stands for iptables on the adaptor's PATH (test_kill_between_claim_and_tunnel): while the gate file exists, a
#: call from the worker node's netns (the tunnel's NOTRACK rule, the first step of the tunnel) waits, after writing
#: its pid next to the gate; every other call (the pool VMs' forwarders) runs the real binary at once.
IPTABLES_GATE = """#!/bin/sh
if [ -e "$CAA_TEST_GATE" ] && [ "$(readlink /proc/self/ns/net)" = "$CAA_TEST_GATE_NETNS" ]; then
    echo $$ > "$CAA_TEST_GATE.held"
    while [ -e "$CAA_TEST_GATE" ]; do sleep 0.05; done
fi
exec {real} "$@"
"""


def hypervisor_call(path: str, method: str, request: Any, timeout: float = 300.0) -> None:
    """One hypervisor.Hypervisor call over a fresh connection to the adaptor's socket, as the shim makes it
    (blocking: the concurrent StartVMs run in threads); raises the TTRPCError of a failed call."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        data = encode_request("hypervisor.Hypervisor", method, request.SerializeToString(), int(timeout * 1e9), [])
        sock.sendall(encode_frame(1, TYPE_REQUEST, 0, data))
        decoder = FrameDecoder()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{method}: connection closed by the adaptor")
            for frame in decoder.feed(chunk):
                if isinstance(frame, Frame) and frame.stream_id == 1:
                    decode_response(frame.data)
                    return
    finally:
        sock.close()


class PoolLocalTests(RolloutTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.addCleanup(self.remove_pool_vms)

    def pool_vms(self) -> set[str]:
        """This test's pool VMs: the local provider's state directory is the test's own."""
        local = self.node.env["LOCAL_STATE_DIR"]
        names = os.listdir(local) if os.path.isdir(local) else []
        return {n for n in names if n.startswith(POOL_PREFIX)}

    def local_vms(self) -> set[str]:
        """Every instance of this test's local provider (pool and cold)."""
        local = self.node.env["LOCAL_STATE_DIR"]
        names = os.listdir(local) if os.path.isdir(local) else []
        return {n for n in names if n.startswith("podvm-")}

    def remove_pool_vms(self) -> None:
        for pid in self.vm_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        live = netns_names()
        for name in self.local_vms():
            for ns in (name, f"{name}-pod"):
                if ns in live:
                    subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

    def ready_count(self) -> int:
        return self.node.text("a").count("ready (")

    def test_hit_serves_the_pod_refills_recycles_and_stop_deletes(self) -> None:
        n = self.node
        n.launch("a", POOL_SIZE="1", POOL_TTL="40s")
        n.ready("a")
        n.wait_for(lambda: self.ready_count() >= 1, "a ready pool VM", timeout=120)
        (pooled,) = self.pool_vms()
        self.start_pod("a")
        rec = self.record()
        # a hit: the pool VM, not a fresh podvm-web-...
        self.assertEqual(rec["instance_name"], pooled, n.text("a")[-6000:])
        self.assertEqual(rec["server_name"], pooled)
        self.assertIn(f"claimed pool VM {pooled}", n.text("a"))
        conn = AgentConnection(self.agent_path)
        try:
            conn.check()  # shim -> adaptor proxy -> mTLS with the pod's certificate -> forwarder -> agent
        finally:
            conn.close()
        # refilled with a new VM; the claimed one is the pod's now
        n.wait_for(lambda: self.ready_count() >= 2, "the pool refilled", timeout=120)
        refill = self.pool_vms() - {pooled}
        self.assertEqual(len(refill), 1)
        # idle past its TTL: deleted and replaced
        n.wait_for(lambda: "idle for its TTL" in n.text("a"), "TTL recycling", timeout=120)
        n.wait_for(lambda: not (refill & self.pool_vms()), "the idle VM deleted", timeout=60)
        # StopVM deletes the claimed VM
        r = n.ctl("stop", "--id", self.sid, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr + n.text("a")[-3000:])
        self.assertNotIn(pooled, self.pool_vms())
        self.assertNotIn(pooled, netns_names())
        self.assertFalse(os.path.exists(os.path.join(n.pods, self.sid)))
        self.assertIn(self.term("a"), (0, -signal.SIGTERM))

    def pool_journal(self) -> dict[str, dict[str, Any]]:
        """The pool journal (`<pods-dir>/../pool`): pool id -> entry."""
        out: dict[str, dict[str, Any]] = {}
        directory = os.path.join(self.node.base, "pool")
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            try:
                with open(os.path.join(directory, name)) as f:
                    entry = json.load(f)
            except (OSError, ValueError):
                continue
            out[entry["pool_id"]] = entry
        return out

    def ready_pool_vms(self) -> set[str]:
        return {e["name"] for e in self.pool_journal().values() if e["state"] == "ready"}

    def test_twenty_concurrent_starts_against_a_pool_of_five(self) -> None:
        """5 hits and 15 cold starts, every pod answering through its own agent socket; StopVM deletes all 20."""
        n = self.node
        pods = [self.pod] + [nh.cni_pod(self, self.worker, "cbr0", f"10.88.0.{10 + i}/24", "10.88.0.1")
                             for i in range(19)]
        n.launch("a", POOL_SIZE="5", POOL_TTL="1h")
        n.ready("a")
        n.wait_for(lambda: len(self.ready_pool_vms()) == 5, "5 ready pool VMs", timeout=300)
        pooled = self.ready_pool_vms()
        tag = self.sid[2:7]
        sids = [f"p{tag}{i:02d}" + "s" * 16 for i in range(20)]
        self.addCleanup(self.remove_cold_vms, sids)
        paths = {}
        for sid, pod in zip(sids, pods, strict=True):
            r = n.ctl("create", "--id", sid, "--pod", f"web{sid[6:8]}", "--namespace", "default", "--netns",
                      pod.path)
            self.assertEqual(r.returncode, 0, r.stderr)
            paths[sid] = r.stdout.strip()
        errors: dict[str, str] = {}

        def start(sid: str) -> None:
            try:
                hypervisor_call(n.socket, "StartVM", hypervisor_pb2.StartVMRequest(id=sid))
            except Exception as e:
                errors[sid] = f"{type(e).__name__}: {e}"

        threads = [threading.Thread(target=start, args=(sid,)) for sid in sids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        self.assertEqual(errors, {}, n.text("a")[-4000:])
        records = {sid: n.record(sid) or {} for sid in sids}
        self.assertEqual({r.get("state") for r in records.values()}, {"running"})
        names = {sid: r["instance_name"] for sid, r in records.items()}
        hits = {sid for sid, name in names.items() if name in pooled}
        self.assertEqual(len(hits), 5, names)
        self.assertEqual({names[sid] for sid in hits}, pooled)  # each pool VM served exactly one pod
        self.assertEqual(n.text("a").count("claimed pool VM"), 5)
        for sid in set(sids) - hits:  # cold: a fresh VM named for the pod
            self.assertEqual(names[sid], f"podvm-web{sid[6:8]}-{sid[:8]}")
        for sid in sids:
            conn = AgentConnection(paths[sid])
            try:
                conn.check()  # reachable: shim -> proxy -> the pod's own VM -> its agent
            finally:
                conn.close()
        pids = self.vm_pids()
        for sid in sids:
            r = n.ctl("stop", "--id", sid, timeout=120)
            self.assertEqual(r.returncode, 0, r.stderr + n.text("a")[-3000:])
        live = self.local_vms()
        self.assertEqual(set(names.values()) & live, set(), "pod VMs left after StopVM")
        self.assertEqual(set(names.values()) & netns_names(), set(), "pod VM namespaces left")
        self.assertEqual(live, self.ready_pool_vms() | {e["name"] for e in self.pool_journal().values()})
        self.assertEqual([os.path.exists(os.path.join(n.pods, sid)) for sid in sids], [False] * 20)
        self.assertIn(self.term("a"), (0, -signal.SIGTERM))
        self.assertTrue(pids)

    @staticmethod
    def resume(pid: int) -> None:
        if running(pid):
            os.kill(pid, signal.SIGCONT)

    def remove_cold_vms(self, sids: list[str]) -> None:
        live = netns_names()
        for sid in sids:
            for name in live:
                if name.startswith("podvm-") and sid[:8] in name:
                    subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)

    def iptables_gate(self) -> str:
        """An iptables on the adaptor's PATH that holds the tunnel's first iptables call (see IPTABLES_GATE)."""
        bindir = os.path.join(self.node.base, "gate-bin")
        os.makedirs(bindir)
        real = subprocess.run(["sh", "-c", "command -v iptables"], capture_output=True, text=True,
                              check=True).stdout.strip()
        wrapper = os.path.join(bindir, "iptables")
        with open(wrapper, "w") as f:
            f.write(IPTABLES_GATE.format(real=real))
        os.chmod(wrapper, stat.S_IRWXU)
        gate = os.path.join(self.node.base, "tunnel.gate")
        worker_ns = self.worker.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        self.node.env = {**self.node.env, "PATH": f"{bindir}:{os.environ['PATH']}", "CAA_TEST_GATE": gate,
                         "CAA_TEST_GATE_NETNS": worker_ns}
        return gate

    def test_kill_between_claim_and_tunnel(self) -> None:
        """SIGKILL while StartVM has claimed a pool VM and not built the tunnel: the restarted adaptor deletes
        that VM (the sandbox's rollback), never hands it out again, and the pool refills with a new VM."""
        n = self.node
        gate = self.iptables_gate()
        n.launch("a", POOL_SIZE="1", POOL_TTL="1h")
        n.ready("a")
        n.wait_for(lambda: len(self.ready_pool_vms()) == 1, "a ready pool VM", timeout=120)
        (claimed,) = self.ready_pool_vms()
        open(gate, "w").close()
        self.agent_path = n.create(self.sid, "web")
        starting = n.ctl_bg("start", "--id", self.sid)
        self.addCleanup(starting.kill)
        n.wait_for(lambda: os.path.exists(gate + ".held"), "the tunnel's first iptables call held", timeout=120)
        # the state we kill in: the VM is claimed (its forwarder has the pod's configuration), the sandbox
        # journals it with the tunnel announced, and no tunnel exists yet
        rec = self.record()
        self.assertEqual((rec["state"], rec["instance_name"]), ("tunnel-intent", claimed))
        with open(os.path.join(n.env["LOCAL_STATE_DIR"], claimed, "forwarder.log")) as f:
            self.assertIn(f"pool VM {claimed} claimed for pod default/web", f.read())
        self.assertNotIn(claimed, {e["name"] for e in self.pool_journal().values()})
        n.kill("a")
        with open(gate + ".held") as f:
            os.kill(int(f.read()), signal.SIGKILL)  # the held iptables child: it must never add its rule
        os.unlink(gate)
        starting.wait(60)
        self.assertNotEqual(starting.returncode, 0)
        n.launch("b", POOL_SIZE="1", POOL_TTL="1h")
        n.ready("b")
        n.wait_for(lambda: (n.record(self.sid) or {}).get("state") == "created", "the start rolled back")
        self.assertNotIn(claimed, self.local_vms())  # deleted, by the sandbox's rollback
        self.assertNotIn(claimed, netns_names())
        n.wait_for(lambda: len(self.ready_pool_vms()) == 1, "the pool refilled", timeout=120)
        (fresh,) = self.ready_pool_vms()
        self.assertNotEqual(fresh, claimed)
        # the shim's retry: a hit on the new pool VM; the killed one is never handed out again
        r = n.ctl("start", "--id", self.sid, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr + n.text("b")[-3000:])
        self.assertEqual(self.record()["instance_name"], fresh)
        self.assertNotIn(f"claimed pool VM {claimed}", n.text("b"))
        conn = AgentConnection(self.agent_path)
        try:
            conn.check()
        finally:
            conn.close()
        r = n.ctl("stop", "--id", self.sid, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertNotIn(fresh, self.local_vms())
        self.assertEqual(self.local_vms(), self.ready_pool_vms() | {e["name"] for e in self.pool_journal().values()})
        self.assertIn(self.term("b"), (0, -signal.SIGTERM))

    def test_idle_pool_vms_are_recycled_at_their_ttl(self) -> None:
        n = self.node
        n.launch("a", POOL_SIZE="2", POOL_TTL="20s")
        n.ready("a")
        n.wait_for(lambda: len(self.ready_pool_vms()) == 2, "2 ready pool VMs", timeout=180)
        first = self.ready_pool_vms()
        first_pids = self.vm_pids()
        n.wait_for(lambda: not (first & self.local_vms()), "the first VMs deleted at their TTL", timeout=180)
        n.wait_for(lambda: len(self.ready_pool_vms()) == 2, "2 new ready pool VMs", timeout=180)
        second = self.ready_pool_vms()
        self.assertEqual(first & second, set())
        self.assertEqual(first & netns_names(), set())
        self.assertEqual([p for p in first_pids if running(p) and p not in self.vm_pids()], [])
        for name in first:
            self.assertIn(f"pool VM {name} idle for its TTL", n.text("a"))
        self.assertIn(self.term("a"), (0, -signal.SIGTERM))

    def test_pools_off_deletes_the_journalled_pool_vms(self) -> None:
        """Ready pool VMs outlive the adaptor; restarted without pools, it deletes every one of them."""
        n = self.node
        n.launch("a", POOL_SIZE="2", POOL_TTL="1h")
        n.ready("a")
        n.wait_for(lambda: len(self.ready_pool_vms()) == 2, "2 ready pool VMs", timeout=180)
        pooled = self.ready_pool_vms()
        self.assertIn(self.term("a"), (0, -signal.SIGTERM))
        self.assertEqual(self.local_vms(), pooled)  # kept (journalled) for the next adaptor
        n.launch("b")  # --pool-size 0
        n.ready("b")
        n.wait_for(lambda: not self.local_vms(), "the pool VMs deleted", timeout=120)
        n.wait_for(lambda: not self.pool_journal(), "the pool journal emptied")
        self.assertEqual(pooled & netns_names(), set())
        for name in pooled:
            self.assertIn(f"pool VM {name} is of a pool no longer configured", n.text("b"))
        self.assertIn(self.term("b"), (0, -signal.SIGTERM))

    def test_kill_while_the_claim_is_in_flight(self) -> None:
        """SIGKILL while the claim waits for the pool VM (its forwarder paused with SIGSTOP once the sandbox
        journals the VM): the restarted adaptor deletes that VM and never hands it out again."""
        n = self.node
        n.launch("a", POOL_SIZE="1", POOL_TTL="1h")
        n.ready("a")
        n.wait_for(lambda: len(self.ready_pool_vms()) == 1, "a ready pool VM", timeout=120)
        (claimed,) = self.ready_pool_vms()
        with open(os.path.join(n.env["LOCAL_STATE_DIR"], claimed, "instance.json")) as f:
            agent_pid, forwarder_pid = json.load(f)["pids"]
        os.kill(forwarder_pid, signal.SIGSTOP)  # the claim's TLS handshake gets no answer
        self.addCleanup(self.resume, forwarder_pid)
        self.agent_path = n.create(self.sid, "web")
        starting = n.ctl_bg("start", "--id", self.sid)
        self.addCleanup(starting.kill)
        n.wait_for(lambda: (n.record(self.sid) or {}).get("instance_name") == claimed, "the sandbox journals the VM")
        self.assertEqual(self.record()["state"], "create-intent")
        # handed over: the pool's journal no longer has it (only the refill it started)
        self.assertNotIn(claimed, {e["name"] for e in self.pool_journal().values()})
        n.kill("a")
        os.kill(forwarder_pid, signal.SIGCONT)
        starting.wait(60)
        n.launch("b", POOL_SIZE="1", POOL_TTL="1h")
        n.ready("b")
        n.wait_for(lambda: (n.record(self.sid) or {}).get("state") == "created", "the start rolled back")
        self.assertNotIn(claimed, self.local_vms())
        self.assertFalse(running(forwarder_pid) or running(agent_pid))
        n.wait_for(lambda: len(self.ready_pool_vms()) == 1, "the pool refilled", timeout=120)
        (fresh,) = self.ready_pool_vms()
        r = n.ctl("start", "--id", self.sid, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr + n.text("b")[-3000:])
        self.assertEqual(self.record()["instance_name"], fresh)
        self.assertNotEqual(fresh, claimed)
        r = n.ctl("stop", "--id", self.sid, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(self.term("b"), (0, -signal.SIGTERM))
