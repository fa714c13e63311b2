#!/usr/bin/env bash
# GRE tunnel vs plain kernel routing, side by side in one run, on one veth topology:
#
#   hqpc -- hq (198.51.100.1) -- isp -- br (198.51.100.2) -- brpc
#
# All paths share every namespace and veth. The hosts carry three addresses each:
# 192.168.101/102.x is routed through a vipgate GRE tunnel on the kernel data path (mode
# vipgate, the default `datapath = "kernel"`: TC programs encapsulate and decapsulate, GSO
# kept), 172.20.101/102.x through a second tunnel between the same routers on the TUN data
# path (mode vipgate-tun, `datapath = "tun"`; the two tunnels differ by key), and
# 10.101/102.0.x by plain kernel routing (mode routing; the ISP knows those routes). Each
# repetition runs every test on every path back to back, the order reversed every other
# repetition, so load swings on this shared machine hit all alike. ENCAP=udp makes both
# tunnels GRE-in-UDP (kernel path: UDP tunnel super-packets; TUN path: UDP GSO/GRO).
#
# Metrics: iperf3 TCP 1 stream and 4 streams (Gbit/s, receiver side), iperf3 UDP 64-byte
# datagrams unthrottled (thousands of packets/s received).
#
# Usage (root): bench/gre.sh [RUNS]   (RUNS=5, DUR=5, ONLY, MODES="routing vipgate vipgate-tun",
# VIPGATE_BIN: see bench/README.md; OFFLOAD=true|false, ENCAP=gre|udp)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

bench_knobs 5 5 "$@"
OFFLOAD=${OFFLOAD:-true}
ENCAP=${ENCAP:-gre}
bench_require iperf3 python3
bench_cargo_bin VIPGATE_BIN vipgate vipgate
bench_init bg isp hq br hqpc brpc

veth "$P-hq" e0 "$P-isp" ihq
veth "$P-br" e0 "$P-isp" ibr
veth "$P-hq" e1 "$P-hqpc" e0
veth "$P-br" e1 "$P-brpc" e0
forwarding "$P-hq"
forwarding "$P-br"
x isp sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.proxy_arp=1 \
  net.ipv4.conf.ihq.proxy_arp=1 net.ipv4.conf.ibr.proxy_arp=1 \
  net.ipv4.neigh.ihq.proxy_delay=0 net.ipv4.neigh.ibr.proxy_delay=0
ip -n "$P-isp" addr add 198.51.100.254/32 dev ihq
ip -n "$P-isp" addr add 198.51.100.254/32 dev ibr
ip -n "$P-isp" route add 198.51.100.1/32 dev ihq
ip -n "$P-isp" route add 198.51.100.2/32 dev ibr
# Plain-routing path: the ISP routes the 10.x LANs to the routers.
ip -n "$P-isp" route add 10.101.0.0/24 via 198.51.100.1 dev ihq
ip -n "$P-isp" route add 10.102.0.0/24 via 198.51.100.2 dev ibr
addr "$P-hq" e0 198.51.100.1/24
addr "$P-br" e0 198.51.100.2/24
addr "$P-hq" e1 192.168.101.1/24
addr "$P-hq" e1 10.101.0.1/24
addr "$P-hq" e1 172.20.101.1/24
addr "$P-br" e1 192.168.102.1/24
addr "$P-br" e1 10.102.0.1/24
addr "$P-br" e1 172.20.102.1/24
ip -n "$P-hq" route add 10.102.0.0/24 via 198.51.100.2
ip -n "$P-br" route add 10.101.0.0/24 via 198.51.100.1
addr "$P-hqpc" e0 192.168.101.10/24
addr "$P-hqpc" e0 10.101.0.10/24
addr "$P-hqpc" e0 172.20.101.10/24
addr "$P-brpc" e0 192.168.102.10/24
addr "$P-brpc" e0 10.102.0.10/24
addr "$P-brpc" e0 172.20.102.10/24
ip -n "$P-hqpc" route add default via 192.168.101.1
ip -n "$P-hqpc" route add 10.102.0.0/24 via 10.101.0.1 src 10.101.0.10
ip -n "$P-hqpc" route add 172.20.102.0/24 via 172.20.101.1 src 172.20.101.10
ip -n "$P-brpc" route add default via 192.168.102.1
ip -n "$P-brpc" route add 10.101.0.0/24 via 10.102.0.1 src 10.102.0.10
ip -n "$P-brpc" route add 172.20.101.0/24 via 172.20.102.1 src 172.20.102.10

