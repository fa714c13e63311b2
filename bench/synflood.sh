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
# drops every SYN-ACK: sources that never answer). Each mode's figure is its flood rate as a
# ratio of its own quiet rate, so the two gateways' different quiet speeds cancel out. The
# modes alternate round by round (vipgate is started afresh, conntrack is flushed), RUNS
# rounds; prints min/median/max of each figure and each mode's ratio.
#
# Usage (root): bench/synflood.sh [RUNS]   (default 3; DUR=seconds per measurement (4),
# FLOOD_PPS=forged SYNs per second (50000), VIPGATE_BIN and SPOOF_BIN=other binaries (then
# they are not built), ONLY="kernel" or ONLY="vipgate" runs one mode)
set -euo pipefail

RUNS=${1:-3}
DUR=${DUR:-4}
FLOOD_PPS=${FLOOD_PPS:-50000}
ONLY=${ONLY:-kernel vipgate}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
P=sf$$
TMP=$(mktemp -d)
[ "$(id -u)" = 0 ] || { echo "bench/synflood.sh needs root" >&2; exit 1; }

cleanup() {
  for n in in gw out att; do
    for pid in $(ip netns pids "$P-$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$P-$n" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT

# The peers, from Debian, when missing.
need=()
for pair in wrk:wrk haproxy:haproxy nft:nftables conntrack:conntrack; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The forger (tests/src/bin/spoof.rs) and vipgate: release builds, unless given.
OUT=${CARGO_TARGET_DIR:-$ROOT/target}/release
BIN=${VIPGATE_BIN:-$OUT/vipgate}
SPOOF=${SPOOF_BIN:-$OUT/spoof}
[ -n "${VIPGATE_BIN:-}" ] || (cd "$ROOT" && cargo build -q --release -p vipgate --bin vipgate)
[ -n "${SPOOF_BIN:-}" ] || (cd "$ROOT" && cargo build -q --release -p vipgate-tests --bin spoof)

x() { local n=$1; shift; ip netns exec "$P-$n" "$@"; }

for n in in gw out att; do ip netns add "$P-$n"; ip -n "$P-$n" link set lo up; done
ip -n "$P-in" link add eth0 type veth peer name eth1 netns "$P-gw"
ip -n "$P-gw" link add eth0 type veth peer name pgw netns "$P-out"
ip -n "$P-att" link add eth0 type veth peer name patt netns "$P-out"
ip -n "$P-out" link add br0 type bridge
ip -n "$P-out" link set pgw master br0
ip -n "$P-out" link set patt master br0
for l in "in eth0" "gw eth1" "gw eth0" "out pgw" "out patt" "out br0" "att eth0"; do
  set -- $l; ip -n "$P-$1" link set "$2" up
done
ip -n "$P-in" addr add 192.168.101.10/24 dev eth0
ip -n "$P-in" route add default via 192.168.101.1
ip -n "$P-gw" addr add 192.168.101.1/24 dev eth1
ip -n "$P-gw" addr add 198.51.100.1/24 dev eth0
ip -n "$P-gw" route add 203.0.0.0/16 via 198.51.100.66
ip -n "$P-out" addr add 198.51.100.200/24 dev br0
ip -n "$P-att" addr add 198.51.100.66/24 dev eth0
x gw sysctl -qw net.ipv4.ip_forward=1
# As bench/nat.sh: the client reuses TIME_WAIT ports, the server keeps none, so that the
# rate measures the gateway and not one client's port space.
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
URL=http://198.51.100.1:8001/

rate() { # connections/s over DUR seconds
  x out wrk -t 2 -c 32 -d "${DUR}s" -H 'Connection: close' "$URL" 2>/dev/null |
    awk '/Requests\/sec/ {print $2}' || true
}

measure() { # mode: quiet rate, then the rate during a flood
  local mode=$1 quiet flood
  quiet=$(rate)
  # The flood runs from before wrk starts until after it ends.
  x att "$SPOOF" syn-flood --from 203.0.0.0/16 --to 198.51.100.1:8001 \
    --count $((FLOOD_PPS * (DUR + 3))) --rate "$FLOOD_PPS" --max-secs $((DUR + 10)) \
    > "$TMP/flood.log" 2>&1 &
  local flooder=$!
  sleep 1
  flood=$(rate)
  wait "$flooder" || { cat "$TMP/flood.log" >&2; exit 1; }
  echo "  $mode: quiet ${quiet:-0}/s, flood ${flood:-0}/s; $(cat "$TMP/flood.log")" >&2
  echo "$mode ${quiet:-0} ${flood:-0}" >> "$RESULTS"
}

want() { case " $ONLY " in *" $1 "*) return 0;; *) return 1;; esac; }

