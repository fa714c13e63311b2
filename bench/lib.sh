#!/usr/bin/env bash
# Helpers shared by the bench scripts. Source it after `set -euo pipefail`; it sources
# netns-scripts/lib.sh (ns_add, ns_del, veth, bridge, addr, gw, forwarding, wait_port, ...).
#
# Invariants:
# - every namespace a script creates is named "$P-HOST" and registered here, so it is deleted
#   (with every process in it) when the script exits, whether it ends, fails or is interrupted;
# - the knobs have the same names and meanings in every script (bench_knobs, bench/README.md);
# - every figure goes through `record` into one tab-separated file, METRIC MODE VALUE per line,
#   and bench/summarize.py turns that file into the one table every script prints.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
BENCH_NAME=bench/$(basename "$0")
# shellcheck source-path=SCRIPTDIR source=../netns-scripts/lib.sh
. "$ROOT/netns-scripts/lib.sh"

PATH=$PATH:/usr/sbin:/sbin   # sshd, haproxy, nft, keepalived live there
BENCH_HOSTS=()   # registered namespaces, without the "$P-" prefix
BENCH_PIDS=()    # processes outside any namespace to stop on exit (perf, ...)

bench_die() { echo "$BENCH_NAME: $*" >&2; exit 1; }

# bench_knobs DEFAULT_RUNS DEFAULT_DUR [SCRIPT ARGUMENTS]: the knobs every script takes.
#   RUNS   repetitions; a script's one positional argument is an alias (bench/nat.sh 5)
#   DUR    seconds per measurement
#   ONLY   metrics to run, as space-separated glob patterns on the metric names (all if empty)
#   MODES  modes to run (vipgate and the script's anchors; all if empty)
bench_knobs() {
  [ "$(id -u)" = 0 ] || bench_die "needs root (network namespaces, TUN)"
  [ $# -le 3 ] || bench_die "usage: $BENCH_NAME [RUNS]"
  RUNS=${3:-${RUNS:-$1}}
  DUR=${DUR:-$2}
  ONLY=${ONLY:-}
  MODES=${MODES:-}
  case $RUNS in '' | *[!0-9]* | 0) bench_die "RUNS must be a positive integer, not '$RUNS'" ;; esac
  case $DUR in '' | *[!0-9]* | 0) bench_die "DUR must be a positive number of seconds, not '$DUR'" ;; esac
}

# The Debian package that ships each tool a script may need.
bench_package() {
  case $1 in
    nft) echo nftables ;;
    sshd) echo openssh-server ;;
    ssh | ssh-keygen) echo openssh-client ;;
    perf) echo linux-perf ;;
    ip) echo iproute2 ;;
    *) echo "$1" ;;
  esac
}

# bench_require CMD...: fail, naming the Debian packages, unless every command is installed.
bench_require() {
  local c missing=() pkgs=()
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 || {
      missing+=("$c")
      pkgs+=("$(bench_package "$c")")
    }
  done
  [ ${#missing[@]} = 0 ] ||
    bench_die "needs ${missing[*]}: apt-get install ${pkgs[*]}"
}

# bench_cargo_bin VAR PACKAGE BIN: VAR (e.g. VIPGATE_BIN) is the binary to use; when unset it
# is the release build in target/, built first when missing.
bench_cargo_bin() {
  local var=$1 pkg=$2 bin=$3
  local path=${!var:-${CARGO_TARGET_DIR:-$ROOT/target}/release/$bin}
  if [ ! -x "$path" ]; then
    [ -z "${!var:-}" ] || bench_die "$var=$path is not an executable"
    echo "building $bin: cargo build --release -p $pkg --bin $bin" >&2
    (cd "$ROOT" && cargo build -q --release -p "$pkg" --bin "$bin")
  fi
  printf -v "$var" '%s' "$path"
}

# bench_init PREFIX HOST...: namespaces "$P-HOST" (P is PREFIX and this shell's pid), $TMP
# (kept with KEEP=1) and $RESULTS (default $TMP/results.tsv; a RESULTS given by the caller is
# appended to and kept), all cleaned up on exit, error, Ctrl-C or SIGTERM.
bench_init() {
  P=$1$$
  shift
  TMP=$(mktemp -d "/tmp/vipgate-$(basename "$0" .sh).XXXXXX")
  RESULTS=${RESULTS:-$TMP/results.tsv}
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local h
  for h in "$@"; do bench_ns "$h"; done
}

# bench_ns HOST: create (and register for cleanup) the namespace "$P-HOST".
bench_ns() {
  ns_add "$P-$1"
  case " ${BENCH_HOSTS[*]} " in *" $1 "*) ;; *) BENCH_HOSTS+=("$1") ;; esac
}

