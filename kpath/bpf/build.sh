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
	# kpath uses an atomic fetch-and-add (the one-packet cursor shared by every CPU): BPF ISA v3
	# (kernel 5.12+; an older kernel refuses the program and the daemon runs the TUN path,
	# saying why), without its 32-bit subregisters (the codegen stays v1's, plus the atomics).
	# No stack slot sharing: a slot that held a spilled pointer on one path and takes a 32-bit
	# value on another is refused by the verifier of a daemon without CAP_PERFMON ("attempt
	# to corrupt spilled pointer on stack"); the slots cost stack (below the 512-byte limit).
	cpu="-mcpu=v1"
	[ "$prog" = kpath ] && cpu="-mcpu=v3 -Xclang -target-feature -Xclang -alu32 -mllvm -no-stack-slot-sharing"
	# -g gives the BTF the loader needs for the .maps section; the DWARF (which records build
	# paths) is stripped so the object is the same bytes on every machine.
	clang -O2 -g $cpu -fdebug-prefix-map="$PWD"=. -target bpfel -I"/usr/include/$multiarch" -Wall -Werror -c "$prog.c" -o "$out/$prog.o"
	llvm-strip -g "$out/$prog.o"
done
if [ "$out" = . ]; then
	sha256sum kpath.c gre.c build.sh > sources.sha256
fi