kernel_round() {
  x gw nft -f - <<NFT
table ip sfnat {
  chain pre { type nat hook prerouting priority -100; iifname "eth0" tcp dport 8001 dnat to 192.168.101.10:80; }
  chain post { type nat hook postrouting priority 100; oifname "eth0" masquerade; }
}
NFT
  measure kernel
  echo "  kernel: $(x gw conntrack -C) conntrack entries after the flood" >&2
  x gw nft delete table ip sfnat
  x gw conntrack -F >/dev/null 2>&1 || true
}

vipgate_round() {
  # Not through x(): $! must be vipgate itself (ip netns exec execs it), not a subshell.
  ip netns exec "$P-gw" "$BIN" run -c "$TMP/site.toml" > "$TMP/vipgate.log" 2>&1 &
  local vipgate=$!
  for _ in $(seq 100); do
    x gw "$BIN" show nat -c "$TMP/site.toml" >/dev/null 2>&1 && break
    sleep 0.1
  done
  x gw "$BIN" show nat -c "$TMP/site.toml" >/dev/null || { cat "$TMP/vipgate.log" >&2; exit 1; }
  measure vipgate
  echo "  vipgate: $(x gw "$BIN" show nat --json -c "$TMP/site.toml" | python3 -c '
import json, sys
v = json.load(sys.stdin)[0]
c, d = v["counters"], v["drops"]
print("%d flows after the flood; early_drops %d, half_open_source %d, table_full %d" % (
    v["flows"], c.get("early_drops", 0), d.get("half_open_source", 0), d.get("table_full", 0)))')" >&2
  if ! kill -0 "$vipgate" 2>/dev/null; then
    echo "vipgate died during the round:" >&2; tail -20 "$TMP/vipgate.log" >&2; exit 1
  fi
  kill -TERM "$vipgate"
  wait "$vipgate" || true
  # The next round starts from a clean gateway: its TUN gone too.
  for _ in $(seq 50); do ip -n "$P-gw" link show nat0 >/dev/null 2>&1 || break; sleep 0.1; done
}

for r in $(seq "$RUNS"); do
  echo "round $r of $RUNS" >&2
  # Alternate which mode goes first, so that neither always measures a warmer machine.
  if [ $((r % 2)) = 1 ]; then order="kernel vipgate"; else order="vipgate kernel"; fi
  for mode in $order; do
    want "$mode" && "${mode}_round"
  done
done

python3 - "$RESULTS" "$FLOOD_PPS" <<'PY'
import sys, statistics as st, collections
rows = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    mode, quiet, flood = line.split()
    quiet, flood = float(quiet), float(flood)
    rows[mode]["quiet"].append(quiet)
    rows[mode]["flood"].append(flood)
    rows[mode]["ratio"].append(flood / quiet if quiet > 0 else 0.0)
print(f"new connections/s through a static forward, quiet and during {int(sys.argv[2]):,} forged SYN/s")
print(f"{'mode':<8} {'figure':<18} {'min':>9} {'median':>9} {'max':>9}")
names = {"quiet": "quiet conn/s", "flood": "flood conn/s", "ratio": "flood / quiet"}
for mode in ("kernel", "vipgate"):
    for k in ("quiet", "flood", "ratio"):
        v = rows[mode][k]
        if v:
            fmt = "{:>9.2f}" if k == "ratio" else "{:>9.0f}"
            print(f"{mode:<8} {names[k]:<18} " + " ".join(fmt.format(x) for x in (min(v), st.median(v), max(v))))
k, g = rows["kernel"]["ratio"], rows["vipgate"]["ratio"]
if k and g and st.median(k) > 0:
    print(f"vipgate's flood/quiet ratio over kernel NAT's (medians): {st.median(g) / st.median(k):.2f}")
PY
