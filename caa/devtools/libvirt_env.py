"""Prepare this machine for the libvirt provider: what `make demo-vm` and bench/podstart_bench.py need.

Idempotent, for a fresh machine as root without systemd: start virtlogd and libvirtd unless ``qemu:///system``
answers, define/start a NAT network with DHCP (`caa-demo`, 192.168.151.0/24) and a dir storage pool
(`caa-demo-pool` at /var/lib/caa-demo-pool), build the pod VM image with podvm/build.sh (or reuse its cached
build) and upload its BIOS-bootable disk as the pool's base volume (copied again only when the build changes).
Everything blocks: call it from a CLI or a thread, never from the reactor thread.

    python -m caa.devtools.libvirt_env        # prepare, print the adaptor's libvirt flags
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import attrs

URI = "qemu:///system"
NETWORK = "caa-demo"
BRIDGE = "virbr-caademo"
GATEWAY = "192.168.151.1"
POOL = "caa-demo-pool"
POOL_DIR = Path("/var/lib/caa-demo-pool")
BASE_VOLUME = "podvm-base.qcow2"
_SOURCE_MARK = ".source"  # <pool dir>.source (outside the pool): the build the base volume was copied from
REPO = Path(__file__).resolve().parent.parent.parent
BUILD_SCRIPT = REPO / "podvm" / "build.sh"


@attrs.frozen
class LibvirtEnv:
    """What the adaptor needs to use the prepared environment."""

    uri: str
    network: str
    pool: str
    volume: str
    image_dir: Path
    image_seconds: float  # what building (or checking the cache of) the image took

    def open(self) -> Any:
        """A libvirt connection to `uri` (close it)."""
        return _open()

    def adaptor_args(self, *, cpu: int = 1, memory_mib: int = 1024) -> list[str]:
        """`twistd caa-adaptor --provider libvirt` flags for this environment (BIOS boot, TCG, no KVM here)."""
        return ["--uri", self.uri, "--pool-name", self.pool, "--network-name", self.network,
                "--vol-name", self.volume, "--firmware", "", "--domain-type", "qemu",
                "--cpu", str(cpu), "--memory", str(memory_mib), "--root-disk-size", "1", "--ip-timeout", "600s"]


@contextmanager
def file_lock(name: str) -> Iterator[None]:
    """An exclusive flock on /run/lock/<name>.lock, shared by every process on the machine."""
    os.makedirs("/run/lock", exist_ok=True)
    with open(f"/run/lock/{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _open() -> Any:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions only
    return libvirt.open(URI)


def _answers() -> bool:
    try:
        r = subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _pid_alive(pidfile: str) -> bool:
    try:
        os.kill(int(Path(pidfile).read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


def ensure_daemons(timeout: float = 30.0) -> None:
    """Start virtlogd and libvirtd (daemonised) unless qemu:///system already answers."""
    with file_lock("caa-test-libvirtd"):  # the same lock as the tests' helper: never two libvirtd starts
        if _answers():
            return
        for d in ("/var/log/libvirt", "/var/run/libvirt", "/var/lib/libvirt"):
            os.makedirs(d, exist_ok=True)
        if not _pid_alive("/run/virtlogd.pid"):
            subprocess.run(["virtlogd", "-d"], check=True, timeout=30)
        if not _pid_alive("/run/libvirtd.pid"):
            subprocess.run(["libvirtd", "-d"], check=True, timeout=30)
        deadline = time.monotonic() + timeout
        while not _answers():
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not answer on {URI} within {timeout:.0f}s")
            time.sleep(0.1)


def network_xml(name: str = NETWORK, bridge: str = BRIDGE, gateway: str = GATEWAY) -> str:
    """NAT + DHCP; short leases (every pod VM has a new MAC) and no ping before an offer (faster DHCP)."""
    base = gateway.rsplit(".", 1)[0]
    return f"""<network xmlns:dnsmasq='http://libvirt.org/schemas/network/dnsmasq/1.0'>
  <name>{escape(name)}</name>
  <forward mode='nat'/>
  <bridge name='{escape(bridge)}' stp='off' delay='0'/>
  <ip address='{gateway}' netmask='255.255.255.0'>
    <dhcp>
      <range start='{base}.100' end='{base}.250'><lease expiry='2' unit='minutes'/></range>
    </dhcp>
  </ip>
  <dnsmasq:options><dnsmasq:option value='no-ping'/></dnsmasq:options>
</network>
"""


def ensure_network(name: str = NETWORK) -> None:
    import libvirt

    with file_lock(f"caa-net-{name}"):
        conn = _open()
        try:
            try:
                net = conn.networkLookupByName(name)
            except libvirt.libvirtError:
                net = conn.networkDefineXML(network_xml(name))
            if not net.isActive():
                net.create()
        finally:
            conn.close()


def build_image() -> tuple[Path, float]:
    """podvm/build.sh: the output directory (a cached build when the inputs are unchanged) and the seconds."""
    t0 = time.monotonic()
    r = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"podvm/build.sh failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return Path(r.stdout.strip().splitlines()[-1]), time.monotonic() - t0


def ensure_pool(image_dir: Path, name: str = POOL, directory: Path = POOL_DIR, volume: str = BASE_VOLUME) -> None:
    """A dir pool at `directory` whose `volume` is the BIOS disk of the build in `image_dir`."""
    import libvirt

    manifest = json.loads((image_dir / "manifest.json").read_text())
    disk = image_dir / manifest["qcow2"]
    with file_lock(f"caa-pool-{name}"):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ".podvm-base.source").unlink(missing_ok=True)  # where an earlier version kept it
        mark = directory.parent / f"{directory.name}{_SOURCE_MARK}"
        target = directory / volume
        source = f"{disk} {disk.stat().st_size} {disk.stat().st_mtime_ns}"
        if not target.exists() or not mark.exists() or mark.read_text() != source:
            tmp = directory / f".{volume}.tmp"
            shutil.copyfile(disk, tmp)
            os.replace(tmp, target)
            mark.write_text(source)
        conn = _open()
        try:
            try:
                pool = conn.storagePoolLookupByName(name)
            except libvirt.libvirtError:
                xml = (f"<pool type='dir'><name>{escape(name)}</name>"
                       f"<target><path>{escape(str(directory))}</path></target></pool>")
                pool = conn.storagePoolDefineXML(xml, 0)
            if not pool.isActive():
                pool.create(0)
            pool.refresh(0)
        finally:
            conn.close()


def prepare(network: str = NETWORK, pool: str = POOL) -> LibvirtEnv:
    """Daemons, network, image, pool: everything `twistd caa-adaptor --provider libvirt` needs here."""
    if os.geteuid() != 0:
        raise RuntimeError("preparing libvirt needs root")
    missing = [t for t in ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "qemu-img", "dnsmasq")
               if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}: run scripts/setup.sh")
    ensure_daemons()
    ensure_network(network)
    image_dir, seconds = build_image()
    ensure_pool(image_dir, pool)
    return LibvirtEnv(URI, network, pool, BASE_VOLUME, image_dir, seconds)


def main() -> int:
    env = prepare()
    print(f"image {env.image_dir} ({env.image_seconds:.1f}s)", file=sys.stderr)
    print(" ".join(a if a else "''" for a in env.adaptor_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
