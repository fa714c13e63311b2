#!/usr/bin/env bash
# Client-visible VRRP failover gap: vipgate vs keepalived, same settings, same run.
#
# Two directors (priority 150 and 100) and a client on one bridge, all in network
# namespaces created here. The client sends a UDP probe to the VIP every 10 ms; the gap is
# the longest silence between two answers. Scenarios: host death (bridge port down + kill -9
# of the master's daemon) and graceful stop (SIGTERM), at advert intervals 1 s and 100 ms.
#
# Usage: sudo bench/vrrp.sh            (RUNS=5 by default; VIPGATE_BIN to use another binary)
set -euo pipefail

RUNS=${RUNS:-5}
P=${P:-vb$$}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/vipgate-bench-vrrp.XXXX)
VIP=198.51.100.10

[ "$(id -u)" = 0 ] || { echo "bench/vrrp.sh needs root (network namespaces)" >&2; exit 1; }
if [ -z "${VIPGATE_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p vipgate)
  VIPGATE_BIN=$ROOT/target/release/vipgate
fi

cat >"$WORK/echo.py" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 7777))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(sys.argv[1].encode(), peer)
EOF
cat >"$WORK/probe.py" <<'EOF'
import socket, sys, time
vip, seconds, start_file = sys.argv[1], float(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
start = time.monotonic(); nxt = start; replies = []; seq = 0
while time.monotonic() - start < seconds:
    now = time.monotonic()
    if now >= nxt:
        try: s.sendto(b"p", (vip, 7777))
        except OSError: pass
        nxt += 0.01; seq += 1
        if seq == 50: open(start_file, "w").close()
    try:
        s.recvfrom(64); replies.append(time.monotonic())
    except BlockingIOError:
        time.sleep(0.0005)
gaps = [b - a for a, b in zip(replies, replies[1:])]
print(round(max(gaps) * 1000) if gaps else -1)
EOF

lab_down() {
  for h in d1 d2 cl sw; do
    for pid in $(ip netns pids "$P-$h" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$P-$h" 2>/dev/null || true
  done
}
trap 'lab_down; rm -rf "$WORK"' EXIT

lab_up() {
  lab_down
  ip netns add "$P-sw"
  ip -n "$P-sw" link add br0 type bridge
  ip -n "$P-sw" link set br0 up
  local ip=(d1:11 d2:12 cl:200)
  for e in "${ip[@]}"; do
    local h=${e%%:*} a=${e##*:}
    ip netns add "$P-$h"
    ip -n "$P-$h" link set lo up
    ip -n "$P-$h" link add eth0 type veth peer name "p-$h" netns "$P-sw"
    ip -n "$P-sw" link set "p-$h" master br0 up
    ip -n "$P-$h" link set eth0 up
    ip -n "$P-$h" addr add "198.51.100.$a/24" dev eth0
  done
  for h in d1 d2; do
    ip netns exec "$P-$h" python3 "$WORK/echo.py" "$h" >/dev/null 2>&1 &
  done
}

# start TOOL HOST PRIORITY INTERVAL_MS: prints the daemon's pid
start() {
  local tool=$1 h=$2 prio=$3 int=$4
  if [ "$tool" = vipgate ]; then
    cat >"$WORK/$h.toml" <<EOF
[daemon]
control = "$WORK/$h.sock"

[[vrrp]]
name = "vip"
interface = "eth0"
vrid = 51
priority = $prio
advert_interval = "${int}ms"
addresses = ["$VIP/24"]
EOF
    ip netns exec "$P-$h" "$VIPGATE_BIN" run -c "$WORK/$h.toml" >"$WORK/$h.log" 2>&1 &
  else
    local ai
    ai=$(python3 -c "print($int/1000)")
    cat >"$WORK/$h.conf" <<EOF
global_defs {
  vrrp_version 3
}
vrrp_instance vip {
  state BACKUP
  interface eth0
  virtual_router_id 51
  priority $prio
  advert_int $ai
  virtual_ipaddress {
    $VIP/24
  }
}
EOF
    ip netns exec "$P-$h" keepalived -n -l --vrrp -f "$WORK/$h.conf" \
      -p "$WORK/$h.pid" -r "$WORK/$h.vpid" >"$WORK/$h.log" 2>&1 &
  fi
  echo $!
}

holds() { ip -n "$P-$1" -4 -o addr show dev eth0 | grep -q "$VIP/"; }

wait_holds() { # HOST TIMEOUT_S
  local end=$((SECONDS + $2))
  until holds "$1"; do
    [ $SECONDS -lt $end ] || { echo "timeout waiting for $1 to hold the VIP" >&2; return 1; }
    sleep 0.02
  done
}

# one_run TOOL SCENARIO INTERVAL_MS: prints the gap in ms
one_run() {
  local tool=$1 scen=$2 int=$3
  lab_up
  local p1 p2
  p1=$(start "$tool" d1 150 "$int")
  wait_holds d1 $((int * 5 / 1000 + 5))
  p2=$(start "$tool" d2 100 "$int")
  # Let d2 settle as backup: it has heard several adverts after this.
  sleep "$(python3 -c "print($int * 5 / 1000)")"
  holds d2 && { echo "d2 holds the VIP before the failure" >&2; return 1; }
  local secs
  secs=$(python3 -c "print(1.5 + 4.5 * $int / 1000)")
  rm -f "$WORK/started"
  ip netns exec "$P-cl" python3 "$WORK/probe.py" "$VIP" "$secs" "$WORK/started" >"$WORK/gap" &
  local probe=$!
  until [ -e "$WORK/started" ]; do sleep 0.01; done
  # Fail at a random point of the advert interval: the gap depends on how long ago the last
  # advert left, and a fixed phase would favour whichever tool happens to align with it.
  sleep "$(python3 -c "import random; print(random.uniform(0, $int / 1000))")"
  if [ "$scen" = death ]; then
    # The whole host dies: its link first (nothing it does afterwards reaches the wire, e.g.
    # keepalived's VRRP child resigning when its parent dies), then every process in its
    # namespace (daemon, keepalived's VRRP child, the echo service).
    ip -n "$P-sw" link set p-d1 down
    for pid in $(ip netns pids "$P-d1"); do kill -9 "$pid" 2>/dev/null || true; done
  else
    kill -TERM "$p1"
  fi
  wait "$probe"
  holds d2 || { echo "d2 did not take over ($tool $scen $int)" >&2; return 1; }
  kill -TERM "$p2" 2>/dev/null || true
  cat "$WORK/gap"
}

stats() { # values... -> "min/median/max"
  printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%d/%d/%d", a[1], m, a[NR]}'
}

echo "VRRP failover gap (client-visible, ms, min/median/max over $RUNS runs)"
echo "vipgate: $("$VIPGATE_BIN" --version 2>/dev/null || echo "$VIPGATE_BIN")"
echo "keepalived: $(keepalived --version 2>&1 | head -1)"
printf '%-10s %-9s %-18s %-18s %s\n' scenario interval vipgate keepalived "median ratio vipgate/keepalived"
for int in 1000 100; do
  for scen in death graceful; do
    declare -a vg=() ka=()
    for ((i = 0; i < RUNS; i++)); do
      # Interleave the tools so machine load hits both alike.
      vg+=("$(one_run vipgate "$scen" "$int")")
      ka+=("$(one_run keepalived "$scen" "$int")")
    done
    sv=$(stats "${vg[@]}"); sk=$(stats "${ka[@]}")
    mv=$(echo "$sv" | cut -d/ -f2); mk=$(echo "$sk" | cut -d/ -f2)
    printf '%-10s %-9s %-18s %-18s %s\n' "$scen" "${int}ms" "$sv" "$sk" \
      "$(python3 -c "print(f'{$mv / max($mk, 1):.2f}')")"
  done
done
