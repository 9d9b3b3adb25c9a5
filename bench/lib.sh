# Shared by the bench/*.sh scenario scripts: sourced, not run.
#
# Environment knobs (all optional):
#   BENCH_BIN     the wschat binary          [target/release/wschat of this checkout]
#   LOAD_BIN      the binary whose `load` drives the scenario     [BENCH_BIN]
#   PIN=0         do not pin with taskset    [servers on SERVER_CPU, client on CLIENT_CPU]
#   SERVER_CPU    core for servers           [1]
#   CLIENT_CPU    core for the load client   [0]
#   LO_RPS=1      loopback's receive side on the client's core too (receive packet steering
#                 on lo: rps_cpus set to CLIENT_CPU's mask, put back on exit; needs root and
#                 PIN=1). On loopback the kernel otherwise processes every frame a server
#                 writes, up to waking the client, inside the server's own write() on the
#                 server's core; over a network the client's machine would do it.  [0]
#   PG            PostgreSQL base URL        [postgres://postgres@127.0.0.1:5432]
#   NATS          NATS URL                   [nats://127.0.0.1:4222]
#   KEEP=1        keep the work folder (logs, databases, JSON results)
#   OUT=FILE      also append the markdown tables to FILE
#   QUIET_WAIT=S  before each scenario, wait up to S seconds until the machine is quiet
#                 (under QUIET_BUSY % of all cores busy over 5 s, default 15) [0: no wait]
#   SEED          the load client's --seed (same send schedule for every server) [1]
#   PEERS         peers measured besides the Node floor, any of: "socketio" (bench/peers/
#                 socketio, Socket.IO 4, driven with --protocol socketio), "c-floor" (bench/
#                 peers/c-floor, the Node floor's job in C on epoll: what a server speaking
#                 the legacy protocol pays at the least); "" for none [socketio c-floor]
#
# Every server, database and temp folder a script starts is stopped/dropped on exit.

