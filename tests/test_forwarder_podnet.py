"""caa-forwarder with the real pod network (caa.network.podvm) in test namespaces (root).

A "VM" netns (underlay to a "worker" netns, default route = primary interface) and an empty pod netns, like
netns@podns: starting the forwarder builds the VXLAN pod interface in the pod netns before it listens, stopping
it removes the interface and the NOTRACK rules again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import cast

from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from caa.forwarder import tap
from caa.forwarder.daemon import ForwarderService
from caa.reactors import as_node_reactor
from tests import netns_helpers as nh

reactor = as_node_reactor(_reactor)


class PodNetworkTests(TestCase):
    timeout = 60

    async def test_setup_before_listen_and_teardown_on_stop(self) -> None:
        nh.need_root(self)
        worker = nh.make_netns(self, "fw")
        vm = nh.make_netns(self, "fv")
        pod = nh.make_netns(self, "fp")
        nh.set_up(pod, "lo")
        nh.underlay(self, worker, vm, net="192.168.91.0/24")
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        apf = {
            "pod-network": {
                "podip": "10.244.7.21/24", "pod-hw-addr": "32:b9:59:6b:f0:d5", "interface": "eth0",
                "worker-node-ip": "192.168.91.1/24", "tunnel-type": "vxlan", "mtu": 1500,
                "vxlan-port": 4789, "vxlan-id": 555000 + os.getpid() % 10000,
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.7.1", "dev": "eth0"},
                           {"dst": "10.244.7.0/24", "gw": "", "dev": "eth0", "protocol": "kernel",
                            "scope": "link"}],
            },
            "pod-namespace": "default", "pod-name": "p",
        }
        with open(os.path.join(d, "apf.json"), "w") as f:
            json.dump(apf, f)
        options = tap.Options()
        options.parseOptions(["--config", os.path.join(d, "apf.json"), "--disable-tls",
                              "--listen", "127.0.0.1:0", "--kata-agent-socket", os.path.join(d, "agent.sock"),
                              "--pod-netns", pod.path, "--host-netns", vm.name])
        # no systemd notifications from a test, even when trial itself runs under systemd
        saved = os.environ.pop("NOTIFY_SOCKET", None)
        if saved is not None:
            self.addCleanup(os.environ.__setitem__, "NOTIFY_SOCKET", saved)
        svc = cast(ForwarderService, tap.makeService(options))
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        await svc.when_ready()
        with pod.ipr() as ipr:
            link = ipr.get_links(ifname="eth0")[0]
            self.assertEqual(link.get_attr("IFLA_ADDRESS"), "32:b9:59:6b:f0:d5")
            self.assertEqual(link.get_attr("IFLA_MTU"), 1450)  # capped
            addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=link["index"])]
            self.assertIn("10.244.7.21", addrs)
            gws = [r.get_attr("RTA_GATEWAY") for r in ipr.get_routes(family=2) if r["dst_len"] == 0]
            self.assertEqual(gws, ["10.244.7.1"])
        raw = vm.run(["iptables", "-t", "raw", "-S"]).stdout
        self.assertIn("NOTRACK", raw)
        await svc.stopService()
        with pod.ipr() as ipr:
            self.assertEqual(list(ipr.get_links(ifname="eth0")), [])
        self.assertNotIn("NOTRACK", vm.run(["iptables", "-t", "raw", "-S"]).stdout)
