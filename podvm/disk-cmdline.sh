#!/usr/bin/env bash
# podvm/disk-cmdline.sh: a copy of the pod VM's BIOS disk whose kernel command line has extra arguments.
#
#   podvm/disk-cmdline.sh <caa-podvm[-dev].qcow2> <out.qcow2> <arg>...
#
# e.g. `caa.init=floor` (podvm/make-floor-disk.sh) or `caa.forwarder_options=--disable-tls` (tests). The
# arguments are appended to the APPEND line of syslinux.cfg in the disk's partition 1 (the FAT boot
# partition); an argument already there is not added twice. The input is not changed.
# No root and no loop device: qemu-img converts to raw, mtools rewrites the file inside partition 1.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 <bios-disk.qcow2> <out.qcow2> <kernel-arg>..." >&2; exit 2; }
IN=$1 OUT=$2
shift 2
[ -f "$IN" ] || { echo "disk-cmdline: no such disk image: $IN" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/caa-disk-cmdline.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
RAW=$WORK/disk.raw
qemu-img convert -O raw "$IN" "$RAW"
# partition 1 (the FAT boot partition): its start sector from the MBR's partition table
START=$(sfdisk --dump "$RAW" 2>/dev/null | awk -F'[=,]' '/^[^ ]+1 *:/ {gsub(/ /, "", $2); print $2; exit}' || true)
[ -n "$START" ] || { echo "disk-cmdline: $IN has no partition 1 (not a caa BIOS disk?)" >&2; exit 1; }
FAT="$RAW@@$(( START * 512 ))"
mcopy -n -i "$FAT" ::syslinux.cfg "$WORK/syslinux.cfg" 2>/dev/null \
  || { echo "disk-cmdline: no syslinux.cfg in partition 1 of $IN" >&2; exit 1; }
grep -q '^ *APPEND ' "$WORK/syslinux.cfg" || { echo "disk-cmdline: no APPEND line in syslinux.cfg of $IN" >&2; exit 1; }
for arg in "$@"; do
  case "$arg" in *[[:space:]/\&\\]*) echo "disk-cmdline: unsupported characters in argument: $arg" >&2; exit 2 ;; esac
  grep -Eq "^ *APPEND (.* )?$arg( |\$)" "$WORK/syslinux.cfg" || sed -i "s/^\( *APPEND .*\)\$/\1 $arg/" "$WORK/syslinux.cfg"
done
mcopy -o -i "$FAT" "$WORK/syslinux.cfg" ::syslinux.cfg
qemu-img convert -O qcow2 "$RAW" "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "$OUT"
