#!/bin/sh
# Rebuilds the kernel programs (kpath.o from kpath.c, gre.o from gre.c) with Debian's clang and
# records the sources' hash.
#
# The objects are shipped in the repository so that a machine without clang builds and runs
# vipgate; kpath's tests check that the objects are up to date (sources.sha256) and, where clang
# is present, that rebuilding gives the same bytes. Run this after editing a .c file:
#   kpath/bpf/build.sh            (writes the objects here and records the hashes)
#   kpath/bpf/build.sh DIR        (writes the objects into DIR only, as the test does)
# Needs: clang and llvm (apt-get install -y clang llvm), linux-libc-dev (UAPI headers).
set -eu
cd "$(dirname "$0")"
out=${1:-.}
multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
for prog in kpath gre; do
	# -g gives the BTF the loader needs for the .maps section; the DWARF (which records build
	# paths) is stripped so the object is the same bytes on every machine.
	clang -O2 -g -fdebug-prefix-map="$PWD"=. -target bpfel -I"/usr/include/$multiarch" -Wall -Werror -c "$prog.c" -o "$out/$prog.o"
	llvm-strip -g "$out/$prog.o"
done
if [ "$out" = . ]; then
	sha256sum kpath.c gre.c build.sh > sources.sha256
fi
