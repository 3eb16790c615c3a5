"""
Provider benchmark: time from `create_instance` to a running instance with an IP, and `delete_instance`,
for the local provider (netns + process-user-data + development agent + caa-forwarder, ready when the
forwarder accepts TCP) and the libvirt provider (QEMU under TCG, tiny image of tests/vmimage.py, ready when
the DHCP lease is seen; also: until the guest serves its cidata over HTTP). Sequential runs; p50/min/max.

Run as root: `.venv/bin/python bench/provider_bench.py [--runs 10] [--only local|libvirt]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task, threads  # noqa: E402

from caa.providers.interfaces import InstanceSpec  # noqa: E402
from caa.reactors import INodeReactor

APF_USER_DATA = b"#cloud-config\nwrite_files:\n  - path: /run/peerpod/apf.json\n    content: |\n      {}\n"


def summary(label: str, values: list[float]) -> str:
    return (f"{label}: p50 {statistics.median(values):.2f} s, min {min(values):.2f} s, max {max(values):.2f} s "
            f"(n={len(values)})")


async def bench_local(reactor: INodeReactor, runs: int) -> list[str]:
    from caa.providers.local import LocalConfig, LocalProvider

    state = tempfile.mkdtemp(prefix="caa-bench-local-")
    bridge = f"clbench{os.getpid() % 10000}"
    config = LocalConfig(bridge=bridge, subnet="10.124.7.0/24", state_dir=state, forwarder_args="--disable-tls")
    provider = LocalProvider(reactor, config)
    creates, deletes = [], []
    try:
        await provider.verify_config()
        for i in range(runs):
            sid = uuid.uuid4().hex * 2
            start = time.monotonic()
            instance = await provider.create_instance(f"bench-{i}", sid, APF_USER_DATA, InstanceSpec())
            creates.append(time.monotonic() - start)
            start = time.monotonic()
            await provider.delete_instance(instance.id)
            deletes.append(time.monotonic() - start)
    finally:
        subprocess.run(["ip", "link", "del", bridge], check=False)
        shutil.rmtree(state, ignore_errors=True)
    return [summary("local: create -> serving with IP", creates), summary("local: delete", deletes)]


async def bench_libvirt(reactor: INodeReactor, runs: int) -> list[str]:
    import libvirt

    from caa.providers.libvirt.config import LibvirtConfig
    from caa.providers.libvirt.provider import LibvirtProvider
    from tests.libvirt_helpers import ensure_network
    from tests.vmimage import build_image

    network = (await threads.deferToThread(ensure_network)).name
    image = await threads.deferToThread(build_image)
    pool_dir = tempfile.mkdtemp(prefix="caa-bench-pool-")
    shutil.copy(image, os.path.join(pool_dir, "base.qcow2"))
    conn = libvirt.open("qemu:///system")
    pool_name = f"caa-bench-{os.getpid()}"
    pool = conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{pool_name}</name><target><path>{pool_dir}</path></target></pool>", 0)
    config = LibvirtConfig(uri="qemu:///system", pool_name=pool_name, network_name=network, vol_name="base.qcow2",
                           firmware="", domain_type="qemu", cpu=1, memory=256, root_disk_size=1, ip_timeout=120)
    provider = LibvirtProvider(reactor, config)
    creates, serving, deletes = [], [], []

    def wait_http(ip: str, start: float) -> float:
        while True:
            try:
                with urllib.request.urlopen(f"http://{ip}:15150/user-data", timeout=1) as r:
                    r.read()
                return time.monotonic() - start
            except OSError:
                time.sleep(0.05)

    try:
        await provider.verify_config()
        for i in range(runs):
            sid = uuid.uuid4().hex * 2
            start = time.monotonic()
            instance = await provider.create_instance(f"bench-{i}", sid, b"#cloud-config\n", InstanceSpec())
            creates.append(time.monotonic() - start)
            serving.append(await threads.deferToThread(wait_http, instance.ips[0], start))
            start = time.monotonic()
            await provider.delete_instance(instance.id)
            deletes.append(time.monotonic() - start)
        await provider.teardown()
    finally:
        for volume in pool.listAllVolumes():
            volume.delete(0)
        pool.destroy()
        conn.close()
        shutil.rmtree(pool_dir, ignore_errors=True)
    return [
        summary("libvirt (TCG): create -> running with DHCP IP", creates),
        summary("libvirt (TCG): create -> guest serves its cidata over HTTP", serving),
        summary("libvirt (TCG): delete", deletes),
    ]


async def main(reactor: INodeReactor, args: argparse.Namespace) -> None:
    lines = []
    if args.only in (None, "local"):
        lines += await bench_local(reactor, args.runs)
    if args.only in (None, "libvirt"):
        lines += await bench_libvirt(reactor, args.runs)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for line in lines:
        print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--only", choices=["local", "libvirt"])
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, arguments)))
