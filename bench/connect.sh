#!/usr/bin/env bash
# connect: authenticated connects per second into an empty room. N legacy connections
# with one session key (room 0, empty: a fresh database), offered at RAMP connects/s
# (0 = all at once); the rate is the connections up when the client's connect phase ended
# ÷ that phase (until every connection's first attempt is over: upgrade, key check,
# {"authenticated":true}); a connection that got in only on a retry after it is not counted.
# wschat (SQLite, then PostgreSQL), the PEERS (lib.sh) and the Node floor. Issue: ≥ 5,000/s.
# Knobs: N (5000), RAMP (0), STORES ("sqlite pg"), USERS (one: one session key for all, as
# nodejschat's client; distinct: keys k1…kN of users u1…uN, all in room 0, so that every
# connect is a new user in one big room).
source "$(dirname "$0")/lib.sh"
N=${N:-5000} RAMP=${RAMP:-0} STORES=${STORES:-"sqlite pg"} USERS=${USERS:-one}
header connect "bench/connect.sh  # N=$N RAMP=$RAMP STORES=\"$STORES\" USERS=$USERS"
if [[ $USERS == distinct ]]; then keys=(--keys 'k{i}'); else keys=(--session-key bench); fi
args=(--protocol legacy "${keys[@]}" -n "$N" --interval 0 --duration 1 --drain 0
    --ramp "$RAMP")
files=()
for store in $STORES; do
    if [[ $store == pg ]]; then db=$(pg_db); else db=$(sqlite_db); fi
    if [[ $USERS == distinct ]]; then bulk_sessions "$db" "$N" 1; else session "$db" bench; fi
    start_wschat "$db"
    load "wschat-$store" "$WORK/connect-wschat-$store.json" "$SRV_PID" "ws://127.0.0.1:$SRV_PORT/" "${args[@]}"
    stop "$SRV_PID"
    files+=("$WORK/connect-wschat-$store.json")
done
load_peers connect "${args[@]}"
files+=("${PEER_FILES[@]}")

note ""
note "| server | connected in the phase | failed attempts | connect phase s | connects/s | ÷ floor | server CPU in connect phase s | CPU µs per connect | load avg before |"
note "|---|---|---|---|---|---|---|---|---|"
python3 - "${files[@]}" <<'PY' | while IFS= read -r l; do note "$l"; done
import json, sys
rs = [json.load(open(f)) for f in sys.argv[1:]]
floor = rs[-1]["connect_rate"]
for r in rs:
    up = r["connected_in_connect_phase"]
    c = max(up, 1)
    print(f"| {r['label']} | {up:,} | {r['failed_connects']:,} | {r['connect_s']:.2f} | "
          f"{r['connect_rate']:,.0f} | {r['connect_rate'] / floor:.2f} | {r['cpu_connect_s']:.2f} | "
          f"{r['cpu_connect_s'] / c * 1e6:.0f} | {r['loadavg_before']} |")
PY
