#!/usr/bin/env bash
# What LVS direct routing saves the director (issue 16): the same virtual service forwarded by
# NAT (`forward = "nat"`, ipvsadm -m) and by direct routing (`forward = "dr"`, ipvsadm -g), a
# download through the VIP, and the director's CPU per Gbit/s of the client's traffic.
#
#   cl eth0 198.51.100.200 ── eth0 dir 198.51.100.11 (VIP .10)
#   cl eth1 10.0.0.200 ─┐
#   dir eth1 10.0.0.1 ──┼── sw (bridge) ── rs1 10.0.0.101 (VIP on lo)
#
# In NAT mode rs1 routes the clients' network through the director, which rewrites every reply;
# in DR mode through cl's own leg on the segment (the segment's router in a real site), so the
# replies — the download's bytes — never reach the director, which forwards only the client's
# ACKs. One real server: iperf3's control and data connections must reach the same one.
#
# Each repetition runs each mode once (order reversed every other repetition): iperf3 -R (the
# real server sends) for DUR seconds, and during it
# - download_Gbps: what the client received;
# - director_core_pct_per_Gbps: the director's CPU — its daemon's (utime + stime from
#   /proc/PID/stat) plus the run time of its eBPF programs (the fdinfo of the daemon's program
#   fds, `kernel.bpf_stats_enabled` turned on for the run) — in % of one core, per Gbit/s.
#   The kernel's own work around a redirect (the veth transmit) is not in it;
# - machine_core_pct_per_Gbps: every CPU's busy time (/proc/stat), per Gbit/s: client, server
#   and director together; the difference between the modes is the director's whole share;
# - director_packets_per_Gbit: packets the director's programs ran on, per Gbit received.
#
# Usage (root): bench/lb_dr.sh [RUNS]   (RUNS=3, DUR=4, ONLY, MODES="nat dr", VIPGATE_BIN: see
# bench/README.md)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

bench_knobs 3 4 "$@"
bench_require iperf3 python3
bench_cargo_bin VIPGATE_BIN vipgate vipgate
VIP=198.51.100.10
bench_init lbdr cl dir
veth "$P-cl" eth0 "$P-dir" eth0
addr "$P-cl" eth0 198.51.100.200/24
addr "$P-dir" eth0 198.51.100.11/24
forwarding "$P-dir"
lan_attach sw cl eth1 10.0.0.200/24
lan_attach sw dir eth1 10.0.0.1/24
lan_attach sw rs1 eth0 10.0.0.101/24
# The client takes the direct replies on eth1 from an address it reaches through eth0.
x cl sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth1.rp_filter=0
# The real-server side of LVS-DR (README): the VIP on lo, never answered for in ARP.
x rs1 sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
addr "$P-rs1" lo $VIP/32
x rs1 iperf3 -s -D -I "$TMP/iperf3.pid" > /dev/null
wait_port "$P-rs1" 10.0.0.101 5201

site() { # FORWARD
  cat > "$TMP/$1.toml" <<CFG
[daemon]
control = "$TMP/vipgate.sock"

[[service]]
name = "iperf"
listen = "$VIP:5201"
scheduler = "rr"
forward = "$1"
backends = [{ address = "10.0.0.101:5201" }]
CFG
}
site nat
site dr

# The eBPF statistics are global; put back what the machine had.
STATS_BEFORE=$(sysctl -n kernel.bpf_stats_enabled)
trap 'sysctl -qw kernel.bpf_stats_enabled="$STATS_BEFORE"; bench_cleanup' EXIT
sysctl -qw kernel.bpf_stats_enabled=1

# daemon_cpu_ns PID: the process's user + system time.
daemon_cpu_ns() {
  awk -v hz="$(getconf CLK_TCK)" '{ printf "%.0f\n", ($14 + $15) * 1e9 / hz }' "/proc/$1/stat"
}

# bpf_totals PID: "RUN_TIME_NS RUN_COUNT" summed over the eBPF programs PID holds open.
bpf_totals() {
  local fd t=0 n=0 link info
  for fd in /proc/"$1"/fd/*; do
    link=$(readlink "$fd" 2>/dev/null) || continue
    [ "$link" = "anon_inode:bpf-prog" ] || continue
    info=$(cat "/proc/$1/fdinfo/${fd##*/}" 2>/dev/null) || continue
    t=$((t + $(awk '$1 == "run_time_ns:" { print $2 }' <<< "$info")))
    n=$((n + $(awk '$1 == "run_cnt:" { print $2 }' <<< "$info")))
  done
  echo "$t $n"
}

# machine_busy_ns: busy time of every CPU (user nice system irq softirq steal), in ns.
machine_busy_ns() {
  awk -v hz="$(getconf CLK_TCK)" '$1 == "cpu" {
    printf "%.0f\n", ($2 + $3 + $4 + $7 + $8 + $9) * 1e9 / hz }' /proc/stat
}

measure() { # MODE
  local d0 b0 n0 m0 t0 d1 b1 n1 m1 t1 gbps wall
  d0=$(daemon_cpu_ns "$VIPGATE_PID")
  read -r b0 n0 <<< "$(bpf_totals "$VIPGATE_PID")"
  m0=$(machine_busy_ns)
  t0=$(date +%s%N)
  gbps=$(iperf_gbps cl -c $VIP -R -t "$DUR")
  t1=$(date +%s%N)
  d1=$(daemon_cpu_ns "$VIPGATE_PID")
  read -r b1 n1 <<< "$(bpf_totals "$VIPGATE_PID")"
  m1=$(machine_busy_ns)
  record download_Gbps "$1" "$gbps"
  [ "$gbps" != failed ] || return 0
  wall=$((t1 - t0))
  python3 - "$1" "$gbps" "$wall" "$((d1 - d0 + b1 - b0))" "$((m1 - m0))" "$((n1 - n0))" "$DUR" <<'PY' >> "$RESULTS"
import sys
mode, gbps, wall, director, machine, runs, dur = sys.argv[1], float(sys.argv[2]), *map(int, sys.argv[3:])
print(f"director_core_pct_per_Gbps\t{mode}\t{100 * director / wall / gbps:.3f}")
print(f"machine_core_pct_per_Gbps\t{mode}\t{100 * machine / wall / gbps:.2f}")
print(f"director_packets_per_Gbit\t{mode}\t{runs / (gbps * dur):.0f}")
PY
}

run_mode() { # nat | dr
  # Where rs1 sends the clients' answers: through the director (NAT) or past it (DR).
  local via=10.0.0.1
  [ "$1" = nat ] || via=10.0.0.200
  x rs1 ip route replace 198.51.100.0/24 via $via
  vipgate_start dir "$TMP/$1.toml" lb
  x dir "$VIPGATE_BIN" show lb -c "$TMP/$1.toml" | grep -q "^Data path: kernel " ||
    bench_die "the director is not on the kernel data path (DR needs it): $(x dir "$VIPGATE_BIN" show lb -c "$TMP/$1.toml" | tail -1)"
  wait_for 10 x cl bash -c "exec 3<>/dev/tcp/$VIP/5201"
  measure "$1"
  vipgate_stop
}

for rep in $(seq "$RUNS"); do
  for mode in $(bench_order "$rep" nat dr); do
    echo "repetition $rep/$RUNS: $mode" >&2
    run_mode "$mode"
  done
done

bench_summarize --ratio dr/nat \
  --title "Director CPU, LVS-NAT against LVS-DR, iperf3 -R through the VIP to one real server; $RUNS x ${DUR}s"
