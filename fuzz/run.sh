#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a while, then minimises its corpus in place.
#
#   fuzz/run.sh [-t SECONDS] [-r RUNS] [-s SANITIZER] [TARGET...]
#
# -t: time per target (default 60 s); -r: stop a target after RUNS executions instead (the
# README's figures come from `-r 10000000`); -s: cargo-fuzz's sanitizer (default `address`;
# `none` runs 2-4x faster and still catches every panic, which is what safe Rust fails with). Each target starts from fuzz/corpus/TARGET (the
# committed, minimised corpus) and writes new inputs there; a crash stops that target, is left
# in fuzz/artifacts/TARGET/ and makes the script exit non-zero at the end. The last line per
# target (`TARGET: N executions in S s, corpus C files, DATE`) is also appended to
# fuzz/runs.log, which is what the README's table is made from.
#
# Needs the nightly toolchain (libFuzzer's sanitizer flags) and cargo-fuzz; both are installed
# when missing (cargo install cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")"

seconds=60
runs=0
sanitizer=address
while getopts "t:r:s:" opt; do
  case $opt in
    t) seconds=$OPTARG ;;
    r) runs=$OPTARG ;;
    s) sanitizer=$OPTARG ;;
    *) echo "usage: fuzz/run.sh [-t SECONDS] [-r RUNS] [-s SANITIZER] [TARGET...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

limit=(-max_total_time="$seconds")
[ "$runs" -gt 0 ] && limit=(-runs="$runs")

# Build every target first: a broken manifest or a compile error is not a crash and must not
# be recorded as one.
cargo +nightly fuzz build -s "$sanitizer" || {
  echo "fuzz/run.sh: the fuzz targets do not build" >&2
  exit 2
}

failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  echo "== $t (${limit[*]})"
  start=$(date +%s)
  if cargo +nightly fuzz run -s "$sanitizer" "$t" -- "${limit[@]}" -print_final_stats=1 >"$log" 2>&1; then
    status=ok
  else
    status=CRASH
    failed+=("$t")
    tail -40 "$log"
  fi
  elapsed=$(( $(date +%s) - start ))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rm -f "$log"
  # Keep only the inputs that add coverage, so the committed corpus stays small.
  cargo +nightly fuzz cmin -s "$sanitizer" "$t" >/dev/null 2>&1 || true
  # cmin renames everything it keeps to its SHA-1; the hand-written seeds (named after what
  # they are, some read by unit tests with include_bytes!) stay under their names.
  git ls-files "corpus/$t" | grep -v '/[0-9a-f]\{40\}$' | xargs -r git checkout -- || true
  files=$(find "corpus/$t" -type f | wc -l)
  line="$t: ${execs:-?} executions in ${elapsed} s, corpus $files files, $(date -u +%Y-%m-%d) ($status; sanitizer $sanitizer)"
  echo "$line"
  echo "$line" >> runs.log
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
