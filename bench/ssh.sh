#!/usr/bin/env bash
# Side-by-side benchmark: `vipgate ssh -L` vs OpenSSH `ssh -L`, same sshd (Debian's OpenSSH),
# same cipher, inside a private network namespace on loopback.
#   - throughput, 1 and 8 streams (iperf3), per cipher: CIPHER_1stream_Gbps, CIPHER_8stream_Gbps
#   - short connections per second (connect, 100 B echo, close), 1 and 8 clients, with the
#     latency and the CPU each process spends per connection (conn_Nclient_*), and the best
#     ratio any forwarder could reach given what sshd, the echo server and the generator cost
#     (bench/tools/ssh_bounds.py)
#   - time and client memory to open and hold N concurrent forwarded connections
#     (open_N_conns_s, client_kB_per_conn_N)
# Modes: openssh, vipgate, vipgate-x2 (`--connections 2`) and haproxy (a plain TCP relay, the
# floor of the 1-client connection rate), alternating within each repetition.
# The echo server and the connection-rate client are small C programs (bench/tools/tcp_echo.c,
# connrate.c), not Python: with Python's asyncio echo server and a threaded Python client,
# those two alone used ~450 us of CPU per connection (against ~190 for either forwarder), so
# the benchmark measured mostly Python. Both tools get the same generator and echo server.
#
# Usage (root): bench/ssh.sh [RUNS]   (RUNS=3, DUR=5, ONLY, MODES, VIPGATE_BIN: see
# bench/README.md; HOLD="1000 5000 10000" held-connection counts, HOLD_ROUNDS=1,
# CIPHERS="chacha20-poly1305@openssh.com aes128-gcm@openssh.com")
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

bench_knobs 3 5 "$@"
HOLD=${HOLD-1000 5000 10000}
HOLD_ROUNDS=${HOLD_ROUNDS:-1}
CIPHERS=${CIPHERS:-"chacha20-poly1305@openssh.com aes128-gcm@openssh.com"}
bench_require sshd ssh ssh-keygen iperf3 python3
bench_cargo_bin VIPGATE_BIN vipgate vipgate
ulimit -n "$(ulimit -Hn)"   # 10,000 held connections need ~10,000 fds in each process
bench_init bs ns
D=$TMP

mkdir -p /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$D/host"
ssh-keygen -q -t ed25519 -N '' -f "$D/id"
cp "$D/id.pub" "$D/authorized_keys"
cat > "$D/sshd_config" <<EOF
Port 2222
ListenAddress 127.0.0.1
HostKey $D/host
AuthorizedKeysFile $D/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
MaxStartups 1000
LogLevel ERROR
EOF
echo "[127.0.0.1]:2222 $(cut -d' ' -f1,2 "$D/host.pub")" > "$D/known_hosts"

bench_cc tcp_echo
bench_cc connrate -pthread

spawn ns /usr/sbin/sshd -D -e -f "$D/sshd_config"
spawn ns "$D/tcp_echo" 7007
port_up() { wait_port "$P-ns" 127.0.0.1 "$1"; }
port_up 2222
port_up 7007
x ns iperf3 -s -p 5201 -D

CLIENT_PID=""
start_client() { # TOOL CIPHER PORT_BASE [EXTRA VIPGATE ARGS]
  local tool=$1 cipher=$2 base=$3
  shift 3
  local fw=(-L "$((base + 1)):127.0.0.1:5201" -L "$((base + 2)):127.0.0.1:7007")
  local common=(-N -p 2222 -i "$D/id" -c "$cipher" -o IdentitiesOnly=yes -o BatchMode=yes
    -o UserKnownHostsFile="$D/known_hosts" -o StrictHostKeyChecking=yes)
  if [ "$tool" = openssh ]; then
    spawn ns ssh "${common[@]}" "${fw[@]}" root@127.0.0.1
  else
    spawn ns "$VIPGATE_BIN" ssh "${common[@]}" "$@" "${fw[@]}" root@127.0.0.1 2> /dev/null
  fi
  CLIENT_PID=$SPAWNED
  port_up "$((base + 1))"
  port_up "$((base + 2))"
}
stop_client() {
  kill "$CLIENT_PID" 2> /dev/null || true
  wait "$CLIENT_PID" 2> /dev/null || true
}
rss_kb() { awk '/VmRSS/ { print $2 }' "/proc/$1/status"; }

# CPU seconds (utime + stime, all threads) of processes in the namespace, by role.
cpu_s() { # ROLE: fwd | sshd | echo
  local p t=0 comm
  for p in $(ip netns pids "$P-ns"); do
    comm=$(cat "/proc/$p/comm" 2> /dev/null) || continue
    case $1 in
      fwd) [ "$p" = "$CLIENT_PID" ] || continue ;;
      sshd) [ "$comm" = sshd ] || continue ;;
      echo) [ "$comm" = tcp_echo ] || continue ;;
    esac
    t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{ print $12 + $13 }')))
  done
  echo "$t"
}

