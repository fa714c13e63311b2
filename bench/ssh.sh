#!/usr/bin/env bash
# Side-by-side benchmark: `vipgate ssh -L` vs OpenSSH `ssh -L`, same sshd (Debian's OpenSSH),
# same cipher, inside a private network namespace on loopback.
#   - throughput, 1 and 8 streams (iperf3), per cipher
#   - short connections per second (connect, 100 B echo, close), 1 and 8 clients
#   - time and client memory to open and hold N concurrent forwarded connections
# Prints min / median / max over ROUNDS and the ratio of medians (vipgate / OpenSSH).
# Usage (root): bench/ssh.sh   env: ROUNDS=3 SECS=5 HOLD="1000 5000 10000" HOLD_ROUNDS=1
#                                   CIPHERS="chacha20-poly1305@openssh.com aes128-gcm@openssh.com"
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench/ssh.sh needs root (network namespace)" >&2; exit 1; }

ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}
HOLD=${HOLD:-"1000 5000 10000"}
HOLD_ROUNDS=${HOLD_ROUNDS:-1}
CIPHERS=${CIPHERS:-"chacha20-poly1305@openssh.com aes128-gcm@openssh.com"}
VIPGATE=${VIPGATE:-target/release/vipgate}
[ -x "$VIPGATE" ] || cargo build --release -p vipgate
ulimit -n "$(ulimit -Hn)"   # 10,000 held connections need ~10,000 fds in each process

NS=vgbench-ssh
D=$(mktemp -d /tmp/vipgate-bench-ssh.XXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT
ip netns del "$NS" 2>/dev/null || true
ip netns add "$NS"
ip -n "$NS" link set lo up
in_ns() { ip netns exec "$NS" "$@"; }
bg() { ip netns exec "$NS" "$@" & PIDS+=($!); }

mkdir -p /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$D/host" ; ssh-keygen -q -t ed25519 -N '' -f "$D/id"
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

cat > "$D/echo.py" <<'EOF'
import asyncio, sys
async def handle(r, w):
    try:
        while True:
            d = await r.read(65536)
            if not d: break
            w.write(d); await w.drain()
    except Exception: pass
    w.close()
async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    async with s: await s.serve_forever()
asyncio.run(main())
EOF
cat > "$D/connrate.py" <<'EOF'
# connections/s: each worker loops connect, send 100 B, read 100 B back, close.
import socket, sys, threading, time
port, workers, secs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
payload = b"x" * 100
count = [0] * workers
stop = time.time() + secs
def work(i):
    while time.time() < stop:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(payload); got = b""
        while len(got) < 100:
            c = s.recv(100 - len(got))
            if not c: raise SystemExit("closed early")
            got += c
        s.close(); count[i] += 1
ts = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
t0 = time.time(); [t.start() for t in ts]; [t.join() for t in ts]
print("%.0f" % (sum(count) / (time.time() - t0)))
EOF
cat > "$D/hold.py" <<'EOF'
# Opens N connections, each proven end to end by a 1-byte echo, prints seconds taken,
# then waits for a line on stdin (while the caller measures memory) and closes them.
import asyncio, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
async def one(sem):
    async with sem:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"x"); await w.drain()
        if await r.readexactly(1) != b"x": raise SystemExit("bad echo")
        return w
async def main():
    sem = asyncio.Semaphore(256)
    t0 = time.time()
    ws = await asyncio.gather(*[one(sem) for _ in range(n)])
    print("%.2f" % (time.time() - t0), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for w in ws: w.close()
asyncio.run(main())
EOF

bg /usr/sbin/sshd -D -e -f "$D/sshd_config"
bg python3 "$D/echo.py" 7007
wait_port() { for _ in $(seq 200); do in_ns bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }
wait_port 2222; wait_port 7007
in_ns iperf3 -s -p 5201 -D

CLIENT_PID=""
start_client() { # tool cipher port_base [extra]
  local tool=$1 cipher=$2 base=$3; shift 3
  local fw=(-L "$((base+1)):127.0.0.1:5201" -L "$((base+2)):127.0.0.1:7007")
  if [ "$tool" = openssh ]; then
    ip netns exec "$NS" ssh -N -p 2222 -i "$D/id" -c "$cipher" -o IdentitiesOnly=yes -o BatchMode=yes \
      -o UserKnownHostsFile="$D/known_hosts" -o StrictHostKeyChecking=yes "${fw[@]}" root@127.0.0.1 &
  else
    ip netns exec "$NS" "$VIPGATE" ssh -N -p 2222 -i "$D/id" -c "$cipher" -o IdentitiesOnly=yes -o BatchMode=yes \
      -o UserKnownHostsFile="$D/known_hosts" -o StrictHostKeyChecking=yes "$@" "${fw[@]}" root@127.0.0.1 2>/dev/null &
  fi
  CLIENT_PID=$!   # `ip netns exec` execs the client: this is its pid
  wait_port "$((base+1))"; wait_port "$((base+2))"
}
stop_client() { kill "$CLIENT_PID" 2>/dev/null || true; wait "$CLIENT_PID" 2>/dev/null || true; }
rss_kb() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }

