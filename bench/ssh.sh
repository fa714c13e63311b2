#!/usr/bin/env bash
# Side-by-side benchmark: `vipgate ssh -L` vs OpenSSH `ssh -L`, same sshd (Debian's OpenSSH),
# same cipher, inside a private network namespace on loopback.
#   - throughput, 1 and 8 streams (iperf3), per cipher
#   - short connections per second (connect, 100 B echo, close), 1 and 8 clients, with the
#     latency and the CPU each process spends per connection, and the best ratio any
#     forwarder could reach given what sshd, the echo server and the generator cost
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

# The echo server and the connection-rate client are small C programs, not Python: with
# Python's asyncio echo server and a threaded Python client, those two alone used ~450 us of
# CPU per connection (against ~190 for either forwarder), so the benchmark measured mostly
# Python. Both tools get the same generator and the same echo server.
command -v cc >/dev/null || { echo "bench/ssh.sh needs a C compiler (cc) for its load generator" >&2; exit 1; }
cat > "$D/echo.c" <<'EOF'
/* Single-threaded epoll echo server: echo PORT. A connection whose peer is slow to read is
   not read from until its backlog is written. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
struct conn { int fd, out; size_t off, len; char buf[16384]; };
static void want(int ep, struct conn *c, int out) {
  if (c->out == out) return;
  struct epoll_event e = { .events = out ? EPOLLOUT : EPOLLIN, .data.ptr = c };
  epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e); c->out = out;
}
int main(int argc, char **argv) {
  if (argc != 2) { fprintf(stderr, "usage: echo PORT\n"); return 2; }
  int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])) };
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(l, (void *)&a, sizeof a) || listen(l, 4096)) { perror("listen"); return 1; }
  int ep = epoll_create1(0);
  struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL }, evs[256];
  epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
  for (;;) {
    int n = epoll_wait(ep, evs, 256, -1);
    for (int i = 0; i < n; i++) {
      struct conn *c = evs[i].data.ptr;
      if (!c) {
        int fd;
        while ((fd = accept4(l, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
          if (!(c = malloc(sizeof *c))) { close(fd); continue; }
          c->fd = fd; c->out = 0; c->off = c->len = 0;
          struct epoll_event e = { .events = EPOLLIN, .data.ptr = c };
          epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
        }
        continue;
      }
      for (;;) {
        if (c->len > c->off) {
          ssize_t w = write(c->fd, c->buf + c->off, c->len - c->off);
          if (w < 0 && errno == EAGAIN) { want(ep, c, 1); break; }
          if (w < 0) { close(c->fd); free(c); break; }
          c->off += w; continue;
        }
        c->off = c->len = 0;
        ssize_t r = read(c->fd, c->buf, sizeof c->buf);
        if (r > 0) { c->len = r; continue; }
        if (r < 0 && errno == EAGAIN) { want(ep, c, 0); break; }
        close(c->fd); free(c); break;
      }
    }
  }
}
EOF
cat > "$D/connrate.c" <<'EOF'
/* connrate PORT WORKERS SECS: each worker thread loops connect, send 100 B, read the 100 B
   back (checked), close. Prints connections/s, mean latency (us) and its own CPU seconds. */
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static int port; static double secs;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
struct res { long count; double lat; };
static void *work(void *arg) {
  struct res *r = arg; char buf[100], got[100]; memset(buf, 'x', sizeof buf);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  double stop = now() + secs;
  for (;;) {
    double t0 = now(); if (t0 >= stop) break;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0 || connect(s, (void *)&a, sizeof a) < 0) { perror("connect"); exit(1); }
    if (write(s, buf, sizeof buf) != sizeof buf) { perror("write"); exit(1); }
    size_t n = 0;
    while (n < sizeof got) {
      ssize_t k = read(s, got + n, sizeof got - n);
      if (k <= 0) { fprintf(stderr, "closed early\n"); exit(1); }
      n += k;
    }
    if (memcmp(buf, got, sizeof buf)) { fprintf(stderr, "bad echo\n"); exit(1); }
    close(s); r->count++; r->lat += now() - t0;
  }
  return NULL;
}
int main(int argc, char **argv) {
  if (argc != 4) { fprintf(stderr, "usage: connrate PORT WORKERS SECS\n"); return 2; }
  port = atoi(argv[1]); int w = atoi(argv[2]); secs = atof(argv[3]);
  pthread_t t[w]; struct res r[w]; memset(r, 0, sizeof r);
  double t0 = now();
  for (int i = 0; i < w; i++) pthread_create(&t[i], NULL, work, &r[i]);
  long c = 0; double lat = 0;
  for (int i = 0; i < w; i++) { pthread_join(t[i], NULL); c += r[i].count; lat += r[i].lat; }
  struct rusage ru; getrusage(RUSAGE_SELF, &ru);
  printf("%.0f %.0f %.4f\n", c / (now() - t0), c ? lat / c * 1e6 : 0,
         ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
  return 0;
}
EOF
cc -O2 -o "$D/echo" "$D/echo.c"
cc -O2 -pthread -o "$D/connrate" "$D/connrate.c"
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
bg "$D/echo" 7007
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
    if out=$(in_ns iperf3 -c 127.0.0.1 -p "$1" -t "$SECS" -P "$2" -J 2>/dev/null) &&
      gbps=$(echo "$out" | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))' 2>/dev/null); then
      echo "$gbps"
      return
    fi
    sleep 1
  done
  echo timeout
}

