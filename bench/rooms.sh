#!/usr/bin/env bash
# rooms: 10,000 legacy clients in 1,000 rooms of 10, 1 msg/s each (10,000 msgs/s,
# 100,000 deliveries/s), default store (SQLite). Sessions k1…kN are inserted directly,
# session ki in room i % ROOMS; the client uses --keys k{i}. The Node floor runs with
# FLOOR_ROOMS=ROOMS (same mapping from the key), and so do the PEERS (lib.sh). Issue:
# p99 ≤ 20 ms.
# Knobs: N (10000), ROOMS (1000), INTERVAL (1), DURATION (20), RAMP (2000 connects/s).
source "$(dirname "$0")/lib.sh"
N=${N:-10000} ROOMS=${ROOMS:-1000} INTERVAL=${INTERVAL:-1} DURATION=${DURATION:-20}
RAMP=${RAMP:-2000}
# --key-rooms: the client expects each connection to get its room's messages by the same
# mapping, not only by what arrives (a connection that got nothing is counted as losing
# its whole room's).
args=(--protocol legacy --keys 'k{i}' --key-rooms "$ROOMS" -n "$N" --interval "$INTERVAL"
    --duration "$DURATION" --ramp "$RAMP")
# With every connection up for the whole run and rooms of equal size, each message is
# expected of its room's N/ROOMS members and no more; anything else means connections
# failed or were not up all along. Deliveries that crossed rooms are the report's
# `unexpected`. Rooms of unequal size (N not a multiple of ROOMS): no check.
check_rooms() { # FILE LABEL
    local unexpected
    unexpected=$(field "$1" unexpected)
    if ((unexpected > 0)); then
        note "warning: $2 delivered $unexpected messages to connections outside the sender's room"
    fi
    ((N % ROOMS == 0)) || return 0
    local sent expected
    sent=$(field "$1" sent)
    expected=$(field "$1" expected)
    if ((expected != sent * (N / ROOMS))); then
        note "warning: $2 expected $expected deliveries, not sent × $((N / ROOMS)) = $((sent * (N / ROOMS))): connections failed or were not up all along"
    fi
}
header rooms "bench/rooms.sh  # N=$N ROOMS=$ROOMS INTERVAL=$INTERVAL DURATION=$DURATION RAMP=$RAMP"
db=$(sqlite_db)
bulk_sessions "$db" "$N" "$ROOMS"
start_wschat "$db"
load wschat "$WORK/rooms-wschat.json" "$SRV_PID" "ws://127.0.0.1:$SRV_PORT/" "${args[@]}"
# The server's own share of the latency (its histograms): the client's figures also hold
# the client's queueing on its core. Not fatal: the peers' runs still follow.
server_side=$(curl -fs "http://127.0.0.1:$SRV_PORT/metrics" | python3 "$MEASURE" server-side) ||
    server_side="wschat's /metrics could not be read after its run"
stop "$SRV_PID"
check_rooms "$WORK/rooms-wschat.json" wschat
FLOOR_ENV="FLOOR_ROOMS=$ROOMS" load_peers rooms "${args[@]}"
for f in "${PEER_FILES[@]}"; do
    check_rooms "$f" "$(basename "$f" .json)"
done
table rooms "$WORK/rooms-wschat.json" "${PEER_FILES[@]}"
note ""
note "$server_side"
