#!/usr/bin/env bash
# Long-lived flows surviving the crash of the master of a PAT gateway pair: vipgate ([nat] +
# [[vrrp]] + [sync]) vs nftables NAT + conntrackd (FTFW) + keepalived, same topology, same run.
#
#   pc 192.168.101.10 ── insw ── g1 eth1 .2   g2 eth1 .3    inside VIP 192.168.101.1 (vrid 62)
#   srv 198.51.100.100 ─ outsw ─ g1 eth0 .11  g2 eth0 .12   overload VIP 198.51.100.10 (vrid 61)
#                        syncsw ─ g1 eth2 10.9.0.1  g2 eth2 10.9.0.2   state sync
#
# Both VIPs in one VRRP sync group, adverts every 100 ms, g1 priority 150, g2 100. Both tools
# translate to the overload address on ports 10000-19999 (the client's ephemeral ports lie
# outside: every public port is allocated, none preserved, so a flow survives only if the new
# master knows its mapping). pc opens FLOWS (1,000) TCP connections to an echo server on srv,
# each proven by a 1-byte echo; after SETTLE seconds g1 dies (its three bridge ports down, then
# kill -9 of everything in its namespace, as bench/vrrp.sh); then every connection sends one
# byte and counts as surviving if the echo is back within 15 s.
#
# conntrackd follows its documentation's primary-backup setup: FTFW over UDP on the sync link,
# external cache, keepalived's notify_master running `conntrackd -c; -f; -R; -B`
# (primary-backup.sh), nf_conntrack_tcp_be_liberal=1 on both gateways.
#
# The control, vipgate-nosync: vipgate without [sync] (the new master knows no mapping),
# which shows what the figure is worth: a flow survives only by the state synced.
#
# Metric: flows_surviving_pct_crash (percent of FLOWS).
#
# Usage (root): bench/failover.sh [RUNS]   (RUNS=3, FLOWS=1000, SETTLE=3, ONLY,
# MODES="vipgate conntrackd vipgate-nosync", VIPGATE_BIN: see bench/README.md; DUR is not
# used)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

bench_knobs 3 1 "$@"   # DUR is not used
FLOWS=${FLOWS:-1000}
SETTLE=${SETTLE:-3}
bench_require keepalived conntrackd nft python3
bench_cargo_bin VIPGATE_BIN vipgate vipgate
bench_init fo g1 g2 pc srv
WORK=$TMP
VIP=198.51.100.10
FLOWS_PY=$BENCH_DIR/tools/long_flows.py
printf 'a shared key for the two gateways\n' > "$WORK/sync.key"
chmod 600 "$WORK/sync.key"

lab_up() {
  bench_teardown
  lan_attach outsw g1 eth0 198.51.100.11/24
  lan_attach outsw g2 eth0 198.51.100.12/24
  lan_attach outsw srv eth0 198.51.100.100/24
  lan_attach insw g1 eth1 192.168.101.2/24
  lan_attach insw g2 eth1 192.168.101.3/24
  lan_attach insw pc eth0 192.168.101.10/24
  lan_attach syncsw g1 eth2 10.9.0.1/24
  lan_attach syncsw g2 eth2 10.9.0.2/24
  gw "$P-pc" 192.168.101.1
  forwarding "$P-g1"
  forwarding "$P-g2"
}

# start_vipgate HOST PRIORITY ME PEER [nosync]
start_vipgate() {
  local h=$1 prio=$2 me=$3 peer=$4 sync
  sync=$(printf '[sync]\npeers = ["%s"]\nlisten = "%s"\nkey_file = "%s"\nvrrp = "outside"\n' \
    "$peer" "$me" "$WORK/sync.key")
  [ "${5:-}" != nosync ] || sync=
  cat > "$WORK/$h.toml" <<EOF
[daemon]
control = "$WORK/$h.sock"

[nat]
inside = ["eth1"]
outside = "eth0"
address = "$VIP"
ports = "10000-19999"

[[nat.acl]]
action = "permit"
src = "192.168.101.0/24"

[[vrrp]]
name = "outside"
group = "hq"
interface = "eth0"
vrid = 61
priority = $prio
advert_interval = "100ms"
addresses = ["$VIP/24"]

[[vrrp]]
name = "inside"
group = "hq"
interface = "eth1"
vrid = 62
priority = $prio
advert_interval = "100ms"
addresses = ["192.168.101.1/24"]

$sync
EOF
  spawn "$h" "$VIPGATE_BIN" run -c "$WORK/$h.toml" > "$WORK/$h.log" 2>&1
  disown "$SPAWNED"   # killed with its host: no job report
}

start_vipgate-nosync() { start_vipgate "$@" nosync; }

