#!/usr/bin/env bash
# Retained messages at their shards' owners (docs/BENCHMARKS.md, "Retained
# messages at their owners"): 1,000,000 retained topics (64 B) published
# over a 5-node kadmq fleet (R = 3), then per node the retained messages and
# bytes it keeps, its RSS and data-directory growth; against one kadmq
# without a cluster holding all 1,000,000 (what every node of a fleet held
# when retained messages were copied to every node).
#
#   benches/retained.sh                 # 1,000,000 topics
#   TOPICS=200000 benches/retained.sh   # fewer
#   SETTLE_SECS=60 benches/retained.sh    # measure a minute after the burst (default 10 s)
#   NODE_FLAGS="--retained-check-secs 0" benches/retained.sh   # extra flags for the fleet's nodes
#
# Every process started here is killed by its PID on exit. Needs: cargo,
# python3, curl.
set -euo pipefail
TOPICS=${TOPICS:-1000000}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-$(mktemp -d /tmp/kadmq-retained-bench.XXXXXX)}
PIDS=()
# On exit: the processes by PID, then the data directories and the binary
# copy (GBs at 1,000,000 topics); the logs stay. KEEP_DATA=1 keeps all.
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    [[ ${KEEP_DATA:-0} == 1 ]] || rm -rf "$WORK"/n[1-5] "$WORK/single" "$WORK/kadmq"
}
trap cleanup EXIT
log() { echo "[retained.sh $(date -u +%H:%M:%S)] $*" >&2; }

(cd "$ROOT" && cargo build --release --bin kadmq)
cp "$ROOT/target/release/kadmq" "$WORK/"
K=$WORK/kadmq
cd "$WORK"
"$K" keygen --out key --force >/dev/null
log "kadmq $(cd "$ROOT" && git rev-parse --short HEAD)"

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
disk() { du -sk "$1" | cut -f1; }
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v k="$2" '$1==k {print $2}'; }

# Ports 2930i (MQTT), 2931i (HTTP), 2932i (libp2p); the single node 29300/29310.
start() { # i extra...
    local i=$1
    shift
    "$K" start --no-ws --log warn --sys-interval 0 --dead-timeout 60 ${NODE_FLAGS:-} \
        --mqtt "127.0.0.1:2930$i" --http "127.0.0.1:2931$i" \
        --p2p-listen "/ip4/127.0.0.1/tcp/2932$i" --cluster-key-file key \
        --data-dir "n$i" --node-name "n$i" "$@" >"n$i.log" 2>&1 &
    PIDS+=($!)
    NODE_PID[$i]=$!
}
declare -a NODE_PID
start 1
sleep 2
boot="/ip4/127.0.0.1/tcp/29321/p2p/$("$K" id --data-dir n1)"
for i in 2 3 4 5; do start "$i" --bootstrap "$boot"; done
for _ in $(seq 120); do
    ready=0
    for i in 1 2 3 4 5; do
        [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:2931$i/health/ready") == 200 ]] && ready=$((ready + 1))
    done
    ((ready == 5)) && break
    sleep 1
done
((ready == 5)) || { log "the fleet did not form"; exit 1; }
declare -a RSS0 DISK0
for i in 1 2 3 4 5; do RSS0[$i]=$(rss "${NODE_PID[$i]}"); DISK0[$i]=$(disk "n$i"); done

log "publishing $TOPICS retained topics over the 5 nodes"
python3 "$ROOT/benches/retained/publish_retained.py" 29301,29302,29303,29304,29305 "$TOPICS"
want=$((3 * TOPICS))
for _ in $(seq 120); do
    sum=0
    for i in 1 2 3 4 5; do sum=$((sum + $(metric "2931$i" kadmq_cluster_retained_messages))); done
    ((sum >= want)) && break
    sleep 5
done
((sum == want)) || log "the owners hold $sum copies, not $want"
sleep "${SETTLE_SECS:-10}"
echo "| node | retained messages | share of the fleet's | retained bytes | RSS growth KiB | data dir growth KiB |"
echo "|---|---:|---:|---:|---:|---:|"
for i in 1 2 3 4 5; do
    msgs=$(metric "2931$i" kadmq_cluster_retained_messages)
    bytes=$(metric "2931$i" kadmq_cluster_retained_bytes)
    echo "| n$i | $msgs | $(awk -v m="$msgs" -v t="$TOPICS" 'BEGIN {printf "%.3f", m / t}') | $bytes | $(($(rss "${NODE_PID[$i]}") - RSS0[i])) | $(($(disk "n$i") - DISK0[i])) |"
done
for f in 'bench/r7/#' 'bench/+/5'; do
    echo "subscribe $f on n3: $(python3 "$ROOT/benches/retained/count_retained.py" 29303 "$f")"
done

log "the full copy: one node holding all $TOPICS"
"$K" start --no-ws --log warn --sys-interval 0 --mqtt 127.0.0.1:29300 --http 127.0.0.1:29310 --data-dir single >single.log 2>&1 &
single=$!
PIDS+=($single)
sleep 2
rss0=$(rss $single)
disk0=$(disk single)
python3 "$ROOT/benches/retained/publish_retained.py" 29300 "$TOPICS"
for _ in $(seq 60); do
    [[ $(metric 29310 kadmq_retained_messages) == "$TOPICS" ]] && break
    sleep 2
done
sleep "${SETTLE_SECS:-10}"
echo "full copy (one node): $(metric 29310 kadmq_retained_messages) messages, RSS growth $(($(rss $single) - rss0)) KiB, data dir growth $(($(disk single) - disk0)) KiB"
