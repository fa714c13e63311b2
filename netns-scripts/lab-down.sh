#!/usr/bin/env bash
# Remove the lab built by lab-up.sh: every PREFIX-* namespace, its processes, its state.
# Usage: lab-down.sh [PREFIX]. Harmless when nothing is up.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
P=${1:-vg}
for n in hq br dir1 dir2 inet web brpc rs1 rs2 isp; do ns_del "$P-$n"; done
rm -rf "/run/vipgate-lab/$P"
echo "lab $P is down"
