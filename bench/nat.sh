#!/usr/bin/env bash
# Side-by-side benchmark of the PAT gateway (issue 4): plain routing, kernel NAT (nftables
# masquerade + dnat), a null TUN forwarder and vipgate, on the same three namespaces, in one run.
#
#   inside 192.168.101.10 ── gw (.1 | 198.51.100.1) ── outside 198.51.100.200
#
# - iperf3 TCP, 1 and 4 streams, inside→outside (up) and outside→inside (down, -R), through
#   the overload address;
# - new connections/s through the static forward PUBLIC:8001 → inside:80 (wrk, Connection:
#   close, HAProxy answering 200 inside); plain routing connects to inside:80 directly;
# - bytes of memory per flow at 100,000 flows (natgw/examples/table_memory).
# "tunloop" is plain routing through a TUN (offload on, like vipgate's) served by a C loop that
# writes every packet back unchanged: blocking read, write, nothing else. It is the floor of
# what crossing a TUN costs, the ceiling of any userspace TUN gateway: vipgate / tunloop
# says how much of the gap to kernel NAT is vipgate's own.
# Prints min/median/max over RUNS runs and the vipgate / kernel NAT and vipgate / tunloop
# ratios of the medians.
#
# Usage (root): cargo build --release -p vipgate && bench/nat.sh [RUNS]   (DUR=seconds per run,
# VIPGATE_BIN=another binary, MEM_RUN=0 skips the table memory example, ONLY="kernel vipgate"
# picks modes, STREAMS="" skips iperf3, QUEUES=N sets vipgate's TUN queues (default 1),
# PERF_OUT=FILE records a perf profile of vipgate)
set -euo pipefail

RUNS=${1:-3}
DUR=${DUR:-4}
STREAMS=${STREAMS-1 4}   # STREAMS="" measures connections/s only
ONLY=${ONLY:-plain kernel tunloop vipgate}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${VIPGATE_BIN:-$ROOT/target/release/vipgate}
P=nb$$
TMP=$(mktemp -d)
[ "$(id -u)" = 0 ] || { echo "bench/nat.sh needs root" >&2; exit 1; }
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release -p vipgate" >&2; exit 1; }

cleanup() {
  for n in in gw out; do
    for pid in $(ip netns pids "$P-$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$P-$n" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT

x() { local n=$1; shift; ip netns exec "$P-$n" "$@"; }

for n in in gw out; do ip netns add "$P-$n"; ip -n "$P-$n" link set lo up; done
ip -n "$P-in" link add eth0 type veth peer name eth1 netns "$P-gw"
ip -n "$P-out" link add eth0 type veth peer name eth0 netns "$P-gw"
for l in "in eth0" "gw eth1" "gw eth0" "out eth0"; do set -- $l; ip -n "$P-$1" link set "$2" up; done
ip -n "$P-in" addr add 192.168.101.10/24 dev eth0
ip -n "$P-in" route add default via 192.168.101.1
ip -n "$P-gw" addr add 192.168.101.1/24 dev eth1
ip -n "$P-gw" addr add 198.51.100.1/24 dev eth0
ip -n "$P-out" addr add 198.51.100.200/24 dev eth0
x gw sysctl -qw net.ipv4.ip_forward=1
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

cat > "$TMP/haproxy.cfg" <<CFG
global
  maxconn 4000
defaults
  mode http
  timeout client 5s
  timeout server 5s
  timeout connect 5s
frontend web
  bind 192.168.101.10:80
  http-request return status 200 content-type text/plain string "ok"
CFG
x in haproxy -f "$TMP/haproxy.cfg" > "$TMP/haproxy.log" 2>&1 &
x out iperf3 -s -B 198.51.100.200 >/dev/null 2>&1 &
for _ in $(seq 50); do
  x in bash -c 'exec 3<>/dev/tcp/192.168.101.10/80' 2>/dev/null && break
  sleep 0.1
done
x in bash -c 'exec 3<>/dev/tcp/192.168.101.10/80' || { cat "$TMP/haproxy.log" >&2; exit 1; }

cat > "$TMP/site.toml" <<CFG
[daemon]
control = "$TMP/vipgate.sock"

[nat]
inside = ["eth1"]
outside = "eth0"
address = "198.51.100.1"
${QUEUES:+queues = $QUEUES}

[[nat.static]]
proto = "tcp"
outside_port = 8001
inside = "192.168.101.10:80"
CFG

RESULTS=$TMP/results
: > "$RESULTS"
record() { echo "$1 $2 $3" >> "$RESULTS"; }

measure() { # mode, connection-rate URL
  local mode=$1 url=$2
  for r in $(seq "$RUNS"); do
    for s in $STREAMS; do
      for dir in up down; do
        local rev=""; [ $dir = down ] && rev="-R"
        local bps
        bps=$(x in iperf3 -c 198.51.100.200 -t "$DUR" -P "$s" $rev -J 2>/dev/null |
          python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')
        record "tcp_${s}stream_${dir}_Gbps" "$mode" "$bps"
      done
    done
    local rps
    rps=$(x out wrk -t 2 -c 32 -d "${DUR}s" -H 'Connection: close' "$url" 2>/dev/null |
      awk '/Requests\/sec/ {print $2}' || true)
    record "new_conn_per_s" "$mode" "${rps:-0}"
  done
}

want() { case " $ONLY " in *" $1 "*) return 0;; *) return 1;; esac; }

if want plain; then
  echo "plain routing..." >&2
  ip -n "$P-out" route add 192.168.101.0/24 via 198.51.100.1
  measure plain "http://192.168.101.10/"
  ip -n "$P-out" route del 192.168.101.0/24 via 198.51.100.1
fi

if want tunloop; then
  echo "tunloop (plain routing through a TUN echoed by a C loop)..." >&2
  command -v cc >/dev/null || { echo "tunloop needs a C compiler (cc); ONLY= to skip it" >&2; exit 1; }
  cat > "$TMP/tunloop.c" <<'C'
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
int main(int argc, char **argv) {
  int fd = open("/dev/net/tun", O_RDWR);
  struct ifreq r;
  memset(&r, 0, sizeof r);
  r.ifr_flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR;
  strncpy(r.ifr_name, argv[1], IFNAMSIZ - 1);
  if (fd < 0 || ioctl(fd, TUNSETIFF, &r) < 0) { perror("TUNSETIFF"); return 1; }
  if (ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) < 0) { perror("TUNSETOFFLOAD"); return 1; }
  static char buf[65536 + 64];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) { perror("read"); return 1; }
    if (write(fd, buf, (size_t)n) < 0) { /* dropped, as a router would */ }
  }
}
C
  cc -O2 -o "$TMP/tunloop" "$TMP/tunloop.c"
  x gw "$TMP/tunloop" tl0 &
  TUNLOOP=$!
  for _ in $(seq 50); do ip -n "$P-gw" link show tl0 >/dev/null 2>&1 && break; sleep 0.1; done
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
  kill "$TUNLOOP"; wait "$TUNLOOP" 2>/dev/null || true
