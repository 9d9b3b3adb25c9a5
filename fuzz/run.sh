#!/usr/bin/env bash
# Run every fuzz target: RUNS iterations each (default 100000), or MAX_TIME seconds each
# when set. Exits non-zero on the first crash (the input is in fuzz/artifacts/<target>/).
set -euo pipefail
cd "$(dirname "$0")"
RUNS="${RUNS:-100000}"
# Stable toolchain: allow the -Z flags cargo-fuzz passes (sanitizer, sancov).
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
limit=(-runs="$RUNS")
if [ -n "${MAX_TIME:-}" ]; then
  limit=(-max_total_time="$MAX_TIME")
fi
for target in v1_decode legacy_decode; do
  echo "== fuzz $target (${limit[*]})"
  mkdir -p "work/$target"
  # New inputs go to work/ (the first corpus directory); the committed seeds are read.
  cargo fuzz run "$target" "work/$target" "corpus/$target" -- \
    "${limit[@]}" -dict=json.dict -max_len=4096 -print_final_stats=1
done
echo "== fuzz passed"
