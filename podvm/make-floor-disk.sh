#!/usr/bin/env bash
# podvm/make-floor-disk.sh: a "floor" copy of the pod VM's BIOS disk, for the benchmark's bare-VM floor.
#
#   podvm/make-floor-disk.sh <caa-podvm[-dev].qcow2> <out.qcow2>
#
# The copy is the same disk (same kernel, stage-1 initramfs, root filesystem, DHCP) whose syslinux.cfg adds
# caa.init=floor to the kernel command line: the tiny init then only starts a minimal TCP listener on port
# 15150 with the image's system python3 (marker "CAA-INIT floor-listening uptime=<s>").
# No root and no loop device: qemu-img converts to raw, mtools rewrites the file inside partition 1.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 <bios-disk.qcow2> <out.qcow2>" >&2; exit 2; }
IN=$1 OUT=$2
[ -f "$IN" ] || { echo "make-floor-disk: no such disk image: $IN" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/caa-floor.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
RAW=$WORK/disk.raw
qemu-img convert -O raw "$IN" "$RAW"
# partition 1 (the FAT boot partition): its start sector from the MBR's partition table
START=$(sfdisk --dump "$RAW" 2>/dev/null | awk -F'[=,]' '/^[^ ]+1 *:/ {gsub(/ /, "", $2); print $2; exit}')
[ -n "$START" ] || { echo "make-floor-disk: $IN has no partition 1 (not a caa BIOS disk?)" >&2; exit 1; }
FAT="$RAW@@$(( START * 512 ))"
mcopy -n -i "$FAT" ::syslinux.cfg "$WORK/syslinux.cfg" \
  || { echo "make-floor-disk: no syslinux.cfg in partition 1 of $IN" >&2; exit 1; }
grep -q '^ *APPEND ' "$WORK/syslinux.cfg" || { echo "make-floor-disk: no APPEND line in syslinux.cfg" >&2; exit 1; }
grep -q 'caa.init=floor' "$WORK/syslinux.cfg" || sed -i 's/^\( *APPEND .*\)$/\1 caa.init=floor/' "$WORK/syslinux.cfg"
mcopy -o -i "$FAT" "$WORK/syslinux.cfg" ::syslinux.cfg
qemu-img convert -O qcow2 "$RAW" "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "$OUT"
