#!/usr/bin/env bash
# Side-by-side benchmark of load-balanced virtual services (issue 8), in one run on the same
# namespaces:
#   - vipgate: [[service]] wrr over two real servers (LVS-NAT on the default kernel fast path:
#     the core schedules each connection through the TUN gateway, the eBPF program moves its
#     established packets); vipgate-tun: the same with `[lb] datapath = "tun"`;
#   - nftables: DNAT with `numgen inc mod 2` (the kernel's packet-level round robin here);
#   - HAProxy: `mode tcp`, `balance roundrobin` (Debian's package).
#
#   cl 198.51.100.200 ── eth0 lb 198.51.100.11 (VIP .10) eth1 10.0.0.1 ── rs1 .101, rs2 .102
#
# Each repetition runs each mode once (the order reversed every other repetition) and
# measures new connections per second (wrk, Connection: close, HAProxy answering 200 on each
# real server), the share of them rs1 got (from the real servers' own session counters) and
# wrk's socket errors. After the repetitions: how long a failed real server stays in vipgate's
# rotation, RUNS times (health check interval 1 s, fall 2 → target ≤ interval × fall + 1 s).
#
# Usage (root): bench/lb.sh [RUNS]   (RUNS=5, DUR=4, ONLY, MODES="vipgate vipgate-tun haproxy nft",
# VIPGATE_BIN: see bench/README.md)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

bench_knobs 5 4 "$@"
bench_require wrk haproxy nft conntrack socat python3
bench_cargo_bin VIPGATE_BIN vipgate vipgate
VIP=198.51.100.10
bench_init lb
gateway_topology lb 198.51.100.11/24 10.0.0.1/24 \
  out:cl=198.51.100.200/24 in:rs1=10.0.0.101/24 in:rs2=10.0.0.102/24
# Tens of thousands of short connections per run wrap the client's ports; a SYN that reuses a
# 4-tuple still in TIME_WAIT on a real server is often refused (this kernel's per-4-tuple
# timestamps trip PAWS) and retried a second later, which collapses every mode alike after
# the first run. Skip TIME_WAIT in these namespaces and widen the port range: the same for
# all three load balancers.
for h in cl lb rs1 rs2; do
  x "$h" sysctl -qw net.ipv4.tcp_max_tw_buckets=0 net.ipv4.ip_local_port_range="1024 65535"
done
http_ok_server rs1 10.0.0.101:80 rs1
http_ok_server rs2 10.0.0.102:80 rs2

wait_vip() { wait_for 5 x cl bash -c "exec 3<>/dev/tcp/$VIP/80"; }

cat > "$TMP/vipgate.toml" <<CFG
[daemon]
control = "$TMP/vipgate.sock"

[[service]]
name = "web"
listen = "$VIP:80"
scheduler = "wrr"
health = { kind = "tcp", interval = "1s", timeout = "500ms", rise = 2, fall = 2 }
backends = [
  { address = "10.0.0.101:80", weight = 1 },
  { address = "10.0.0.102:80", weight = 1 },
]
CFG
{ printf '[lb]\ndatapath = "tun"\n\n'; cat "$TMP/vipgate.toml"; } > "$TMP/vipgate-tun.toml"

cat > "$TMP/haproxy-lb.cfg" <<CFG
global
  maxconn 4000
defaults
  mode tcp
  timeout client 5s
  timeout server 5s
  timeout connect 5s
frontend vip
  bind $VIP:80
  default_backend reals
backend reals
  balance roundrobin
  server rs1 10.0.0.101:80
  server rs2 10.0.0.102:80
CFG

measure() { # MODE
  want_metric new_conn_per_s || want_metric rs1_share || want_metric wrk_socket_errors || return 0
  local a1 a2 d1 d2
  a1=$(http_sessions rs1)
  a2=$(http_sessions rs2)
  conn_rate cl "http://$VIP/"
  d1=$(($(http_sessions rs1) - a1))
  d2=$(($(http_sessions rs2) - a2))
  if want_metric new_conn_per_s; then record new_conn_per_s "$1" "$CONN_RATE"; fi
  if want_metric rs1_share; then
    record rs1_share "$1" "$(python3 -c "print($d1 / ($d1 + $d2) if $d1 + $d2 else 'none')")"
  fi
  if want_metric wrk_socket_errors; then record wrk_socket_errors "$1" "$CONN_ERRORS"; fi
}

