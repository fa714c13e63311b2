#!/usr/bin/env bash
# Build vipgate's Debian package with dpkg-deb: the binary, the systemd unit, man pages for
# every subcommand and vipgate.toml(5), bash/zsh/fish completions, /etc/vipgate/vipgate.toml
# as a conffile, the reference example, and a postinst that creates the `vipgate` system user.
# Usage: ./dist/deb.sh [--binary PATH] [--out DIR]
#   --binary  package this vipgate binary instead of building the release one
#   --out     where the .deb goes (default target/debian); its path is printed last
set -euo pipefail
cd "$(dirname "$0")/.."
binary=""
out="target/debian"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--out DIR]" >&2; exit 2 ;;
  esac
done
if [ -z "$binary" ]; then
  cargo build --release -p vipgate --locked
  binary=target/release/vipgate
fi
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root

install -D -m 0755 "$binary" "$root/usr/bin/vipgate"
# Man pages: vipgate(1), one per subcommand at every depth, and vipgate.toml(5).
"$root/usr/bin/vipgate" man --out "$stage/man" >/dev/null
install -d "$root/usr/share/man/man1" "$root/usr/share/man/man5"
for page in "$stage"/man/*.1; do gzip -9n -c "$page" > "$root/usr/share/man/man1/$(basename "$page").gz"; done
for page in "$stage"/man/*.5; do gzip -9n -c "$page" > "$root/usr/share/man/man5/$(basename "$page").gz"; done
install -d "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
  "$root/usr/share/fish/vendor_completions.d"
"$root/usr/bin/vipgate" completions bash > "$root/usr/share/bash-completion/completions/vipgate"
"$root/usr/bin/vipgate" completions zsh > "$root/usr/share/zsh/vendor-completions/_vipgate"
"$root/usr/bin/vipgate" completions fish > "$root/usr/share/fish/vendor_completions.d/vipgate.fish"
install -d "$root/lib/systemd/system"
sed "s|/usr/local/bin/vipgate|/usr/bin/vipgate|g" dist/vipgate.service > "$root/lib/systemd/system/vipgate.service"
install -D -m 0640 dist/vipgate.toml "$root/etc/vipgate/vipgate.toml"
install -D -m 0644 examples/reference.toml "$root/usr/share/doc/vipgate/examples/reference.toml"
gzip -9n -c README.md > "$stage/README.md.gz"
install -m 0644 "$stage/README.md.gz" "$root/usr/share/doc/vipgate/README.md.gz"
printf 'vipgate is licensed under the MIT or the Apache-2.0 license, at your option.\n' \
  > "$root/usr/share/doc/vipgate/copyright"

install -d "$root/DEBIAN"
installed_kib=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: vipgate
Version: $version
Architecture: $arch
Maintainer: vipgate maintainers <vipgate@example.invalid>
Installed-Size: $installed_kib
Depends: libc6, passwd
Section: net
Priority: optional
Description: GRE tunnels, PAT, VRRP failover, load balancing and SSH forwarding
 One daemon and one CLI for the network jobs of a small site: GRE site-to-site
 tunnels, a PAT gateway, VRRPv3 failover with keepalived-compatible notify
 scripts, load-balanced virtual services and SSH port forwarding, described
 in one TOML file checked by `vipgate check`.
CONTROL
echo /etc/vipgate/vipgate.toml > "$root/DEBIAN/conffiles"
cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    # The unit runs as this system user (no login; its home is the StateDirectory).
    if ! getent passwd vipgate >/dev/null; then
        useradd --system --user-group --no-create-home --home-dir /var/lib/vipgate \
            --shell /usr/sbin/nologin vipgate
    fi
    # The daemon (group vipgate) reads its config on reload; only root writes it.
    chown root:vipgate /etc/vipgate /etc/vipgate/vipgate.toml
    chmod 0750 /etc/vipgate
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
POSTINST
cat > "$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
POSTRM
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/postrm"
mkdir -p "$out"
deb="$out/vipgate_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
