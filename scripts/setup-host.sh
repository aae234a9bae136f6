#!/usr/bin/env bash
# Installs what Cubicle needs on the host, and nothing when it is all there.
#
# Runs before every `./cubicle up` and `./cubicle test`, so the path where nothing is missing
# must stay fast (well under a second): it only queries dpkg, runs `criu --version`/`check`,
# and loads the native Node modules once. Prints one line per step that did something.
#
# Environment:
#   CUBICLE_STATE_DIR   state directory (default /var/lib/cubicle); CRIU goes to <state>/criu
#   CUBICLE_DEBIAN_MIRROR  Debian mirror for the private CRIU and QEMU trees (default deb.debian.org)
set -euo pipefail

readonly REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly STATE_DIR="${CUBICLE_STATE_DIR:-/var/lib/cubicle}"
readonly CRIU_DIR="$STATE_DIR/criu"
readonly CRIU_ROOT="$CRIU_DIR/root"
readonly CRIU_WRAPPER="$CRIU_DIR/criu"
# The tree's criu with the tree's loader and library path written into it (patchelf): runc starts
# CRIU twice per checkpoint or restore, and the wrapper's shell cost ~1-2 ms each time.
readonly CRIU_DIRECT="$CRIU_DIR/bin/criu"
# runc is pointed at this file's content (`runc --criu <path>`); see ARCHITECTURE.md §3.1.
readonly CRIU_PATH_FILE="$CRIU_DIR/path"
readonly DEBIAN_MIRROR="${CUBICLE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Debian 12's CRIU 3.17 fails on current kernels (vDSO), trixie's 4.1.1 fails on TCP sockets
# with kernels >= 6.16; 4.2 (Debian testing, "forky") works.
readonly CRIU_MIN_VERSION="4.2"
readonly CRIU_SUITE="forky"
# The microVM runtime's QEMU (QEMU_INSTALL_NOTE in src/runtime/microvm/qemu-install.ts): Debian
# 12's is 7.2; private copy-on-write mappings of guest RAM (memory-backend-file readonly=on,rom=off) need
# 8.2+. bookworm-backports builds QEMU 10 for this very release, so its packages' files run
# with the host's libraries; they are unpacked into a private tree, nothing is installed.
readonly QEMU_DIR="$STATE_DIR/qemu"
readonly QEMU_ROOT="$QEMU_DIR/root"
readonly QEMU_PATH_FILE="$QEMU_DIR/path"
readonly QEMU_MIN_VERSION="8.2"
readonly QEMU_SUITE="bookworm-backports"
readonly QEMU_PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data)
# libnss-myhostname: glibc resolves every *.localhost name to loopback, so the default domain
# (cubicle.localhost) works for getHost() URLs in Node, Python and curl on this machine.
# The microVM runtime's guest kernel (GUEST_KERNEL_PACKAGE in src/runtime/microvm/guest-assets.ts),
# kept as a package file in apt's cache, never installed: the runtime unpacks it into its own
# directory, and tests find it there without downloading anything.
readonly GUEST_KERNEL_PACKAGE="linux-image-6.1.0-57-cloud-amd64"
readonly APT_ARCHIVES="/var/cache/apt/archives"
readonly HOST_PACKAGES=(runc iproute2 nftables mmdebstrap uidmap iptables tini patchelf gcc libc6-dev btrfs-progs libcap2-bin libnss-myhostname zstd docker-registry busybox-static qemu-system-x86 qemu-utils libfuse3-dev pkg-config)

staging=""

say() { echo "setup-host: $*"; }
die() { echo "setup-host: error: $*" >&2; exit 1; }

need_root() {
  [[ $EUID -eq 0 ]] || die "$1 needs root; run this script as root (sudo $0)"
}

# ---- Debian packages -------------------------------------------------------------------------

install_missing_packages() {
  local missing=() pkg status
  for pkg in "${HOST_PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == "installed" ]] || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  need_root "installing ${missing[*]}"
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
  # docker-registry is there for the OCI tests, which start their own on loopback; Debian's
  # package would also run one for everybody on :5000.
  if [[ " ${missing[*]} " == *" docker-registry "* && -d /run/systemd/system ]]; then
    systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
  fi
}

# ---- CRIU ------------------------------------------------------------------------------------

