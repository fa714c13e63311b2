#!/usr/bin/env bash
# The one test command, in two phases.
#   Phase 1 needs no root: fmt, clippy, the drivers-off builds, and every crate's unit,
#   property and corpus-replay tests except the end-to-end crate.
#   Phase 2 needs root: installs the test peers when missing, then runs the kernel data
#   path's tests (they load eBPF programs) and the end-to-end binary (tests/tests/e2e/) in
#   network namespaces.
# Usage: ./netns-scripts/test.sh [--unit-only] [extra cargo test args]
#   --unit-only runs phase 1 alone (no root needed).
set -euo pipefail
cd "$(dirname "$0")/.."

unit_only=false
if [ "${1:-}" = "--unit-only" ]; then
  unit_only=true
  shift
fi
if ! $unit_only && [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: phase 2 (end-to-end tests: network namespaces, TUN, raw sockets) needs root;" \
       "run as root, or with --unit-only for phase 1 alone" >&2
  exit 1
fi

echo "=== phase 1: no root needed"
echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== fuzz manifest"
# The fuzz crate builds only on nightly, so nothing else reads its manifest: a bad merge there
# would otherwise surface only when someone fuzzes.
cargo metadata -q --no-deps --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null
echo "== sans-IO cores build without their drivers"
for c in gre natgw balance vrrp flowsync sshfwd; do cargo check -q -p "$c" --no-default-features --locked; done
echo "== unit tests"
# kpath loads eBPF programs into the kernel: it needs root and runs in phase 2.
cargo test --workspace --exclude vipgate-tests --exclude kpath --locked "$@"
if $unit_only; then
  exit 0
fi

echo "=== phase 2: end to end, as root"
# Debian packages of the real peers the tests talk to (qemu-system-x86, linux-image-amd64
# and busybox-static for the ip_gre peer), and clang/llvm that rebuild the
# kernel path's eBPF object to check that the shipped kpath/bpf/kpath.o is its source's build;
# dpkg-deb and systemd-analyze build and verify the Debian package (tests/tests/e2e/ops.rs).
need=()
for pair in ip:iproute2 sshd:openssh-server ssh:openssh-client keepalived:keepalived \
            iperf3:iperf3 curl:curl h2load:nghttp2-client python3:python3 nft:nftables ping:iputils-ping \
            traceroute:traceroute tcpdump:tcpdump tshark:tshark socat:socat promtool:prometheus clang:clang llvm-strip:llvm \
            dpkg-deb:dpkg systemd-analyze:systemd; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
# The real Linux ip_gre peer (tests/tests/e2e/gre_qemu.rs): the Debian kernel booted in qemu
# from a busybox-static initramfs; the helper names the packages it misses.
if ! missing=$(bash netns-scripts/qemu-gre-peer.sh check 2>&1); then
  need+=(${missing##*: })
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "test.sh: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# keepalived and sshd must not run as system services during tests (they would answer on
# the root namespace); the tests start their own instances.
systemctl stop keepalived ssh 2>/dev/null || true
echo "== build"
cargo build --workspace --bins --locked
echo "== kernel data path (loads eBPF programs)"
cargo test -p kpath --locked "$@"
echo "== end-to-end tests"
# Every peer is installed now: a test whose peer is missing fails instead of skipping.
export VIPGATE_REQUIRE_PEERS=1
# Two end-to-end tests at a time: each builds its own namespaces, and the machine has 2 cores.
cargo test -p vipgate-tests --locked "$@" -- --test-threads=2
