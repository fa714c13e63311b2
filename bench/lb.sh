#!/usr/bin/env bash
# Side-by-side benchmark of load-balanced virtual services (issue 8), in one run on the same
# namespaces:
#   - vipgate: [[service]] wrr over two real servers (LVS-NAT through the TUN gateway);
#   - nftables: DNAT with `numgen inc mod 2` (the kernel's packet-level round robin here);
#   - HAProxy: `mode tcp`, `balance roundrobin` (Debian's package).
#
#   cl 198.51.100.200 ── eth0 ── lb 198.51.100.11 (VIP .10) ── br0 10.0.0.1 ── rs1 .101, rs2 .102
#
# Each run measures new connections per second (wrk, Connection: close, HAProxy answering
# 200 on each real server) and the split between the two real servers (their own session
# counters). After the runs: how long a failed real server stays in vipgate's rotation
# (health check interval 1 s, fall 2 → target ≤ interval × fall + 1 s = 3 s).
# Prints min/median/max over RUNS runs and the vipgate / other ratios of the medians.
#
# Usage (root): cargo build --release -p vipgate && bench/lb.sh [RUNS]   (DUR=seconds per run)
set -euo pipefail

RUNS=${1:-5}
DUR=${DUR:-4}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${VIPGATE_BIN:-$ROOT/target/release/vipgate}
P=lb$$
TMP=$(mktemp -d)
VIP=198.51.100.10
[ "$(id -u)" = 0 ] || { echo "bench/lb.sh needs root" >&2; exit 1; }
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release -p vipgate" >&2; exit 1; }
for t in wrk haproxy nft socat; do
  command -v "$t" >/dev/null || { echo "bench/lb.sh needs $t" >&2; exit 1; }
done

