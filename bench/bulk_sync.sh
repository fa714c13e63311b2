#!/usr/bin/env bash
# Bulk sync time: how long a node that (re)starts takes to pull a snapshot of FLOWS (100,000)
# flows from its peer. vipgate's flowsync against conntrackd's resync, same run.
#
# vipgate-daemon: two `vipgate run` daemons of a PAT pair (bench/failover.sh's topology and
# config: [nat] + two [[vrrp]] in one sync group + [sync] on a link of their own), g1 master;
# adverts every second rather than failover.sh's 100 ms, so that g1 busy serving a snapshot of
# 100,000 flows on a loaded machine does not miss adverts for the 360 ms that would let g2 take
# over (seen with a debug build: what is measured here is the snapshot, not VRRP).
# g1's table is filled once per series with FLOWS UDP flows made by real packets
# (tools/flowgen.c from pc through g1 to srv, which drops them; one datagram per flow, at
# FILL_RATE flows/s, in rounds of FILL_SECS seconds until g1 holds FLOWS, then kept alive by
# the 5-minute UDP timeout). Each run stops g2's daemon (SIGTERM, waits for its exit) and
# starts it again, and times from the start until its `show sync --json` reports every one
# of g1's flows held as standby and the sync-ready gate open (the snapshot came from the
# master): the daemon's start (config, VRRP, the kernel path's load), discovery, the request,
# g1's export of its flows, the transport and g2's install of each as standby. Polled every
# 50 ms, one `vipgate show` run at a time. Two more metrics split it: daemon_start_ms, from
# the start until `show sync` first answers (the daemon starting: loading its binary, the
# kernel path, VRRP), and after_start_ms, from then until ready (mostly the snapshot).
#
# vipgate: flowsync's example bulk_sync (flowsync/examples/bulk_sync.rs): two transports
# (flowsync::driver, the UDP task `vipgate run` uses) on two UDP sockets on the loopback of one
# namespace, in one process; the master holds FLOWS established TCP flows, a backup starts, and
# the time runs from its start to its BulkComplete with every record delivered: discovery, the
# request, encoding, HMAC-SHA256 signing and checking of every message, acknowledgements and
# any resend. Not included: the gateway exporting its flows and installing them as standby
# around it (no way to fill a daemon with 100,000 flows cheaply).
#
# conntrackd: two namespaces on a veth link (the sync link), conntrackd FTFW over UDP on both
# (as bench/failover.sh configures it); FLOWS established TCP entries are loaded into the
# first one's conntrack table with `conntrack -R` before its conntrackd starts (so its internal
# cache holds them); each run flushes the second one's external cache, then times from
# `conntrackd -n` (request a resync) until `conntrackd -s cache` shows FLOWS external entries
# (each poll is one conntrackd client run, a few ms).
#
# Metrics: bulk_sync_ms; daemon_start_ms and after_start_ms (vipgate-daemon).
#
# Usage (root): bench/bulk_sync.sh [RUNS]   (RUNS=5, FLOWS=100000, MODES="vipgate
# vipgate-daemon conntrackd", BULK_SYNC_BIN: the example binary, default
# target/release/examples/bulk_sync, built when missing; VIPGATE_BIN for vipgate-daemon;
# FILL_RATE=10000, FILL_SECS=4; see bench/README.md. DUR is not used)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

bench_knobs 5 1 "$@"   # DUR is not used
FLOWS=${FLOWS:-100000}
FILL_RATE=${FILL_RATE:-10000}
FILL_SECS=${FILL_SECS:-4}
bench_require conntrackd conntrack python3 nft
if want_mode vipgate; then
  BULK_SYNC_BIN=${BULK_SYNC_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bulk_sync}
  if [ ! -x "$BULK_SYNC_BIN" ]; then
    echo "building: cargo build --release -p flowsync --example bulk_sync" >&2
    (cd "$ROOT" && cargo build -q --release -p flowsync --example bulk_sync)
  fi
fi
if want_mode vipgate-daemon; then
  bench_cargo_bin VIPGATE_BIN vipgate vipgate
