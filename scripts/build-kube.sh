#!/usr/bin/env bash
# Build a real kube-apiserver, kube-scheduler and kube-controller-manager (Kubernetes 1.20.2) from Debian's
# source package, plus etcd from Debian's binary package, for the tests that need a real API server
# (docs/kubernetes.md, /work/shared/specs/kubernetes-recipe.md). Nothing else ships these binaries here.
#
# Idempotent and cached: the binaries land in $CAA_KUBE_CACHE/<package version>/bin (default cache
# /var/cache/caa-kube); a second run only prints that directory. The last line on stdout is always the bin
# directory; progress goes to stderr. Runs as root on Debian 12 (installs its build tools with apt).
# Concurrent runs (two trial workers) serialise on a lock; the loser finds the cache filled.
set -euo pipefail

KUBE_DEB_VERSION=${KUBE_DEB_VERSION:-1.20.5+really1.20.2-1.1+deb12u1}
CACHE=${CAA_KUBE_CACHE:-/var/cache/caa-kube}
OUT=$CACHE/$KUBE_DEB_VERSION
BIN=$OUT/bin
WHAT_BINARIES=(kube-apiserver kube-scheduler kube-controller-manager)

log() { echo "build-kube: $*" >&2; }

complete() {
  [ -f "$OUT/complete" ] || return 1
  for b in "${WHAT_BINARIES[@]}" etcd; do [ -x "$BIN/$b" ] || return 1; done
}

if complete; then echo "$BIN"; exit 0; fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if complete; then echo "$BIN"; exit 0; fi

if [ "$(id -u)" != 0 ]; then
  log "must run as root (apt-get, $CACHE); the API-server tests need it too"
  exit 1
fi

started=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
need=()
for p in golang-go rsync make tar xz-utils gzip ca-certificates; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

WORK=$CACHE/build
rm -rf "$WORK"
mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial" "$WORK/apt/sources" "$WORK/dl"

# A private apt configuration with deb-src entries for the Debian mirrors apt already uses (deb822 files
# and one-line lists alike); third-party repositories are left out, they have no sources to offer.
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  awk 'BEGIN { RS = ""; ORS = "\n\n" }
       /URIs:[^\n]*debian/ && !/Enabled: *no/ { sub(/Types: *deb\n/, "Types: deb-src\n"); print }' \
    "$f" >"$WORK/apt/sources/$(basename "$f")"
done
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
  [ -f "$f" ] || continue
  { grep -E '^deb [^#]*debian' "$f" || true; } | sed 's/^deb /deb-src /' >"$WORK/apt/sources/$(basename "$f" .list)-src.list"
done
APT_OPTS=(-o APT::Sandbox::User=root -o Dir::Etc::sourcelist=/dev/null -o Dir::Etc::sourceparts="$WORK/apt/sources"
          -o Dir::State::Lists="$WORK/apt/lists" -o Dir::Cache="$WORK/apt/cache")
log "apt-get update (deb-src)"
apt-get "${APT_OPTS[@]}" update -qq
cd "$WORK/dl"
log "downloading kubernetes=$KUBE_DEB_VERSION sources, etcd-server, golang-github-modern-go-reflect2-dev"
apt-get "${APT_OPTS[@]}" source --download-only -qq "kubernetes=$KUBE_DEB_VERSION" >&2
apt-get -o APT::Sandbox::User=root download -qq golang-github-modern-go-reflect2-dev etcd-server >&2

mkdir -p "$WORK/etcd" "$WORK/reflect2" "$WORK/src"
dpkg-deb -x etcd-server_*.deb "$WORK/etcd"
dpkg-deb -x golang-github-modern-go-reflect2-dev_*.deb "$WORK/reflect2"
orig=$(ls kubernetes_*.orig.tar.* | head -n1)
tar -xf "$orig" -C "$WORK/src" --strip-components=1

cd "$WORK/src"
# The vendored reflect2 v1.0.1 faults at run time under Go >= 1.18 (UnsafeIterate); 1.0.2 fixes it.
rm -f vendor/github.com/modern-go/reflect2/*.go vendor/github.com/modern-go/reflect2/*.s
find "$WORK/reflect2/usr/share/gocode/src/github.com/modern-go/reflect2" -maxdepth 1 \
  \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' -exec cp {} vendor/github.com/modern-go/reflect2/ \;

export GOPATH=$PWD/.go GOPROXY=off CGO_ENABLED=0 HOME=$WORK/home GOCACHE=$WORK/gocache
export KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20
export KUBE_GIT_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56 SOURCE_DATE_EPOCH=1610496000
mkdir -p "$HOME" .go/src/k8s.io
ln -sfn ../../.. .go/src/k8s.io/kubernetes
log "building ${WHAT_BINARIES[*]} (about 10 minutes on 2 cores)"
what=""
for b in "${WHAT_BINARIES[@]}"; do what="$what cmd/$b"; done
make WHAT="${what# }" >&2

rm -rf "$OUT"
mkdir -p "$BIN"
for b in "${WHAT_BINARIES[@]}"; do cp "_output/bin/$b" "$BIN/"; done
cp "$WORK/etcd/usr/bin/etcd" "$BIN/"
[ -x "$WORK/etcd/usr/bin/etcdctl" ] && cp "$WORK/etcd/usr/bin/etcdctl" "$BIN/" || true
cd /
rm -rf "$WORK"
echo "built in $(( $(date +%s) - started )) s on $(nproc) cores" >"$OUT/complete"
log "done: $(cat "$OUT/complete")"
echo "$BIN"
