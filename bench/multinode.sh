#!/usr/bin/env bash
# multi-node: the fan-out scenario (200 legacy clients, one room, 2.5 msgs/s each) on
# PostgreSQL with NATS (127.0.0.1:4222) as the broker: first one node, then NODES nodes
# sharing a fresh database and a NATS subject of their own (connections spread
# round-robin over the nodes by the client), then the Node floor. CPU figures sum all
# nodes. Issue: deliveries/s over NODES nodes within 80 % of one node's. The PEERS are not
# measured here (a Socket.IO cluster needs an adapter, e.g. Redis, not set up here).
# Knobs: N (200), INTERVAL (0.4), DURATION (20), NODES (3), BROKER (nats: $NATS).
source "$(dirname "$0")/lib.sh"
N=${N:-200} INTERVAL=${INTERVAL:-0.4} DURATION=${DURATION:-20} NODES=${NODES:-3}
BROKER=${BROKER:-$NATS}
header multi-node "bench/multinode.sh  # N=$N INTERVAL=$INTERVAL DURATION=$DURATION NODES=$NODES BROKER=$BROKER, PostgreSQL"
args=(--protocol legacy --session-key bench -n "$N" --interval "$INTERVAL" --duration "$DURATION")

cluster() { # COUNT LABEL
    local count=$1 label=$2 db pids=() urls=()
    db=$(pg_db)
    session "$db" bench
    EXTRA_ENV="WSCHAT_NATS_SUBJECT=wschat.bench.$$.$RANDOM"
    for _ in $(seq "$count"); do
        EXTRA_ENV=$EXTRA_ENV start_wschat "$db" --broker "$BROKER"
        pids+=("$SRV_PID")
        urls+=("ws://127.0.0.1:$SRV_PORT/")
    done
    local pid_list url_list
    pid_list=$(IFS=,; echo "${pids[*]}")
    url_list=$(IFS=,; echo "${urls[*]}")
    load "$label" "$WORK/multinode-$label.json" "$pid_list" "$url_list" "${args[@]}"
    stop "${pids[@]}"
}

cluster 1 wschat-1-node
cluster "$NODES" "wschat-$NODES-nodes"
start_floor
load node-floor "$WORK/multinode-floor.json" "$SRV_PID" "ws://127.0.0.1:$SRV_PORT/" "${args[@]}"
stop "$SRV_PID"
table multi-node "$WORK/multinode-wschat-$NODES-nodes.json" "$WORK/multinode-wschat-1-node.json" "$WORK/multinode-floor.json"
