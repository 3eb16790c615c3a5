"""
The tiny test VM image of the libvirt provider tests: a BIOS-bootable disk (FAT + syslinux) holding
Debian's cloud kernel and a busybox initramfs. The guest loads virtio_net and the IDE CD-ROM modules,
gets an address with udhcpc, mounts the NoCloud `cidata` CD-ROM and serves it with busybox httpd on
port 15150, so a test can read back the user data it passed to the provider over the VM's IP.

Built from Debian packages only (`apt-get download linux-image-<ver>-cloud-amd64`, the installed static
busybox, syslinux/mtools/dosfstools, qemu-img), without mounting anything, and cached under
/var/cache/caa-test/provider-vm keyed by the kernel version and this file's guest scripts. Blocking: call
from a thread. Recipe: /work/shared/specs/real-vm-recipes.md §2 and §8.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("CAA_TEST_CACHE", "/var/cache/caa-test")) / "provider-vm"
HTTP_PORT = 15150
MODULES = ("virtio_pci", "virtio_net", "ata_piix", "sr_mod", "isofs")

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/ttyS0 2>&1
echo "CAA-VM init uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /modules.list); do insmod /mods/$m; done
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -q -n -t 60 -T 1 -s /udhcpc.sh || echo "CAA-VM dhcp-failed"
mkdir -p /cidata
for i in $(seq 1 100); do [ -b /dev/sr0 ] && break; sleep 0.1; done
mount -t iso9660 -o ro /dev/sr0 /cidata && echo "CAA-VM cidata-mounted" || echo "CAA-VM cidata-failed"
httpd -p @PORT@ -h /cidata
echo "CAA-VM ready uptime=$(cut -d' ' -f1 /proc/uptime)"
while true; do sleep 3600; done
""".replace("@PORT@", str(HTTP_PORT))

UDHCPC = """#!/bin/sh
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    echo "CAA-VM dhcp-bound ip=$ip" ;;
esac
exit 0
"""

SYSLINUX_CFG = (
    "DEFAULT vm\nPROMPT 0\nTIMEOUT 0\nLABEL vm\n  KERNEL vmlinuz\n  INITRD initrd.gz\n"
    "  APPEND console=ttyS0 quiet panic=-1\n"
)


def _run(*command: str, cwd: Path | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


def kernel_package() -> str:
    for line in _run("apt-cache", "depends", "linux-image-cloud-amd64").splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split()[1]
    raise RuntimeError("no linux-image-*-cloud-amd64 package known to apt")


def build_image() -> Path:
    """The path of the cached qcow2 boot disk, building it first if needed (about 10 s cold)."""
    package = kernel_package()
    version = package.removeprefix("linux-image-")
    key = hashlib.sha256((version + INIT + UDHCPC + SYSLINUX_CFG + " ".join(MODULES)).encode()).hexdigest()[:12]
    image = CACHE / f"vm-{key}.qcow2"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image.exists():
            return image
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            work = Path(tmp)
            debs = list(CACHE.glob(f"{package}_*.deb"))
            if not debs:
                _run("apt-get", "download", package, cwd=CACHE)
                debs = list(CACHE.glob(f"{package}_*.deb"))
            kernel = work / "k"
            _run("dpkg-deb", "-x", str(debs[0]), str(kernel))
            _run("depmod", "-b", str(kernel), version)
            root = work / "root"
            for sub in ("bin", "mods", "proc", "sys", "dev", "cidata"):
                (root / sub).mkdir(parents=True)
            shutil.copy2("/bin/busybox", root / "bin" / "busybox")
            seen: list[str] = []
            for module in MODULES:
                out = _run("modprobe", "-d", str(kernel), "-S", version, "--show-depends", module)
                for line in out.splitlines():
                    parts = line.split()
                    if parts and parts[0] == "insmod" and parts[1] not in seen:
                        seen.append(parts[1])
            names = []
            for path in seen:
                target = root / "mods" / Path(path).name
                if path.endswith(".xz") or path.endswith(".zst"):
                    raise RuntimeError(f"compressed module {path}: busybox insmod cannot load it")
                shutil.copy2(path, target)
                names.append(target.name)
            (root / "modules.list").write_text("\n".join(names) + "\n")
            (root / "init").write_text(INIT)
            (root / "init").chmod(0o755)
            (root / "udhcpc.sh").write_text(UDHCPC)
            (root / "udhcpc.sh").chmod(0o755)
            files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
            listing = "\n".join(files).encode()
            cpio = subprocess.run(
                ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=listing, capture_output=True, check=True
            ).stdout
            initrd = work / "initrd.gz"
            initrd.write_bytes(subprocess.run(["gzip", "-1"], input=cpio, capture_output=True, check=True).stdout)
            vmlinuz = kernel / "boot" / f"vmlinuz-{version}"
            size_mib = (vmlinuz.stat().st_size + initrd.stat().st_size) // (1 << 20) + 8
            boot = work / "boot.img"
            with open(boot, "wb") as f:
                f.truncate(size_mib << 20)
            _run("mkfs.vfat", "-n", "CAAVM", str(boot))
            (work / "syslinux.cfg").write_text(SYSLINUX_CFG)
            _run("mcopy", "-i", str(boot), str(vmlinuz), "::vmlinuz")
            _run("mcopy", "-i", str(boot), str(initrd), "::initrd.gz")
            _run("mcopy", "-i", str(boot), str(work / "syslinux.cfg"), "::syslinux.cfg")
            _run("syslinux", "--install", str(boot))
            partial = work / "vm.qcow2"
            _run("qemu-img", "convert", "-O", "qcow2", str(boot), str(partial))
            os.replace(partial, image)
    return image


if __name__ == "__main__":
    print(build_image())
