#!/usr/bin/env bash
# Flow sync between the two gateways of a PAT pair: vipgate ([nat] + [[vrrp]] + [sync]) vs
# nftables NAT + conntrackd (FTFW) + keepalived, same topology, same run.
#
#   pc 192.168.101.10 ── insw ── g1 eth1 .2   g2 eth1 .3    inside VIP 192.168.101.1 (vrid 62)
#   srv 198.51.100.100 ─ outsw ─ g1 eth0 .11  g2 eth0 .12   overload VIP 198.51.100.10 (vrid 61)
#                        syncsw ─ g1 eth2 10.9.0.1  g2 eth2 10.9.0.2   state sync
#
# Both VIPs in one VRRP sync group, adverts every 100 ms, g1 priority 150, g2 100. Both tools
# translate to the overload address on ports 10000-32767 (the client's ephemeral ports lie
# above: every public port is allocated, none preserved, so a flow survives only if the new
# master knows its mapping).
#
# Surviving flows (flows_surviving_pct_EVENT): pc opens FLOWS (1,000) TCP connections to an echo
# server on srv, each proven by a 1-byte echo, and from then on CHURN (500) new short
# connections per second run alongside (one echo each, then closed: state created and removed
# all the time); after SETTLE seconds the EVENT, then every connection sends one byte and counts
# as surviving if the echo is back within 15 s:
# - crash: g1 dies (its three bridge ports down, then kill -9 of everything in its namespace,
#   as bench/vrrp.sh);
# - switchover: g1 is stopped as planned (vipgate: SIGTERM, VRRP priority 0; keepalived:
#   SIGTERM, the same; conntrackd keeps running), g2 takes over;
# - failback: the crash, the probe through g2, then g1 comes back (links up, its conntrack table
#   flushed as after a reboot, its daemons started again) and preempts: vipgate once its sync is
#   ready (the snapshot from g2), keepalived at once, its notify_backup's resync (`conntrackd
#   -n`) under way; then the connections alive through g2 are probed again, and the figure is
#   the share of those that survive the fail-back.
#
# Sync cost (RATES: 1,000 and 10,000 new flows/s): pc sends new UDP flows at RATE for DUR
# seconds (tools/flowgen.c, one datagram per flow, dropped by srv); meanwhile:
# - master_cpu_pct_Rfps: CPU of g1's vipgate (user + system, /proc/PID/stat, every thread),
#   with sync (vipgate) and without (vipgate-nosync);
# - sync_cpu_pct_Rfps: what sync costs the master: vipgate's CPU with sync minus without (same
#   repetition), and conntrackd's process CPU (the kernel's conntrack event work is in neither);
# - sync_link_kBps_Rfps: bytes on the sync link (g1's eth2, both directions) per second;
# - backup_holds_pct_Rfps: flows the backup holds a second later (vipgate's standby flows,
#   conntrackd's external cache) in percent of the master's (vipgate's flows, conntrack's
#   entries).
#
# conntrackd follows its documentation's primary-backup setup: FTFW over UDP on the sync link,
# external cache, keepalived's notify_master running `conntrackd -c; -f; -R; -B` and
# notify_backup `conntrackd -n; -B` (primary-backup.sh), nf_conntrack_tcp_be_liberal=1 on both
# gateways.
#
# The control, vipgate-nosync: vipgate without [sync] (the new master knows no mapping),
# which shows what the figure is worth: a flow survives only by the state synced.
#
# Usage (root): bench/failover.sh [RUNS]   (RUNS=3, DUR=5, FLOWS=1000, CHURN=500, SETTLE=3,
# RATES="1000 10000", ONLY, MODES="vipgate conntrackd vipgate-nosync", VIPGATE_BIN: see
# bench/README.md)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

bench_knobs 3 5 "$@"
FLOWS=${FLOWS:-1000}
CHURN=${CHURN:-500}
SETTLE=${SETTLE:-3}
RATES=${RATES:-1000 10000}
bench_require keepalived conntrackd conntrack nft python3
bench_cargo_bin VIPGATE_BIN vipgate vipgate
bench_init fo g1 g2 pc srv
bench_cc flowgen
declare -A DAEMON   # HOST -> pid of its vipgate, or of its conntrackd
WORK=$TMP
VIP=$PAT_PAIR_VIP
FLOWS_PY=$BENCH_DIR/tools/long_flows.py
printf 'a shared key for the two gateways\n' > "$WORK/sync.key"
chmod 600 "$WORK/sync.key"

lab_up() {
  bench_teardown
  pat_pair_lan
}