# True when version $1 (x.y[.z]) is at least $2 (x.y).
version_at_least() {
  local have_major have_minor want_major want_minor
  IFS=. read -r have_major have_minor _ <<<"$1"
  IFS=. read -r want_major want_minor _ <<<"$2"
  [[ "$have_major" =~ ^[0-9]+$ && "${have_minor:-0}" =~ ^[0-9]+$ ]] || return 1
  ((have_major > want_major || (have_major == want_major && ${have_minor:-0} >= want_minor)))
}

criu_version() {
  "$1" --version 2>/dev/null | sed -n 's/^Version: *//p'
}

# True when binary $1 exists, is new enough and `criu check` passes on this kernel.
criu_usable() {
  local bin="$1" version
  [[ -x "$bin" ]] || return 1
  version="$(criu_version "$bin")"
  version_at_least "$version" "$CRIU_MIN_VERSION" || return 1
  "$bin" check >/dev/null 2>&1
}

record_criu_path() {
  local bin="$1"
  if [[ "$(cat "$CRIU_PATH_FILE" 2>/dev/null || true)" != "$bin" ]]; then
    mkdir -p "$CRIU_DIR"
    printf '%s\n' "$bin" >"$CRIU_PATH_FILE.tmp"
    mv -f "$CRIU_PATH_FILE.tmp" "$CRIU_PATH_FILE"
    say "criu $(criu_version "$bin") at $bin (recorded in $CRIU_PATH_FILE)"
  fi
}

write_criu_wrapper() {
  local root="$1"
  # The tree's own loader and libraries run its criu, so the host's libc is never touched.
  # The library path is not exported (no LD_LIBRARY_PATH), so the host tools criu executes
  # (ip, iptables-restore, sh) keep using the host's libraries.
  cat >"$CRIU_WRAPPER.tmp" <<EOF
#!/bin/sh
# Made by scripts/setup-host.sh: CRIU from Debian $CRIU_SUITE in a private tree.
exec "$root/lib64/ld-linux-x86-64.so.2" --argv0 criu \\
  --library-path "$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu" \\
  "$root/usr/sbin/criu" "\$@"
EOF
  chmod 755 "$CRIU_WRAPPER.tmp"
  mv -f "$CRIU_WRAPPER.tmp" "$CRIU_WRAPPER"
}

# Makes CRIU_DIRECT from the tree in $1; false when patchelf or the tree is missing.
make_direct_criu() {
  local root="$1"
  command -v patchelf >/dev/null || return 1
  [[ -x "$root/usr/sbin/criu" ]] || return 1
  [[ -x "$CRIU_DIRECT" && "$CRIU_DIRECT" -nt "$root/usr/sbin/criu" ]] && return 0
  mkdir -p "$(dirname "$CRIU_DIRECT")"
  cp "$root/usr/sbin/criu" "$CRIU_DIRECT.tmp"
  # RPATH (not RUNPATH) so that the tree's libraries also serve the libraries' own dependencies;
  # programs CRIU runs (tar, ip, iptables) are not affected and keep the host's libraries.
  if ! patchelf --set-interpreter "$root/lib64/ld-linux-x86-64.so.2" --force-rpath \
    --set-rpath "$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu" "$CRIU_DIRECT.tmp"; then
    rm -f "$CRIU_DIRECT.tmp"
    return 1
  fi
  mv -f "$CRIU_DIRECT.tmp" "$CRIU_DIRECT"
}

