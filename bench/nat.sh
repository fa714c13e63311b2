#!/usr/bin/env bash
# Side-by-side benchmark of the PAT gateway (issue 4): plain routing, kernel NAT (nftables
# masquerade + dnat), a null TUN forwarder and vipgate on both data paths (`vipgate`: the
# default kernel fast path; `vipgate-tun`: datapath = "tun"), on the same three namespaces, in
# one run.
#
#   in 192.168.101.10 ── gw (.1 | 198.51.100.1) ── out 198.51.100.200
#
# - iperf3 TCP, 1 and 4 streams, inside→outside (up) and outside→inside (down, -R), through
#   the overload address;
# - new connections/s through the static forward PUBLIC:8001 → inside:80 (wrk, Connection:
#   close, HAProxy answering 200 inside); plain routing connects to inside:80 directly;
# - vipgate's peak RSS during its runs, and bytes of memory per flow at 100,000 flows
#   (natgw/examples/table_memory).
# "tunloop" (bench/tools/tunloop.c) is plain routing through a TUN (offload on, like
# vipgate's) served by a C loop that writes every packet back unchanged: blocking read, write,
# nothing else. It is the floor of what crossing a TUN costs, the ceiling of any userspace TUN
# gateway: vipgate / tunloop says how much of the gap to kernel NAT is vipgate's own.
# Every repetition runs each mode once, the order reversed every other repetition; vipgate is
# started afresh and conntrack flushed for each.
#
# Usage (root): bench/nat.sh [RUNS]   (RUNS=3, DUR=4, ONLY, MODES="plain kernel tunloop
# vipgate-tun vipgate", VIPGATE_BIN: see bench/README.md; STREAMS="1 4" the iperf3 stream counts,
# QUEUES=N vipgate's TUN queues (default 1), PERF_OUT=FILE records a perf profile of vipgate
# during the first repetition, STATUS_OUT=FILE appends vipgate's `show nat --json`, one line
# per sample, every 100 ms during its runs and once more before each stop: what the kernel path
# and the core counted; each sample lists every translation, which costs the daemon time: a
# diagnosis, not a measurement)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

bench_knobs 3 4 "$@"
STREAMS=${STREAMS-1 4}
bench_require iperf3 wrk haproxy nft conntrack python3
bench_cargo_bin VIPGATE_BIN vipgate vipgate
bench_init nb
gateway_topology gw 198.51.100.1/24 192.168.101.1/24 \
  in:in=192.168.101.10/24 out:out=198.51.100.200/24
# wrk closes each connection as soon as it has the response. When the server's FIN arrives
# after that (a slower path), the client's socket ends in TIME_WAIT, and at thousands of
# connections/s the client runs out of ephemeral ports within seconds: the rate then collapses
# and measures the load generator, not the gateway. Real clients are many hosts; let this one
# reuse TIME_WAIT ports (timestamps keep it safe) from the whole range. The server closes
# first, so its side keeps a TIME_WAIT per 4-tuple too; with one client address the tuples come
# back within seconds and a SYN landing on one may be answered with a challenge ACK (timestamps
# are randomised per connection), which costs the client a one-second retry: the server keeps
# no TIME_WAIT here.
x out sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="1024 65535"
x in sysctl -qw net.ipv4.tcp_max_tw_buckets=0

http_ok_server in 192.168.101.10:80
spawn out iperf3 -s -B 198.51.100.200 > /dev/null 2>&1
wait_port "$P-out" 198.51.100.200 5201

forward_site "$TMP/site.toml" ${QUEUES:+"queues = $QUEUES"}
# The same gateway on the userspace data path alone (every packet through nat0).
forward_site "$TMP/site-tun.toml" ${QUEUES:+"queues = $QUEUES"} 'datapath = "tun"'

measure() { # MODE CONNECTION-RATE-URL
  local mode=$1 url=$2 s dir rev
  for s in $STREAMS; do
    for dir in up down; do
      want_metric "tcp_${s}stream_${dir}_Gbps" || continue
      rev=()
      [ $dir = up ] || rev=(-R)
      record "tcp_${s}stream_${dir}_Gbps" "$mode" \
        "$(iperf_gbps in -c 198.51.100.200 -t "$DUR" -P "$s" "${rev[@]}")"
    done
  done
  if want_metric new_conn_per_s; then
    conn_rate out "$url"
    record new_conn_per_s "$mode" "$CONN_RATE"
  fi
}

plain_mode() {
  ip -n "$P-out" route add 192.168.101.0/24 via 198.51.100.1
  measure plain "http://192.168.101.10/"
  ip -n "$P-out" route del 192.168.101.0/24 via 198.51.100.1
}