# start_vipgate HOST PRIORITY ME PEER [nosync]
start_vipgate() {
  local h=$1 prio=$2 me=$3 peer=$4 sync
  sync=$(pat_pair_sync "$me" "$peer" "$WORK/sync.key")
  [ "${5:-}" != nosync ] || sync=
  pat_pair_conf "$WORK/$h.toml" "$WORK/$h.sock" "$prio" 100ms 262144 "$sync"
  spawn "$h" "$VIPGATE_BIN" run -c "$WORK/$h.toml" >> "$WORK/$h.log" 2>&1
  disown "$SPAWNED"   # killed with its host: no job report
  DAEMON[$h]=$SPAWNED
}

start_vipgate-nosync() { start_vipgate "$@" nosync; }

# start_conntrackd HOST PRIORITY ME PEER: nftables NAT, conntrackd, keepalived.
start_conntrackd() {
  local h=$1 prio=$2 me=$3 peer=$4
  x "$h" sysctl -qw net.netfilter.nf_conntrack_tcp_be_liberal=1
  x "$h" nft -f - <<EOF
flush ruleset
table ip nat {
  chain post {
    type nat hook postrouting priority srcnat;
    oifname "eth0" ip saddr 192.168.101.0/24 meta l4proto { tcp, udp } snat to $VIP:10000-32767
  }
}
EOF
  conntrackd_ftfw_conf "$WORK/$h.ctd" "$me" "$peer" 524288 TCP UDP
  # primary-backup.sh's "primary" and "backup" branches.
  cat > "$WORK/$h.primary.sh" <<EOF
#!/bin/sh
C="conntrackd -C $WORK/$h.ctd.conf"
\$C -c; \$C -f; \$C -R; \$C -B
EOF
  cat > "$WORK/$h.backup.sh" <<EOF
#!/bin/sh
C="conntrackd -C $WORK/$h.ctd.conf"
\$C -n; \$C -B
EOF
  chmod +x "$WORK/$h.primary.sh" "$WORK/$h.backup.sh"
  cat > "$WORK/$h.keepalived.conf" <<EOF
global_defs {
  vrrp_version 3
  script_user root
  enable_script_security
}
vrrp_sync_group G {
  group {
    OUT
    IN
  }
  notify_master "$WORK/$h.primary.sh"
  notify_backup "$WORK/$h.backup.sh"
}
vrrp_instance OUT {
  state BACKUP
  interface eth0
  virtual_router_id 61
  priority $prio
  advert_int 0.1
  virtual_ipaddress {
    $VIP/24
  }
}
vrrp_instance IN {
  state BACKUP
  interface eth1
  virtual_router_id 62
  priority $prio
  advert_int 0.1
  virtual_ipaddress {
    192.168.101.1/24
  }
}
EOF
  # What a reboot clears (g1 comes back from kill -9 in the fail-back).
  rm -f "$WORK/$h.ctd.lock" "$WORK/$h.ctd.ctl" "$WORK/$h.ka.pid" "$WORK/$h.ka.vpid"
  spawn "$h" conntrackd -C "$WORK/$h.ctd.conf" >> "$WORK/$h.ctd.out" 2>&1
  disown "$SPAWNED"
  DAEMON[$h]=$SPAWNED
  wait_for 5 test -S "$WORK/$h.ctd.ctl" || { cat "$WORK/$h.ctd.out" "$WORK/$h.ctd.log" >&2; return 1; }
  x "$h" keepalived -n -l --vrrp -f "$WORK/$h.keepalived.conf" \
    -p "$WORK/$h.ka.pid" -r "$WORK/$h.ka.vpid" >> "$WORK/$h.ka.log" 2>&1 &
  disown $!
}

# HOST holds the inside VIP (vipgate makes the overload address live by a route into nat0,
# not as an interface address; the group moves both together).
holds() { ip -n "$P-$1" -4 -o addr show dev eth1 | grep -q "192.168.101.1/"; }

# start_node MODE g1|g2: g1 at priority 150, g2 at 100.
start_node() {
  case $2 in
    g1) "start_$1" g1 150 10.9.0.1 10.9.0.2 ;;
    g2) "start_$1" g2 100 10.9.0.2 10.9.0.1 ;;
  esac
}

# pair_up MODE: the lab, g1 master, g2 backup, SETTLE seconds to sync.
pair_up() {
  lab_up
  start_node "$1" g1
  wait_for 10 holds g1 || { echo "g1 never took the VIP" >&2; return 1; }
  start_node "$1" g2
  sleep "$SETTLE"
  ! holds g2 || { echo "g2 holds the VIP next to g1" >&2; return 1; }
}