tunnel() { # name local remote inner lan key datapath
  cat <<CFG
[[gre]]
name = "$1"
local = "$2"
remote = "$3"
address = "$4"
routes = ["$5"]
key = $6
encap = "$ENCAP"
offload = $OFFLOAD
CFG
  echo "datapath = \"$7\""
}
site() { # name local remote inner-prefix lan-prefix
  printf '[daemon]\ncontrol = "%s"\n' "$TMP/$1.sock"
  tunnel "gre-$1" "$2" "$3" "172.16.0.$4/30" "192.168.$5.0/24" 1 kernel
  tunnel "tun-$1" "$2" "$3" "172.16.1.$4/30" "172.20.$5.0/24" 2 tun
}
site hq 198.51.100.1 198.51.100.2 1 102 > "$TMP/hq.toml"
site br 198.51.100.2 198.51.100.1 2 101 > "$TMP/br.toml"
spawn hq "$VIPGATE_BIN" run -c "$TMP/hq.toml" > "$TMP/hq.log" 2>&1
spawn br "$VIPGATE_BIN" run -c "$TMP/br.toml" > "$TMP/br.log" 2>&1
wait_for 10 x hqpc ping -c1 -W1 192.168.102.10 > /dev/null ||
  { cat "$TMP"/hq.log "$TMP"/br.log >&2; bench_die "the tunnel did not come up"; }
x hqpc ping -c1 -W1 10.102.0.10 > /dev/null || bench_die "the plain routing path is broken"
wait_for 10 x hqpc ping -c1 -W1 172.20.102.10 > /dev/null || bench_die "the TUN-path tunnel is broken"
# Which data path each tunnel runs on, as vipgate says (the kernel path may not load).
for s in hq br; do
  "$VIPGATE_BIN" show gre --json --control "$TMP/$s.sock" | python3 -c '
import json, sys
for t in json.load(sys.stdin):
    print("%s: %s (%s)" % (t["name"], t["datapath"], t["datapath_reason"]), file=sys.stderr)'
done

x brpc iperf3 -s -D -I "$TMP/iperf3.pid" > /dev/null
wait_port "$P-brpc" 10.102.0.10 5201

udp_kpps() { # IPERF3-CLIENT-ARGS...: thousands of datagrams/s received, "failed" if none
  x hqpc iperf3 -J "$@" 2>/dev/null | python3 -c '
import json, sys
try:
    e = json.load(sys.stdin)["end"]["sum"]
    print("%.0f" % ((e["packets"] - e["lost_packets"]) / e["seconds"] / 1e3))
except (ValueError, KeyError):
    print("failed")'
}

measure() { # MODE METRIC -> value
  local dst=10.102.0.10 src=10.101.0.10
  case $1 in
    vipgate) dst=192.168.102.10 src=192.168.101.10 ;;
    vipgate-tun) dst=172.20.102.10 src=172.20.101.10 ;;
  esac
  case $2 in
    tcp_1stream_Gbps) iperf_gbps hqpc -c "$dst" -B "$src" -t "$DUR" ;;
    tcp_4stream_Gbps) iperf_gbps hqpc -c "$dst" -B "$src" -t "$DUR" -P 4 ;;
    udp64_kpps) udp_kpps -c "$dst" -B "$src" -t "$DUR" -u -l 64 -b 0 ;;
  esac
}

for rep in $(seq "$RUNS"); do
  for metric in tcp_1stream_Gbps tcp_4stream_Gbps udp64_kpps; do
    want_metric "$metric" || continue
    for mode in $(bench_order "$rep" routing vipgate vipgate-tun); do
      v=$(measure "$mode" "$metric")
      record "$metric" "$mode" "$v"
      echo "repetition $rep/$RUNS  $metric  $mode  $v" >&2
    done
  done
done

bench_summarize --ratio vipgate/routing \
  --title "GRE tunnel (vipgate kernel and TUN data paths, encap=$ENCAP, offload=$OFFLOAD) vs plain kernel routing, $RUNS x ${DUR}s; load average $(cut -d' ' -f1-3 /proc/loadavg)"
