#!/usr/bin/env bash
# fan-out ceiling: the fan-out room (200 legacy clients, one room, SQLite), the offered
# rate raised step by step, a fresh server per step; for each server the highest offered
# rate with everything sent and delivered (lost 0, unsent 0, all connected) and p99 ≤ 50
# ms. A step that fails is run again, up to TRIES runs in all (one stall does not end a
# server's climb); a server stops climbing at a step that failed every run. Issue: wschat's
# ceiling ≥ 1.5 × the floor's (stretch 300,000 deliveries/s).
# The top steps load the client's core too (about 1.7 µs of its CPU a delivery): a
# failure there can be the client's.
# Knobs: N (200), RATES (offered deliveries/s, space-separated), DURATION (10 s per step),
#        P99_MS (50), TRIES (3).
source "$(dirname "$0")/lib.sh"
N=${N:-200}
RATES=${RATES:-"25000 50000 75000 100000 125000 150000 200000 250000 300000 400000 500000 600000"}
DURATION=${DURATION:-10}
P99_MS=${P99_MS:-50}
TRIES=${TRIES:-3}
header "fan-out ceiling" "bench/ceiling.sh  # N=$N DURATION=$DURATION TRIES=$TRIES RATES=\"$RATES\""

declare -A ceiling=([wschat]=0 [node-floor]=0)
declare -A climbing=([wschat]=1 [node-floor]=1)
for peer in $PEERS; do
    ceiling[$peer]=0
    climbing[$peer]=1
done
rows=()
for rate in $RATES; do
    interval=$(python3 -c "print(round($N * $N / $rate, 6))")
    for who in wschat $PEERS node-floor; do
        [[ ${climbing[$who]} == 1 ]] || continue
        for try in $(seq "$TRIES"); do
            if [[ $who == wschat ]]; then
                db=$(sqlite_db)
                session "$db" bench
                start_wschat "$db"
            else
                start_peer "$who"
            fi
            f="$WORK/ceiling-$who-$rate-$try.json"
            peer_args "$who" --protocol legacy --session-key bench -n "$N" --interval "$interval" \
                --duration "$DURATION"
            load "$who@$rate" "$f" "$SRV_PID" "ws://127.0.0.1:$SRV_PORT/" "${PEER_ARGS[@]}" || true
            stop "$SRV_PID"
            if ceiling_passes "$f" "$N" "$P99_MS"; then
                ceiling[$who]=$rate
                verdict=pass
            elif ((try < TRIES)); then
                verdict="FAIL (run $try of $TRIES: again)"
            else
                climbing[$who]=0
                verdict="FAIL (all $TRIES runs)"
            fi
            rows+=("$(python3 - "$f" "$who" "$rate" "$verdict" <<'PY' || echo "| $who | $rate | (no report: the client failed, see $f.stderr) | | | | | | | $verdict | | |"
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency_ms"]
print(f"| {sys.argv[2]} | {int(sys.argv[3]):,} | {r['delivered'] / r['duration_s']:,.0f} | {r['delivered']:,} / {r['expected']:,} | {r['lost']:,} | {r['unsent']:,} | {l['p50']:.1f} / {l['p99']:.1f} / {l['max']:.1f} | {r['cpu_per_delivery_us']:.2f} | {r['server_cpu_share_send']:.2f} | {sys.argv[4]} | {r['other_cores_busy']:.2f} | {r['loadavg_before']} |")
PY
)")
            if [[ $verdict == pass ]]; then break; fi
        done
    done
    any=0
    for who in "${!climbing[@]}"; do [[ ${climbing[$who]} == 1 ]] && any=1; done
    ((any)) || break
done

note ""
note "| server | offered deliveries/s | delivered ÷ send phase, /s | delivered / expected | lost | unsent | p50 / p99 / max ms | CPU µs/delivery | server cores busy (send phase) | verdict | other processes, cores | load avg before |"
note "|---|---|---|---|---|---|---|---|---|---|---|---|"
for r in "${rows[@]}"; do note "$r"; done
note ""
ratio=$(python3 -c "w,f=${ceiling[wschat]},${ceiling[node-floor]}; print(f'{w/f:.2f}' if f else 'n/a')")
peers_note=""
for peer in $PEERS; do peers_note+=", $peer ${ceiling[$peer]}/s"; done
note "Ceiling (highest offered rate passing in one of up to $TRIES runs: lost 0, unsent 0, p99 ≤ $P99_MS ms): wschat ${ceiling[wschat]}/s$peers_note, node-floor ${ceiling[node-floor]}/s, ratio wschat ÷ floor $ratio."
