#!/usr/bin/env bash
# podvm/make-floor-disk.sh: the "floor" copy of the pod VM's BIOS disk that the benchmark compares with.
#
#   podvm/make-floor-disk.sh <caa-podvm[-dev].qcow2> <out.qcow2>
#
# The same disk (kernel, stage-1 initramfs, root filesystem, DHCP) with caa.init=floor added to syslinux.cfg's
# APPEND line: the tiny init then only starts a minimal TCP listener on port 15150 with the image's system
# python3 (console marker "CAA-INIT floor-listening uptime=<s>"). See podvm/disk-cmdline.sh.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 <bios-disk.qcow2> <out.qcow2>" >&2; exit 2; }
exec "$(dirname "$0")/disk-cmdline.sh" "$1" "$2" caa.init=floor