tunloop_mode() {
  spawn gw "$TMP/tunloop" tl0
  local tunloop=$SPAWNED
  wait_for 5 ip -n "$P-gw" link show tl0 > /dev/null
  x gw sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.tl0.rp_filter=0
  ip -n "$P-gw" link set tl0 up
  ip -n "$P-gw" route add default dev tl0 table 100
  ip -n "$P-gw" rule add iif eth0 lookup 100 pref 10
  ip -n "$P-gw" rule add iif eth1 lookup 100 pref 11
  ip -n "$P-out" route add 192.168.101.0/24 via 198.51.100.1
  measure tunloop "http://192.168.101.10/"
  ip -n "$P-out" route del 192.168.101.0/24 via 198.51.100.1
  ip -n "$P-gw" rule del pref 10
  ip -n "$P-gw" rule del pref 11
  kill "$tunloop"
  wait "$tunloop" 2> /dev/null || true
}

kernel_mode() {
  x gw nft -f - <<NFT
table ip bnat {
  chain pre { type nat hook prerouting priority -100; iifname "eth0" tcp dport 8001 dnat to 192.168.101.10:80; }
  chain post { type nat hook postrouting priority 100; oifname "eth0" masquerade; }
}
NFT
  measure kernel "http://198.51.100.1:8001/"
  x gw nft delete table ip bnat
  # conntrack would also track the TUN path: the next mode starts from a clean slate.
  x gw conntrack -F > /dev/null 2>&1 || true
}

vipgate_mode() { # REPETITION [MODE SITE]
  local mode=${2:-vipgate} site=${3:-$TMP/site.toml}
  vipgate_start gw "$site" nat
  local perf=""
  if [ -n "${PERF_OUT:-}" ] && [ "$1" = 1 ]; then
    bench_require perf
    perf record -q -g -p "$VIPGATE_PID" -o "$PERF_OUT" > /dev/null 2>&1 &
    perf=$!
    bench_track "$perf"
  fi
  local sampler=""
  if [ -n "${STATUS_OUT:-}" ]; then
    nat_status "$site" 0.1 &
    sampler=$!
    bench_track "$sampler"
  fi
  measure "$mode" "http://198.51.100.1:8001/"
  if [ -n "$perf" ]; then kill -INT "$perf"; wait "$perf" || true; fi
  if [ -n "$sampler" ]; then
    kill "$sampler"
    wait "$sampler" 2> /dev/null || true
    nat_status "$site"
  fi
  if want_metric peak_rss_kB; then
    record peak_rss_kB "$mode" "$(awk '/VmHWM/ { print $2 }' "/proc/$VIPGATE_PID/status")"
  fi
  vipgate_stop
}

# nat_status SITE [PERIOD]: appends `show nat --json` of the running vipgate to STATUS_OUT as
# one line: once, or every PERIOD seconds until killed.
nat_status() {
  while :; do
    # Whole lines only: the sampler may be killed in the middle of a sample.
    local line
    line=$(x gw "$VIPGATE_BIN" show nat --json -c "$1" | tr -d '\n') || true
    printf '%s\n' "$line" >> "$STATUS_OUT"
    [ -n "${2:-}" ] || return 0
    sleep "$2"
  done
}

# vipgate on the TUN data path (`datapath = "tun"`); `vipgate` runs the default, the kernel
# fast path where it loads.
vipgate-tun_mode() { # REPETITION
  vipgate_mode "$1" vipgate-tun "$TMP/site-tun.toml"
}

if want_mode tunloop; then bench_cc tunloop; fi
for rep in $(seq "$RUNS"); do
  for mode in $(bench_order "$rep" plain kernel tunloop vipgate-tun vipgate); do
    echo "repetition $rep/$RUNS: $mode" >&2
    "${mode}_mode" "$rep"
  done
done

if want_mode vipgate && want_metric 'table_*'; then
  echo "memory per flow at 100,000 flows..." >&2
  mem=$(cd "$ROOT" && cargo run -q --release -p natgw --example table_memory 100000)
  for kv in $mem; do   # flows=... bytes_per_flow=... rss_growth_per_flow=... insert_ns=...
    case $kv in
      bytes_per_flow=*) metric=table_bytes_per_flow ;;
      rss_growth_per_flow=*) metric=table_rss_per_flow ;;
      insert_ns=*) metric=table_insert_ns ;;
      *) continue ;;
    esac
    if want_metric "$metric"; then record "$metric" vipgate "${kv#*=}"; fi
  done
fi

bench_summarize --ratio vipgate/kernel --ratio vipgate/tunloop \
  --title "PAT gateway: plain routing, kernel NAT (nftables), tunloop, vipgate; $RUNS x ${DUR}s"
