#!/usr/bin/env bash
# chat: 100 legacy clients in one room, 2 msgs/s each, on the default store (SQLite);
# wschat, then the PEERS (lib.sh), then the Node floor, with the same client. Issue:
# 0 lost; CPU per delivery ≤ 0.5 × the floor's; p99 no worse than the floor's.
# Knobs: N (100), INTERVAL (0.5 s between messages of a client), DURATION (20 s).
source "$(dirname "$0")/lib.sh"
N=${N:-100} INTERVAL=${INTERVAL:-0.5} DURATION=${DURATION:-20}
pair chat "bench/chat.sh  # N=$N INTERVAL=$INTERVAL DURATION=$DURATION" \
    --protocol legacy --session-key bench -n "$N" --interval "$INTERVAL" --duration "$DURATION"