# crash_g1: g1 dies: its links down, then everything in it killed.
crash_g1() {
  local sw pid
  for sw in outsw insw syncsw; do ip -n "$P-$sw" link set p-g1 down; done
  for pid in $(ip netns pids "$P-g1"); do kill -9 "$pid" 2>/dev/null || true; done
}

# stop_g1 MODE: the planned switchover: vipgate or keepalived stopped with SIGTERM (VRRP
# priority 0); conntrackd keeps running, as stopping keepalived leaves it.
stop_g1() {
  case $1 in
    conntrackd) kill -TERM "$(cat "$WORK/g1.ka.pid")" ;;
    *) kill -TERM "${DAEMON[g1]}" ;;
  esac
}

# restart_g1 MODE: g1 back from its crash: links up, the kernel state of a fresh boot (an
# empty conntrack table), its daemons started again.
restart_g1() {
  local sw
  x g1 conntrack -F > /dev/null 2>&1 || true
  for sw in outsw insw syncsw; do ip -n "$P-$sw" link set p-g1 up; done
  start_node "$1" g1
}

# show_json PART HOST FIELD: FIELD of `show PART --json` on HOST's vipgate.
show_json() {
  "$VIPGATE_BIN" show "$1" --json -c "$WORK/$2.toml" 2> /dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
print((d[0] if isinstance(d, list) else d)[sys.argv[1]])' "$3"
}

# one_run MODE EVENT: the share (percent) of the flows surviving EVENT in $WORK/pct.
one_run() {
  local mode=$1 event=$2 rounds=1 client churn before after
  pair_up "$mode" || return 1
  spawn srv python3 "$FLOWS_PY" echo 9000 > "$WORK/echo.log" 2>&1
  disown "$SPAWNED"
  wait_port "$P-srv" 198.51.100.100 9000
  rm -f "$WORK"/ready* "$WORK"/go*
  [ "$event" != failback ] || rounds=2
  x pc python3 "$FLOWS_PY" client 198.51.100.100 9000 "$FLOWS" "$WORK/ready" "$WORK/go" 15 \
    "$rounds" > "$WORK/alive" 2> "$WORK/client.log" &
  client=$!
  wait_for 60 test -e "$WORK/ready" || { cat "$WORK/client.log" >&2; return 1; }
  spawn pc python3 "$FLOWS_PY" churn 198.51.100.100 9000 "$CHURN" 600 > "$WORK/churn.log" 2>&1
  churn=$SPAWNED
  # Let the state reach the backup (both tools stream changes within milliseconds).
  sleep "$SETTLE"
  case $event in
    switchover) stop_g1 "$mode" ;;
    *) crash_g1 ;;
  esac
  touch "$WORK/go"
  if [ "$event" = failback ]; then
    wait_for 30 test -e "$WORK/ready.1" || { cat "$WORK/client.log" >&2; return 1; }
    holds g2 || { echo "g2 did not take over ($mode)" >&2; return 1; }
    restart_g1 "$mode"
    wait_for 60 holds g1 || { echo "g1 did not take the VIP back ($mode)" >&2; return 1; }
    touch "$WORK/go.2"
  fi
  wait "$client" || { cat "$WORK/client.log" >&2; return 1; }
  kill "$churn" 2> /dev/null || true
  wait "$churn" 2> /dev/null || true
  echo "churn ($mode): $(cat "$WORK/churn.log") (connections opened, echoed)" >&2
  case $event in
    failback) holds g1 || { echo "g1 lost the VIP again ($mode)" >&2; return 1; } ;;
    *) holds g2 || { echo "g2 did not take over ($mode)" >&2; return 1; } ;;
  esac
  if [ "$event" = failback ]; then
    before=$(sed -n 1p "$WORK/alive")
    after=$(sed -n 2p "$WORK/alive")
  else
    before=$FLOWS
    after=$(sed -n 1p "$WORK/alive")
  fi
  echo "$event ($mode): $after of $before flows alive" >&2
  python3 -c "print('%.1f' % (100 * $after / max($before, 1)))" > "$WORK/pct"
}

