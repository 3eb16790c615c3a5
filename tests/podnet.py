"""A pod's network namespace as a CNI plugin wires it on a node, for tests that run a real adaptor with VXLAN:
the namespace with an `eth0` veth whose host end joins a bridge holding the gateway, and a default route."""

from __future__ import annotations

import subprocess


def wire_pod_netns(netns: str, bridge: str, prefix: str) -> str:
    """Create netns `netns` on a new `bridge` with addresses `<prefix>.1` (bridge) and `<prefix>.2` (eth0) of
    a /24; returns the namespace's path. The caller deletes the namespace and the bridge."""
    peer = f"{netns}h"
    for cmd in (["link", "add", bridge, "type", "bridge"], ["addr", "add", f"{prefix}.1/24", "dev", bridge],
                ["link", "set", bridge, "up"], ["netns", "add", netns],
                ["link", "add", "name", "eth0", "netns", netns, "type", "veth", "peer", "name", peer],
                ["link", "set", peer, "master", bridge, "up"],
                ["-n", netns, "addr", "add", f"{prefix}.2/24", "dev", "eth0"],
                ["-n", netns, "link", "set", "eth0", "up"], ["-n", netns, "link", "set", "lo", "up"],
                ["-n", netns, "route", "add", "default", "via", f"{prefix}.1"]):
        subprocess.run(["ip", *cmd], check=True, capture_output=True)
    return f"/var/run/netns/{netns}"
