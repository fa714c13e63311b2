#!/usr/bin/env bash
# Client-visible VRRP failover gap: vipgate vs keepalived, same settings, same run.
#
# Two directors (priority 150 and 100) and a client on one bridge, all in network
# namespaces created here. The client sends a UDP probe to the VIP every 10 ms; the gap is
# the longest silence between two answers. Scenarios: host death (bridge port down + kill -9
# of the master's daemon) and graceful stop (SIGTERM), at advert intervals 1 s and 100 ms.
# Each repetition runs both tools, the order reversed every other repetition.
#
# Metrics: gap_ms_SCENARIO_INTERVAL (gap_ms_death_1000ms, gap_ms_graceful_100ms, ...).
#
# Usage (root): bench/vrrp.sh [RUNS]   (RUNS=5, ONLY, MODES="vipgate keepalived", VIPGATE_BIN:
# see bench/README.md; DUR is not used)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

bench_knobs 5 1 "$@"   # DUR is not used: a run lasts as long as its failover needs
bench_require keepalived python3
bench_cargo_bin VIPGATE_BIN vipgate vipgate
bench_init vb sw d1 d2 cl
WORK=$TMP
VIP=198.51.100.10

# A fresh lab per run: switch sw, hosts d1 and d2 (directors) and cl (client) on its bridge.
lab_up() {
  bench_teardown
  local e h
  for e in d1:11 d2:12 cl:200; do
    h=${e%%:*}
    lan_attach sw "$h" eth0 "198.51.100.${e##*:}/24"
  done
  for h in d1 d2; do
    spawn "$h" python3 "$BENCH_DIR/tools/udp_echo.py" "$h" > /dev/null 2>&1
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
    ip netns exec "$P-$h" "$VIPGATE_BIN" run -c "$WORK/$h.toml" > "$WORK/$h.log" 2>&1 &
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

# one_run TOOL SCENARIO INTERVAL_MS: one failover on a fresh lab, its gap (ms) in $WORK/gap;
# fails when the backup did not take over as it should
one_run() {
  local tool=$1 scen=$2 int=$3
  lab_up
  local p1 p2
  p1=$(start "$tool" d1 150 "$int")
  wait_holds d1 $((int * 5 / 1000 + 5)) || return 1
  p2=$(start "$tool" d2 100 "$int")
  # Let d2 settle as backup: it has heard several adverts after this.
  sleep "$(python3 -c "print($int * 5 / 1000)")"
  holds d2 && { echo "d2 holds the VIP before the failure" >&2; return 1; }
  local secs
  secs=$(python3 -c "print(1.5 + 4.5 * $int / 1000)")
  rm -f "$WORK/started"
  ip netns exec "$P-cl" python3 "$BENCH_DIR/tools/gap_probe.py" "$VIP" "$secs" "$WORK/started" >"$WORK/gap" &
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
}

echo "vipgate: $("$VIPGATE_BIN" --version 2>/dev/null || echo "$VIPGATE_BIN")" >&2
echo "keepalived: $(keepalived --version 2>&1 | head -1)" >&2
for int in 1000 100; do
  for scen in death graceful; do
    metric=gap_ms_${scen}_${int}ms
    want_metric "$metric" || continue
    for rep in $(seq "$RUNS"); do
      for tool in $(bench_order "$rep" vipgate keepalived); do
        echo "repetition $rep/$RUNS: $metric $tool" >&2
        if one_run "$tool" "$scen" "$int"; then
          record "$metric" "$tool" "$(cat "$WORK/gap")"
        else
          record "$metric" "$tool" failed
        fi
      done
    done
  done
done
bench_teardown

bench_summarize --ratio vipgate/keepalived \
  --title "VRRP failover gap seen by a client (ms; death = link down + kill -9 of the master, graceful = SIGTERM), $RUNS runs"
