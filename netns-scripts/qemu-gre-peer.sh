#!/usr/bin/env bash
# A real Linux ip_gre peer for the GRE end-to-end tests (tests/tests/e2e/gre_qemu.rs): the
# Debian kernel (linux-image-amd64) booted under qemu with TCG, from a busybox initramfs that
# holds ip_gre and virtio-net with their module dependencies.
#
#   qemu-gre-peer.sh check
#       exits 0 when qemu, the Debian kernel and busybox-static are installed; otherwise names
#       what is missing on stderr and exits 1.
#   qemu-gre-peer.sh build DIR SETUP ADDR/LEN
#       writes DIR/initrd.cpio.gz. Its /init mounts /proc, /sys and /dev, loads the modules,
#       gives eth0 ADDR/LEN, runs the shell script SETUP (the test's tunnels and services),
#       prints "VIPGATE-PEER READY" on the console and keeps running.
#   qemu-gre-peer.sh boot DIR TAP
#       execs qemu (so the caller's process is qemu): the console on stdout, one virtio-net NIC
#       on the tap device TAP, which qemu creates in the current network namespace.
#
# Everything the tests need is in the packages qemu-system-x86, linux-image-amd64 and
# busybox-static, which netns-scripts/test.sh installs with the other peers.
set -euo pipefail

kernel_version() {
  local v
  v=$(ls /lib/modules 2>/dev/null | grep -E -- '-amd64$' | sort -V | tail -n1)
  [ -n "$v" ] && [ -f "/boot/vmlinuz-$v" ] && echo "$v"
}

busybox_static() {
  [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1
}

check() {
  local missing=()
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  kernel_version >/dev/null || missing+=(linux-image-amd64)
  busybox_static || missing+=(busybox-static)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "qemu-gre-peer.sh: missing Debian packages: ${missing[*]}" >&2
    return 1
  fi
}

# Prints the modules to load, dependencies first, each once (modules.dep lists a module's
# whole dependency closure, the ones loaded last first).
load_order() {
  local dep=$1; shift
  local seen=" " m line d
  for m in "$@"; do
    line=$(grep -E "^([^:]*/)?$m\.ko(\.[a-z]+)?:" "$dep")
    for d in $(echo "${line#*:}" | tr ' ' '\n' | tac) "${line%%:*}"; do
      case "$seen" in *" $d "*) ;; *) seen="$seen$d "; echo "$d" ;; esac
    done
  done
}

build() {
  local dir=$1 setup=$2 addr=$3
  check
  local ver root
  ver=$(kernel_version)
  root=$dir/initramfs
  rm -rf "$root"
  mkdir -p "$root"/{bin,dev,proc,sys,tmp,www/cgi-bin,modules}
  cp /bin/busybox "$root/bin/busybox"
  for applet in sh mount insmod ip sysctl sleep echo cat head sha256sum httpd nc seq; do
    ln -s busybox "$root/bin/$applet"
  done
  local n=0 m file
  for m in $(load_order "/lib/modules/$ver/modules.dep" virtio_pci virtio_net ip_gre); do
    file=/lib/modules/$ver/$m
    n=$((n + 1))
    case "$m" in
      *.ko) cp "$file" "$root/modules/$(printf %02d $n).ko" ;;
      *.ko.xz) xz -dc "$file" >"$root/modules/$(printf %02d $n).ko" ;;
      *.ko.zst) zstd -qdc "$file" >"$root/modules/$(printf %02d $n).ko" ;;
      *) echo "qemu-gre-peer.sh: unexpected module file $m" >&2; return 1 ;;
    esac
  done
  cp "$setup" "$root/setup.sh"
  cat >"$root/init" <<EOF
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /modules/*.ko; do insmod "\$m" || echo "VIPGATE-PEER FAILED insmod \$m"; done
n=0
while [ ! -e /sys/class/net/eth0 ] && [ \$n -lt 100 ]; do sleep 0.1; n=\$((n + 1)); done
ip link set lo up
ip addr add $addr dev eth0
ip link set eth0 up
if sh -e /setup.sh; then echo "VIPGATE-PEER READY"; else echo "VIPGATE-PEER FAILED setup"; fi
while true; do sleep 3600; done
EOF
  chmod +x "$root/init" "$root/setup.sh"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$dir/initrd.cpio.gz"
}

boot() {
  local dir=$1 tap=$2 ver
  check
  ver=$(kernel_version)
  exec qemu-system-x86_64 -accel tcg -m 256 -smp 1 -nodefaults -no-user-config \
    -display none -monitor none -serial stdio -no-reboot \
    -kernel "/boot/vmlinuz-$ver" -initrd "$dir/initrd.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3" \
    -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no,vnet_hdr=off" \
    -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56
}

case "${1:-}" in
  check) check ;;
  build) [ $# -eq 4 ] || { echo "usage: $0 build DIR SETUP ADDR/LEN" >&2; exit 2; }; build "$2" "$3" "$4" ;;
  boot) [ $# -eq 3 ] || { echo "usage: $0 boot DIR TAP" >&2; exit 2; }; boot "$2" "$3" ;;
  *) echo "usage: $0 check | build DIR SETUP ADDR/LEN | boot DIR TAP" >&2; exit 2 ;;
esac
