#!/usr/bin/env bash
# New connections/s through a static forward during a spoofed SYN flood (issue 14, security
# review §5.1): vipgate against nftables DNAT + conntrack, on the same namespaces, in one run.
#
#   in 192.168.101.10 (haproxy :80) ── gw (.1 | 198.51.100.1) ──┬── out 198.51.100.200 (wrk)
#                                                                └── att 198.51.100.66 (spoof)
#
# wrk opens connections to PUBLIC:8001 (forwarded to in:80, Connection: close) for DUR
# seconds, first on a quiet gateway, then while att sends FLOOD_PPS forged SYNs to the same
# port from random addresses and ports of 203.0.0.0/16 (gw routes that network to att, which
# drops every SYN-ACK: sources that never answer). Each mode's flood_over_quiet is its flood
# rate as a ratio of its own quiet rate, so the two gateways' different quiet speeds cancel
# out. Each repetition runs both modes (the order reversed every other repetition; vipgate is
# started afresh, conntrack is flushed). flows_after_flood is conntrack's count for kernel,
# vipgate's flow count for vipgate.
#
# Usage (root): bench/synflood.sh [RUNS]   (RUNS=3, DUR=4, ONLY, MODES="kernel vipgate",
# VIPGATE_BIN: see bench/README.md; FLOOD_PPS=forged SYNs per second (50000), SPOOF_BIN=the
# forger, default the release build of tests/src/bin/spoof.rs, built when missing)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

bench_knobs 3 4 "$@"
FLOOD_PPS=${FLOOD_PPS:-50000}
bench_require wrk haproxy nft conntrack python3
bench_cargo_bin VIPGATE_BIN vipgate vipgate
bench_cargo_bin SPOOF_BIN vipgate-tests spoof
bench_init sf
gateway_topology gw 198.51.100.1/24 192.168.101.1/24 \
  in:in=192.168.101.10/24 out:out=198.51.100.200/24 out:att=198.51.100.66/24
ip -n "$P-gw" route add 203.0.0.0/16 via 198.51.100.66
# As bench/nat.sh: the client reuses TIME_WAIT ports, the server keeps none, so that the
# rate measures the gateway and not one client's port space.
x out sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="1024 65535"
x in sysctl -qw net.ipv4.tcp_max_tw_buckets=0
http_ok_server in 192.168.101.10:80

forward_site "$TMP/site.toml"
URL=http://198.51.100.1:8001/

measure() { # MODE: the quiet rate, then the rate during a flood
  local mode=$1 quiet="" flood=""
  if want_metric quiet_conn_per_s || want_metric flood_over_quiet; then
    conn_rate out "$URL"
    quiet=$CONN_RATE
    if want_metric quiet_conn_per_s; then record quiet_conn_per_s "$mode" "$quiet"; fi
  fi
  if want_metric flood_conn_per_s || want_metric flood_over_quiet || want_metric flows_after_flood; then
    # The flood runs from before wrk starts until after it ends.
    spawn att "$SPOOF_BIN" syn-flood --from 203.0.0.0/16 --to 198.51.100.1:8001 \
      --count $((FLOOD_PPS * (DUR + 3))) --rate "$FLOOD_PPS" --max-secs $((DUR + 10)) \
      > "$TMP/flood.log" 2>&1
    local flooder=$SPAWNED
    sleep 1
    conn_rate out "$URL"
    flood=$CONN_RATE
    wait "$flooder" || { cat "$TMP/flood.log" >&2; bench_die "the forger failed"; }
    if want_metric flood_conn_per_s; then record flood_conn_per_s "$mode" "$flood"; fi
    echo "  $mode: quiet ${quiet:-?}/s, flood $flood/s; $(cat "$TMP/flood.log")" >&2
  fi
  if [ -n "$quiet" ] && [ -n "$flood" ] && want_metric flood_over_quiet; then
    record flood_over_quiet "$mode" "$(python3 -c "print($flood / $quiet if $quiet > 0 else 0.0)")"
  fi
}

kernel_mode() {
  x gw nft -f - <<NFT
table ip sfnat {
  chain pre { type nat hook prerouting priority -100; iifname "eth0" tcp dport 8001 dnat to 192.168.101.10:80; }
  chain post { type nat hook postrouting priority 100; oifname "eth0" masquerade; }
}
NFT
  measure kernel
  if want_metric flows_after_flood; then record flows_after_flood kernel "$(x gw conntrack -C)"; fi
  x gw nft delete table ip sfnat
  x gw conntrack -F > /dev/null 2>&1 || true
}

vipgate_mode() {
  vipgate_start gw "$TMP/site.toml" nat
  measure vipgate
  local status
  status=$(x gw "$VIPGATE_BIN" show nat --json -c "$TMP/site.toml")
  if want_metric flows_after_flood; then
    record flows_after_flood vipgate "$(python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["flows"])' <<< "$status")"
  fi
  echo "  vipgate: $(python3 -c '
import json, sys
v = json.load(sys.stdin)[0]
c = v["counters"]; d = c["drops"]
print("early_drops %d, half_open_source %d, table_full %d" % (
    c.get("early_drops", 0), d.get("half_open_source", 0), d.get("table_full", 0)))' <<< "$status")" >&2
  vipgate_stop
}

for rep in $(seq "$RUNS"); do
  for mode in $(bench_order "$rep" kernel vipgate); do
    echo "repetition $rep/$RUNS: $mode" >&2
    "${mode}_mode"
  done
done

bench_summarize --ratio vipgate/kernel \
  --title "New connections/s through a static forward, quiet and during $FLOOD_PPS forged SYN/s: kernel NAT (nftables + conntrack), vipgate; $RUNS x ${DUR}s"
