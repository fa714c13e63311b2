#!/usr/bin/env bash
# Bulk sync time: how long a node that (re)starts takes to pull a snapshot of FLOWS (100,000)
# flows from its peer. vipgate's flowsync against conntrackd's resync, same run.
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
# Metric: bulk_sync_ms.
#
# Usage (root): bench/bulk_sync.sh [RUNS]   (RUNS=5, FLOWS=100000, MODES="vipgate conntrackd",
# BULK_SYNC_BIN: the example binary, default target/release/examples/bulk_sync, built when
# missing; see bench/README.md. DUR is not used)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

bench_knobs 5 1 "$@"   # DUR is not used
FLOWS=${FLOWS:-100000}
bench_require conntrackd conntrack python3
BULK_SYNC_BIN=${BULK_SYNC_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bulk_sync}
if [ ! -x "$BULK_SYNC_BIN" ]; then
  echo "building: cargo build --release -p flowsync --example bulk_sync" >&2
  (cd "$ROOT" && cargo build -q --release -p flowsync --example bulk_sync)
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

echo "conntrackd: $(conntrackd -v 2>&1 | head -1)" >&2
metric=bulk_sync_ms
if want_metric "$metric"; then
  if want_mode conntrackd; then ct_setup; fi
  for rep in $(seq "$RUNS"); do
    for mode in $(bench_order "$rep" vipgate conntrackd); do
      echo "repetition $rep/$RUNS: $metric $mode ($FLOWS flows)" >&2
      case $mode in
        vipgate) run=vg_run ;;
        conntrackd) run=ct_run ;;
      esac
      if $run; then
        record "$metric" "$mode" "$(cat "$TMP/ms")"
      else
        record "$metric" "$mode" failed
      fi
    done
  done
fi
bench_teardown

bench_summarize --ratio vipgate/conntrackd \
  --title "Time for a (re)started node to pull a snapshot of $FLOWS flows from its peer (ms), $RUNS runs"