fi

if want kernel; then
  echo "kernel NAT (nftables masquerade + dnat)..." >&2
  x gw nft -f - <<NFT
table ip bnat {
  chain pre { type nat hook prerouting priority -100; iifname "eth0" tcp dport 8001 dnat to 192.168.101.10:80; }
  chain post { type nat hook postrouting priority 100; oifname "eth0" masquerade; }
}
NFT
  measure kernel "http://198.51.100.1:8001/"
  x gw nft delete table ip bnat
fi
# conntrack would also track the TUN path: start vipgate from a clean slate.
x gw sh -c 'command -v conntrack >/dev/null && conntrack -F >/dev/null 2>&1 || true'

echo "vipgate..." >&2
x gw "$BIN" run -c "$TMP/site.toml" > "$TMP/vipgate.log" 2>&1 &
for _ in $(seq 100); do
  x gw "$BIN" show nat -c "$TMP/site.toml" >/dev/null 2>&1 && break
  sleep 0.1
done
VPID=$(pgrep -f "$BIN run -c $TMP/site.toml" | head -1)
if [ -n "${PERF_OUT:-}" ]; then   # PERF_OUT=file: perf record -g of vipgate while it is measured
  perf record -q -g -p "$VPID" -o "$PERF_OUT" >/dev/null 2>&1 &
  PERF_PID=$!
fi
measure vipgate "http://198.51.100.1:8001/"
if [ -n "${PERF_PID:-}" ]; then kill -INT "$PERF_PID"; wait "$PERF_PID" || true; fi
PEAK_RSS=$(x gw sh -c "grep VmHWM /proc/\$(pgrep -f '$BIN run' | head -1)/status" | awk '{print $2}')

MEM="skipped (MEM=0)"
if [ "${MEM_RUN:-1}" != 0 ]; then
  echo "memory per flow at 100,000 flows..." >&2
  MEM=$(cd "$ROOT" && cargo run -q --release -p natgw --example table_memory 100000)
fi

python3 - "$RESULTS" <<'PY'
import sys, statistics as st, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    metric, mode, value = line.split()
    rows[(metric, mode)].append(float(value))
metrics = []
for (m, _) in rows:
    if m not in metrics: metrics.append(m)
print(f"{'metric':<24} {'mode':<8} {'min':>10} {'median':>10} {'max':>10}")
for m in metrics:
    for mode in ("plain", "kernel", "tunloop", "vipgate"):
        v = rows.get((m, mode), [])
        if v:
            print(f"{m:<24} {mode:<8} {min(v):>10.2f} {st.median(v):>10.2f} {max(v):>10.2f}")
    k, g = rows.get((m, "kernel")), rows.get((m, "vipgate"))
    if k and g and st.median(k) > 0:
        print(f"{m:<24} ratio vipgate/kernel NAT (medians): {st.median(g)/st.median(k):.2f}")
    t = rows.get((m, "tunloop"))
    if t and g and st.median(t) > 0:
        print(f"{m:<24} ratio vipgate/tunloop (medians): {st.median(g)/st.median(t):.2f}")
PY
echo "vipgate peak RSS during the run: ${PEAK_RSS:-?} kB"
echo "table memory: $MEM"