build_private_criu() {
  need_root "building the private CRIU tree"
  command -v mmdebstrap >/dev/null || die "mmdebstrap is missing"
  mkdir -p "$CRIU_DIR"
  staging="$CRIU_DIR/root.building.$$"
  rm -rf "$staging"
  trap 'rm -rf "$staging"' EXIT
  say "building CRIU $CRIU_MIN_VERSION+ from Debian $CRIU_SUITE into $CRIU_ROOT (~15 s)"
  local started=$SECONDS
  # forky's Release file is past its Valid-Until date; its signature still verifies with the
  # keys in Debian 12's debian-archive-keyring.
  mmdebstrap --quiet --variant=apt --include=criu,iptables \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    "$CRIU_SUITE" "$staging" "$DEBIAN_MIRROR" >"$CRIU_DIR/build.log" 2>&1 \
    || die "mmdebstrap of $CRIU_SUITE failed; see $CRIU_DIR/build.log"
  rm -rf "$CRIU_ROOT.old"
  [[ -e "$CRIU_ROOT" ]] && mv "$CRIU_ROOT" "$CRIU_ROOT.old"
  mv "$staging" "$CRIU_ROOT"
  rm -rf "$CRIU_ROOT.old"
  trap - EXIT
  write_criu_wrapper "$CRIU_ROOT"
  local version
  version="$(criu_version "$CRIU_WRAPPER")"
  version_at_least "$version" "$CRIU_MIN_VERSION" \
    || die "$CRIU_WRAPPER --version gave '${version:-nothing}', want >= $CRIU_MIN_VERSION"
  "$CRIU_WRAPPER" check >"$CRIU_DIR/check.log" 2>&1 \
    || die "$CRIU_WRAPPER check failed on kernel $(uname -r); see $CRIU_DIR/check.log"
  say "criu $version built in $((SECONDS - started)) s"
}

ensure_criu() {
  local recorded
  recorded="$(cat "$CRIU_PATH_FILE" 2>/dev/null || true)"
  # A recorded wrapper is looked at again: the direct binary may be possible now.
  if [[ -n "$recorded" && "$recorded" != "$CRIU_WRAPPER" ]] && criu_usable "$recorded"; then
    return 0
  fi
  local host_criu
  host_criu="$(command -v criu || true)"
  if [[ -n "$host_criu" ]] && criu_usable "$host_criu"; then
    record_criu_path "$host_criu"
    return 0
  fi
  # Serialize with other setup runs (./cubicle up and ./cubicle test may start together).
  mkdir -p "$CRIU_DIR"
  exec {lock_fd}>"$CRIU_DIR/.lock"
  flock "$lock_fd"
  if ! criu_usable "$CRIU_WRAPPER"; then
    if [[ -x "$CRIU_ROOT/usr/sbin/criu" ]]; then
      write_criu_wrapper "$CRIU_ROOT"
    fi
    criu_usable "$CRIU_WRAPPER" || build_private_criu
  fi
  if make_direct_criu "$CRIU_ROOT" && criu_usable "$CRIU_DIRECT"; then
    record_criu_path "$CRIU_DIRECT"
  else
    record_criu_path "$CRIU_WRAPPER"
  fi
  flock -u "$lock_fd"
}

# ---- QEMU ------------------------------------------------------------------------------------

qemu_version() {
  "$1" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9.]*\).*/\1/p'
}

# The private tree's binary runs (its libraries are the host's) and is new enough.
qemu_usable() {
  [[ -x "$1" ]] || return 1
  version_at_least "$(qemu_version "$1")" "$QEMU_MIN_VERSION"
}

