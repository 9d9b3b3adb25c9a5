#!/usr/bin/env bash
# The load client against a real peer: 50 connections in 5 rooms (FLOOR_ROOMS=5, keys
# k1…k50), 3 s of messages. Fails unless all 50 connected, nothing was lost, and every
# message was expected of exactly its room's 10 members.
# Usage: bench/peers/smoke.sh socketio|c-floor [WSCHAT_BINARY]   (CI runs both with the debug build)
#   socketio: bench/peers/socketio (Socket.IO 4, Node.js), driven with --protocol socketio
#   c-floor:  bench/peers/c-floor/server.c, built with gcc, driven with --protocol legacy
set -euo pipefail
dir=$(cd "$(dirname "$0")" && pwd)
peer=${1:?usage: smoke.sh socketio|c-floor [WSCHAT_BINARY]}
bin=${2:-$dir/../../target/release/wschat}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
case $peer in
socketio)
    # npm writes node_modules/.package-lock.json last: missing or older than the lock file
    # means the packages are not (all) installed.
    [[ $dir/socketio/node_modules/.package-lock.json -nt $dir/socketio/package-lock.json ]] ||
        (cd "$dir/socketio" && npm ci --no-audit --no-fund >&2)
    FLOOR_ROOMS=5 node "$dir/socketio/server.js" "$port" 2>/dev/null &
    ;;
c-floor)
    exe=$(mktemp)
    trap 'rm -f "$exe"' EXIT
    gcc -O2 -Wall -Werror -o "$exe" "$dir/c-floor/server.c"
    FLOOR_ROOMS=5 "$exe" "$port" 2>/dev/null &
    ;;
*) echo "unknown peer $peer" >&2; exit 2 ;;
esac
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "${exe:-}"' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
protocol=legacy
[[ $peer == socketio ]] && protocol=socketio
report=$("$bin" load "ws://127.0.0.1:$port/" --protocol "$protocol" --keys 'k{i}' -n 50 \
    --interval 0.5 --duration 3 --json --no-progress | tail -1)
python3 - "$peer" "$report" <<'PY'
import json, sys
peer, r = sys.argv[1], json.loads(sys.argv[2])
ok = r["connected"] == 50 and r["lost"] == 0 and r["sent"] > 0 and r["expected"] == r["sent"] * 10
print(f"{peer} smoke: connected {r['connected']}, sent {r['sent']}, expected {r['expected']}, "
      f"delivered {r['delivered']}, lost {r['lost']}: {'ok' if ok else 'FAILED'}")
sys.exit(0 if ok else 1)
PY
