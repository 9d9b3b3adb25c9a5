#!/usr/bin/env bash
# The load client against the real Socket.IO 4 server: 50 connections in 5 rooms
# (FLOOR_ROOMS=5, keys k1…k50), 3 s of messages. Fails unless all 50 connected, nothing
# was lost, and every message was expected of exactly its room's 10 members.
# Usage: bench/peers/socketio/smoke.sh [WSCHAT_BINARY]   (CI runs it with the debug build)
set -euo pipefail
dir=$(cd "$(dirname "$0")" && pwd)
bin=${1:-$dir/../../../target/release/wschat}
# npm writes node_modules/.package-lock.json last: missing or older than the lock file
# means the packages are not (all) installed.
[[ $dir/node_modules/.package-lock.json -nt $dir/package-lock.json ]] || (cd "$dir" && npm ci --no-audit --no-fund >&2)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
FLOOR_ROOMS=5 node "$dir/server.js" "$port" 2>/dev/null &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
report=$("$bin" load "ws://127.0.0.1:$port/" --protocol socketio --keys 'k{i}' -n 50 \
    --interval 0.5 --duration 3 --json --no-progress | tail -1)
python3 - "$report" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
ok = r["connected"] == 50 and r["lost"] == 0 and r["sent"] > 0 and r["expected"] == r["sent"] * 10
print(f"socketio smoke: connected {r['connected']}, sent {r['sent']}, expected {r['expected']}, "
      f"delivered {r['delivered']}, lost {r['lost']}: {'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PY
