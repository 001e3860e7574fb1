#!/usr/bin/env bash
# What an idle connection costs (docs/BENCHMARKS.md, "Idle connections"):
# the broker's RSS growth per idle MQTT 3.1.1 client holding one
# subscription, kadmq against mosquitto in the same run.
#
#   benches/connections.sh                      # 1,000 and 15,000 clients, 3 repetitions
#   COUNTS=1000,5000 REPEATS=5 benches/connections.sh
#   HOLD=20 benches/connections.sh              # seconds the clients stay (default 10)
#
# Per repetition, count and broker: a fresh broker process (open files
# raised to 20,000), its VmRSS read once it listens, `kadmq-loadgen --mode
# idle` opening the clients (one subscription each, nothing published), the
# VmRSS read again 2 s after the last SUBACK, then the clients closed and
# the broker killed by its PID. Growth / clients = bytes per connection.
# Raw rows stay in $WORK/connections.jsonl.
#
# Needs: cargo, python3, ss; mosquitto (installed with apt-get if missing
# and root; skipped with a message otherwise).
set -euo pipefail

COUNTS=${COUNTS:-1000,15000}
REPEATS=${REPEATS:-3}
HOLD=${HOLD:-10}
PORT=${PORT:-28840}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-$(mktemp -d /tmp/kadmq-connections.XXXXXX)}
mkdir -p "$WORK"
ROWS=$WORK/connections.jsonl
: >"$ROWS"

BROKER_PID=
LOADGEN_PID=
cleanup() {
    for pid in $LOADGEN_PID $BROKER_PID; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    [[ ${KEEP_DATA:-0} == 1 ]] || rm -rf "$WORK/kadmq-data" "$WORK/kadmq" "$WORK/kadmq-loadgen"
}
trap cleanup EXIT

log() { echo "[connections.sh $(date +%H:%M:%S)] $*" >&2; }

ulimit -n 20000 || { log "cannot raise open files to 20,000"; exit 1; }
BROKERS=(kadmq)
if ! command -v mosquitto >/dev/null && [[ $(id -u) == 0 ]]; then
    log "installing mosquitto"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null || true
fi
if command -v mosquitto >/dev/null; then
    BROKERS+=(mosquitto)
else
    log "mosquitto is not installed: kadmq only, no ratio"
fi

log "building kadmq and kadmq-loadgen (release)"
(cd "$ROOT" && cargo build --release --bin kadmq --bin kadmq-loadgen)
cp "$ROOT/target/release/kadmq" "$ROOT/target/release/kadmq-loadgen" "$WORK/"
log "kadmq built from $(git -C "$ROOT" rev-parse --short HEAD) ($(git -C "$ROOT" status --porcelain | wc -l) paths modified or new); mosquitto: $({ mosquitto -h 2>/dev/null || true; } | head -1)"

cat >"$WORK/mosquitto.conf" <<EOF
listener $PORT 127.0.0.1
allow_anonymous true
max_connections -1
persistence false
log_dest none
EOF

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

start_broker() {
    case $1 in
    kadmq)
        rm -rf "$WORK/kadmq-data"
        "$WORK/kadmq" start --no-ws --data-dir "$WORK/kadmq-data" --log warn --mqtt "127.0.0.1:$PORT" \
            --sys-interval 0 --max-connections 100000 >>"$WORK/kadmq.log" 2>&1 &
        ;;
    mosquitto)
        mosquitto -c "$WORK/mosquitto.conf" >>"$WORK/mosquitto.log" 2>&1 &
        ;;
    esac
    BROKER_PID=$!
    for _ in $(seq 200); do
        ss -Hltn "sport = :$PORT" 2>/dev/null | grep -q . && return 0
        sleep 0.05
    done
    log "$1 does not listen on $PORT"
    return 1
}

stop_broker() {
    kill "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
    BROKER_PID=
}

IFS=, read -r -a COUNT_LIST <<<"$COUNTS"
for rep in $(seq "$REPEATS"); do
    for count in "${COUNT_LIST[@]}"; do
        for broker in "${BROKERS[@]}"; do
            start_broker "$broker"
            sleep 1
            before=$(rss_kb "$BROKER_PID")
            out=$WORK/loadgen-$broker-$count-$rep.out
            "$WORK/kadmq-loadgen" --mode idle --pub-addrs "127.0.0.1:$PORT" --connections "$count" \
                --hold "$HOLD" --duration-limit $((HOLD + 120)) --threads 1 --json >"$out" 2>&1 &
            LOADGEN_PID=$!
            for _ in $(seq 1200); do
                grep -q idle_ready "$out" && break
                kill -0 "$LOADGEN_PID" 2>/dev/null || break
                sleep 0.1
            done
            sleep 2
            after=$(rss_kb "$BROKER_PID")
            status=0
            wait "$LOADGEN_PID" || status=$?
            LOADGEN_PID=
            stop_broker
            ready=$(grep -c idle_ready "$out" || true)
            per=$(((after - before) * 1024 / count))
            echo "{\"broker\":\"$broker\",\"connections\":$count,\"rep\":$rep,\"rss_before_kb\":$before,\"rss_after_kb\":$after,\"bytes_per_connection\":$per,\"ready\":$ready,\"loadgen_status\":$status}" >>"$ROWS"
            log "$broker $count rep $rep: RSS $before -> $after KiB, $per bytes per connection (loadgen exit $status)"
        done
    done
done

python3 - "$ROWS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
bad = [r for r in rows if r["ready"] != 1 or r["loadgen_status"] != 0]
keys = sorted({(r["connections"], r["broker"]) for r in rows})
print("| connections | broker | bytes per idle connection (median) | per repetition |")
print("|---:|---|---:|---|")
med = {}
for n, b in keys:
    vals = [r["bytes_per_connection"] for r in rows if (r["connections"], r["broker"]) == (n, b)]
    med[(n, b)] = statistics.median(vals)
    print(f"| {n:,} | {b} | {med[(n, b)]:,.0f} | {', '.join(f'{v:,}' for v in vals)} |")
for n in sorted({n for n, _ in keys}):
    if (n, "kadmq") in med and (n, "mosquitto") in med and med[(n, "mosquitto")] > 0:
        print(f"\n{n:,} connections: kadmq / mosquitto = {med[(n, 'kadmq')] / med[(n, 'mosquitto')]:.1f}")
if bad:
    print(f"\n{len(bad)} run(s) did not complete (not every client subscribed, or one closed early): see {sys.argv[1]}")
PY
