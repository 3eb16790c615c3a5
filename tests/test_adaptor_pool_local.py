"""Warm pools with real processes: `twistd caa-adaptor --pool-size 1` with the local provider (pool VMs are
namespaces running caa-process-user-data on the bootstrap user data, the unclaimed forwarder and the development
agent), the real VXLAN tunnel into a CNI-like pod namespace and mutual TLS with the auto CA (the rolling-update
test's node, tests/test_adaptor_rollout.py).

A StartVM with a ready pool VM claims it (the forwarder sets up the pod network and switches to the pod's
certificate) and the pod's agent answers through it; the pool refills; an idle pool VM is recycled at its TTL;
StopVM deletes the claimed VM (it never returns to the pool). No timing is asserted: speed is bench/pool_bench.py.
"""

from __future__ import annotations

import os
import signal
import subprocess

from tests.test_adaptor_rollout import AgentConnection, RolloutTestCase, netns_names

POOL_PREFIX = "podvm-pool-"


class PoolLocalTests(RolloutTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.addCleanup(self.remove_pool_vms)

    def pool_vms(self) -> set[str]:
        """This test's pool VMs: the local provider's state directory is the test's own."""
        local = self.node.env["LOCAL_STATE_DIR"]
        names = os.listdir(local) if os.path.isdir(local) else []
        return {n for n in names if n.startswith(POOL_PREFIX)}

    def remove_pool_vms(self) -> None:
        for pid in self.vm_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        live = netns_names()
        for name in self.pool_vms():
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