# vipgate owns the VIP: routed into nat0, proxy neighbour on eth0.
vipgate_mode() { # [NAME CONFIG]
  local config=${2:-$TMP/vipgate.toml} datapath=kernel
  [ "${1:-vipgate}" = vipgate ] || datapath=tun
  vipgate_start lb "$config" lb
  # The numbers must be those of the data path named (the kernel path falls back to the TUN
  # when the program does not load).
  x lb "$VIPGATE_BIN" show lb -c "$config" | grep -q "^Data path: $datapath " ||
    bench_die "vipgate is not on the $datapath data path: $(x lb "$VIPGATE_BIN" show lb -c "$config" | tail -1)"
  wait_vip
  measure "${1:-vipgate}"
  vipgate_stop
}

vipgate-tun_mode() {
  vipgate_mode vipgate-tun "$TMP/vipgate-tun.toml"
}

# HAProxy mode tcp, the VIP as a local address.
haproxy_mode() {
  ip -n "$P-lb" addr add $VIP/32 dev eth0
  x lb haproxy -f "$TMP/haproxy-lb.cfg" -D -p "$TMP/haproxy-lb.pid"
  wait_vip
  measure haproxy
  kill "$(cat "$TMP/haproxy-lb.pid")"
  wait_for 5 bash -c "! kill -0 $(cat "$TMP/haproxy-lb.pid")"
  ip -n "$P-lb" addr del $VIP/32 dev eth0
}

# nftables numgen DNAT, the VIP as a local address (so that lb answers ARP for it).
nft_mode() {
  ip -n "$P-lb" addr add $VIP/32 dev eth0
  x lb nft -f - <<NFT
table ip lbbench {
  chain pre {
    type nat hook prerouting priority dstnat;
    ip daddr $VIP tcp dport 80 dnat to numgen inc mod 2 map { 0 : 10.0.0.101, 1 : 10.0.0.102 }
  }
}
NFT
  wait_vip
  measure nft
  x lb nft delete table ip lbbench
  # Conntrack entries keep their DNAT after the table is gone: the next mode starts clean.
  x lb conntrack -F > /dev/null 2>&1 || true
  ip -n "$P-lb" addr del $VIP/32 dev eth0
}

for rep in $(seq "$RUNS"); do
  for mode in $(bench_order "$rep" vipgate vipgate-tun haproxy nft); do
    echo "repetition $rep/$RUNS: $mode" >&2
    "${mode}_mode"
  done
done

# The State column follows the address and the Forward column (Masq).
backend_is() { x lb "$VIPGATE_BIN" show lb --control "$TMP/vipgate.sock" | grep -Eq "10\.0\.0\.102:80 +Masq +$1 "; }

# Failover: stop rs2, time until vipgate's show lb says down.
if want_mode vipgate && want_metric failover_ms; then
  echo "failover of a real server, $RUNS times" >&2
  vipgate_start lb "$TMP/vipgate.toml" lb
  wait_vip
  for _ in $(seq "$RUNS"); do
    kill "$(cat "$TMP/rs2.pid")"
    t0=$(date +%s%N)
    for _ in $(seq 200); do
      backend_is down && break
      sleep 0.02
    done
    record failover_ms vipgate $((($(date +%s%N) - t0) / 1000000))
    http_ok_server rs2 10.0.0.102:80 rs2
    wait_for 10 backend_is up
  done
  vipgate_stop
fi

bench_summarize --ratio vipgate/nft --ratio vipgate-tun/nft --ratio vipgate/haproxy \
  --title "Virtual service wrr 1:1 over two real servers: vipgate (kernel path), vipgate-tun, HAProxy, nftables numgen; $RUNS x ${DUR}s (failover_ms: health interval 1 s x fall 2 = 2000 ms)"