cleanup() {
  for n in cl lb rs1 rs2; do
    for pid in $(ip netns pids "$P-$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$P-$n" 2>/dev/null || true
  done
  if [ -n "${KEEP:-}" ]; then echo "logs kept in $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
KEEP=${KEEP:-}

x() { local n=$1; shift; ip netns exec "$P-$n" "$@"; }

for n in cl lb rs1 rs2; do ip netns add "$P-$n"; ip -n "$P-$n" link set lo up; done
ip -n "$P-cl" link add eth0 type veth peer name eth0 netns "$P-lb"
ip -n "$P-cl" addr add 198.51.100.200/24 dev eth0
ip -n "$P-cl" link set eth0 up
ip -n "$P-lb" addr add 198.51.100.11/24 dev eth0
ip -n "$P-lb" link set eth0 up
ip -n "$P-lb" link add br0 type bridge
ip -n "$P-lb" link set br0 up
ip -n "$P-lb" addr add 10.0.0.1/24 dev br0
x lb sysctl -qw net.ipv4.ip_forward=1
# Tens of thousands of short connections per run wrap the client's ports; a SYN that reuses a
# 4-tuple still in TIME_WAIT on a real server is often refused (this kernel's per-4-tuple
# timestamps trip PAWS) and retried a second later, which collapses every mode alike after
# the first run. Skip TIME_WAIT in these namespaces and widen the port range: the same for
# all three load balancers.
for n in cl lb rs1 rs2; do
  x $n sysctl -qw net.ipv4.tcp_max_tw_buckets=0
  x $n sysctl -qw net.ipv4.ip_local_port_range="1024 65535"
done
for i in 1 2; do
  ip -n "$P-rs$i" link add eth0 type veth peer name v$i netns "$P-lb"
  ip -n "$P-rs$i" addr add 10.0.0.10$i/24 dev eth0
  ip -n "$P-rs$i" link set eth0 up
  ip -n "$P-rs$i" route add default via 10.0.0.1
  ip -n "$P-lb" link set v$i master br0
  ip -n "$P-lb" link set v$i up
done

# Real servers: HAProxy answering 200 itself, with a stats socket for its session count.
real_server() {
  local i=$1
  cat > "$TMP/rs$i.cfg" <<CFG
global
  maxconn 4000
  stats socket $TMP/rs$i.sock mode 600 level admin
defaults
  mode http
  timeout client 5s
  timeout server 5s
  timeout connect 5s
frontend web
  bind 10.0.0.10$i:80
  http-request return status 200 content-type text/plain string "rs$i"
CFG
  x rs$i haproxy -f "$TMP/rs$i.cfg" -D -p "$TMP/rs$i.pid"
}
real_server 1
real_server 2

# Total sessions a real server accepted (HAProxy's stot of frontend "web").
sessions() {
  echo "show stat" | socat stdio "unix-connect:$TMP/rs$1.sock" |
    awk -F, '$1 == "web" && $2 == "FRONTEND" { print $8 }'
}

wait_vip() {
  for _ in $(seq 100); do
    x cl bash -c "exec 3<>/dev/tcp/$VIP/80" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "the VIP does not answer" >&2
  return 1
}

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

# One measurement of mode $1: "<conn/s> <rs1 sessions> <rs2 sessions> <wrk socket errors>".
measure() {
  local a1 a2 rps errs log="$TMP/wrk-$1-$run.log"
  a1=$(sessions 1); a2=$(sessions 2)
  x cl wrk -t 2 -c 32 -d "${DUR}s" -H 'Connection: close' "http://$VIP/" > "$log" 2>&1 || true
  rps=$(awk '/Requests\/sec/ { print $2 }' "$log")
  errs=$(awk '/Socket errors/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$log")
  echo "$rps $(( $(sessions 1) - a1 )) $(( $(sessions 2) - a2 )) ${errs:-0}"
}

: > "$TMP/results"
for run in $(seq "$RUNS"); do
  # vipgate (the VIP is owned by vipgate: routed into nat0, proxy neighbour on eth0).
  x lb "$BIN" run -c "$TMP/vipgate.toml" > "$TMP/vipgate.log" 2>&1 &
  wait_vip
  echo "vipgate $(measure vipgate)" >> "$TMP/results"
  kill "$(x lb pgrep -f "$BIN run" | head -1)"
  for _ in $(seq 100); do x lb pgrep -f "$BIN run" >/dev/null || break; sleep 0.05; done

  # HAProxy mode tcp (the VIP as a local address).
  ip -n "$P-lb" addr add $VIP/32 dev eth0
  x lb haproxy -f "$TMP/haproxy-lb.cfg" -D -p "$TMP/haproxy-lb.pid"
  wait_vip
  echo "haproxy $(measure haproxy)" >> "$TMP/results"
  kill "$(cat "$TMP/haproxy-lb.pid")"
  for _ in $(seq 100); do kill -0 "$(cat "$TMP/haproxy-lb.pid")" 2>/dev/null || break; sleep 0.05; done

  # nftables numgen DNAT (last in the run: deleting the table releases conntrack again).
  x lb nft -f - <<NFT
table ip lbbench {
  chain pre {
    type nat hook prerouting priority dstnat;
    ip daddr $VIP tcp dport 80 dnat to numgen inc mod 2 map { 0 : 10.0.0.101, 1 : 10.0.0.102 }
  }
}
NFT
  wait_vip
  echo "nft $(measure nft)" >> "$TMP/results"
  x lb nft delete table ip lbbench
  ip -n "$P-lb" addr del $VIP/32 dev eth0
  echo "run $run/$RUNS done" >&2
done

# Failover: stop rs2, time until vipgate's show lb says down (3 times).
x lb "$BIN" run -c "$TMP/vipgate.toml" > "$TMP/vipgate.log" 2>&1 &
wait_vip
for _ in 1 2 3; do
  kill "$(cat "$TMP/rs2.pid")"
  t0=$(date +%s%N)
  for _ in $(seq 200); do
    x lb "$BIN" show lb --control "$TMP/vipgate.sock" | grep -q '10.0.0.102:80 *down' && break
    sleep 0.02
  done
  echo "failover $(( ($(date +%s%N) - t0) / 1000000 ))" >> "$TMP/results"
  real_server 2
  for _ in $(seq 200); do
    x lb "$BIN" show lb --control "$TMP/vipgate.sock" | grep -q '10.0.0.102:80 *up' && break
    sleep 0.05
  done
done
kill "$(x lb pgrep -f "$BIN run" | head -1)"

python3 - "$TMP/results" <<'PY'
import sys, statistics as st, collections
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
rps, split, fail = collections.defaultdict(list), collections.defaultdict(list), []
for r in rows:
    if r[0] == "failover":
        fail.append(float(r[1]))
        continue
    rps[r[0]].append(float(r[1]))
    split[r[0]].append((int(r[2]), int(r[3]), int(r[4])))
print(f"{'new connections/s':<20} {'min':>9} {'median':>9} {'max':>9}   rs1/rs2 (wrk socket errors) per run")
for mode in ("vipgate", "nft", "haproxy"):
    v = rps[mode]
    s = " ".join(f"{a}/{b}({e})" for a, b, e in split[mode])
    print(f"{mode:<20} {min(v):>9.0f} {st.median(v):>9.0f} {max(v):>9.0f}   {s}")
for other in ("nft", "haproxy"):
    print(f"ratio vipgate/{other} (medians): {st.median(rps['vipgate']) / st.median(rps[other]):.2f}")
if fail:
    print(f"failed backend out of rotation after (ms): min {min(fail):.0f} median {st.median(fail):.0f} max {max(fail):.0f}"
          " (interval 1 s x fall 2 = 2000 ms)")
PY