fi
bench_init bs vg ca cb

# conntrackd on HOST (sync address ME, peer PEER) with its files under $TMP/HOST.*
ctd_conf() { conntrackd_ftfw_conf "$TMP/$1" "$2" "$3" $((FLOWS * 2 + 1024)) TCP; }
ctd() { local h=$1; shift; x "$h" conntrackd -C "$TMP/$h.conf" "$@"; }
# external_entries HOST: the entries of HOST's external cache (what its peer synced).
external_entries() { ctd "$1" -s cache | awk '/cache:external/ { print $4; exit }'; }
internal_entries() { ctd "$1" -s cache | awk '/cache:internal/ { print $4; exit }'; }
holds_all() { [ "$("$1_entries" "$2")" -ge "$FLOWS" ]; }

ct_setup() {
  veth "$P-ca" eth2 "$P-cb" eth2
  addr "$P-ca" eth2 10.9.0.1/24
  addr "$P-cb" eth2 10.9.0.2/24
  # Resolve the neighbours first: a bulk burst into an unresolved neighbour is mostly dropped
  # (its queue holds a few packets), which is not what a running pair sees.
  x ca ping -q -c 1 -W 2 10.9.0.2 > /dev/null
  python3 - "$FLOWS" > "$TMP/entries" <<'PY'
import sys
for i in range(int(sys.argv[1])):
    print("-I -s 192.168.%d.10 -d 203.0.113.80 -p tcp --sport %d --dport 443"
          " --state ESTABLISHED -t 7200 -u ASSURED" % (i // 50000, 10000 + i % 50000))
PY
  x ca conntrack -R "$TMP/entries" > /dev/null 2> "$TMP/load.log"
  ctd_conf ca 10.9.0.1 10.9.0.2
  ctd_conf cb 10.9.0.2 10.9.0.1
  ctd ca -d
  ctd cb -d
  wait_for 60 holds_all internal ca || { tail "$TMP"/ca.log >&2; return 1; }
}

now_ns() { date +%s%N; }

# ct_run: the ms from `conntrackd -n` on cb until its external cache holds FLOWS, in $TMP/ms.
ct_run() {
  ctd cb -f external > /dev/null
  [ "$(external_entries cb)" = 0 ] || { echo "cb's external cache not flushed" >&2; return 1; }
  local start end
  start=$(now_ns)
  ctd cb -n > /dev/null
  wait_for 30 holds_all external cb ||
    { echo "cb holds $(external_entries cb) external entries" >&2; return 1; }
  end=$(now_ns)
  echo $(((end - start) / 1000000)) > "$TMP/ms"
}

vg_run() {
  x vg "$BULK_SYNC_BIN" "$FLOWS" 1 2> "$TMP/vg.log" | awk -F'\t' '{ print $3 }' > "$TMP/ms"
  [ -s "$TMP/ms" ] || { cat "$TMP/vg.log" >&2; return 1; }
}

# The PAT pair of vipgate-daemon (bench/lib.sh's, as bench/failover.sh runs it).
printf 'a shared key for the two gateways\n' > "$TMP/sync.key"
chmod 600 "$TMP/sync.key"

# gw_conf HOST PRIORITY ME PEER: HOST's config in $TMP/HOST.toml.
gw_conf() {
  pat_pair_conf "$TMP/$1.toml" "$TMP/$1.sock" "$2" 1s $((FLOWS * 2 + 1024)) \
    "$(pat_pair_sync "$3" "$4" "$TMP/sync.key")"
}

# gw_start HOST: its vipgate, pid in $TMP/HOST.pid.
gw_start() {
  spawn "$1" "$VIPGATE_BIN" run -c "$TMP/$1.toml" >> "$TMP/$1.log" 2>&1
  bench_track "$SPAWNED"
  echo "$SPAWNED" > "$TMP/$1.pid"
}

# show_fields PART HOST FIELD...: the FIELDs of HOST's `show PART --json`, space-separated.
show_fields() {
  x "$2" "$VIPGATE_BIN" show "$1" --json -c "$TMP/$2.toml" 2> /dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
d = d[0] if isinstance(d, list) else d
print(" ".join(str(d[f]).lower() for f in sys.argv[1:]))' "${@:3}"
}
master_flows() { show_fields nat g1 flows; }
holds_vip() { ip -n "$P-$1" -4 -o addr show dev eth1 | grep -q "192.168.101.1/"; }

# sync_ready HOST N: HOST holds at least N standby flows and its sync-ready gate is open.
sync_ready() {
  local got
  read -r -a got <<< "$(show_fields sync "$1" standby_flows ready)"
  [ "${got[0]:-0}" -ge "$2" ] && [ "${got[1]:-}" = true ]
}

vd_setup() {
  pat_pair_lan
  pat_pair_sink
  bench_cc flowgen
  gw_conf g1 150 10.9.0.1 10.9.0.2
  gw_conf g2 100 10.9.0.2 10.9.0.1
  gw_start g1
  wait_for 20 holds_vip g1 || { tail "$TMP/g1.log" >&2; return 1; }
  local held=0 deadline=$((SECONDS + 120))
  while [ "$held" -lt "$FLOWS" ]; do
    [ $SECONDS -lt $deadline ] || { echo "g1 holds $held flows after 120 s" >&2; return 1; }
    x pc "$TMP/flowgen" 198.51.100.100 "$FILL_RATE" "$FILL_SECS" > /dev/null
    held=$(master_flows || echo 0)
    echo "g1 holds $held flows" >&2
  done
  gw_start g2
  wait_for 60 sync_ready g2 "$FLOWS" || { tail "$TMP/g2.log" >&2; return 1; }
}

# vd_run: restart g2's daemon; in $TMP/ms the ms from its start until it answers, and until
# it holds every flow of g1 with its gate open.
vd_run() {
  local pid flows start answered end
  pid=$(cat "$TMP/g2.pid")
  kill -TERM "$pid"
  wait "$pid" || true
  flows=$(master_flows) || return 1
  start=$(now_ns)
  gw_start g2
  wait_for 10 show_fields sync g2 state > /dev/null || { tail "$TMP/g2.log" >&2; return 1; }
  answered=$(now_ns)
  wait_for 30 sync_ready g2 "$flows" ||
    { echo "g2: $(show_fields sync g2 standby_flows ready) of $flows" >&2; return 1; }
  end=$(now_ns)
  echo "$(((answered - start) / 1000000)) $(((end - start) / 1000000))" > "$TMP/ms"
  echo "g2 holds g1's $flows flows: $(cat "$TMP/ms") ms (answering, ready)" >&2
}

echo "conntrackd: $(conntrackd -v 2>&1 | head -1)" >&2
metric=bulk_sync_ms
if want_metric "$metric"; then
  if want_mode conntrackd; then ct_setup; fi
  if want_mode vipgate-daemon; then vd_setup; fi
  for rep in $(seq "$RUNS"); do
    for mode in $(bench_order "$rep" vipgate vipgate-daemon conntrackd); do
      echo "repetition $rep/$RUNS: $metric $mode ($FLOWS flows)" >&2
      case $mode in
        vipgate) run=vg_run ;;
        vipgate-daemon) run=vd_run ;;
        conntrackd) run=ct_run ;;
      esac
      if $run; then
        if [ "$mode" = vipgate-daemon ]; then
          read -r answered ready < "$TMP/ms"
          record daemon_start_ms "$mode" "$answered"
          record after_start_ms "$mode" $((ready - answered))
          record "$metric" "$mode" "$ready"
        else
          record "$metric" "$mode" "$(cat "$TMP/ms")"
        fi
      else
        record "$metric" "$mode" failed
      fi
    done
  done
fi
bench_teardown

bench_summarize --ratio vipgate/conntrackd --ratio vipgate-daemon/conntrackd \
  --title "Time for a (re)started node to pull a snapshot of $FLOWS flows from its peer (ms), $RUNS runs"