build_private_qemu() {
  need_root "unpacking the private QEMU tree"
  local lists="$QEMU_DIR/apt" debs="$QEMU_DIR/debs.$$"
  staging="$QEMU_DIR/root.building.$$"
  rm -rf "$staging" "$debs"
  mkdir -p "$lists/lists/partial" "$debs" "$staging"
  trap 'rm -rf "$staging" "$debs"' EXIT
  say "unpacking QEMU $QEMU_MIN_VERSION+ from Debian $QEMU_SUITE into $QEMU_ROOT"
  local started=$SECONDS
  printf 'deb %s %s main\n' "$DEBIAN_MIRROR" "$QEMU_SUITE" >"$lists/sources.list"
  local apt_opts=(-q -o "Dir::Etc::sourcelist=$lists/sources.list" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$lists/lists" -o "APT::Get::List-Cleanup=0")
  apt-get "${apt_opts[@]}" update >"$QEMU_DIR/build.log" 2>&1 || die "apt-get update for $QEMU_SUITE failed; see $QEMU_DIR/build.log"
  local pkg wanted=()
  for pkg in "${QEMU_PACKAGES[@]}"; do wanted+=("$pkg/$QEMU_SUITE"); done
  (cd "$debs" && apt-get "${apt_opts[@]}" download "${wanted[@]}") >>"$QEMU_DIR/build.log" 2>&1 \
    || die "downloading ${QEMU_PACKAGES[*]} from $QEMU_SUITE failed; see $QEMU_DIR/build.log"
  local deb
  for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$staging"; done
  local bin="$staging/usr/bin/qemu-system-x86_64"
  qemu_usable "$bin" || die "the unpacked $bin does not run or is older than $QEMU_MIN_VERSION ($(qemu_version "$bin"))"
  local missing
  missing="$(ldd "$bin" | grep 'not found' || true)"
  [[ -z "$missing" ]] || die "the unpacked QEMU needs libraries this host lacks: $missing"
  rm -rf "$QEMU_ROOT.old" "$debs"
  [[ -e "$QEMU_ROOT" ]] && mv "$QEMU_ROOT" "$QEMU_ROOT.old"
  mv "$staging" "$QEMU_ROOT"
  rm -rf "$QEMU_ROOT.old"
  trap - EXIT
  say "qemu $(qemu_version "$QEMU_ROOT/usr/bin/qemu-system-x86_64") unpacked in $((SECONDS - started)) s"
}

ensure_qemu() {
  local bin="$QEMU_ROOT/usr/bin/qemu-system-x86_64"
  if ! qemu_usable "$bin"; then
    mkdir -p "$QEMU_DIR"
    exec {qemu_lock_fd}>"$QEMU_DIR/.lock"
    flock "$qemu_lock_fd"
    qemu_usable "$bin" || build_private_qemu
    flock -u "$qemu_lock_fd"
  fi
  if [[ "$(cat "$QEMU_PATH_FILE" 2>/dev/null || true)" != "$bin" ]]; then
    printf '%s\n' "$bin" >"$QEMU_PATH_FILE.tmp"
    mv -f "$QEMU_PATH_FILE.tmp" "$QEMU_PATH_FILE"
    say "qemu $(qemu_version "$bin") at $bin (recorded in $QEMU_PATH_FILE)"
  fi
}

# ---- Node modules ----------------------------------------------------------------------------

native_modules_load() {
  (cd "$REPO_DIR" && node -e '
    const Database = require("better-sqlite3");
    new Database(":memory:").close(); // the addon loads on first use, not on require
    require("node-pty");
  ' >/dev/null 2>&1)
}

ensure_node_modules() {
  command -v node >/dev/null || die "node is not installed (Cubicle needs Node 20)"
  cd "$REPO_DIR"
  if ! node_modules_stale && native_modules_load; then
    return 0
  fi
  # Two setups at once must not run npm ci over each other.
  mkdir -p "$STATE_DIR"
  exec {npm_lock_fd}>"$STATE_DIR/.setup-npm.lock"
  flock "$npm_lock_fd"
  if node_modules_stale; then
    say "npm ci"
    npm ci --no-audit --no-fund --loglevel=error >/dev/null || die "npm ci failed"
  fi
  if ! native_modules_load; then
    say "npm rebuild better-sqlite3 node-pty"
    npm rebuild better-sqlite3 node-pty --loglevel=error >/dev/null || die "npm rebuild failed"
    native_modules_load || die "better-sqlite3 or node-pty still fails to load after npm rebuild"
  fi
  flock -u "$npm_lock_fd"
}

ensure_guest_kernel_package() {
  compgen -G "$APT_ARCHIVES/${GUEST_KERNEL_PACKAGE}_*_amd64.deb" >/dev/null && return 0
  need_root "downloading the microVM guest kernel"
  say "downloading $GUEST_KERNEL_PACKAGE into $APT_ARCHIVES (not installed; the microVM guest's kernel)"
  (cd "$APT_ARCHIVES" && apt-get download -q "$GUEST_KERNEL_PACKAGE" >/dev/null 2>&1) \
    || say "warning: apt-get download $GUEST_KERNEL_PACKAGE failed; microVM sandboxes and their tests will fetch or skip it"
}

# npm ci writes node_modules/.package-lock.json; older than the lockfile means stale.
node_modules_stale() {
  [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]
}

# The state directory holds the database (tokens, env vars) and the API key: host root's alone,
# from the start (the server tightens an older install's).
if [[ ! -d "$STATE_DIR" ]]; then
  need_root "creating the state directory"
  mkdir -p -m 0700 "$STATE_DIR"
fi

install_missing_packages
ensure_guest_kernel_package
ensure_criu
ensure_qemu
ensure_node_modules