# bench_teardown: delete every registered namespace and what runs in it (bench_ns re-creates).
bench_teardown() {
  local h
  for h in "${BENCH_HOSTS[@]}"; do ns_del "$P-$h"; done
}

bench_cleanup() {
  set +e
  local p
  for p in "${BENCH_PIDS[@]}"; do kill "$p" 2>/dev/null; done
  bench_teardown
  if [ -n "${KEEP:-}" ]; then echo "$BENCH_NAME: logs kept in $TMP" >&2; else rm -rf "$TMP"; fi
}

# bench_track PID: stop this process (running outside the namespaces) on exit.
bench_track() { BENCH_PIDS+=("$1"); }

# x HOST CMD...: run CMD in the namespace of HOST.
x() {
  local h=$1
  shift
  ip netns exec "$P-$h" "$@"
}

# spawn HOST CMD...: start CMD in the background in HOST; SPAWNED is its pid (`ip netns exec`
# execs CMD), so `kill "$SPAWNED"` and `wait "$SPAWNED"` reach CMD itself. Redirect the call.
spawn() {
  local h=$1
  shift
  ip netns exec "$P-$h" "$@" &
  SPAWNED=$!
}

# wait_for SECONDS CMD...: poll CMD every 50 ms until it succeeds; fail after SECONDS.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "$BENCH_NAME: timed out waiting for: $*" >&2; return 1; }
    sleep 0.05
  done
}

# record METRIC MODE VALUE: one figure, appended to $RESULTS.
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$RESULTS"; }

bench_matches() { # PATTERNS ITEM: does ITEM match one of the glob PATTERNS (empty: all)?
  [ -z "$1" ] && return 0
  local pat pats
  read -ra pats <<< "$1"
  for pat in "${pats[@]}"; do
    # shellcheck disable=SC2053  # the pattern is a glob on purpose
    [[ $2 == $pat ]] && return 0
  done
  return 1
}
want_metric() { bench_matches "$ONLY" "$1"; }
want_mode() { bench_matches "$MODES" "$1"; }

