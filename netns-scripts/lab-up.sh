#!/usr/bin/env bash
# Build the vipgate lab of DESIGN.md in network namespaces named PREFIX-*.
# Usage: lab-up.sh [PREFIX]   (default prefix: vg). Running it twice is harmless.
#
#            inet 198.51.100.200
#                  |
#   ------------ PREFIX-isp: bridge isp0, 198.51.100.0/24 -------------------------
#     |                 |                  |                    |
#   hq .1             br .2             dir1 .11             dir2 .12
#     | 192.168.101.1   | 192.168.102.1    | 10.0.0.11          | 10.0.0.12
#   web .101          brpc .10          ---- PREFIX-isp: bridge rs0 (L2 only) ----
#                                          rs1 10.0.0.101     rs2 10.0.0.102
#
# rs1 and rs2 also have a leg on the isp segment (eth1, .21 and .22) that only the answers of
# the direct-routing service (VIP 198.51.100.20 on their lo) take.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
P=${1:-vg}
state=/run/vipgate-lab/$P
mkdir -p "$state"

# "Up" means built and its servers still running: a lab whose processes were killed (kill -9,
# a crash) keeps its namespaces and marker but serves nothing, so it is rebuilt.
if [ -f "$state/up" ] && ns_exists "$P-isp" && ns_exists "$P-rs2" \
  && [ -n "$(ip netns pids "$P-web")" ] && [ -n "$(ip netns pids "$P-rs1")" ] \
  && [ -n "$(ip netns pids "$P-rs2")" ]; then
  echo "lab $P is already up"
  exit 0
fi
# A half-built or dead lab is removed first, so the build starts clean.
bash "$here/lab-down.sh" "$P" >/dev/null

for n in isp inet hq web br brpc dir1 dir2 rs1 rs2; do ns_add "$P-$n"; done

# The "isp" segment: one bridge, every public host on it.
bridge "$P-isp" isp0
for h in inet hq br dir1 dir2; do
  veth "$P-isp" "p-$h" "$P-$h" eth0
  bridge_port "$P-isp" isp0 "p-$h"
done
addr "$P-inet" eth0 198.51.100.200/24
addr "$P-hq"   eth0 198.51.100.1/24
addr "$P-br"   eth0 198.51.100.2/24
addr "$P-dir1" eth0 198.51.100.11/24
addr "$P-dir2" eth0 198.51.100.12/24

# The real servers' switch: L2 only (no address in the isp namespace).
bridge "$P-isp" rs0
for h in dir1 dir2 rs1 rs2; do
  ifname=eth1; [ "${h#rs}" != "$h" ] && ifname=eth0
  veth "$P-isp" "r-$h" "$P-$h" "$ifname"
  bridge_port "$P-isp" rs0 "r-$h"
done
addr "$P-dir1" eth1 10.0.0.11/24
addr "$P-dir2" eth1 10.0.0.12/24
addr "$P-rs1" eth0 10.0.0.101/24
addr "$P-rs2" eth0 10.0.0.102/24
# The real servers' gateway is 10.0.0.1, a VIP the directors move with VRRP.
gw "$P-rs1" 10.0.0.1
gw "$P-rs2" 10.0.0.1
# Direct routing (service web-dr, 198.51.100.20:8080, forward = "dr"): each real server holds
# that VIP on lo and never answers ARP for it (arp_ignore=1, arp_announce=2); what it sends
# from the VIP leaves through its own leg on the isp segment (a source rule; the address has
# no prefix route, so nothing else uses that leg), never through a director.
for i in 1 2; do
  veth "$P-isp" "d-rs$i" "$P-rs$i" eth1
  bridge_port "$P-isp" isp0 "d-rs$i"
  ip -n "$P-rs$i" addr add "198.51.100.2$i/24" dev eth1 noprefixroute
  ip -n "$P-rs$i" addr add 198.51.100.20/32 dev lo
  ip netns exec "$P-rs$i" sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
  ip -n "$P-rs$i" rule add from 198.51.100.20 lookup 20
  ip -n "$P-rs$i" route add 198.51.100.0/24 dev eth1 table 20
done

# Branch LANs: one point-to-point LAN each.
veth "$P-hq" eth1 "$P-web" eth0
addr "$P-hq" eth1 192.168.101.1/24
addr "$P-web" eth0 192.168.101.101/24
gw "$P-web" 192.168.101.1
veth "$P-br" eth1 "$P-brpc" eth0
addr "$P-br" eth1 192.168.102.1/24
addr "$P-brpc" eth0 192.168.102.10/24
gw "$P-brpc" 192.168.102.1

for r in hq br dir1 dir2; do forwarding "$P-$r"; done

# Services: HTTP answering with the host's name, OpenSSH on the web host.
http_server "$P-web" 192.168.101.101 80 web "$state"
http_server "$P-rs1" 10.0.0.101 80 rs1 "$state"
http_server "$P-rs2" 10.0.0.102 80 rs2 "$state"
# The same 4 MiB file on both real servers: the tour downloads it through the VIP across a
# director failover and compares its hash.
head -c 4194304 /dev/urandom > "$state/big.bin"
cp "$state/big.bin" "$state/www-$P-rs1/big.bin"
cp "$state/big.bin" "$state/www-$P-rs2/big.bin"
# The directors' flow-sync key (the same file for both, StrictModes-style 0600).
(umask 077 && head -c 32 /dev/urandom > "$state/sync.key")
http_server "$P-rs1" 0.0.0.0 8080 rs1 "$state"
http_server "$P-rs2" 0.0.0.0 8080 rs2 "$state"
sshd_server "$P-web" 192.168.101.101 22 "$state"
wait_port "$P-web" 192.168.101.101 80
wait_port "$P-rs1" 10.0.0.101 80
wait_port "$P-rs2" 10.0.0.102 80
wait_port "$P-rs1" 10.0.0.101 8080
wait_port "$P-rs2" 10.0.0.102 8080
wait_port "$P-web" 192.168.101.101 22

touch "$state/up"
echo "lab $P is up: namespaces $P-{isp,inet,hq,web,br,brpc,dir1,dir2,rs1,rs2}"