declare -A R
add() { R["$1"]="${R[$1]:-} $2"; }
iperf() { # port streams; retries while the iperf3 server still finishes the previous test
  local out
  for _ in 1 2 3; do
    if out=$(in_ns iperf3 -c 127.0.0.1 -p "$1" -t "$SECS" -P "$2" -J 2>/dev/null); then
      echo "$out" | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
      return
    fi
    sleep 1
  done
  echo timeout
}

TOOLS="openssh vipgate vipgate-x2"
for round in $(seq "$ROUNDS"); do
  echo "== round $round" >&2
  for cipher in $CIPHERS; do
    c=${cipher%%@*}
    for tool in $TOOLS; do
      extra=(); [ "$tool" = vipgate-x2 ] && extra=(--connections 2)
      start_client "${tool%%-*}" "$cipher" 30000 "${extra[@]}"
      add "$c 1 stream Gbit/s|$tool" "$(iperf 30001 1)"
      add "$c 8 streams Gbit/s|$tool" "$(iperf 30001 8)"
      if [ "$c" = "${CIPHERS%%@*}" ]; then
        add "conn/s 1 client|$tool" "$(in_ns python3 "$D/connrate.py" 30002 1 3)"
        add "conn/s 8 clients|$tool" "$(in_ns python3 "$D/connrate.py" 30002 8 3)"
      fi
      stop_client
    done
  done
done
for round in $(seq "$HOLD_ROUNDS"); do
  for n in $HOLD; do
    for tool in openssh vipgate; do
      echo "== hold $n via $tool" >&2
      start_client "$tool" "${CIPHERS%% *}" 30000
      before=$(rss_kb "$CLIENT_PID")
      coproc HOLD_P { in_ns python3 "$D/hold.py" 30002 "$n"; }
      if read -r -t 300 secs <&"${HOLD_P[0]}"; then
        after=$(rss_kb "$CLIENT_PID")
        add "open $n conns (s)|$tool" "$secs"
        add "client KB/conn at $n|$tool" "$(( (after - before) / n ))"
        echo >&"${HOLD_P[1]}"
      else
        add "open $n conns (s)|$tool" "timeout"
      fi
      kill "$HOLD_P_PID" 2>/dev/null || true; wait "$HOLD_P_PID" 2>/dev/null || true
      stop_client
    done
  done
done

python3 - "$TOOLS" <<'EOF' "${!R[@]}" -- "${R[@]}"
import sys, statistics
tools = sys.argv[1].split()
args = sys.argv[2:]
sep = args.index("--")
keys, vals = args[:sep], args[sep + 1:]
data = {}
for k, v in zip(keys, vals):
    metric, tool = k.split("|")
    data.setdefault(metric, {})[tool] = v.split()
def fmt(xs):
    nums = [float(x) for x in xs if x != "timeout"]
    if not nums: return "timeout", None
    s = sorted(nums)
    return "%g / %g / %g" % (s[0], statistics.median(s), s[-1]), statistics.median(s)
print("%-30s %-28s %-28s %-28s %s" % ("metric (min / median / max)", "OpenSSH ssh -L", "vipgate ssh -L", "vipgate --connections 2", "vipgate/OpenSSH"))
for metric in sorted(data):
    row = data[metric]
    cells, meds = [], {}
    for t in ["openssh", "vipgate", "vipgate-x2"]:
        if t in row:
            text, med = fmt(row[t]); cells.append(text); meds[t] = med
        else:
            cells.append("-")
    ratio = "-"
    if meds.get("openssh") and meds.get("vipgate") is not None:
        ratio = "%.2fx" % (meds["vipgate"] / meds["openssh"])
    print("%-30s %-28s %-28s %-28s %s" % (metric, *cells, ratio))
EOF
