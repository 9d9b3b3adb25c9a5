#!/usr/bin/env bash
# fan-out: 200 legacy clients in one room, 2.5 msgs/s each (200 × 2.5 × 200 = 100,000
# deliveries/s offered), default store (SQLite); wschat, then the PEERS (lib.sh), then the
# Node floor. Issue: all delivered, p99 ≤ 50 ms, CPU per delivery ≤ 0.5 × the floor's
# (stretch 0.25 ×).
# Knobs: N (200), INTERVAL (0.4), DURATION (20).
source "$(dirname "$0")/lib.sh"
N=${N:-200} INTERVAL=${INTERVAL:-0.4} DURATION=${DURATION:-20}
pair fan-out "bench/fanout.sh  # N=$N INTERVAL=$INTERVAL DURATION=$DURATION" \
    --protocol legacy --session-key bench -n "$N" --interval "$INTERVAL" --duration "$DURATION"
