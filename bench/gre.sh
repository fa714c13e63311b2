#!/usr/bin/env bash
# GRE tunnel vs plain kernel routing, side by side in one run, on one veth topology:
#
#   hqpc -- hq (198.51.100.1) -- isp -- br (198.51.100.2) -- brpc
#
# Both paths share every namespace and veth. The hosts carry two addresses each:
# 192.168.101/102.x is routed through vipgate's GRE tunnel, 10.101/102.0.x by plain kernel
# routing (the ISP knows those routes). Each round runs every test on both paths back to
# back, so load swings on this shared machine hit both alike.
#
# Tests: iperf3 TCP 1 stream and 4 streams (Gbit/s, receiver side), iperf3 UDP 64-byte
# datagrams unthrottled (packets/s received). Prints min/median/max per path and the
# tunnel/routing ratio of the medians.
#
# Usage: sudo bench/gre.sh            (ROUNDS=5 SECS=5 OFFLOAD=true|false ENCAP=gre|udp)
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
SECS=${SECS:-5}
OFFLOAD=${OFFLOAD:-true}
ENCAP=${ENCAP:-gre}
P=${PREFIX:-bg$$}
BIN=${VIPGATE_BIN:-target/release/vipgate}
DIR=$(mktemp -d /tmp/vipgate-bench-gre.XXXXXX)

[ "$(id -u)" -eq 0 ] || { echo "bench/gre.sh: needs root (namespaces, TUN)" >&2; exit 1; }
[ -x "$BIN" ] || cargo build --release -p vipgate

HOSTS="isp hq br hqpc brpc"
cleanup() {
  for h in $HOSTS; do
    for pid in $(ip netns pids "$P-$h" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$P-$h" 2>/dev/null || true
  done
  rm -rf "$DIR"
}
trap cleanup EXIT

x() { local h=$1; shift; ip netns exec "$P-$h" "$@"; }
for h in $HOSTS; do ip netns add "$P-$h"; ip -n "$P-$h" link set lo up; done
ip -n "$P-hq" link add e0 type veth peer name ihq netns "$P-isp"
ip -n "$P-br" link add e0 type veth peer name ibr netns "$P-isp"
ip -n "$P-hq" link add e1 type veth peer name e0 netns "$P-hqpc"
ip -n "$P-br" link add e1 type veth peer name e0 netns "$P-brpc"
for h in hq br; do
  ip -n "$P-$h" link set e0 up; ip -n "$P-$h" link set e1 up
  x "$h" sysctl -qw net.ipv4.ip_forward=1
done
for h in hqpc brpc; do ip -n "$P-$h" link set e0 up; done
ip -n "$P-isp" link set ihq up; ip -n "$P-isp" link set ibr up
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
ip -n "$P-hq" addr add 198.51.100.1/24 dev e0
ip -n "$P-br" addr add 198.51.100.2/24 dev e0
ip -n "$P-hq" addr add 192.168.101.1/24 dev e1
ip -n "$P-hq" addr add 10.101.0.1/24 dev e1
ip -n "$P-br" addr add 192.168.102.1/24 dev e1
ip -n "$P-br" addr add 10.102.0.1/24 dev e1
ip -n "$P-hq" route add 10.102.0.0/24 via 198.51.100.2
ip -n "$P-br" route add 10.101.0.0/24 via 198.51.100.1
ip -n "$P-hqpc" addr add 192.168.101.10/24 dev e0
ip -n "$P-hqpc" addr add 10.101.0.10/24 dev e0
ip -n "$P-brpc" addr add 192.168.102.10/24 dev e0
ip -n "$P-brpc" addr add 10.102.0.10/24 dev e0
ip -n "$P-hqpc" route add default via 192.168.101.1
ip -n "$P-hqpc" route add 10.102.0.0/24 via 10.101.0.1 src 10.101.0.10
ip -n "$P-brpc" route add default via 192.168.102.1
ip -n "$P-brpc" route add 10.101.0.0/24 via 10.102.0.1 src 10.102.0.10

site() { # name local remote inner lan
  cat <<EOF
[daemon]
control = "$DIR/$1.sock"
[[gre]]
name = "gre-$1"
local = "$2"
remote = "$3"
address = "$4"
routes = ["$5"]
encap = "$ENCAP"
offload = $OFFLOAD
EOF
}
site hq 198.51.100.1 198.51.100.2 172.16.0.1/30 192.168.102.0/24 > "$DIR/hq.toml"
site br 198.51.100.2 198.51.100.1 172.16.0.2/30 192.168.101.0/24 > "$DIR/br.toml"
x hq "$BIN" run -c "$DIR/hq.toml" > "$DIR/hq.log" 2>&1 &
x br "$BIN" run -c "$DIR/br.toml" > "$DIR/br.log" 2>&1 &
for _ in $(seq 100); do
  x hqpc ping -c1 -W1 192.168.102.10 >/dev/null 2>&1 && break
  sleep 0.1
done
x hqpc ping -c1 -W1 192.168.102.10 >/dev/null || { echo "tunnel did not come up"; cat "$DIR"/*.log; exit 1; }
x hqpc ping -c1 -W1 10.102.0.10 >/dev/null || { echo "plain routing path broken"; exit 1; }

x brpc iperf3 -s -D -I "$DIR/iperf3.pid" >/dev/null
sleep 0.5

# iperf3 JSON -> one number.
tcp_gbps() { python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'; }
udp_kpps() { python3 -c '
import json,sys
e=json.load(sys.stdin)["end"]["sum"]
print("%.0f" % ((e["packets"]-e["lost_packets"])/e["seconds"]/1e3))'; }

run() { # path test -> value
  local dst src
  if [ "$1" = tunnel ]; then dst=192.168.102.10; src=192.168.101.10; else dst=10.102.0.10; src=10.101.0.10; fi
  case $2 in
    tcp1) x hqpc iperf3 -J -c "$dst" -B "$src" -t "$SECS" | tcp_gbps ;;
    tcp4) x hqpc iperf3 -J -c "$dst" -B "$src" -t "$SECS" -P 4 | tcp_gbps ;;
    udp64) x hqpc iperf3 -J -c "$dst" -B "$src" -t "$SECS" -u -l 64 -b 0 | udp_kpps ;;
  esac
}

TESTS="tcp1 tcp4 udp64"
declare -A R
for round in $(seq "$ROUNDS"); do
  for t in $TESTS; do
    for path in routing tunnel; do
      v=$(run "$path" "$t")
      R[$path.$t]+="$v "
      echo "round $round  $t  $path  $v" >&2
    done
  done
done

stats() { python3 -c '
import sys, statistics
v=[float(x) for x in sys.argv[1:]]
print("%g / %g / %g" % (min(v), round(statistics.median(v), 2), max(v)))' "$@"; }
median() { python3 -c 'import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

echo
echo "GRE tunnel (vipgate, encap=$ENCAP, offload=$OFFLOAD) vs plain kernel routing, $ROUNDS rounds x ${SECS}s"
printf "%-24s %-28s %-28s %s\n" test "routing min/median/max" "vipgate min/median/max" "ratio (medians)"
for t in $TESTS; do
  unit=$([ "$t" = udp64 ] && echo "kpps" || echo "Gbit/s")
  r=$(stats ${R[routing.$t]}); g=$(stats ${R[tunnel.$t]})
  ratio=$(python3 -c "print('%.2f' % ($(median ${R[tunnel.$t]}) / $(median ${R[routing.$t]})))")
  printf "%-24s %-28s %-28s %sx\n" "$t ($unit)" "$r" "$g" "$ratio"
done
