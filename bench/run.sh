#!/usr/bin/env bash
# bench/run.sh SCENARIO…  — runs bench/SCENARIO.sh for each name (or `all`), appending
# the markdown tables to $OUT if set. Scenarios: idle chat fanout ceiling rooms connect
# storm multinode. Build first: cargo build --release -p wschat.
set -euo pipefail
dir=$(cd "$(dirname "$0")" && pwd)
all=(idle chat fanout ceiling rooms connect storm multinode)
[[ $# -gt 0 ]] || { echo "usage: $0 SCENARIO… | all   (${all[*]})" >&2; exit 2; }
[[ $1 == all ]] && set -- "${all[@]}"
for s in "$@"; do
    [[ -x $dir/$s.sh ]] || { echo "no scenario $s (${all[*]})" >&2; exit 2; }
    "$dir/$s.sh"
done
