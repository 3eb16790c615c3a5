#!/usr/bin/env bash
# podvm/build.sh: build the caa pod VM image from Debian packages and caa's wheel (run as root).
#
#   podvm/build.sh [--kata-agent PATH] [--print-dir]
#
# Outputs, in $CAA_PODVM_CACHE/podvm-<variant>-<key>/ (default cache /var/cache/caa-podvm):
#   caa-podvm[-dev].qcow2       BIOS-bootable disk: MBR with syslinux; partition 1 FAT (syslinux, kernel, the
#                               stage-1 initramfs), partition 2 the ext4 root; for libvirt's firmware boot (the
#                               provider's domain XML, virtio vda) and BIOS clouds
#   caa-podvm[-dev]-root.qcow2  ext4 root filesystem (systemd + units + the tiny init), read-only at run time
#   vmlinuz, initrd.img         the guest kernel (Debian cloud kernel) and the stage-1 initramfs that mounts
#                               root= (default /dev/vda) read-only and runs the tiny init (or systemd): with
#                               -root.qcow2 as vda, the fast direct-kernel boot the tests use
#   manifest.json          names, sizes, build time, kernel version, variant, root UUID, boot partition offset
# <key> hashes this recipe, caa's sources and the kata-agent binary, so an unchanged input is
# never built twice; a second caller waits on the lock and reuses the result.
# Without --kata-agent (or $KATA_AGENT) the image is a *development* image: its kata-agent is
# caa/devtools/agent.py, a stand-in; the file names and the motd say so.
# The last line printed is the output directory.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "${CAA_SRC:-$(dirname "$HERE")}" && pwd)
CACHE=${CAA_PODVM_CACHE:-/var/cache/caa-podvm}
KATA_AGENT=${KATA_AGENT:-}
BYOM_AUTHORIZED_KEYS=${BYOM_AUTHORIZED_KEYS:-}
PRINT_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --kata-agent) KATA_AGENT=$2; shift 2 ;;
    --print-dir) PRINT_ONLY=1; shift ;;
    # byom variant: sshd + SFTP-pushed user data (docs/podvm.md); PATH holds the adaptor's public key(s)
    --byom-authorized-keys) BYOM_AUTHORIZED_KEYS=$2; shift 2 ;;
    *) echo "usage: $0 [--kata-agent PATH] [--byom-authorized-keys PATH] [--print-dir]" >&2; exit 2 ;;
  esac
done
# shellcheck source=podvm/config.sh
. "$HERE/config.sh"
log() { echo "podvm: $*" >&2; }

# ---- cache key: the recipe, caa's sources (the wheel's inputs), the kata-agent binary
source_files() {
  (cd "$SRC" && find caa twisted -type f -name '*.py' -not -path '*/__pycache__/*' | LC_ALL=C sort
   echo setup.cfg; echo pyproject.toml; echo README.md)
}
key=$( {
  (cd "$HERE" && find . -type f -not -name '*~' | LC_ALL=C sort | xargs sha256sum)
  (cd "$SRC" && source_files | xargs -r sha256sum)
  if [ -n "$KATA_AGENT" ]; then sha256sum < "$KATA_AGENT"; fi
  if [ -n "$BYOM_AUTHORIZED_KEYS" ]; then sha256sum < "$BYOM_AUTHORIZED_KEYS"; fi
} | sha256sum | cut -c1-16)
if [ -n "$KATA_AGENT" ]; then VARIANT=kata; SUFFIX=; else VARIANT=dev; SUFFIX=-dev; fi
if [ -n "$BYOM_AUTHORIZED_KEYS" ]; then
  VARIANT=$VARIANT-byom; SUFFIX=$SUFFIX-byom; PODVM_PACKAGES+=("${PODVM_BYOM_PACKAGES[@]}")
