#!/bin/sh
# Rebuilds kpath.o from kpath.c with Debian's clang and records the sources' hash.
#
# The object is shipped in the repository so that a machine without clang builds and runs
# vipgate; kpath's tests check that the object is up to date (sources.sha256) and, where clang
# is present, that rebuilding gives the same bytes. Run this after editing kpath.c:
#   kpath/bpf/build.sh
# Needs: clang and llvm (apt-get install -y clang llvm), linux-libc-dev (UAPI headers).
set -eu
cd "$(dirname "$0")"
out=${1:-kpath.o}
multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
# -g gives the BTF the loader needs for the .maps section; the DWARF (which records build
# paths) is stripped so the object is the same bytes on every machine.
clang -O2 -g -fdebug-prefix-map="$PWD"=. -target bpfel -I"/usr/include/$multiarch" -Wall -Werror -c kpath.c -o "$out"
llvm-strip -g "$out"
if [ "$out" = kpath.o ]; then
	sha256sum kpath.c build.sh > sources.sha256
fi
