#!/usr/bin/env bash
# The one test command: installs the test peers when missing, then runs every test
# (unit, property, corpus replay, end-to-end in network namespaces) plus fmt and clippy.
# Needs root. Usage: ./netns-scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: the end-to-end tests need root (network namespaces, TUN, raw sockets)" >&2
  exit 1
fi

# Debian packages of the real peers the tests talk to.
need=()
for pair in ip:iproute2 sshd:openssh-server ssh:openssh-client keepalived:keepalived \
            iperf3:iperf3 curl:curl python3:python3 nft:nftables ping:iputils-ping \
            traceroute:traceroute tcpdump:tcpdump socat:socat promtool:prometheus; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "test.sh: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# keepalived and sshd must not run as system services during tests (they would answer on
# the root namespace); the tests start their own instances.
systemctl stop keepalived ssh 2>/dev/null || true

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== fuzz manifest"
# The fuzz crate builds only on nightly, so nothing else reads its manifest: a bad merge there
# would otherwise surface only when someone fuzzes.
cargo metadata -q --no-deps --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null
echo "== sans-IO cores build without their drivers"
for c in gre natgw balance vrrp sshfwd; do cargo check -q -p "$c" --no-default-features --locked; done
echo "== build"
cargo build --workspace --bins --locked
echo "== tests"
# Two end-to-end tests at a time: each builds its own namespaces, and the machine has 2 cores.
cargo test --workspace --locked "$@" -- --test-threads=2