# cpu_ticks PID: user + system clock ticks of the process (every thread).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
link_bytes() {
  echo $(($(x g1 cat /sys/class/net/eth2/statistics/tx_bytes) +
    $(x g1 cat /sys/class/net/eth2/statistics/rx_bytes)))
}
# master_flows MODE: the flows in g1's table (vipgate's flows, conntrack's entries).
master_flows() {
  case $1 in
    conntrackd) x g1 conntrack -C ;;
    *) show_json nat g1 flows ;;
  esac
}
# backup_holds MODE: the flows g2 holds from g1.
backup_holds() {
  case $1 in
    vipgate) show_json sync g2 standby_flows ;;
    conntrackd) x g2 conntrackd -C "$WORK/g2.ctd.conf" -s cache |
      awk '/cache:external/ { print $4; exit }' ;;
    *) echo 0 ;;
  esac
}

# cost_run MODE RATE: new UDP flows at RATE/s for DUR s through g1; $WORK/cost holds
# "CPU_PCT LINK_KBPS MASTER_FLOWS HELD" (HELD: what g2 holds of them).
cost_run() {
  local mode=$1 rate=$2 tck t0 t1 c0 c1 b0 b1 sent held flows
  pair_up "$mode" || return 1
  pat_pair_sink
  tck=$(getconf CLK_TCK)
  c0=$(cpu_ticks "${DAEMON[g1]}")
  b0=$(link_bytes)
  t0=$(date +%s%N)
  sent=$(x pc "$TMP/flowgen" 198.51.100.100 "$rate" "$DUR")
  t1=$(date +%s%N)
  c1=$(cpu_ticks "${DAEMON[g1]}")
  b1=$(link_bytes)
  sleep 1   # the last changes reach the backup
  held=$(backup_holds "$mode" 2> /dev/null || echo 0)
  flows=$(master_flows "$mode" 2> /dev/null || echo 0)
  python3 -c "
secs = ($t1 - $t0) / 1e9
print('%.2f %.1f %d %d' % (100 * ($c1 - $c0) / $tck / secs, ($b1 - $b0) / 1e3 / secs, ${flows:-0}, ${held:-0}))" \
    > "$WORK/cost"
  echo "cost ($mode, $rate flows/s, $sent sent): cpu %, sync link kB/s, flows on g1, held by g2: $(cat "$WORK/cost")" >&2
}

echo "vipgate: $("$VIPGATE_BIN" --version 2>/dev/null || echo "$VIPGATE_BIN")" >&2
echo "conntrackd: $(conntrackd -v 2>&1 | head -1); keepalived: $(keepalived --version 2>&1 | head -1)" >&2
for rep in $(seq "$RUNS"); do
  for event in crash switchover failback; do
    metric=flows_surviving_pct_$event
    want_metric "$metric" || continue
    for mode in $(bench_order "$rep" vipgate conntrackd vipgate-nosync); do
      echo "repetition $rep/$RUNS: $metric $mode" >&2
      if one_run "$mode" "$event"; then
        record "$metric" "$mode" "$(cat "$WORK/pct")"
      else
        record "$metric" "$mode" failed
      fi
    done
  done
  for rate in $RATES; do
    want_metric "sync_cpu_pct_${rate}fps" || continue
    nosync_cpu=
    with_sync_cpu=
    for mode in $(bench_order "$rep" vipgate conntrackd vipgate-nosync); do
      echo "repetition $rep/$RUNS: sync cost at $rate flows/s, $mode" >&2
      if ! cost_run "$mode" "$rate"; then
        record "sync_cpu_pct_${rate}fps" "$mode" failed
        continue
      fi
      read -r cpu kbps flows held < "$WORK/cost"
      case $mode in
        vipgate-nosync) nosync_cpu=$cpu ;;
        vipgate) with_sync_cpu=$cpu ;;
        conntrackd) record "sync_cpu_pct_${rate}fps" "$mode" "$cpu" ;;
      esac
      [ "$mode" = conntrackd ] || record "master_cpu_pct_${rate}fps" "$mode" "$cpu"
      if [ "$mode" != vipgate-nosync ]; then
        record "sync_link_kBps_${rate}fps" "$mode" "$kbps"
        record "backup_holds_pct_${rate}fps" "$mode" \
          "$(python3 -c "print('%.1f' % (100 * $held / max($flows, 1)))")"
      fi
    done
    if [ -n "$nosync_cpu" ] && [ -n "$with_sync_cpu" ]; then
      record "sync_cpu_pct_${rate}fps" vipgate \
        "$(python3 -c "print('%.2f' % ($with_sync_cpu - $nosync_cpu))")"
    fi
  done
done
bench_teardown

bench_summarize --ratio vipgate/conntrackd \
  --title "PAT pair: $FLOWS long-lived TCP flows surviving (%) with $CHURN new connections/s; sync cost at $RATES new flows/s over ${DUR}s; $RUNS runs"
