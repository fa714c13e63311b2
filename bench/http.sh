#!/usr/bin/env bash
# Side-by-side benchmark of the HTTP (L7) proxy (issue 20), in one run on the same namespaces:
#   - vipgate: [[http]] with one route to a pool of two real servers (rr), hyper server and
#     pooled hyper-util client;
#   - HAProxy: `mode http`, `balance roundrobin`, `option forwardfor` (Debian's package), its
#     default thread count, as vipgate's tokio runtime uses every core.
#
#   cl 198.51.100.200 ── eth0 lb 198.51.100.11:80 eth1 10.0.0.1 ── rs1 .101, rs2 .102
#
# The real servers are HAProxy answering 200 with a 3-byte body (http_ok_server). Each
# repetition runs each mode once (the order reversed every other repetition) and measures with
# wrk: requests/s over keep-alive connections (wrk -t 2 -c 32) with the p50 and p99 latency,
# and requests/s with a new connection per request (Connection: close).
#
# Usage (root): bench/http.sh [RUNS]   (RUNS=5, DUR=4, ONLY, MODES="vipgate haproxy",
# VIPGATE_BIN: see bench/README.md)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

bench_knobs 5 4 "$@"
bench_require wrk haproxy python3
bench_cargo_bin VIPGATE_BIN vipgate vipgate
GW=198.51.100.11
bench_init http
gateway_topology lb 198.51.100.11/24 10.0.0.1/24 \
  out:cl=198.51.100.200/24 in:rs1=10.0.0.101/24 in:rs2=10.0.0.102/24
# New-connection runs wrap the client's ports; skip TIME_WAIT the same way for both proxies.
for h in cl lb rs1 rs2; do
  x "$h" sysctl -qw net.ipv4.tcp_max_tw_buckets=0 net.ipv4.ip_local_port_range="1024 65535"
done
http_ok_server rs1 10.0.0.101:80 rs1
http_ok_server rs2 10.0.0.102:80 rs2

cat > "$TMP/vipgate.toml" <<CFG
[daemon]
control = "$TMP/vipgate.sock"

[[http]]
name = "bench"
listen = "$GW:80"

[[http.route]]
name = "all"
pool = "reals"

[[http.pool]]
name = "reals"
backends = [{ address = "10.0.0.101:80" }, { address = "10.0.0.102:80" }]
CFG

cat > "$TMP/haproxy-http.cfg" <<CFG
global
  maxconn 4000
defaults
  mode http
  option forwardfor
  timeout client 10s
  timeout server 30s
  timeout connect 5s
  timeout http-request 10s
frontend www
  bind $GW:80
  default_backend reals
backend reals
  balance roundrobin
  http-reuse safe
  server rs1 10.0.0.101:80
  server rs2 10.0.0.102:80
CFG

# to_ms VALUE: wrk's latency (1.23ms, 456.78us, 1.02s) in milliseconds.
to_ms() {
  python3 -c '
import re, sys
m = re.fullmatch(r"([0-9.]+)(us|ms|s)", sys.argv[1])
print("none" if not m else "%.3f" % (float(m[1]) * {"us": 0.001, "ms": 1, "s": 1000}[m[2]]))' "$1"
}

measure() { # MODE
  local log=$TMP/wrk-$1.log
  if want_metric keepalive_req_per_s || want_metric p50_ms || want_metric p99_ms; then
    x cl wrk -t 2 -c 32 -d "${DUR}s" --latency "http://$GW/" > "$log" 2>&1 || true
    if want_metric keepalive_req_per_s; then
      record keepalive_req_per_s "$1" "$(awk '/Requests\/sec/ { print $2 }' "$log")"
    fi
    if want_metric p50_ms; then record p50_ms "$1" "$(to_ms "$(awk '$1 == "50%" { print $2 }' "$log")")"; fi
    if want_metric p99_ms; then record p99_ms "$1" "$(to_ms "$(awk '$1 == "99%" { print $2 }' "$log")")"; fi
    if want_metric non_2xx; then
      record non_2xx "$1" "$(awk '/Non-2xx/ { n = $NF } END { print n + 0 }' "$log")"
    fi
  fi
  if want_metric new_conn_req_per_s; then
    conn_rate cl "http://$GW/"
    record new_conn_req_per_s "$1" "$CONN_RATE"
  fi
}

wait_gw() { wait_for 10 x cl bash -c "exec 3<>/dev/tcp/$GW/80"; }

vipgate_mode() {
  vipgate_start lb "$TMP/vipgate.toml" http
  wait_gw
  measure vipgate
  vipgate_stop
}

haproxy_mode() {
  x lb haproxy -f "$TMP/haproxy-http.cfg" -D -p "$TMP/haproxy-http.pid"
  wait_gw
  measure haproxy
  kill "$(cat "$TMP/haproxy-http.pid")"
  wait_for 5 bash -c "! kill -0 $(cat "$TMP/haproxy-http.pid")"
}

for rep in $(seq "$RUNS"); do
  for mode in $(bench_order "$rep" vipgate haproxy); do
    echo "repetition $rep/$RUNS: $mode" >&2
    "${mode}_mode"
  done
done

bench_summarize --ratio vipgate/haproxy \
  --title "HTTP/1.1 proxy, one route to two real servers (rr): vipgate [[http]] vs HAProxy mode http; $RUNS x ${DUR}s, wrk -t 2 -c 32 (keep-alive) and Connection: close"
