"""Network namespaces of the tests that run a real adaptor with the local provider and VXLAN: a pod's
namespace wired as a CNI plugin would, and the local provider's VM namespaces and their processes."""

from __future__ import annotations

import os
import signal
import subprocess


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def netns_pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def running(pid: int) -> bool:
    """Alive and not a zombie (the VM's processes outlived the killed adaptor, so whoever inherited them
    reaps them, maybe never: exited is what counts)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


def remove_vm_namespaces(sid8: str, before: set[str]) -> None:
    """Kill the processes of, and delete, every local-provider VM namespace (`podvm-*`) made since `before`
    whose name holds the sandbox id prefix `sid8` (never another test's)."""
    for name in netns_names() - before:
        if name.startswith("podvm-") and sid8 in name:
            for pid in netns_pids(name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)



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
