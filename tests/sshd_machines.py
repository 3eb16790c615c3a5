"""BYOM "machines" for the tests: a real OpenSSH sshd (Debian's openssh-server) per machine, each in its own
network namespace, reached from the test process over a veth pair.

`machine(testcase)` starts one: namespace, veth (host side in this process's namespace with `.1/30`, the machine's
`eth0` with `.2/30`), a generated ed25519 host key, the test client key in its authorized keys, and sshd on port 22
with SFTP chrooted to `<dir>/media` (as on the byom pod VM image, where it is /media). Everything is removed by
the test's cleanups (sshd killed, link and namespace deleted, directory removed). Addresses come from 198.18.0.0/15
(the benchmarking range) by pid and a counter, so trial -j2 workers never share one. Root only (`need_root`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

from attrs import frozen
from pyroute2 import IPRoute
from twisted.trial.unittest import SynchronousTestCase

from tests.netns_helpers import Netns, make_netns, need_root, unique

SSHD = "/usr/sbin/sshd"
BASE = IPv4Address("198.18.0.0")
_counter = itertools.count()
_client_key: tuple[str, str] | None = None


def need_sshd(testcase: SynchronousTestCase) -> None:
    need_root(testcase, ("nsenter", "ssh-keygen"))
    if not os.path.exists(SSHD):
        testcase.fail(f"{SSHD} is missing: scripts/setup.sh installs Debian's openssh-server")


def keygen(path: Path, comment: str = "caa-test") -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True,
                   stdin=subprocess.DEVNULL)


def client_key() -> tuple[str, str]:
    """(public, private) key files of the test client, made once per process under /run."""
    global _client_key
    if _client_key is None:
        directory = Path(tempfile.mkdtemp(prefix=f"caa-byom-key-{os.getpid()}-", dir="/run"))
        keygen(directory / "id")
        import atexit

        atexit.register(shutil.rmtree, directory, True)
        _client_key = (str(directory / "id.pub"), str(directory / "id"))
    return _client_key


@frozen
class Machine:
    ip: str
    dir: Path
    netns: Netns

    @property
    def media(self) -> Path:
        return self.dir / "media"

    @property
    def host_key_pub(self) -> Path:
        return self.dir / "host_ed25519.pub"

    def pushed(self, name: str) -> bytes | None:
        path = self.media / "cidata" / name
        return path.read_bytes() if path.exists() else None


def _addresses() -> tuple[str, str]:
    block = (os.getpid() % 512) * 64 + next(_counter) % 64
    net = BASE + block * 4
    return str(net + 1), str(net + 2)


def machine(testcase: SynchronousTestCase, sshd: bool = True) -> Machine:
    """A machine with sshd on <ip>:22 (or, with `sshd=False`, an address where nothing listens)."""
    need_sshd(testcase)
    public_key, _private = client_key()
    ns = make_netns(testcase, "byom")
    host_if = unique("bym")
    host_ip, ip = _addresses()
    fd = os.open(ns.path, os.O_RDONLY)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
            index = ipr.link_lookup(ifname=host_if)[0]
            ipr.addr("add", index=index, address=host_ip, prefixlen=30)
            ipr.link("set", index=index, state="up")
    finally:
        os.close(fd)

    def remove_link() -> None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=host_if)
            if found:
                ipr.link("del", index=found[0])

    testcase.addCleanup(remove_link)
    with ns.ipr() as ipr:
        for name in ("lo", "eth0"):
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=ip, prefixlen=30)

    # sshd's ChrootDirectory wants every component root-owned and not group/world-writable: /run, not /tmp.
    directory = Path(tempfile.mkdtemp(prefix=f"caa-byom-{os.getpid()}-", dir="/run"))
    directory.chmod(0o755)
    testcase.addCleanup(shutil.rmtree, directory, True)
    (directory / "media").mkdir(mode=0o755)
    keygen(directory / "host_ed25519", f"host-{ip}")
    shutil.copy(public_key, directory / "authorized_keys")
    result = Machine(ip, directory, ns)
    if not sshd:
        return result
    config = directory / "sshd_config"
    config.write_text("\n".join([
        "Port 22", f"ListenAddress {ip}", f"HostKey {directory / 'host_ed25519'}", "PidFile none",
        f"AuthorizedKeysFile {directory / 'authorized_keys'}", "StrictModes no", "UsePAM no",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "Subsystem sftp internal-sftp", f"ChrootDirectory {directory / 'media'}", "LogLevel VERBOSE", ""]))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    log = open(directory / "sshd.log", "wb")
    proc = ns.popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()

    testcase.addCleanup(stop)
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection((ip, 22), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {ip} did not start: {(directory / 'sshd.log').read_text()}") from None
            time.sleep(0.05)
    return result


__all__ = ["Machine", "client_key", "keygen", "machine", "need_sshd"]
