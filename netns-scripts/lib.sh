#!/usr/bin/env bash
# Helpers shared by the lab scripts and tests. Source it; every function is idempotent.
# Rule: nothing here ever adds an address or route in the root namespace.

ns_exists() { [ -e "/run/netns/$1" ]; }

# ns_add NAME: create a namespace with loopback up.
ns_add() {
  ns_exists "$1" || ip netns add "$1"
  ip -n "$1" link set lo up
}

# ns_del NAME: kill every process in the namespace, then delete it.
ns_del() {
  ns_exists "$1" || return 0
  local pids
  pids=$(ip netns pids "$1" 2>/dev/null || true)
  if [ -n "$pids" ]; then
    # shellcheck disable=SC2086
    kill $pids 2>/dev/null || true
    local deadline=$((SECONDS + 3))
    while [ -n "$(ip netns pids "$1" 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.05; done
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  fi
  ip netns del "$1" 2>/dev/null || true
}

# veth NS_A IF_A NS_B IF_B: a veth pair created directly inside the two namespaces
# (never visible in the root namespace), both ends up.
veth() {
  ip -n "$1" link show "$2" >/dev/null 2>&1 && return 0
  ip -n "$1" link add "$2" type veth peer name "$4" netns "$3"
  ip -n "$1" link set "$2" up
  ip -n "$3" link set "$4" up
}

# bridge NS NAME: an L2 bridge inside a namespace.
bridge() {
  ip -n "$1" link show "$2" >/dev/null 2>&1 || ip -n "$1" link add "$2" type bridge
  ip -n "$1" link set "$2" up
}

# bridge_port NS BRIDGE IF: enslave IF to BRIDGE.
bridge_port() { ip -n "$1" link set "$3" master "$2"; }

# addr NS IF CIDR
addr() { ip -n "$1" addr replace "$3" dev "$2"; }

# gw NS ADDR: default route.
gw() { ip -n "$1" route replace default via "$2"; }

# forwarding NS: make the namespace a router.
forwarding() { ip netns exec "$1" sysctl -qw net.ipv4.ip_forward=1; }

# wait_port NS ADDR PORT [SECONDS]: poll until a TCP port accepts, or fail after the deadline.
wait_port() {
  local deadline=$((SECONDS + ${4:-10}))
  until ip netns exec "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; do
    if [ $SECONDS -ge "$deadline" ]; then
      echo "timeout waiting for $2:$3 in $1" >&2
      return 1
    fi
    sleep 0.05
  done
}

# http_server NS ADDR PORT NAME STATE_DIR: a real HTTP server answering GET / with NAME.
http_server() {
  local dir="$5/www-$1"
  mkdir -p "$dir"
  printf '%s\n' "$4" > "$dir/index.html"
  ip netns exec "$1" setsid "$(command -v /usr/bin/python3 || command -v python3)" -m http.server --bind "$2" --directory "$dir" "$3" \
    >"$5/http-$1.log" 2>&1 < /dev/null &
}

# sshd_server NS ADDR PORT STATE_DIR: Debian's OpenSSH sshd with its own host key and config;
# root logs in with the key STATE_DIR/id_ed25519 (created here).
sshd_server() {
  local d="$4/sshd-$1"
  mkdir -p "$d" /run/sshd
  [ -f "$d/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$d/host_ed25519"
  [ -f "$4/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$4/id_ed25519"
  cp "$4/id_ed25519.pub" "$d/authorized_keys"
  cat > "$d/sshd_config" <<CFG
ListenAddress $2:$3
HostKey $d/host_ed25519
AuthorizedKeysFile $d/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile $d/sshd.pid
CFG
  ip netns exec "$1" "$(command -v sshd || echo /usr/sbin/sshd)" -f "$d/sshd_config" -E "$d/sshd.log"
}