# start_conntrackd HOST PRIORITY ME PEER: nftables NAT, conntrackd, keepalived.
start_conntrackd() {
  local h=$1 prio=$2 me=$3 peer=$4
  x "$h" sysctl -qw net.netfilter.nf_conntrack_tcp_be_liberal=1
  x "$h" nft -f - <<EOF
table ip nat {
  chain post {
    type nat hook postrouting priority srcnat;
    oifname "eth0" ip saddr 192.168.101.0/24 meta l4proto tcp snat to $VIP:10000-19999
  }
}
EOF
  cat > "$WORK/$h.ctd.conf" <<EOF
Sync {
  Mode FTFW {
    DisableExternalCache Off
  }
  UDP {
    IPv4_address $me
    IPv4_Destination_Address $peer
    Port 3780
    Interface eth2
    Checksum on
  }
}
General {
  HashSize 32768
  HashLimit 131072
  LogFile $WORK/$h.ctd.log
  Syslog off
  LockFile $WORK/$h.ctd.lock
  UNIX {
    Path $WORK/$h.ctd.ctl
  }
  NetlinkBufferSize 2097152
  NetlinkBufferSizeMaxGrowth 8388608
  Filter From Userspace {
    Protocol Accept {
      TCP
    }
    Address Ignore {
      IPv4_address 127.0.0.1
      IPv4_address 10.9.0.0/24
    }
  }
}
EOF
  # primary-backup.sh's "primary" branch.
  cat > "$WORK/$h.primary.sh" <<EOF
#!/bin/sh
C="conntrackd -C $WORK/$h.ctd.conf"
\$C -c; \$C -f; \$C -R; \$C -B
EOF
  chmod +x "$WORK/$h.primary.sh"
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
  rm -f "$WORK/$h.ctd.lock" "$WORK/$h.ctd.ctl"
  spawn "$h" conntrackd -C "$WORK/$h.ctd.conf" > "$WORK/$h.ctd.out" 2>&1
  disown "$SPAWNED"
  wait_for 5 test -S "$WORK/$h.ctd.ctl" || { cat "$WORK/$h.ctd.out" "$WORK/$h.ctd.log" >&2; return 1; }
  x "$h" keepalived -n -l --vrrp -f "$WORK/$h.keepalived.conf" \
    -p "$WORK/$h.ka.pid" -r "$WORK/$h.ka.vpid" > "$WORK/$h.ka.log" 2>&1 &
  disown $!
}

# HOST holds the inside VIP (vipgate makes the overload address live by a route into nat0,
# not as an interface address; the group moves both together).
holds() { ip -n "$P-$1" -4 -o addr show dev eth1 | grep -q "192.168.101.1/"; }

# one_run MODE: the share (percent) of FLOWS surviving g1's death in $WORK/pct.
one_run() {
  local mode=$1
  lab_up
  "start_$mode" g1 150 10.9.0.1 10.9.0.2
  wait_for 10 holds g1 || { echo "g1 never took the VIP" >&2; return 1; }
  "start_$mode" g2 100 10.9.0.2 10.9.0.1
  sleep "$SETTLE"
  holds g2 && { echo "g2 holds the VIP before the crash" >&2; return 1; }
  spawn srv python3 "$FLOWS_PY" echo 9000 > "$WORK/echo.log" 2>&1
  disown "$SPAWNED"
  wait_port "$P-srv" 198.51.100.100 9000
  rm -f "$WORK/ready" "$WORK/go"
  x pc python3 "$FLOWS_PY" client 198.51.100.100 9000 "$FLOWS" "$WORK/ready" "$WORK/go" 15 \
    > "$WORK/alive" 2> "$WORK/client.log" &
  local client=$!
  wait_for 60 test -e "$WORK/ready" || { cat "$WORK/client.log" >&2; return 1; }
  # Let the state reach the backup (both tools stream changes within milliseconds).
  sleep "$SETTLE"
  local sw
  for sw in outsw insw syncsw; do ip -n "$P-$sw" link set p-g1 down; done
  for pid in $(ip netns pids "$P-g1"); do kill -9 "$pid" 2>/dev/null || true; done
  touch "$WORK/go"
  wait "$client" || { cat "$WORK/client.log" >&2; return 1; }
  holds g2 || { echo "g2 did not take over ($mode)" >&2; return 1; }
  python3 -c "print('%.1f' % (100 * $(cat "$WORK/alive") / $FLOWS))" > "$WORK/pct"
  for pid in $(ip netns pids "$P-g2"); do kill -TERM "$pid" 2>/dev/null || true; done
}

echo "vipgate: $("$VIPGATE_BIN" --version 2>/dev/null || echo "$VIPGATE_BIN")" >&2
echo "conntrackd: $(conntrackd -v 2>&1 | head -1); keepalived: $(keepalived --version 2>&1 | head -1)" >&2
metric=flows_surviving_pct_crash
if want_metric "$metric"; then
  for rep in $(seq "$RUNS"); do
    for mode in $(bench_order "$rep" vipgate conntrackd vipgate-nosync); do
      want_mode "$mode" || continue
      echo "repetition $rep/$RUNS: $metric $mode" >&2
      if one_run "$mode"; then
        record "$metric" "$mode" "$(cat "$WORK/pct")"
      else
        record "$metric" "$mode" failed
      fi
    done
  done
fi
bench_teardown

bench_summarize --ratio vipgate/conntrackd \
  --title "Share of $FLOWS long-lived TCP flows through a PAT pair surviving the master's crash (%), $RUNS runs"
