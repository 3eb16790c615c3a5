#!/usr/bin/env bash
# One-shot machine set-up for caa on Debian 12 as root: system packages, services, .venv.
# Idempotent: each step checks before it acts, so `make test` and `make demo` may call it every time.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

APT_PACKAGES=(
  # build of libvirt-python
  libvirt-dev pkg-config
  # networking tests and the local provider
  iproute2 iptables nftables iputils-ping bridge-utils procps
  # Go reference ttrpc peer (offline build from Debian's sources)
  golang-go golang-github-containerd-ttrpc-dev golang-google-protobuf-dev golang-goprotobuf-dev protobuf-compiler
  # real libvirtd + QEMU (TCG) for the libvirt provider and the real-VM tests
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils
  dnsmasq-base ovmf
  # tiny BIOS-bootable test VM disk of the libvirt provider tests (tests/vmimage.py)
  syslinux syslinux-common mtools dosfstools
  # pod VM image recipe
  debootstrap busybox-static e2fsprogs xorriso cpio kmod zstd fdisk
  # BYOM provider tests: a real sshd per "machine" (tests/sshd_machines.py)
  openssh-server
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${#missing[@]} Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The deploy/ tests render the overlays with kubectl's kustomize (v4+: components, labels); Debian's
# kubernetes-client is 1.20 (kustomize v2), so the machine's `kubectl` package is used, installed if missing.
if ! kubectl version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([4-9]|[1-9][0-9])'; then
  echo "setup: installing kubectl (kustomize v4+ for deploy/)"
  apt-get install -y -qq --no-install-recommends kubectl >/dev/null \
    || { echo "setup: no kubectl with kustomize v4+ available from apt; the deploy/ tests need one" >&2; exit 1; }
fi

# libvirtd expects these users/groups and directories (no systemd on these machines).
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd -r -g kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt
if ! grep -q '^user = "root"' /etc/libvirt/qemu.conf 2>/dev/null; then
  printf 'user = "root"\ngroup = "root"\n' >> /etc/libvirt/qemu.conf
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.caa-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing caa and its dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  # pyroute2-minimal ships the same `pyroute2` package as the full pyroute2 it replaced: remove both, or
  # uninstalling one later deletes the other's files
  if .venv/bin/pip show -q pyroute2 2>/dev/null; then
    .venv/bin/pip uninstall -q -y pyroute2 pyroute2-minimal >/dev/null 2>&1 || true
  fi
  .venv/bin/pip install -q -e ".[dev]" --config-settings editable_mode=compat
  touch "$stamp"
fi
echo "setup: ok"