fi
OUT=$CACHE/podvm-$VARIANT-$key
if [ "$PRINT_ONLY" = 1 ]; then echo "$OUT"; exit 0; fi
[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
# host tools of the BIOS disk (Debian packages fdisk, syslinux, syslinux-common, mtools, dosfstools)
for tool in sfdisk syslinux mcopy mkfs.vfat; do
  command -v "$tool" >/dev/null || { log "missing host tool $tool (scripts/setup.sh installs it)"; exit 1; }
done
[ -f "$SYSLINUX_MBR" ] || { log "missing $SYSLINUX_MBR (Debian package syslinux-common)"; exit 1; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [ -f "$OUT/manifest.json" ]; then log "cached: $OUT"; echo "$OUT"; exit 0; fi
T0=$(date +%s.%N)
elapsed() { awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{printf "%.1f", a-b}'; }

# ---- stage A: base root filesystem (debootstrap), cached by suite + package list
MIRROR=${PODVM_MIRROR:-$(grep -hoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list \
  /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | awk '{print $2; exit}' || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
base_key=$(echo "$PODVM_SUITE ${PODVM_PACKAGES[*]}" | sha256sum | cut -c1-12)
BASE=$CACHE/base-$base_key
if [ ! -f "$BASE/.complete" ]; then
  log "debootstrap $PODVM_SUITE (${PODVM_PACKAGES[*]}) from $MIRROR"
  rm -rf "$BASE"; mkdir -p "$BASE"
  pkgs=$(IFS=,; echo "${PODVM_PACKAGES[*]}")
  debootstrap --variant=minbase --include="$pkgs" "$PODVM_SUITE" "$BASE/rootfs" "$MIRROR" >"$BASE/debootstrap.log" 2>&1 \
    || { tail -20 "$BASE/debootstrap.log" >&2; exit 1; }
  touch "$BASE/.complete"
fi
log "base rootfs ready ($(elapsed) s)"

# ---- stage B: kernel and static busybox from Debian, cached by kernel version
KPKG=$(apt-cache depends "$PODVM_KERNEL_META" | awk '/Depends: linux-image/{print $2; exit}')
KVER=${KPKG#linux-image-}
KDIR=$CACHE/kernel-$KVER
if [ ! -f "$KDIR/.complete" ]; then
  log "fetching $KPKG and busybox-static"
  rm -rf "$KDIR"; mkdir -p "$KDIR/dl"
  (cd "$KDIR/dl" && apt-get download -q "$KPKG" busybox-static >/dev/null 2>&1)
  dpkg-deb -x "$KDIR"/dl/"${KPKG}"_*.deb "$KDIR/kx"
  depmod -b "$KDIR/kx" "$KVER"
  dpkg-deb --fsys-tarfile "$KDIR"/dl/busybox-static_*.deb | tar -x -O ./bin/busybox > "$KDIR/busybox"
  chmod 755 "$KDIR/busybox"
  rm -rf "$KDIR/dl"
  touch "$KDIR/.complete"
fi

# ---- stage C: wheels of caa and its dependencies (pip's own cache makes repeats cheap)
WORK=$(mktemp -d "$CACHE/work.XXXXXX")
R=$WORK/root
cleanup() {
  for m in "$R/proc" "$R/wheels"; do mountpoint -q "$m" 2>/dev/null && umount "$m"; done
  rm -rf "$WORK"
}
trap cleanup EXIT
PIP=${PODVM_PIP:-$SRC/.venv/bin/pip}
[ -x "$PIP" ] || PIP="python3 -m pip"
mkdir -p "$WORK/src" "$WORK/wheels"
(cd "$SRC" && source_files | cpio -pdm --quiet "$WORK/src")
log "pip wheel caa + dependencies"
$PIP wheel -q --wheel-dir "$WORK/wheels" "$WORK/src" >"$WORK/pip.log" 2>&1 || { tail -20 "$WORK/pip.log" >&2; exit 1; }
$PIP download -q --only-binary=:all: --dest "$WORK/wheels" pip >>"$WORK/pip.log" 2>&1
if ls "$WORK"/wheels/*.tar.gz >/dev/null 2>&1; then log "not a wheel: $(ls "$WORK"/wheels/*.tar.gz)"; exit 1; fi
log "wheels ready ($(elapsed) s): $(ls "$WORK/wheels" | wc -l) files"

# ---- stage D: assemble the root filesystem
cp -a "$BASE/rootfs" "$R"
mkdir -p "$R/wheels"; mount --bind "$WORK/wheels" "$R/wheels"; mount -t proc proc "$R/proc"
chroot "$R" /usr/bin/python3 -m venv --without-pip /opt/caa
pipwhl=$(cd "$WORK/wheels" && ls pip-*.whl | head -n1)
# caa itself without its node-only dependencies (PODVM_PIP_EXCLUDE), then the rest of its requirements
mapfile -t reqs < <(python3 - "$WORK/src/setup.cfg" "${PODVM_PIP_EXCLUDE[@]}" <<'PY'
import configparser, re, sys
cfg = configparser.ConfigParser(); cfg.read(sys.argv[1])
skip = {n.lower() for n in sys.argv[2:]}
for line in cfg["options"]["install_requires"].splitlines():
    line = line.strip()
    name = re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower() if line else ""
    if name and name not in skip:
        print(line)
PY
)
pipin() { chroot "$R" /opt/caa/bin/python "/wheels/$pipwhl/pip" install -q --no-index --find-links /wheels \
  --no-warn-script-location --disable-pip-version-check "$@" >>"$WORK/pip.log" 2>&1 \
  || { tail -20 "$WORK/pip.log" >&2; exit 1; }; }
pipin --no-deps caa
pipin "${reqs[@]}"
# compile ahead of time (the root is read-only at run time) and fill twisted's plugin cache
chroot "$R" /opt/caa/bin/python -m compileall -q -j0 /opt/caa/lib /usr/lib/python3.11 >/dev/null 2>&1 || true
chroot "$R" /opt/caa/bin/python -c \
  'from twisted.plugin import IPlugin, getPlugins; from twisted.plugins import __path__; list(getPlugins(IPlugin))' \
  >/dev/null 2>&1 || log "warning: twisted plugin cache not generated"
umount "$R/wheels" "$R/proc"; rmdir "$R/wheels"
for s in twistd caa-process-user-data caactl; do
  [ -e "$R/opt/caa/bin/$s" ] && ln -sf "/opt/caa/bin/$s" "$R/usr/local/bin/$s"
done

# project files, units and their enablement (the links `systemctl enable` would make)
cp -a "$HERE/files/." "$R/"
W=$R/etc/systemd/system/multi-user.target.wants
mkdir -p "$W"
for u in caa-process-user-data.service kata-agent.service caa-forwarder.path; do
  ln -sf "/etc/systemd/system/$u" "$W/$u"
done
ln -sf /lib/systemd/system/systemd-networkd.service "$W/systemd-networkd.service"
mkdir -p "$R/etc/systemd/system/network-online.target.wants"
ln -sf /lib/systemd/system/systemd-networkd-wait-online.service \
  "$R/etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service"
mkdir -p "$R/media/cidata" "$R/var/lib/caa" "$R/run/netns"
if [ -n "$BYOM_AUTHORIZED_KEYS" ]; then
  # byom: the pod starts when its user data arrives over SFTP, not at boot (systemd boot: caa.init=systemd)
  cp -a "$HERE/files-byom/." "$R/"
  install -m644 "$BYOM_AUTHORIZED_KEYS" "$R/etc/ssh/caa-byom-authorized_keys"
  chroot "$R" /usr/sbin/useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin peerpod
  chroot "$R" /usr/sbin/usermod -p '*' peerpod  # no password, but not "locked": key logins stay allowed
  for u in caa-process-user-data.service kata-agent.service caa-forwarder.path; do rm -f "$W/$u"; done
  for u in caa-byom-media.service caa-byom-user-data.path caa-byom-reboot.path; do
    ln -sf "/etc/systemd/system/$u" "$W/$u"
  done
  ln -sf /lib/systemd/system/ssh.service "$W/ssh.service"
fi
mkdir -p "$R/etc/kata-opa"; ln -sf /run/peerpod/policy.rego "$R/etc/kata-opa/default-policy.rego"
ln -sf /run/resolv.conf "$R/etc/resolv.conf"

# the kata-agent: the given binary, or caa's development stand-in
if [ -n "$KATA_AGENT" ]; then
  install -m755 "$KATA_AGENT" "$R/usr/local/bin/kata-agent"
  IMAGE_NAME="caa pod VM image"
else
  cat > "$R/usr/local/bin/kata-agent" <<'AGENT'
#!/bin/sh
# DEVELOPMENT pod VM image: this is NOT kata-agent. caa's stand-in (caa/devtools/agent.py) answers the
# agent protocol on the same socket so the adaptor and the forwarder can be exercised end to end.
mkdir -p /run/kata-containers
# A stand-in for the pod's workload, which the real agent would run as containers in podns: busybox httpd on
# port 8080 in podns, so tests and demos can reach "the pod" at its pod IP over the tunnel.
mkdir -p /run/caa-dev-workload
echo "caa development pod VM $(hostname): hello from the pod network namespace" > /run/caa-dev-workload/index.html
# shared, so that the containers' mounts the stand-in publishes there later reach httpd's mount namespace
# (`ip netns exec` gives it one of its own)
mount --bind /run/caa-dev-workload /run/caa-dev-workload && mount --make-shared /run/caa-dev-workload
ip netns exec podns busybox httpd -p 8080 -h /run/caa-dev-workload || echo "caa: dev workload not started" >&2
# nice: on a one-vCPU VM this Python stand-in competes with the forwarder's start, which is the critical path
# (the adaptor waits for port 15150; the forwarder's agent link reconnects until this socket is there). The real
# kata-agent is a native binary that is up in milliseconds, so the stand-in must not delay the forwarder.
exec nice -n 10 /opt/caa/bin/python -m caa.devtools.agent --socket /run/kata-containers/agent.sock \
  --pod-netns podns --workload-dir /run/caa-dev-workload
AGENT
  chmod 755 "$R/usr/local/bin/kata-agent"
  IMAGE_NAME="caa DEVELOPMENT pod VM image (kata-agent is caa's stand-in, caa/devtools/agent.py; not for production)"
fi
printf '%s\nvariant %s, key %s, kernel %s\n' "$IMAGE_NAME" "$VARIANT" "$key" "$KVER" > "$R/etc/motd"
cat >> "$R/usr/lib/os-release" <<OSR
IMAGE_ID="caa-podvm"
IMAGE_VERSION="$key"
VARIANT_ID="$VARIANT"
OSR
echo "caa-podvm" > "$R/etc/hostname"

# no machine id baked in: systemd makes one per boot; each VM gets its own DHCP identity
: > "$R/etc/machine-id"; rm -f "$R/var/lib/dbus/machine-id"
# the root by its filesystem UUID: /dev/vda in the fast boot, partition 2 of the BIOS disk
ROOT_UUID=$(cat /proc/sys/kernel/random/uuid)
printf 'UUID=%s / ext4 ro 0 1\n' "$ROOT_UUID" > "$R/etc/fstab"

# kernel modules with their dependencies, and a modules.dep for the guest's modprobe
KM=$R/lib/modules/$KVER
for m in "${PODVM_BOOT_MODULES[@]}" "${PODVM_EXTRA_MODULES[@]}"; do
  modprobe -d "$KDIR/kx" -S "$KVER" --show-depends "$m" 2>/dev/null || log "no module $m in $KVER"
done | awk '$1=="insmod"{print $2}' | sort -u | while read -r f; do
  rel=${f#*/lib/modules/$KVER/}; mkdir -p "$KM/$(dirname "$rel")"; cp "$f" "$KM/$rel"
done
cp "$KDIR/kx/lib/modules/$KVER"/modules.{order,builtin,builtin.modinfo} "$KM/"
depmod -b "$R" "$KVER"
echo "${PODVM_BOOT_MODULES[*]}" > "$R/usr/local/lib/caa/boot-modules"

# trim (no compilers were ever installed; drop docs, locales, apt state)
for p in "${PODVM_TRIM[@]}"; do rm -rf "${R:?}/$p"; mkdir -p "$R/$p"; done
rm -rf "$R/opt/caa/share/man"
find "$R/opt/caa" -type d \( -name tests -o -path '*/site-packages/twisted/*/test' \) -prune -exec rm -rf {} + 2>/dev/null || true
rm -rf "$R/usr/lib/udev/hwdb.d" "$R/usr/lib/udev/hwdb.bin" "$R/etc/udev/hwdb.bin"

# ---- outputs
STAGE=$WORK/out; mkdir -p "$STAGE"
ROOT_MB=$(du -sm "$R" | cut -f1)
mkfs.ext4 -q -F -L caa-podvm -U "$ROOT_UUID" -d "$R" "$WORK/root.raw" "$PODVM_ROOT_SIZE" >/dev/null
qemu-img convert -O qcow2 "$WORK/root.raw" "$STAGE/caa-podvm$SUFFIX-root.qcow2"
cp "$KDIR/kx/boot/vmlinuz-$KVER" "$STAGE/vmlinuz"
# the stage-1 initramfs: static busybox + the virtio disk driver; mounts root= (default /dev/vda) read-only
S=$WORK/stage1; mkdir -p "$S/bin" "$S/mods" "$S/proc" "$S/sys" "$S/dev" "$S/newroot"
cp "$KDIR/busybox" "$S/bin/busybox"
for m in "${PODVM_STAGE1_MODULES[@]}"; do modprobe -d "$KDIR/kx" -S "$KVER" --show-depends "$m"; done |
  awk '$1=="insmod" && !seen[$2]++ {print $2}' | while read -r f; do cp "$f" "$S/mods/"; basename "$f"; done \
  > "$S/modules.list"
install -m755 "$HERE/stage1-init" "$S/init"
(cd "$S" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 > "$STAGE/initrd.img"

# the BIOS-bootable disk: MBR (syslinux's mbr.bin + the partition table), partition 1 a small FAT (bootable)
# holding syslinux, the kernel and the stage-1 initramfs, partition 2 the ext4 root (the same filesystem as
# -root.qcow2). SeaBIOS reads the disk (virtio-blk, vda: the cloud kernel has no AHCI driver) only for
# syslinux; the guest kernel reads the root itself, like the fast boot does.
SECTOR=512
BOOT_START=2048                                                   # 1 MiB alignment
BOOT_SECTORS=$(( PODVM_BOOT_PART_MB * 1048576 / SECTOR ))
ROOT_START=$(( BOOT_START + BOOT_SECTORS ))
ROOT_SECTORS=$(( $(stat -c %s "$WORK/root.raw") / SECTOR ))
DISK=$WORK/disk.raw
truncate -s $(( (ROOT_START + ROOT_SECTORS) * SECTOR )) "$DISK"
printf 'label: dos\nunit: sectors\n%s\n%s\n' \
  "start=$BOOT_START, size=$BOOT_SECTORS, type=c, bootable" "start=$ROOT_START, size=$ROOT_SECTORS, type=83" \
  | sfdisk -q --no-reread --no-tell-kernel "$DISK"
dd if="$SYSLINUX_MBR" of="$DISK" bs=440 count=1 conv=notrunc status=none
# the FAT is made in its own file (mkfs.vfat has no offset) with the partition's start as its hidden
# sectors, then copied into place; syslinux and mtools work on the partition inside the image file
truncate -s $(( BOOT_SECTORS * SECTOR )) "$WORK/boot.img"
mkfs.vfat -n CAAPODVM -h "$BOOT_START" "$WORK/boot.img" >/dev/null
dd if="$WORK/boot.img" of="$DISK" bs=1M seek=$(( BOOT_START * SECTOR / 1048576 )) conv=notrunc status=none
dd if="$WORK/root.raw" of="$DISK" bs=1M seek=$(( ROOT_START * SECTOR / 1048576 )) conv=notrunc,sparse status=none
rm -f "$WORK/boot.img" "$WORK/root.raw"
BOOT_FAT="$DISK@@$(( BOOT_START * SECTOR ))"
printf 'DEFAULT caa\nPROMPT 0\nTIMEOUT 0\nLABEL caa\n  KERNEL vmlinuz\n  INITRD initrd.img\n  APPEND %s\n' \
  "$PODVM_KERNEL_CMDLINE root=UUID=$ROOT_UUID" > "$WORK/syslinux.cfg"
mcopy -i "$BOOT_FAT" "$STAGE/vmlinuz" ::vmlinuz
mcopy -i "$BOOT_FAT" "$STAGE/initrd.img" ::initrd.img
mcopy -i "$BOOT_FAT" "$WORK/syslinux.cfg" ::syslinux.cfg
syslinux --install --offset $(( BOOT_START * SECTOR )) "$DISK"
qemu-img convert -O qcow2 "$DISK" "$STAGE/caa-podvm$SUFFIX.qcow2"
rm -f "$DISK"
BUILD_S=$(elapsed)
size() { stat -c %s "$STAGE/$1"; }
cat > "$STAGE/manifest.json" <<JSON
{
  "key": "$key",
  "variant": "$VARIANT",
  "kernel_version": "$KVER",
  "qcow2": "caa-podvm$SUFFIX.qcow2",
  "root_qcow2": "caa-podvm$SUFFIX-root.qcow2",
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "kernel_cmdline": "$PODVM_KERNEL_CMDLINE",
  "root_uuid": "$ROOT_UUID",
  "boot_partition_offset": $(( BOOT_START * SECTOR )),
  "sizes": {"qcow2": $(size "caa-podvm$SUFFIX.qcow2"), "root_qcow2": $(size "caa-podvm$SUFFIX-root.qcow2"), "kernel": $(size vmlinuz), "initrd": $(size initrd.img), "rootfs_mb": $ROOT_MB},
  "build_seconds": $BUILD_S,
  "wheels": [$(cd "$WORK/wheels" && ls ./*.whl | sed 's|^\./||; s/.*/"&"/' | paste -sd, -)]
}
JSON
rm -rf "$OUT"; mv "$STAGE" "$OUT"
# keep the three newest builds
ls -dt "$CACHE"/podvm-*-* 2>/dev/null | tail -n +4 | xargs -r rm -rf
log "built $OUT in $BUILD_S s (root $ROOT_MB MB; $(cd "$OUT" && du -h ./*.qcow2 initrd.img vmlinuz | tr '\t\n' ' '))"
echo "$OUT"
