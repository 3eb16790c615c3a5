#!/usr/bin/env bash
# Build the caa container image offline (docs/install.md, "The image"): one image for caa-adaptor,
# caa-peerpod-ctrl and caa-webhook, written as an OCI archive that `podman load -i` and `ctr image import`
# accept. No registry pull and no container engine:
#   1. a Debian bookworm root filesystem from debootstrap (minbase + Python, iproute2, iptables, nftables,
#      openssh-client and libvirt0), from the Debian mirror apt already uses; cached as a tarball in
#      $CAA_IMAGE_CACHE (default /var/cache/caa-image), keyed by the package list, so CI pays once;
#   2. caa's wheel and its dependencies' wheels built with the repository's .venv pip, installed into a venv
#      /opt/caa of that root filesystem (pip --no-index, under chroot);
#   3. deploy/image/entrypoint.sh as /usr/local/bin/entrypoint.sh, a user caa (65532) for the daemons that run
#      unprivileged, Twisted's plugin cache built ahead (the root filesystem may be read-only at run time);
#   4. scripts/oci_archive.py packs it as one layer.
#
# Usage: scripts/build-image.sh [OUT]   (default dist/caa-image.oci.tar; IMAGE_REF overrides localhost/caa:<version>)
# Prints the archive path as its last line. Runs as root (debootstrap, chroot) on Debian 12.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

log() { echo "build-image: $*" >&2; }

VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' caa/__init__.py)
IMAGE_REF=${IMAGE_REF:-localhost/caa:$VERSION}
OUT=${1:-dist/caa-image.oci.tar}
CACHE=${CAA_IMAGE_CACHE:-/var/cache/caa-image}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-}
PACKAGES=python3,python3-venv,ca-certificates,iproute2,iptables,nftables,openssh-client,libvirt0,procps
CAA_UID=65532

if [ "$(id -u)" != 0 ]; then
  log "must run as root (debootstrap, chroot)"
  exit 1
fi
command -v debootstrap >/dev/null || { log "debootstrap is not installed (apt-get install debootstrap)"; exit 1; }
[ -x .venv/bin/pip ] || { log ".venv missing: run scripts/setup.sh first"; exit 1; }

# The mirror apt already uses (deb822 sources first, then one-line lists).
if [ -z "$MIRROR" ]; then
  MIRROR=$(sed -n 's/^URIs: *\(.*debian\/*\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)
fi
if [ -z "$MIRROR" ]; then
  MIRROR=$(awk '$1 == "deb" && $2 ~ /debian\/?$/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
key=$(printf '%s %s %s' "$SUITE" "$PACKAGES" "$(dpkg --print-architecture)" | sha256sum | cut -c1-16)
base="$CACHE/rootfs-$SUITE-$key.tar"
if [ ! -f "$base" ]; then
  log "debootstrap $SUITE from $MIRROR (cached afterwards in $base)"
  tmp=$(mktemp -d "$CACHE/debootstrap.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp/rootfs" "$MIRROR" >&2
  rm -rf "$tmp/rootfs/var/cache/apt/archives/"*.deb "$tmp/rootfs/var/lib/apt/lists/"* "$tmp/rootfs/debootstrap"
  tar -C "$tmp/rootfs" --numeric-owner -cf "$base.partial" .
  mv "$base.partial" "$base"
  rm -rf "$tmp"
  trap - EXIT
fi
flock -u 9

work=$(mktemp -d "${TMPDIR:-/tmp}/caa-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
mkdir -p "$rootfs"
tar -C "$rootfs" --numeric-owner -xf "$base"

log "building the wheels of caa[libvirt] and its dependencies"
# from a snapshot of the sources: pip builds in-tree (./build), which another build of this tree at the same time
# (a test, a second image build) would share and break
mkdir -p "$work/src"
tar -C . --exclude=__pycache__ --exclude=dropin.cache -cf - caa twisted setup.cfg pyproject.toml README.md \
  | tar -C "$work/src" -xf -
.venv/bin/pip wheel -q -w "$work/wheels" "$work/src[libvirt]" >&2
mkdir -p "$rootfs/tmp/wheels"
cp "$work/wheels/"*.whl "$rootfs/tmp/wheels/"

log "installing into /opt/caa of the root filesystem"
chroot "$rootfs" /usr/bin/python3 -m venv /opt/caa
chroot "$rootfs" /opt/caa/bin/pip install -q --no-index --no-cache-dir --find-links /tmp/wheels "caa[libvirt]" >&2
rm -rf "$rootfs/tmp/wheels"

install -m 0755 deploy/image/entrypoint.sh "$rootfs/usr/local/bin/entrypoint.sh"
grep -q "^caa:" "$rootfs/etc/group" || echo "caa:x:$CAA_UID:" >>"$rootfs/etc/group"
grep -q "^caa:" "$rootfs/etc/passwd" || echo "caa:x:$CAA_UID:$CAA_UID:caa:/nonexistent:/usr/sbin/nologin" >>"$rootfs/etc/passwd"
# Twisted writes its plugin cache on first use; build it now, while the root filesystem is writable.
chroot "$rootfs" /usr/bin/env PATH=/opt/caa/bin:/usr/bin:/bin twistd --help >/dev/null

mkdir -p "$(dirname "$OUT")"
python3 scripts/oci_archive.py --rootfs "$rootfs" --ref "$IMAGE_REF" --out "$OUT" \
  --entrypoint /usr/local/bin/entrypoint.sh --user "$CAA_UID" \
  --env PATH=/opt/caa/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env PYTHONDONTWRITEBYTECODE=1 >&2
log "wrote $OUT ($IMAGE_REF)"
echo "$OUT"
