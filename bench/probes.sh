#!/usr/bin/env bash
# probes: what this machine charges for a wake-up, for one write() to a loopback socket,
# and how often it stalls a busy core, and what the rooms scenario costs and how late it
# delivers with no server or client code at all, measured with four small C programs
# (bench/probes/). These are the costs that the scenarios' CPU-per-delivery and p99
# figures inherit; bench/RESULTS.md uses them.
# Knobs: N (2000 wake-ups), GAP_US (1000), STALL_S (20 s of stall watching per core),
# WRITE_S (8 s per write pattern), ROOMS_S (20 s of the rooms pattern).
set -euo pipefail
dir=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
N=${N:-2000} GAP_US=${GAP_US:-1000} STALL_S=${STALL_S:-20} WRITE_S=${WRITE_S:-8}
ROOMS_S=${ROOMS_S:-20}
for probe in wakeup writes stalls rooms; do
    gcc -O2 -Wall -o "$work/$probe" "$dir/probes/$probe.c"
done
echo "# probes — $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
"$work/wakeup" "$N" "$GAP_US"
echo "one write() per delivery, no server code (the chat scenario's pattern, then two frames a write, then the rooms scenario's):"
"$work/writes" 100 5000 "$WRITE_S"
"$work/writes" 100 5000 "$WRITE_S" 120 2
# 10,000 sockets on each side: within the open-files limit of 20,000 a process.
(ulimit -n 20000 && "$work/writes" 10000 100000 "$WRITE_S")
echo "the rooms scenario (10,000 connections in 1,000 rooms, a frame each a second), the least pair:"
(ulimit -n 20000 && "$work/rooms" 10000 1000 1000000 "$ROOMS_S")
echo "one core busy:"
"$work/stalls" 1 "$STALL_S"
echo "both cores busy:"
"$work/stalls" 0 "$STALL_S" & "$work/stalls" 1 "$STALL_S"; wait
