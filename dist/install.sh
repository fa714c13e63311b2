#!/usr/bin/env bash
# Build and install vipgate: binary, man pages, shell completions and the systemd unit.
# Usage (as root, from the repository): ./dist/install.sh [PREFIX]   (default /usr/local)
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:-/usr/local}
cargo build --release -p vipgate --locked
install -D -m 0755 target/release/vipgate "$prefix/bin/vipgate"
"$prefix/bin/vipgate" man --out "$prefix/share/man/man1" >/dev/null
install -d "$prefix/share/man/man5"
mv "$prefix/share/man/man1/vipgate.toml.5" "$prefix/share/man/man5/"
install -d /usr/share/bash-completion/completions /usr/share/zsh/vendor-completions /usr/share/fish/vendor_completions.d
"$prefix/bin/vipgate" completions bash > /usr/share/bash-completion/completions/vipgate
"$prefix/bin/vipgate" completions zsh > /usr/share/zsh/vendor-completions/_vipgate
"$prefix/bin/vipgate" completions fish > /usr/share/fish/vendor_completions.d/vipgate.fish
sed "s|/usr/local/bin/vipgate|$prefix/bin/vipgate|g" dist/vipgate.service > /etc/systemd/system/vipgate.service
# The unit runs as this system user (no login, no home) with only the network capabilities.
if ! getent passwd vipgate >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /var/lib/vipgate \
        --shell /usr/sbin/nologin vipgate
fi
# The daemon (group vipgate) reads its config on reload; only root writes it.
install -d -m 0750 -o root -g vipgate /etc/vipgate
[ -e /etc/vipgate/vipgate.toml ] || install -m 0640 -g vipgate dist/vipgate.toml /etc/vipgate/vipgate.toml
echo "installed; describe the site in /etc/vipgate/vipgate.toml, then: systemctl enable --now vipgate"