# CPU seconds (utime + stime, all threads) of processes in the namespace, by role.
cpu_s() { # role: fwd | sshd | echo
  local p t=0
  for p in $(ip netns pids "$NS"); do
    local comm; comm=$(cat "/proc/$p/comm" 2>/dev/null) || continue
    case $1 in
      fwd) [ "$p" = "$CLIENT_PID" ] || continue ;;
      sshd) [ "$comm" = sshd ] || continue ;;
      echo) [ "$comm" = echo ] || continue ;;
    esac
    t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  echo "$t"
}
connrate() { # tool workers label [port]: rate, latency and CPU per connection of each process
  local b_f b_s b_e rate lat gen
  b_f=$(cpu_s fwd); b_s=$(cpu_s sshd); b_e=$(cpu_s echo)
  read -r rate lat gen < <(in_ns "$D/connrate" "${4:-30002}" "$2" 3)
  local hz; hz=$(getconf CLK_TCK)
  local n; n=$(python3 -c "print($rate * 3)")
  per() { python3 -c "print('%.0f' % (($1) * 1e6 / $n))"; }
  add "conn/s $3|$1" "$rate"
  add "conn/s $3: latency us|$1" "$lat"
  add "conn/s $3: CPU us/conn fwd|$1" "$(per "($(cpu_s fwd) - $b_f) / $hz")"
  local a_s; a_s=$(cpu_s sshd)
  add "conn/s $3: CPU us/conn sshd|$1" "$(per "($a_s - $b_s) / $hz")"
  add "conn/s $3: CPU us/conn rest|$1" \
    "$(per "($a_s - $b_s + $(cpu_s echo) - $b_e) / $hz + $gen")"
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
        connrate "$tool" 1 "1 client"
        connrate "$tool" 8 "8 clients"
      fi
      stop_client
    done
  done
  # The floor for any user-space forwarding hop on this machine: haproxy (one thread, TCP
  # mode, no SSH) relaying the same exchange straight to the echo server.
  if command -v haproxy >/dev/null; then
    printf 'global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nlisten relay\n  bind 127.0.0.1:30100\n  server echo 127.0.0.1:7007\n' > "$D/haproxy.cfg"
    ip netns exec "$NS" haproxy -q -f "$D/haproxy.cfg" &
    CLIENT_PID=$!
    wait_port 30100
    connrate haproxy 1 "1 client" 30100
    stop_client
  fi
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

python3 - "$TOOLS" "$(nproc)" <<'EOF' "${!R[@]}" -- "${R[@]}"
import sys, statistics
tools = sys.argv[1].split()
cores = int(sys.argv[2])
args = sys.argv[3:]
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
print("%-38s %-24s %-24s %-24s %s" % ("metric (min / median / max)", "OpenSSH ssh -L", "vipgate ssh -L", "vipgate --connections 2", "vipgate/OpenSSH"))
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
    print("%-38s %-24s %-24s %-24s %s" % (metric, *cells, ratio))
print("(CPU us/conn: fwd = ssh or vipgate; sshd = the server alone, whose work depends on what")
print(" the client sends; rest = sshd + echo server + load generator)")

# What a forwarder that cost nothing could reach against OpenSSH, from OpenSSH's own run:
# one client is a serial chain (one process at a time works on the connection), so its
# time per connection would shrink by the forwarder's CPU at best; with 8 clients the
# shared processes' CPU per connection over all cores caps the rate.
def med(metric, tool="openssh"):
    xs = [float(x) for x in data.get(metric, {}).get(tool, []) if x != "timeout"]
    return statistics.median(xs) if xs else None
one = [med("conn/s 1 client: CPU us/conn " + w) for w in ("fwd", "rest")]
if None not in one and one[1] > 0:
    print("bound, 1 client: a zero-cost forwarder reaches at most %.2fx OpenSSH (shared %.0f us + ssh %.0f us per connection)"
          % ((one[0] + one[1]) / one[1], one[1], one[0]))
relay = med("conn/s 1 client: CPU us/conn fwd", "haproxy")
if None not in one and relay:
    print("floor: haproxy relaying plain TCP (no SSH, %.0f/s) costs %.0f us per connection; a forwarder that cheap reaches at most %.2fx OpenSSH with 1 client"
          % (med("conn/s 1 client", "haproxy"), relay, (one[0] + one[1]) / (one[1] + relay)))
eight = med("conn/s 8 clients: CPU us/conn rest")
rate8 = med("conn/s 8 clients")
if eight and rate8:
    print("bound, 8 clients: %d cores / %.0f us shared CPU per connection = %.0f/s at most, %.2fx OpenSSH"
          % (cores, eight, cores * 1e6 / eight, cores * 1e6 / eight / rate8))
EOF
