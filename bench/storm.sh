#!/usr/bin/env bash
# storm: N v1 clients (sessions k1…kN, ROOMS rooms via --rooms, sending every INTERVAL s)
# are all cut off at once and reconnect at once, resuming each room with `since`.
#
# How "at once" is made: once every client is connected and the sending phase is
# KILL_AFTER seconds old, `ss -K` destroys every established server-side socket of the
# server's port in one go (the kernel resets them: both ends see a broken connection, as
# when a load balancer or a NAT drops them). The load client's v1 connections then
# reconnect after its backoff (25–50 ms for a connection that was up) and join with
# `since` = the last seq they have; sends that were not acked are retried with the same
# client_msg_id. (`--churn` closes connections one by one at random times, which is not
# a storm.) Measured: time from the kill until the server again holds N established
# sockets (polled with ss every ~50 ms, for up to 30 s), the time until N more connections
# were opened in wschat's /metrics (wschat_connections_opened_total: accepted and
# authenticated), and from the client: each connection's resume (from the moment it saw
# its connection lost to every room of its next connection synced: joined with `since`,
# and the backfill through the join's `last_seq` received; the slowest is when all had
# resumed), lost, duplicated, max latency (a message sent just before the kill is
# delivered only after its receiver resumed).
#
# The Node floor gets the same storm with N legacy clients (it has no v1, no resume), in
# FLOOR_ROOMS=ROOMS rooms, and so do the PEERS (socketio: without connection state
# recovery, so like the floor): only their reconnect times compare. Issue: all resumed
# within 10 s, 0 lost. Default store (SQLite).
# Knobs: N (5000), ROOMS (100), INTERVAL (10), DURATION (30), KILL_AFTER (8), RAMP (2000).
source "$(dirname "$0")/lib.sh"
N=${N:-5000} ROOMS=${ROOMS:-100} INTERVAL=${INTERVAL:-10} DURATION=${DURATION:-30}
KILL_AFTER=${KILL_AFTER:-8} RAMP=${RAMP:-2000}
header storm "bench/storm.sh  # N=$N ROOMS=$ROOMS INTERVAL=$INTERVAL DURATION=$DURATION KILL_AFTER=$KILL_AFTER"

established() { ss -Htn state established "( sport = :$1 )" | wc -l; }
# wschat's count of connections accepted and authenticated (/metrics).
opened() {
    curl -fs "http://127.0.0.1:$1/metrics" |
        awk '/^wschat_connections_opened_total/ {s += $NF} END {printf "%d\n", s}'
}

rows=()
storm() { # WHO PROTOCOL-ARGS…
    local who=$1
    shift
    local fd0
    wait_quiet
    fd0=$(python3 "$MEASURE" fds "$SRV_PID")
    python3 "$MEASURE" load --pids "$SRV_PID" --label "$who" --out "$WORK/storm-$who.json" \
        --cpu "$(client_cpu)" -- "$LOAD_BIN" load "ws://127.0.0.1:$SRV_PORT/$URL_PATH" "$@" \
        --keys 'k{i}' -n "$N" --interval "$INTERVAL" --duration "$DURATION" --ramp "$RAMP" \
        --seed "${SEED:-1}" --json --no-progress &
    local client=$!
    _PIDS+=("$client")
    python3 "$MEASURE" wait-fds "$fd0" "$N" $((N / RAMP + 60)) "$SRV_PID" >/dev/null ||
        log "$who: not all $N connected"
    sleep "$KILL_AFTER"
    local before t_kill killed t_back="" n=0
    before=$(established "$SRV_PORT")
    local opened0="" opened_s="-" t_opened="" opened_now=0
    [[ $who == wschat ]] && opened0=$(opened "$SRV_PORT")
    t_kill=$(date +%s.%N)
    killed=$(ss -K -Htn state established "( sport = :$SRV_PORT )" | wc -l)
    local la
    la=$(cut -d' ' -f1-3 /proc/loadavg)
    local deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)); do
        if [[ -z $t_back ]]; then
            n=$(established "$SRV_PORT")
            ((n >= N)) && t_back=$(date +%s.%N)
        fi
        if [[ -n $opened0 && -z $t_opened ]]; then
            opened_now=$(opened "$SRV_PORT")
            ((opened_now >= opened0 + N)) && t_opened=$(date +%s.%N)
        fi
        [[ -n $t_back && ( -z $opened0 || -n $t_opened ) ]] && break
        sleep 0.05
    done
    [[ -n $t_opened ]] && opened_s=$(python3 -c "print(f'{$t_opened - $t_kill:.2f}')")
    # When fewer than N did, say how many.
    [[ -n $opened0 && -z $t_opened ]] && opened_s="not within 30 s ($((opened_now - opened0)) did)"
    local back_s="not within 30 s ($n)"
    [[ -n $t_back ]] && back_s=$(python3 -c "print(f'{$t_back - $t_kill:.2f}')")
    log "$who: $before established, $killed killed; back to $N after $back_s s (authenticated: $opened_s)"
    wait "$client" || true
    local resumed
    resumed=$(python3 - "$WORK/storm-$who.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
m = r.get("resume_ms")
if not m:
    print("— (no resume)")
else:
    print(f"{m['count']:,} resumes, the slowest after {m['max'] / 1000:.2f} s (p50 {m['p50'] / 1000:.2f}); "
          f"not resumed at the end: {r.get('away_at_end', 0)}")
PY
)
    rows+=("$who|$before|$killed|$back_s|$opened_s|$resumed|$la")
}
db=$(sqlite_db)
bulk_sessions "$db" "$N" 0
start_wschat "$db"
URL_PATH=ws storm wschat --protocol v1 --rooms "$ROOMS"
stop "$SRV_PID"
files=("$WORK/storm-wschat.json")
for peer in $PEERS node-floor; do
    FLOOR_ENV="FLOOR_ROOMS=$ROOMS" start_peer "$peer"
    peer_args "$peer" --protocol legacy
    URL_PATH= storm "$peer" "${PEER_ARGS[@]}"
    stop "$SRV_PID"
    files+=("$WORK/storm-$peer.json")
done

note ""
note "| server | connections before | sockets killed at once | back to N established after, s | N more connections authenticated (wschat /metrics) after, s | resumed (loss → rooms synced again, per connection) | load avg at kill |"
note "|---|---|---|---|---|---|---|"
for r in "${rows[@]}"; do
    IFS='|' read -r who before killed back opened resumed la <<<"$r"
    note "| $who | $before | $killed | $back | $opened | $resumed | $la |"
done
table storm "${files[@]}"