connrate() { # MODE WORKERS [PORT]: rate, latency and CPU per connection of each process
  local mode=$1 m=conn_$2client b_f b_s b_e rate lat gen hz n a_s f wanted=""
  for f in per_s latency_us cpu_fwd_us cpu_sshd_us cpu_rest_us; do
    if want_metric "${m}_$f"; then wanted=1; fi
  done
  [ -n "$wanted" ] || return 0
  b_f=$(cpu_s fwd)
  b_s=$(cpu_s sshd)
  b_e=$(cpu_s echo)
  read -r rate lat gen < <(x ns "$D/connrate" "${3:-30002}" "$2" "$DUR")
  hz=$(getconf CLK_TCK)
  n=$(python3 -c "print($rate * $DUR)")
  per() { python3 -c "print('%.0f' % (($1) * 1e6 / $n))"; }
  a_s=$(cpu_s sshd)
  record "${m}_per_s" "$mode" "$rate"
  record "${m}_latency_us" "$mode" "$lat"
  record "${m}_cpu_fwd_us" "$mode" "$(per "($(cpu_s fwd) - $b_f) / $hz")"
  record "${m}_cpu_sshd_us" "$mode" "$(per "($a_s - $b_s) / $hz")"
  record "${m}_cpu_rest_us" "$mode" "$(per "($a_s - $b_s + $(cpu_s echo) - $b_e) / $hz + $gen")"
}

# The floor for any user-space forwarding hop on this machine: haproxy (one thread, TCP
# mode, no SSH) relaying the same exchange straight to the echo server.
printf 'global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nlisten relay\n  bind 127.0.0.1:30100\n  server echo 127.0.0.1:7007\n' > "$D/haproxy.cfg"
haproxy_relay() {
  bench_require haproxy
  spawn ns haproxy -q -f "$D/haproxy.cfg"
  CLIENT_PID=$SPAWNED
  port_up 30100
  connrate haproxy 1 30100
  stop_client
}

first_cipher=${CIPHERS%% *}
for rep in $(seq "$RUNS"); do
  for mode in $(bench_order "$rep" openssh vipgate vipgate-x2 haproxy); do
    echo "repetition $rep/$RUNS: $mode" >&2
    if [ "$mode" = haproxy ]; then
      haproxy_relay
      continue
    fi
    extra=()
    [ "$mode" != vipgate-x2 ] || extra=(--connections 2)
    for cipher in $CIPHERS; do
      c=${cipher%%@*}
      start_client "${mode%%-*}" "$cipher" 30000 "${extra[@]}"
      for streams in 1 8; do
        if want_metric "${c}_${streams}stream_Gbps"; then
          record "${c}_${streams}stream_Gbps" "$mode" \
            "$(iperf_gbps ns -c 127.0.0.1 -p 30001 -t "$DUR" -P "$streams")"
        fi
      done
      if [ "$cipher" = "$first_cipher" ]; then
        connrate "$mode" 1
        connrate "$mode" 8
      fi
      stop_client
    done
  done
done

for rep in $(seq "$HOLD_ROUNDS"); do
  for n in $HOLD; do
    want_metric "open_${n}_conns_s" || want_metric "client_kB_per_conn_$n" || continue
    for mode in $(bench_order "$rep" openssh vipgate); do
      echo "hold $n connections via $mode" >&2
      start_client "$mode" "$first_cipher" 30000
      before=$(rss_kb "$CLIENT_PID")
      coproc HOLD_P { x ns python3 "$BENCH_DIR/tools/hold.py" 30002 "$n"; }
      if read -r -t 300 secs <&"${HOLD_P[0]}"; then
        after=$(rss_kb "$CLIENT_PID")
        record "open_${n}_conns_s" "$mode" "$secs"
        record "client_kB_per_conn_$n" "$mode" "$(((after - before) / n))"
        echo >&"${HOLD_P[1]}"
      else
        record "open_${n}_conns_s" "$mode" timeout
      fi
      kill "$HOLD_P_PID" 2> /dev/null || true
      wait "$HOLD_P_PID" 2> /dev/null || true
      stop_client
    done
  done
done

bench_summarize --ratio vipgate/openssh --ratio vipgate-x2/openssh \
  --title "ssh -L: OpenSSH, vipgate, vipgate --connections 2 (and haproxy, a plain TCP relay); $RUNS x ${DUR}s"
python3 "$BENCH_DIR/tools/ssh_bounds.py" "$RESULTS" "$(nproc)"