set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
BIN=${BENCH_BIN:-$ROOT/target/release/wschat}
# The load client: the same binary unless LOAD_BIN names another (to measure an older
# server build with today's client).
LOAD_BIN=${LOAD_BIN:-$BIN}
FLOOR_DIR=$BENCH_DIR/peers/node-floor
SOCKETIO_DIR=$BENCH_DIR/peers/socketio
C_FLOOR_SRC=$BENCH_DIR/peers/c-floor/server.c
PEERS=${PEERS-socketio c-floor}
MEASURE=$BENCH_DIR/measure.py
PIN=${PIN:-1}
SERVER_CPU=${SERVER_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
NATS=${NATS:-nats://127.0.0.1:4222}
WORK=$(mktemp -d /tmp/wschat-bench.XXXXXX)

# Settings every wschat server gets in a benchmark: no per-connection rate limit, no
# per-session or per-address connection limit (the load client uses one key for many
# connections, as nodejschat's did), no demo session. Unknown WSCHAT_* variables are
# ignored by servers that do not have these settings yet.
# BENCH_SERVER_ENV replaces the list (e.g. BENCH_SERVER_ENV=" " for a build that still
# refuses unknown WSCHAT_* variables).
read -ra SERVER_ENV <<<"${BENCH_SERVER_ENV:-WSCHAT_RATE_PER_SEC=0 WSCHAT_MAX_CONNECTIONS_PER_SESSION=0 WSCHAT_MAX_CONNECTIONS_PER_IP=0 WSCHAT_MAX_FAILED_KEYS_PER_MINUTE=0 WSCHAT_DEMO_SESSION=false}"


_PIDS=()

_cleanup() {
    local rc=$?
    set +e
    local pid
    for pid in "${_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${_PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [[ -n $_RPS_BEFORE ]]; then echo "$_RPS_BEFORE" >"$RPS_FILE"; fi
    local db
    # pg_db runs in $(…), a subshell: it records its databases in a file, not in a variable.
    if [[ -f $WORK/databases ]]; then
        while read -r db; do
            psql -q "$PG/postgres" -c "drop database if exists $db with (force)" >/dev/null 2>&1
        done <"$WORK/databases"
    fi
    if [[ ${KEEP:-0} == 1 ]]; then
        echo "work folder kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap _cleanup EXIT
trap 'exit 130' INT TERM

# As many open files as allowed (10,000 connections need more than the usual 1,024).
ulimit -n "$(ulimit -Hn)"

die() { echo "error: $*" >&2; exit 1; }
log() { echo "[$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)] $*" >&2; }

[[ -x $BIN ]] || die "no $BIN: run cargo build --release -p wschat"
"$LOAD_BIN" load --help >/dev/null 2>&1 || die "$LOAD_BIN has no load subcommand (stale build?)"

LO_RPS=${LO_RPS:-0}
RPS_FILE=/sys/class/net/lo/queues/rx-0/rps_cpus
_RPS_BEFORE=
if [[ $LO_RPS == 1 ]]; then
    [[ $PIN == 1 ]] || die "LO_RPS=1 steers to the client's core: it needs PIN=1"
    _RPS_BEFORE=$(cat "$RPS_FILE") || die "cannot read $RPS_FILE"
    printf '%x\n' $((1 << CLIENT_CPU)) >"$RPS_FILE" || die "cannot write $RPS_FILE (root?)"
fi

server_pin() { if [[ $PIN == 1 ]]; then echo taskset -c "$SERVER_CPU"; fi; }
client_cpu() { if [[ $PIN == 1 ]]; then echo "$CLIENT_CPU"; else echo -; fi; }

pin_note() {
    if [[ $PIN == 1 ]]; then
        echo -n "pinned: servers on core $SERVER_CPU, load client on core $CLIENT_CPU (taskset)"
        if [[ $LO_RPS == 1 ]]; then
            echo "; loopback's receive side on core $CLIENT_CPU (LO_RPS=1)"
        else
            echo
        fi
    else
        echo "not pinned"
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_tcp() { # PORT [SECONDS]
    local port=$1 t=${2:-30}
    for _ in $(seq $((t * 10))); do
        if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "nothing listens on port $port after ${t}s"
}

wait_ready() { # PORT PID [SECONDS]
    local port=$1 pid=$2 t=${3:-60}
    for _ in $(seq $((t * 10))); do
        kill -0 "$pid" 2>/dev/null || die "server $pid exited; log: $(tail -5 "$WORK"/*-"$port".log)"
        if curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "server on port $port not ready after ${t}s"
}

# A fresh SQLite database URL in the work folder.
sqlite_db() { echo "sqlite://$WORK/wschat-$RANDOM$RANDOM.db"; }

# A fresh PostgreSQL database (dropped on exit); prints its URL.
pg_db() {
    local name="wschat_bench_$$_$RANDOM"
    psql -q "$PG/postgres" -c "create database $name" >/dev/null || die "cannot create database on $PG"
    echo "$name" >>"$WORK/databases"
    echo "$PG/$name"
}

# session DBURL KEY [ROOM]: one session (applies the migrations on first use).
session() {
    local args=(session create --database "$1" --user "bench" --key "$2")
    [[ -n ${3:-} ]] && args+=(--room "$3")
    "$BIN" "${args[@]}" >/dev/null
}

# bulk_sessions DBURL N ROOMS: sessions k1…kN for users u1…uN; with ROOMS > 0 session ki
# is in room i % ROOMS (so connection i of `--keys k{i}` shares a room with every
# ROOMS-th other). Inserted directly (one `session create` per row is slow).
bulk_sessions() {
    local db=$1 n=$2 rooms=$3
    session "$db" "seed-$RANDOM" # creates the schema
    if [[ $db == postgres* ]]; then
        local room=null
        ((rooms > 0)) && room="i % $rooms"
        # the table's trigger hashes the keys
        psql -q "$db" -c "insert into sessions(key, \"user\", room) select 'k'||i, 'u'||i, $room from generate_series(1, $n) i" >/dev/null
    else
        python3 - "${db#sqlite://}" "$n" "$rooms" <<'EOF'
import hashlib, sqlite3, sys
path, n, rooms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = sqlite3.connect(path)
c.executemany(
    'insert into sessions(key, "user", room) values (?, ?, ?)',
    (("sha256:" + hashlib.sha256(f"k{i}".encode()).hexdigest(), f"u{i}", (i % rooms) if rooms else None)
     for i in range(1, n + 1)),
)
c.commit()
EOF
    fi
}

# start_wschat DBURL [serve flags…]: starts a server on a free port; sets SRV_PID, SRV_PORT.
start_wschat() {
    local db=$1
    shift
    SRV_PORT=$(free_port)
    # shellcheck disable=SC2046
    env "${SERVER_ENV[@]}" ${EXTRA_ENV:-} $(server_pin) "$BIN" --log-format json serve \
        --listen "127.0.0.1:$SRV_PORT" --database "$db" "$@" \
        >"$WORK/wschat-$SRV_PORT.log" 2>&1 &
    SRV_PID=$!
    _PIDS+=("$SRV_PID")
    wait_ready "$SRV_PORT" "$SRV_PID"
    log "wschat pid $SRV_PID on port $SRV_PORT ($(redact "$db")) $*"
}

# start_peer NAME: a peer on a free port, FLOOR_ENV in its environment: node-floor
# (bench/peers/node-floor), socketio (bench/peers/socketio, Socket.IO 4), both Node.js,
# their packages installed from their package-lock.json on first use; or c-floor
# (bench/peers/c-floor/server.c, built with gcc -O2 into the work folder on first use).
# Sets SRV_PID, SRV_PORT.
start_peer() {
    local name=$1 dir cmd
    case $name in
    node-floor | socketio)
        dir=$FLOOR_DIR cmd=(node server.js)
        [[ $name == socketio ]] && dir=$SOCKETIO_DIR
        # npm writes node_modules/.package-lock.json last: missing or older than the lock
        # file means the packages are not (all) installed.
        if [[ ! $dir/node_modules/.package-lock.json -nt $dir/package-lock.json ]]; then
            (cd "$dir" && npm ci --no-audit --no-fund >&2)
        fi
        ;;
    c-floor)
        dir=$WORK cmd=("$WORK/c-floor")
        [[ -x $WORK/c-floor ]] || gcc -O2 -Wall -o "$WORK/c-floor" "$C_FLOOR_SRC" ||
            die "cannot build $C_FLOOR_SRC"
        ;;
    *) die "unknown peer $name" ;;
    esac
    SRV_PORT=$(free_port)
    # shellcheck disable=SC2046
    (cd "$dir" && exec env ${FLOOR_ENV:-} $(server_pin) "${cmd[@]}" "$SRV_PORT") \
        >"$WORK/$name-$SRV_PORT.log" 2>&1 &
    SRV_PID=$!
    _PIDS+=("$SRV_PID")
    wait_tcp "$SRV_PORT"
    log "$name pid $SRV_PID on port $SRV_PORT ${FLOOR_ENV:-}"
}

# peer_args NAME ARGS…: sets PEER_ARGS to the load client's legacy ARGS as that peer
# needs them (socketio: `--protocol socketio` instead of `--protocol legacy`).
peer_args() {
    local peer=$1 a
    shift
    PEER_ARGS=()
    for a in "$@"; do
        [[ $peer == socketio && $a == legacy ]] && a=socketio
        PEER_ARGS+=("$a")
    done
}

# load_peers PREFIX ARGS…: for each of $PEERS and then the Node floor: start it
# (FLOOR_ENV applies), run the load client with ARGS (legacy; adapted by peer_args) into
# $WORK/PREFIX-NAME.json, stop it. Sets PEER_FILES to those files, the floor's last.
load_peers() {
    local prefix=$1 peer
    shift
    PEER_FILES=()
    for peer in $PEERS node-floor; do
        start_peer "$peer"
        peer_args "$peer" "$@"
        load "$peer" "$WORK/$prefix-$peer.json" "$SRV_PID" "ws://127.0.0.1:$SRV_PORT/" "${PEER_ARGS[@]}"
        stop "$SRV_PID"
        PEER_FILES+=("$WORK/$prefix-$peer.json")
    done
}

# stop PID…: a graceful stop (TERM, then KILL after 10 s).
stop() {
    local pid
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "$@"; do
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

redact() { echo "${1//$WORK/\$WORK}"; }

# load LABEL OUTFILE PIDS CLIENT-ARGS…: runs `wschat load … --json --no-progress`
# pinned to the client core while measuring the server PIDS (comma-separated).
load() {
    local label=$1 out=$2 pids=$3
    shift 3
    wait_quiet
    log "$label: wschat load $*"
    python3 "$MEASURE" load --pids "$pids" --label "$label" --out "$out" --cpu "$(client_cpu)" \
        -- "$LOAD_BIN" load "$@" --seed "${SEED:-1}" --json --no-progress
}

# ceiling_passes FILE N P99_MS: a ceiling step's run passes: all N connected, everything
# sent and delivered, p99 within P99_MS (ceiling.sh, multinode.sh's CEILING_RATES).
ceiling_passes() {
    python3 - "$1" "$2" "$3" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(1)
ok = (r["connected"] == int(sys.argv[2]) and r["lost"] == 0 and r["unsent"] == 0
      and r["expected"] > 0 and r["latency_ms"]["p99"] <= float(sys.argv[3]))
sys.exit(0 if ok else 1)
PY
}

# table TITLE FILES…: prints (and appends to $OUT) the side-by-side table.
table() {
    local t
    t=$(python3 "$MEASURE" table "$@")
    echo "$t"
    if [[ -n ${OUT:-} ]]; then echo "$t" >>"$OUT"; fi
}

# busy_pct: percent of all cores busy (not idle/iowait) over 5 s, from /proc/stat.
busy_pct() {
    python3 - <<'PY'
import time
def snap():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(v), v[3] + v[4]
t0, i0 = snap(); time.sleep(5); t1, i1 = snap()
print(round(100 * (1 - (i1 - i0) / max(t1 - t0, 1))))
PY
}

wait_quiet() {
    local limit=${QUIET_WAIT:-0} waited=0 b
    ((limit > 0)) || return 0
    while :; do
        b=$(busy_pct)
        if ((b < ${QUIET_BUSY:-15})); then
            log "machine quiet: $b % busy over 5 s (waited ${waited} s)"
            return 0
        fi
        if ((waited >= limit)); then
            log "machine still $b % busy after ${waited} s: running anyway"
            return 0
        fi
        sleep 10
        waited=$((waited + 15))
    done
}

header() { # SCENARIO COMMAND
    local h
    h=$(printf '\n### %s\n\n`%s` — %s; %s cores, %s GiB RAM; %s; load average at start %s\n' \
        "$1" "$2" "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(nproc)" \
        "$(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo)" "$(pin_note)" \
        "$(cut -d' ' -f1-3 /proc/loadavg)")
    echo "$h"
    if [[ -n ${OUT:-} ]]; then echo "$h" >>"$OUT"; fi
}

note() { echo "$*"; if [[ -n ${OUT:-} ]]; then echo "$*" >>"$OUT"; fi; }

field() { python3 "$MEASURE" field "$@"; }

# pair TITLE CMD LOAD-ARGS…: one fresh wschat (SQLite, one session key `bench`, or
# $DB_KIND=pg for PostgreSQL) and then the Node floor, driven by the same client
# arguments (the URL is added first); prints the table. URL path "/" (legacy).
pair() {
    local title=$1 cmd=$2
    shift 2
    header "$title" "$cmd"
    local db
    if [[ ${DB_KIND:-sqlite} == pg ]]; then db=$(pg_db); else db=$(sqlite_db); fi
    session "$db" bench
    start_wschat "$db"
    load wschat "$WORK/$title-wschat.json" "$SRV_PID" "ws://127.0.0.1:$SRV_PORT/" "$@"
    stop "$SRV_PID"
    load_peers "$title" "$@"
    table "$title" "$WORK/$title-wschat.json" "${PEER_FILES[@]}"
}
