#!/usr/bin/env bash
# Side-by-side benchmark of the PAT gateway (issue 4): plain routing, kernel NAT (nftables
# masquerade + dnat) and vipgate, on the same three namespaces, in one run.
#
#   inside 192.168.101.10 ── gw (.1 | 198.51.100.1) ── outside 198.51.100.200
#
# - iperf3 TCP, 1 and 4 streams, inside→outside (up) and outside→inside (down, -R), through
#   the overload address;
# - new connections/s through the static forward PUBLIC:8001 → inside:80 (wrk, Connection:
#   close, HAProxy answering 200 inside); plain routing connects to inside:80 directly;
# - bytes of memory per flow at 100,000 flows (natgw/examples/table_memory).
# Prints min/median/max over RUNS runs and the vipgate / kernel NAT ratio of the medians.
#
# Usage (root): cargo build --release -p vipgate && bench/nat.sh [RUNS]   (DUR=seconds per run,
# VIPGATE_BIN=another binary, MEM_RUN=0 skips the table memory example, ONLY="kernel vipgate"
# picks modes, STREAMS="" skips iperf3, PERF_OUT=FILE records a perf profile of vipgate)
set -euo pipefail

RUNS=${1:-3}
DUR=${DUR:-4}
STREAMS=${STREAMS-1 4}   # STREAMS="" measures connections/s only
ONLY=${ONLY:-plain kernel vipgate}
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
    for mode in ("plain", "kernel", "vipgate"):
        v = rows.get((m, mode), [])
        if v:
            print(f"{m:<24} {mode:<8} {min(v):>10.2f} {st.median(v):>10.2f} {max(v):>10.2f}")
    k, g = rows.get((m, "kernel")), rows.get((m, "vipgate"))
    if k and g and st.median(k) > 0:
        print(f"{m:<24} ratio vipgate/kernel NAT (medians): {st.median(g)/st.median(k):.2f}")
PY
echo "vipgate peak RSS during the run: ${PEAK_RSS:-?} kB"
echo "table memory: $MEM"
