#!/usr/bin/env bash
# multi-node: the fan-out scenario (200 legacy clients, one room, 2.5 msgs/s each) on
# PostgreSQL with NATS (127.0.0.1:4222) as the broker: first one node, then NODES nodes
# sharing a fresh database and a NATS subject of their own (connections spread
# round-robin over the nodes by the client), then the Node floor. CPU figures sum all
# nodes (not NATS or Redis). Issue: deliveries/s over NODES nodes within 80 % of one
# node's. The socketio peer (PEERS, lib.sh) runs the same way: 1 node, then NODES nodes, each with Socket.IO's Redis
# adapter on REDIS (a channel prefix of its own per cluster). The c-floor peer has no
# way to run as several nodes and is left out here.
# With CEILING_RATES (offered deliveries/s, space-separated; off by default), then the
# fan-out ceiling's climb (ceiling.sh) for wschat on 1 node and on NODES nodes, a fresh
# cluster per step: the highest step with everything delivered and p99 ≤ P99_MS, for each,
# and NODES ÷ 1. Not the issue's figure (which is at the fan-out scenario's rate): what a
# cluster costs at its limit, here with every node on the one server core.
# Knobs: N (200), INTERVAL (0.4), DURATION (20), NODES (3), BROKER (nats: $NATS),
#        REDIS (redis://127.0.0.1:6379); CEILING_RATES, STEP_S (10), TRIES (2), P99_MS (50).
source "$(dirname "$0")/lib.sh"
N=${N:-200} INTERVAL=${INTERVAL:-0.4} DURATION=${DURATION:-20} NODES=${NODES:-3}
BROKER=${BROKER:-$NATS}
REDIS=${REDIS:-redis://127.0.0.1:6379}
header multi-node "bench/multinode.sh  # N=$N INTERVAL=$INTERVAL DURATION=$DURATION NODES=$NODES BROKER=$BROKER, PostgreSQL"
args=(--protocol legacy --session-key bench -n "$N" --interval "$INTERVAL" --duration "$DURATION")

# cluster COUNT LABEL [PEER]: COUNT wschat nodes on a fresh database and a NATS subject of
# their own, or (with PEER) COUNT processes of that Node peer sharing a Redis adapter; the
# load client spreads its connections over them; they are stopped afterwards.
cluster() {
    local count=$1 label=$2 peer=${3:-} db pids=() urls=()
    if [[ -z $peer ]]; then
        db=$(pg_db)
        session "$db" bench
        EXTRA_ENV="WSCHAT_NATS_SUBJECT=wschat.bench.$$.$RANDOM"
        PEER_ARGS=("${args[@]}")
    else
        local env="REDIS_URL=$REDIS REDIS_KEY=bench.$$.$RANDOM"
        peer_args "$peer" "${args[@]}"
    fi
    for _ in $(seq "$count"); do
        if [[ -z $peer ]]; then
            EXTRA_ENV=$EXTRA_ENV start_wschat "$db" --broker "$BROKER"
        else
            FLOOR_ENV=$env start_peer "$peer"
        fi
        pids+=("$SRV_PID")
        urls+=("ws://127.0.0.1:$SRV_PORT/")
    done
    local pid_list url_list
    pid_list=$(IFS=,; echo "${pids[*]}")
    url_list=$(IFS=,; echo "${urls[*]}")
    load "$label" "$WORK/multinode-$label.json" "$pid_list" "$url_list" "${PEER_ARGS[@]}"
    stop "${pids[@]}"
}

cluster 1 wschat-1-node
cluster "$NODES" "wschat-$NODES-nodes"
files=("$WORK/multinode-wschat-$NODES-nodes.json" "$WORK/multinode-wschat-1-node.json")
for peer in $PEERS; do
    [[ $peer == c-floor ]] && continue
    cluster 1 "$peer-1-node" "$peer"
    cluster "$NODES" "$peer-$NODES-nodes" "$peer"
    files+=("$WORK/multinode-$peer-$NODES-nodes.json" "$WORK/multinode-$peer-1-node.json")
done
start_peer node-floor
load node-floor "$WORK/multinode-floor.json" "$SRV_PID" "ws://127.0.0.1:$SRV_PORT/" "${args[@]}"
stop "$SRV_PID"
table multi-node "${files[@]}" "$WORK/multinode-floor.json"
# The issue's figure: NODES nodes' sustained deliveries/s over one node's (what came after
# the send phase lengthens the time, so a cluster that fell behind does not pass).
note ""
note "$(python3 "$MEASURE" nodes-ratio "$WORK/multinode-wschat-$NODES-nodes.json" \
    "$WORK/multinode-wschat-1-node.json" "$NODES")"

CEILING_RATES=${CEILING_RATES:-}
if [[ -n $CEILING_RATES ]]; then
    STEP_S=${STEP_S:-10} TRIES=${TRIES:-2} P99_MS=${P99_MS:-50}
    declare -A top=([1]=0 ["$NODES"]=0)
    crows=()
    for count in 1 "$NODES"; do
        for rate in $CEILING_RATES; do
            passed=0
            for try in $(seq "$TRIES"); do
                interval=$(python3 -c "print(round($N * $N / $rate, 6))")
                args=(--protocol legacy --session-key bench -n "$N" --interval "$interval" --duration "$STEP_S")
                label="ceiling-$count-$rate-$try"
                cluster "$count" "$label" || true
                f="$WORK/multinode-$label.json"
                verdict="FAIL (run $try of $TRIES)"
                if ceiling_passes "$f" "$N" "$P99_MS"; then
                    passed=1 verdict=pass
                    top[$count]=$rate
                fi
                crows+=("$(python3 - "$f" "$count" "$rate" "$verdict" <<'PY' || echo "| $count | $rate | (no report: see $f.stderr) | | | | | $verdict |"
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency_ms"]
print(f"| {sys.argv[2]} | {int(sys.argv[3]):,} | {r['delivered'] / r['duration_s']:,.0f} | {r['delivered']:,} / {r['expected']:,} | {r['lost']:,} | {l['p50']:.1f} / {l['p99']:.1f} | {r['cpu_per_delivery_us']:.2f} | {sys.argv[4]} |")
PY
)")
                ((passed)) && break
            done
            ((passed)) || break
        done
    done
    note ""
    note "Multi-node ceiling (CEILING_RATES=\"$CEILING_RATES\", $STEP_S s a step, up to $TRIES runs; every node on the server core):"
    note ""
    note "| wschat nodes | offered deliveries/s | delivered ÷ send phase, /s | delivered / expected | lost | p50 / p99 ms | CPU µs/delivery (all nodes) | verdict |"
    note "|---|---|---|---|---|---|---|---|"
    for r in "${crows[@]}"; do note "$r"; done
    note ""
    note "Highest passing step: 1 node ${top[1]}/s, $NODES nodes ${top[$NODES]}/s; $NODES ÷ 1 = $(python3 -c "a,b=${top[$NODES]},${top[1]}; print(f'{a/b:.2f}' if b else 'n/a')")."
fi
