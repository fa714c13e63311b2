#!/usr/bin/env bash
# Side-by-side benchmark of a one-packet UDP virtual service (issue 19), in one run on the same
# namespaces:
#   - vipgate: [[service]] proto = "udp", one_packet = true, rr over two real servers, on the
#     default kernel data path: the core installs the service's schedule (its rr cycle) into
#     the kernel program, which carries every datagram and every answer without nat0;
#   - nft: DNAT with `numgen inc mod 2` (conntrack: numgen picks per flow, so each client
#     socket sticks to one real server, which is what a one-packet service avoids);
#   - nft-notrack: the stateless analogue of one-packet scheduling, per datagram: `notrack`,
#     the destination rewritten to `numgen inc mod 2`, the answers' source to the VIP.
#
#   cl 198.51.100.200 ── eth0 lb 198.51.100.11 (VIP .10) eth1 10.0.0.1 ── rs1 .101, rs2 .102
#
# Each repetition runs each mode once (the order reversed every other repetition) and measures
# answered datagrams per second (tools/udprr.c: WORKERS client sockets, 8 datagrams of 32 B in
# flight each), the share of answers rs1 gave, and the datagrams counted lost (no answer
# within 100 ms).
#
# Usage (root): bench/lb_udp.sh [RUNS]   (RUNS=5, DUR=4, ONLY, MODES="vipgate nft nft-notrack",
# WORKERS=4, VIPGATE_BIN: see bench/README.md)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

bench_knobs 5 4 "$@"
bench_require nft gcc
bench_cargo_bin VIPGATE_BIN vipgate vipgate
WORKERS=${WORKERS:-4}
VIP=198.51.100.10
bench_init lbudp
bench_cc udprr -lpthread
gateway_topology lb 198.51.100.11/24 10.0.0.1/24 \
  out:cl=198.51.100.200/24 in:rs1=10.0.0.101/24 in:rs2=10.0.0.102/24
for rs in rs1 rs2; do
  spawn "$rs" "$TMP/udprr" server "10.0.0.10${rs#rs}" 53 "$rs" > /dev/null 2>&1
done

cat > "$TMP/vipgate.toml" <<CFG
[daemon]
control = "$TMP/vipgate.sock"

[[service]]
name = "dns"
listen = "$VIP:53"
proto = "udp"
one_packet = true
scheduler = "rr"
backends = [{ address = "10.0.0.101:53" }, { address = "10.0.0.102:53" }]
CFG

# answers: true once a datagram to the VIP is answered.
answers() { x cl "$TMP/udprr" client $VIP 53 1 0.2 | awk '{ exit !($1 > 0) }'; }

measure() { # MODE
  local out
  out=$(x cl "$TMP/udprr" client $VIP 53 "$WORKERS" "$DUR") || out="failed failed failed"
  read -r rate share lost <<< "$out"
  if want_metric dgram_per_s; then record dgram_per_s "$1" "$rate"; fi
  if want_metric rs1_share; then record rs1_share "$1" "$share"; fi
  if want_metric lost; then record lost "$1" "$lost"; fi
}

vipgate_mode() {
  vipgate_start lb "$TMP/vipgate.toml" lb
  wait_for 10 answers
  measure vipgate
  vipgate_stop
}

# Both nft modes own the VIP as a local address (so that lb answers ARP for it); the
# destination is rewritten before routing, so nothing is delivered locally.
nft_mode() {
  ip -n "$P-lb" addr add $VIP/32 dev eth0
  x lb nft -f - <<NFT
table ip lbbench {
  chain pre {
    type nat hook prerouting priority dstnat;
    ip daddr $VIP udp dport 53 dnat to numgen inc mod 2 map { 0 : 10.0.0.101, 1 : 10.0.0.102 }
  }
}
NFT
  wait_for 10 answers
  measure nft
  x lb nft delete table ip lbbench
  # Conntrack entries keep their DNAT after the table is gone; the next modes' client sockets
  # have other ports, and the entries are flushed where conntrack(8) is installed.
  if command -v conntrack > /dev/null; then x lb conntrack -F > /dev/null 2>&1 || true; fi
  ip -n "$P-lb" addr del $VIP/32 dev eth0
}

nft-notrack_mode() {
  ip -n "$P-lb" addr add $VIP/32 dev eth0
  x lb nft -f - <<NFT
table ip lbbench {
  chain raw {
    type filter hook prerouting priority raw;
    ip daddr $VIP udp dport 53 notrack ip daddr set numgen inc mod 2 map { 0 : 10.0.0.101, 1 : 10.0.0.102 }
    iif eth1 ip saddr { 10.0.0.101, 10.0.0.102 } udp sport 53 notrack
  }
  # The answers' source becomes the VIP after routing (before it, a local source address
  # would be a martian).
  chain post {
    type filter hook postrouting priority srcnat;
    oif eth0 ip saddr { 10.0.0.101, 10.0.0.102 } udp sport 53 ip saddr set $VIP
  }
}
NFT
  wait_for 10 answers
  measure nft-notrack
  x lb nft delete table ip lbbench
  ip -n "$P-lb" addr del $VIP/32 dev eth0
}

for rep in $(seq "$RUNS"); do
  for mode in $(bench_order "$rep" vipgate nft nft-notrack); do
    echo "repetition $rep/$RUNS: $mode" >&2
    "${mode}_mode"
  done
done

bench_summarize --ratio vipgate/nft --ratio vipgate/nft-notrack \
  --title "One-packet UDP service rr over two real servers: vipgate vs nftables numgen DNAT (conntrack) and stateless numgen (notrack); $WORKERS client sockets x 8 in flight, 32 B datagrams; $RUNS x ${DUR}s; load average $(cut -d' ' -f1-3 /proc/loadavg)"