# bench_order REP MODE...: the modes MODES selects, in this order on odd repetitions and
# reversed on even ones, so that neither vipgate nor its anchor always runs on a warmer machine.
bench_order() {
  local rep=$1 m out=()
  shift
  for m in "$@"; do want_mode "$m" && out+=("$m"); done
  if [ $((rep % 2)) = 0 ]; then
    local i rev=()
    for ((i = ${#out[@]} - 1; i >= 0; i--)); do rev+=("${out[i]}"); done
    out=("${rev[@]}")
  fi
  echo "${out[*]}"
}

# bench_cc NAME [GCC FLAGS]: compile bench/tools/NAME.c into $TMP/NAME.
bench_cc() {
  local name=$1
  shift
  bench_require gcc
  gcc -O2 -Wall -o "$TMP/$name" "$BENCH_DIR/tools/$name.c" "$@"
}

# lan_attach SWITCH HOST IF [CIDR]: HOST's interface IF on bridge br0 of namespace SWITCH
# (the bridge port is p-HOST).
lan_attach() {
  bench_ns "$1"
  bridge "$P-$1" br0
  bench_ns "$2"
  veth "$P-$2" "$3" "$P-$1" "p-$2"
  bridge_port "$P-$1" br0 "p-$2"
  [ -z "${4:-}" ] || addr "$P-$2" "$3" "$4"
}

# The PAT pair of bench/failover.sh and bench/bulk_sync.sh: gateways g1 and g2 share the
# outside overload address 198.51.100.10 (vrid 61) and the inside gateway 192.168.101.1
# (vrid 62) by VRRP and sync over their own link; pc inside, srv outside.
#
#   srv 198.51.100.100 ── outsw ── g1 eth0 .11   g2 eth0 .12
#   pc 192.168.101.10 ─── insw ─── g1 eth1 .2    g2 eth1 .3
#                         syncsw ─ g1 eth2 10.9.0.1   g2 eth2 10.9.0.2
PAT_PAIR_VIP=198.51.100.10

# pat_pair_lan: the hosts and switches above, pc routed through the inside gateway address.
pat_pair_lan() {
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

# pat_pair_sink: srv drops the datagrams of tools/flowgen.c (UDP ports 20000-59999) unanswered,
# so each is one new flow through the pair and nothing more.
pat_pair_sink() {
  x srv nft -f - <<EOF
table inet sink {
  chain in {
    type filter hook input priority 0;
    udp dport 20000-59999 drop
  }
}
EOF
}

# pat_pair_sync ME PEER KEY_FILE: the [sync] section of the gateway at ME (its sync address)
# syncing with PEER under the key in KEY_FILE, following the outside VRRP instance.
pat_pair_sync() {
  printf '[sync]\npeers = ["%s"]\nlisten = "%s"\nkey_file = "%s"\nvrrp = "outside"\n' "$2" "$1" "$3"
}

# pat_pair_conf FILE CONTROL PRIORITY ADVERT MAPPINGS [SYNC_SECTION]: a gateway's vipgate
# config (PAT of pc's network to the overload address, both VRRP instances in one group at
# PRIORITY and ADVERT, at most MAPPINGS mappings) with SYNC_SECTION appended.
pat_pair_conf() {
  cat > "$1" <<EOF
[daemon]
control = "$2"

[nat]
inside = ["eth1"]
outside = "eth0"
address = "$PAT_PAIR_VIP"
ports = "10000-32767"
max_mappings = $5
max_mappings_per_host = $5

[[nat.acl]]
action = "permit"
src = "192.168.101.0/24"

[[vrrp]]
name = "outside"
group = "hq"
interface = "eth0"
vrid = 61
priority = $3
advert_interval = "$4"
addresses = ["$PAT_PAIR_VIP/24"]

[[vrrp]]
name = "inside"
group = "hq"
interface = "eth1"
vrid = 62
priority = $3
advert_interval = "$4"
addresses = ["192.168.101.1/24"]

${6:-}
EOF
}

# gateway_topology GW GW_OUTSIDE_CIDR GW_INSIDE_CIDR SIDE:HOST=CIDR...: the client-gateway-
# server shape (SIDE is out or in):
#
#   out:HOST... ── eth0  GW  eth1 ── in:HOST...
#
# Every host talks through its eth0. A side with one host is a veth pair straight to the
# gateway; a side with several meets on a bridge in namespace outsw or insw. GW forwards;
# inside hosts route by default through it, outside hosts know only their own subnet.
gateway_topology() {
  local gwh=$1 out_cidr=$2 in_cidr=$3 spec outs=() ins=()
  shift 3
  for spec in "$@"; do
    case $spec in
      out:*=*) outs+=("${spec#out:}") ;;
      in:*=*) ins+=("${spec#in:}") ;;
      *) bench_die "gateway_topology: '$spec' is not out:HOST=CIDR or in:HOST=CIDR" ;;
    esac
  done
  bench_ns "$gwh"
  forwarding "$P-$gwh"
  gateway_side "$gwh" eth0 "$out_cidr" outsw "${outs[@]}"
  gateway_side "$gwh" eth1 "$in_cidr" insw "${ins[@]}"
  for spec in "${ins[@]}"; do gw "$P-${spec%%=*}" "${in_cidr%/*}"; done
}

gateway_side() { # GW IF GW_CIDR SWITCH HOST=CIDR...
  local gwh=$1 ifname=$2 cidr=$3 sw=$4 spec
  shift 4
  [ $# -ge 1 ] || bench_die "gateway_topology: no host on the $ifname side"
  if [ $# = 1 ]; then
    bench_ns "${1%%=*}"
    veth "$P-$gwh" "$ifname" "$P-${1%%=*}" eth0
    addr "$P-${1%%=*}" eth0 "${1#*=}"
  else
    lan_attach "$sw" "$gwh" "$ifname"
    for spec in "$@"; do lan_attach "$sw" "${spec%%=*}" eth0 "${spec#*=}"; done
  fi
  addr "$P-$gwh" "$ifname" "$cidr"
}

# http_ok_server HOST ADDR:PORT [NAME]: HAProxy in HOST answering every HTTP request with 200
# (body NAME), the server end of the connection-rate measurements; waits until it accepts.
# With NAME, its stats socket is $TMP/NAME.sock (for http_sessions).
http_ok_server() {
  local h=$1 listen=$2 name=${3:-ok}
  cat > "$TMP/$name.cfg" <<CFG
global
  maxconn 4000
  stats socket $TMP/$name.sock mode 600 level admin
defaults
  mode http
  timeout client 5s
  timeout server 5s
  timeout connect 5s
frontend web
  bind $listen
  http-request return status 200 content-type text/plain string "$name"
CFG
  x "$h" haproxy -f "$TMP/$name.cfg" -D -p "$TMP/$name.pid" > "$TMP/$name.log" 2>&1 ||
    { cat "$TMP/$name.log" >&2; return 1; }
  wait_port "$P-$h" "${listen%:*}" "${listen##*:}"
}

# http_sessions NAME: total sessions the http_ok_server NAME has accepted.
http_sessions() {
  echo "show stat" | socat stdio "unix-connect:$TMP/$1.sock" |
    awk -F, '$1 == "web" && $2 == "FRONTEND" { print $8 }'
}

# conn_rate HOST URL: new connections/s over DUR seconds from HOST (wrk, Connection: close)
# into CONN_RATE (0 if none), and wrk's socket errors into CONN_ERRORS.
conn_rate() {
  local log=$TMP/wrk.log
  x "$1" wrk -t 2 -c 32 -d "${DUR}s" -H 'Connection: close' "$2" > "$log" 2>&1 || true
  CONN_RATE=$(awk '/Requests\/sec/ { print $2 }' "$log")
  CONN_RATE=${CONN_RATE:-0}
  CONN_ERRORS=$(awk '/Socket errors/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$log")
  CONN_ERRORS=${CONN_ERRORS:-0}
}

# iperf_gbps HOST IPERF3-CLIENT-ARGS...: Gbit/s received, "failed" when iperf3 fails three
# times (a server still finishing the previous test refuses the next one for a moment).
iperf_gbps() {
  local h=$1 try out
  shift
  for try in 1 2 3; do
    if out=$(x "$h" iperf3 -J "$@" 2>/dev/null | python3 -c '
import json, sys
print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))' 2>/dev/null); then
      echo "$out"
      return
    fi
    [ "$try" = 3 ] || sleep 1
  done
  echo failed
}

# forward_site FILE [NAT_LINE...]: the site file of gateway_topology's gateway (nat.sh,
# synflood.sh): PAT on 198.51.100.1 and outside :8001 forwarded to 192.168.101.10:80, with
# NAT_LINEs (such as `queues = 2`) added to [nat].
forward_site() {
  local file=$1 line
  shift
  {
    printf '[daemon]\ncontrol = "%s"\n\n' "$TMP/vipgate.sock"
    printf '[nat]\ninside = ["eth1"]\noutside = "eth0"\naddress = "198.51.100.1"\n'
    for line in "$@"; do printf '%s\n' "$line"; done
    printf '\n[[nat.static]]\nproto = "tcp"\noutside_port = 8001\ninside = "192.168.101.10:80"\n'
  } > "$file"
}

# vipgate_start HOST CONFIG PART: `vipgate run` in HOST, up once `show PART` answers;
# VIPGATE_PID is its pid, VIPGATE_LOG its log (CONFIG with .log for .toml).
vipgate_start() {
  local h=$1 config=$2 part=$3
  VIPGATE_HOST=$h
  VIPGATE_LOG=${config%.toml}.log
  # shellcheck disable=SC2153  # VIPGATE_BIN is set by the script's bench_cargo_bin
  spawn "$h" "$VIPGATE_BIN" run -c "$config" > "$VIPGATE_LOG" 2>&1
  VIPGATE_PID=$SPAWNED
  wait_for 10 x "$h" "$VIPGATE_BIN" show "$part" -c "$config" > /dev/null ||
    { tail -20 "$VIPGATE_LOG" >&2; return 1; }
}

# vipgate_stop: SIGTERM to the vipgate of vipgate_start, and wait until it has cleaned up
# (its TUN and routes gone). Fails if vipgate died before.
vipgate_stop() {
  kill -0 "$VIPGATE_PID" 2>/dev/null ||
    { tail -20 "$VIPGATE_LOG" >&2; bench_die "vipgate died during the run"; }
  kill -TERM "$VIPGATE_PID"
  wait "$VIPGATE_PID" || true
  for _ in $(seq 50); do
    ip -n "$P-$VIPGATE_HOST" link show nat0 > /dev/null 2>&1 || return 0
    sleep 0.1
  done
}

# bench_summarize SUMMARIZE-ARGS...: the one results table (bench/summarize.py).
# conntrackd_ftfw_conf PREFIX ME PEER HASHLIMIT PROTOCOL...: writes PREFIX.conf, conntrackd's
# primary-backup FTFW setup (its documentation's example) syncing over UDP on eth2 from ME to
# PEER with an external cache, accepting the PROTOCOLs (TCP, UDP) and ignoring the sync link;
# its log, lock and control socket are PREFIX.log, PREFIX.lock and PREFIX.ctl.
conntrackd_ftfw_conf() {
  local prefix=$1 me=$2 peer=$3 limit=$4 protocols
  shift 4
  protocols=$(printf '      %s\n' "$@")
  cat > "$prefix.conf" <<EOF
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
  HashSize 65536
  HashLimit $limit
  LogFile $prefix.log
  Syslog off
  LockFile $prefix.lock
  UNIX {
    Path $prefix.ctl
  }
  NetlinkBufferSize 2097152
  NetlinkBufferSizeMaxGrowth 8388608
  Filter From Userspace {
    Protocol Accept {
$protocols
    }
    Address Ignore {
      IPv4_address 127.0.0.1
      IPv4_address 10.9.0.0/24
    }
  }
}
EOF
}

bench_summarize() { python3 "$BENCH_DIR/summarize.py" "$RESULTS" "$@"; }
