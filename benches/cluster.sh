#!/usr/bin/env bash
# Cluster benchmarks (docs/BENCHMARKS.md, "Cluster"): cross-node forwarding
# against one node and against rmqtt's raft cluster, and the route table's
# per-node size and memory.
#
#   benches/cluster.sh                     # everything, 5 repetitions
#   REPEATS=3 benches/cluster.sh           # fewer repetitions
#   PARTS=forward benches/cluster.sh       # only part 1 (forward | lookup | routes, comma-separated)
#   ONLY=qos0-fanin,lat-qos0 benches/cluster.sh   # a subset of the scenarios
#   RMQTTD=/path/to/rmqttd RMQTT_WAIT=2400 benches/cluster.sh
#                                          # wait up to 40 min for rmqttd to appear
#   LOAD_WAIT=900 LOAD_MAX=1.5 benches/cluster.sh # wait up to 15 min for a quiet machine
#   THREADS=1 benches/cluster.sh          # every broker process with 1 worker thread
#                                          # (kadmq --threads, rmqttd TOKIO_WORKER_THREADS);
#                                          # default 0: one per core
#
# Part 1 "forward" (every repetition starts fresh processes of all systems,
# then for every scenario runs every variant, the order rotating each
# repetition):
#   kadmq-single  one kadmq without --p2p-listen; publishers and subscriber on it
#   kadmq-n1      3-node kadmq cluster (replication 3); publishers and subscriber on node 1
#   kadmq-x       the same cluster; publishers on node 1, subscriber on node 2
#   rmqtt-n1      3-node rmqtt raft cluster; publishers and subscriber on node 1
#   rmqtt-x       the same; publishers on rmqtt node 1, subscriber on rmqtt node 2
# Node 1's and node 2's cluster counters (/metrics) are read before and after
# every kadmq-n1/kadmq-x run, after a warm-up run.
# Part 2 "lookup": a 3-node kadmq cluster with --replication 1 (node 1 owns
# only some shards, so publishes need the lookup + route cache path), a
# warm-up, then 3 measured cross-node QoS 0 runs with the counters.
# Part 3 "routes": 100,000 distinct filters over 5 kadmq nodes (20,000 per
# node, one client each; benches/cluster/subscribe_many.py), replication 3
# and then 5 (every node owns every shard = a fully replicated table), and
# the same 100,000 filters on one kadmq without a cluster. Per node: shard
# entries, shards owned, local filters and VmRSS.
#
# Raw results stay in $WORK (results.jsonl, routes.jsonl, logs). Every
# process started here is killed by its PID on exit.
#
# Needs: cargo, python3, curl, ss, awk. rmqtt: `cargo install rmqttd --locked
# --root /tmp/rmqtt` (~17 min on 2 cores; needs protoc); without it the
# rmqtt variants are skipped.
set -euo pipefail

REPEATS=${REPEATS:-5}
ONLY=${ONLY:-}
PARTS=${PARTS:-forward,lookup,routes}
RMQTTD=${RMQTTD:-/tmp/rmqtt/bin/rmqttd}
RMQTT_WAIT=${RMQTT_WAIT:-0}
LOAD_WAIT=${LOAD_WAIT:-0}
LOAD_MAX=${LOAD_MAX:-1.5}
FILTERS_PER_NODE=${FILTERS_PER_NODE:-20000}
THREADS=${THREADS:-0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-$(mktemp -d /tmp/kadmq-cluster-bench.XXXXXX)}
mkdir -p "$WORK"
RESULTS=$WORK/results.jsonl
ROUTES=$WORK/routes.jsonl
: >"$RESULTS"
: >"$ROUTES"

# Ports (127.0.0.1): single kadmq 28900 (HTTP 28910); kadmq node i MQTT
# 2890i, HTTP 2891i, libp2p 2892i; rmqtt node i MQTT 2884i, gRPC 2885i,
# raft 2886i, HTTP 2887i (benches/cluster/rmqtt/).
SINGLE_PORT=28900
SINGLE_HTTP=28910

PIDS=() # every process started here
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -f "$WORK/hold"
    # The data directories and binary copies; results and logs stay.
    [[ ${KEEP_DATA:-0} == 1 ]] || rm -rf "$WORK"/*-data "$WORK"/rmqtt-[0-9] "$WORK"/kadmq "$WORK"/kadmq-loadgen "$WORK"/rmqttd
}
trap cleanup EXIT

log() { echo "[cluster.sh $(date -u +%H:%M:%S)] $*" >&2; }
has_part() { [[ ",$PARTS," == *",$1,"* ]]; }
selected() { [[ -z $ONLY ]] || [[ ",$ONLY," == *",$1,"* ]]; }
load1() { cut -d' ' -f1 /proc/loadavg; }

stop_pids() { # pid...
    local pid
    for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

wait_listening() { # port [tries of 0.1 s]
    local port=$1 tries=${2:-100}
    for _ in $(seq "$tries"); do
        if [[ -n $(ss -Hltn "sport = :$port" 2>/dev/null) ]]; then return 0; fi
        sleep 0.1
    done
    log "nothing listens on $port"
    return 1
}

# --- binaries ----------------------------------------------------------------
log "building kadmq and kadmq-loadgen (release)"
(cd "$ROOT" && cargo build --release --bin kadmq --bin kadmq-loadgen)
# Copies: others may rebuild target/ while this runs.
cp "$ROOT/target/release/kadmq" "$ROOT/target/release/kadmq-loadgen" "$WORK/"
KADMQ=$WORK/kadmq
LOADGEN=$WORK/kadmq-loadgen
log "kadmq built from $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?') ($(cd "$ROOT" && git status --short 2>/dev/null | wc -l) paths modified or new)"
"$KADMQ" keygen --out "$WORK/cluster.key" --force >/dev/null

RMQTT=0
if has_part forward; then
    waited=0
    while [[ ! -x $RMQTTD ]] && ((waited < RMQTT_WAIT)); do
        ((waited == 0)) && log "waiting up to ${RMQTT_WAIT}s for $RMQTTD"
        sleep 60
        waited=$((waited + 60))
    done
    if [[ -x $RMQTTD ]]; then
        RMQTT=1
        cp "$RMQTTD" "$WORK/rmqttd"
        log "rmqtt: $("$WORK/rmqttd" -V 2>&1 | head -1)"
    else
        log "no rmqttd at $RMQTTD: the rmqtt variants are skipped"
    fi
fi

wait_quiet() {
    local waited=0
    while awk -v l="$(load1)" -v m="$LOAD_MAX" 'BEGIN{exit !(l >= m)}' && ((waited < LOAD_WAIT)); do
        ((waited == 0)) && log "load $(load1) >= $LOAD_MAX: waiting up to ${LOAD_WAIT}s"
        sleep 30
        waited=$((waited + 30))
    done
    log "machine: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); broker worker threads: ${THREADS} (0: one per core)"
}

# --- kadmq -------------------------------------------------------------------
KADMQ_COMMON=(--no-ws --log warn --sys-interval 0 --max-queued-messages 1000000 --threads "$THREADS")

start_single() { # name -> SINGLE_PID
    rm -rf "$WORK/$1-data"
    "$KADMQ" start "${KADMQ_COMMON[@]}" --data-dir "$WORK/$1-data" --mqtt "127.0.0.1:$SINGLE_PORT" \
        --http "127.0.0.1:$SINGLE_HTTP" >>"$WORK/$1.log" 2>&1 &
    SINGLE_PID=$!
    PIDS+=("$SINGLE_PID")
    wait_listening "$SINGLE_PORT"
}

cluster_alive() { # nodes -> 0 when every node lists that many members, all alive, and takes clients
    local n=$1 i
    for i in $(seq "$n"); do
        curl -sf -m 2 -o /dev/null "http://127.0.0.1:$((28910 + i))/health/ready" || return 1
        curl -s -m 2 "http://127.0.0.1:$((28910 + i))/api/v1/cluster" | python3 -c '
import json, sys
d = json.load(sys.stdin)
m = d["members"]
sys.exit(0 if len(m) == int(sys.argv[1]) and all(x["state"] == "alive" for x in m) else 1)' "$n" 2>/dev/null || return 1
    done
}

start_cluster() { # nodes replication tag -> CLUSTER_PIDS
    local n=$1 r=$2 tag=$3 i
    CLUSTER_PIDS=()
    for i in $(seq "$n"); do
        rm -rf "$WORK/$tag-n$i-data"
        local boot=()
        ((i > 1)) && boot=(--bootstrap /ip4/127.0.0.1/tcp/28921)
        "$KADMQ" start "${KADMQ_COMMON[@]}" --data-dir "$WORK/$tag-n$i-data" --node-name "n$i" \
            --mqtt "127.0.0.1:$((28900 + i))" --http "127.0.0.1:$((28910 + i))" \
            --p2p-listen "/ip4/127.0.0.1/tcp/$((28920 + i))" --cluster-key-file "$WORK/cluster.key" \
            --replication "$r" "${boot[@]}" >>"$WORK/$tag-n$i.log" 2>&1 &
        CLUSTER_PIDS+=($!)
        PIDS+=($!)
        ((i == 1)) && wait_listening 28921
    done
    for i in $(seq "$n"); do wait_listening $((28900 + i)); done
    for _ in $(seq 120); do
        if cluster_alive "$n"; then
            log "kadmq cluster $tag: $n nodes alive (replication $r)"
            return 0
        fi
        sleep 0.5
    done
    log "kadmq cluster $tag did not converge in 60 s"
    return 1
}

metrics() { # http-port -> one JSON object of the kadmq_cluster_* figures
    curl -s -m 5 "http://127.0.0.1:$1/metrics" | python3 -c '
import json, sys
out = {}
for line in sys.stdin:
    if line.startswith("kadmq_cluster_"):
        k, v = line.split()
        out[k[len("kadmq_cluster_"):]] = int(float(v))
print(json.dumps(out))'
}

wait_outbox_empty() { # http-port
    local i
    for i in $(seq 60); do
        if [[ $(metrics "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("outbox_messages", 0))') == 0 ]]; then
            return 0
        fi
        sleep 0.5
    done
    log "node on $1: cluster outbox still not empty after 30 s"
}

# --- rmqtt -------------------------------------------------------------------
# rmqtt's raft listener does not set SO_REUSEADDR: a restart within the
# 60 s TIME_WAIT of the previous run's connections fails with "Address
# already in use". Wait until no socket (any state) holds its ports.
# (awk reads everything: `grep -q` would exit early and, with pipefail, make
# the pipeline fail on ss's SIGPIPE.)
rmqtt_ports_free() {
    ss -Htan 2>/dev/null | awk '$4 ~ /:(2884[1-3]|2885[1-3]|2886[1-3]|2887[1-3])$/ {n++} END {exit n > 0}'
}

start_rmqtt() { # -> RMQTT_PIDS
    local i
    RMQTT_PIDS=()
    for _ in $(seq 90); do
        rmqtt_ports_free && break
        sleep 1
    done
    rmqtt_ports_free || log "rmqtt ports still in use after 90 s"
    for i in 1 2 3; do
        rm -rf "$WORK/rmqtt-$i"
        cp -r "$ROOT/benches/cluster/rmqtt/$i" "$WORK/rmqtt-$i"
        # THREADS=N gives rmqttd's tokio runtime N workers too (0: its default).
        (cd "$WORK/rmqtt-$i" && { ((THREADS > 0)) && export TOKIO_WORKER_THREADS=$THREADS; exec "$WORK/rmqttd" -f rmqtt.toml >>"$WORK/rmqtt-$i.log" 2>&1; }) &
        RMQTT_PIDS+=($!)
        PIDS+=($!)
    done
    for i in 1 2 3; do wait_listening $((28840 + i)) 300 || return 1; done
}

# --- load --------------------------------------------------------------------
# name | loadgen arguments. Fan-in as in benches/run.sh, 4 publishers
# (3 brokers + the loadgen share 2 cores).
SCENARIOS=(
    "qos0-fanin|--mode fan-in --publishers 4 --subscribers 1 --qos 0 --messages 25000"
    "qos1-fanin|--mode fan-in --publishers 4 --subscribers 1 --qos 1 --messages 20000"
    "lat-qos0|--mode fan-in --publishers 4 --subscribers 1 --qos 0 --messages 4000 --rate 1000"
    "lat-qos1|--mode fan-in --publishers 4 --subscribers 1 --qos 1 --messages 4000 --rate 1000"
)
COMMON="--payload 64 --mqtt-version 3 --duration-limit 60 --drain 5 --json"

addrs_of() { # variant -> "pub-port sub-port"
    case $1 in
    kadmq-single) echo "$SINGLE_PORT $SINGLE_PORT" ;;
    kadmq-n1 | kadmq-r1-n1) echo "28901 28901" ;;
    kadmq-x | kadmq-r1-x) echo "28901 28902" ;;
    rmqtt-n1) echo "28841 28841" ;;
    rmqtt-x) echo "28841 28842" ;;
    esac
}

loadgen() { # pub-port sub-port args... -> JSON on stdout ('{"errors":[...]}' on failure)
    local p=$1 s=$2 out
    shift 2
    # shellcheck disable=SC2086
    out=$(timeout 90 "$LOADGEN" --pub-addrs "127.0.0.1:$p" --sub-addrs "127.0.0.1:$s" "$@" $COMMON 2>>"$WORK/loadgen.err") || true
    if python3 -c 'import json,sys; json.loads(sys.argv[1])' "$out" 2>/dev/null; then
        echo "$out"
    else
        echo '{"errors":["loadgen failed"]}'
    fi
}

# A short paced QoS 1 run until messages cross: routes propagated, raft
# leader elected. Then one flat-out warm-up run.
warm_up() { # variant
    local ports ok=0
    read -r -a ports <<<"$(addrs_of "$1")"
    for _ in $(seq 30); do
        if loadgen "${ports[0]}" "${ports[1]}" --mode fan-in --publishers 1 --qos 1 --messages 200 --rate 500 |
            python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if d.get("received",0) > 0 else 1)'; then
            ok=1
            break
        fi
        sleep 1
    done
    ((ok)) || log "$1: no message crossed in 30 probes"
    loadgen "${ports[0]}" "${ports[1]}" --mode fan-in --publishers 4 --qos 0 --messages 10000 >/dev/null
    [[ $1 == kadmq-* && $1 != kadmq-single ]] && wait_outbox_empty 28911
    return 0
}

run_one() { # variant scenario rep args...
    local variant=$1 name=$2 rep=$3 ports out before1 before2 after1 after2
    shift 3
    read -r -a ports <<<"$(addrs_of "$variant")"
    local counted=0
    [[ $variant == kadmq-* && $variant != kadmq-single ]] && counted=1
    if ((counted)); then
        wait_outbox_empty 28911
        before1=$(metrics 28911)
        before2=$(metrics 28912)
    fi
    local load
    load=$(load1)
    out=$(loadgen "${ports[0]}" "${ports[1]}" "$@")
    local members_ok=true
    if ((counted)); then
        sleep 0.2
        after1=$(metrics 28911)
        after2=$(metrics 28912)
        if ! cluster_alive 3; then
            members_ok=false
            log "$variant $name rep $rep: not every node sees 3 members alive after the run"
        fi
    else
        before1='{}' before2='{}' after1='{}' after2='{}'
    fi
    python3 - "$out" "$variant" "$name" "$rep" "$load" "$before1" "$after1" "$before2" "$after2" "$members_ok" >>"$RESULTS" <<'EOF'
import json, sys
d = json.loads(sys.argv[1])
d.update(variant=sys.argv[2], scenario=sys.argv[3], rep=int(sys.argv[4]), load1=float(sys.argv[5]),
         members_ok=sys.argv[10] == "true")
b1, a1, b2, a2 = (json.loads(x) for x in sys.argv[6:10])
d["n1"] = {k: a1[k] - b1.get(k, 0) for k in a1 if k.endswith("_total")}
d["n2"] = {k: a2[k] - b2.get(k, 0) for k in a2 if k.endswith("_total")}
print(json.dumps(d))
EOF
    tail -1 "$RESULTS" | python3 -c '
import json, sys
d = json.loads(sys.stdin.read())
n1 = d.get("n1", {})
extra = ""
if n1:
    extra = "  n1: lookups %s hits %s owned %s fwd %s; n2 recv %s" % (n1.get("remote_lookups_total"), n1.get("route_cache_hits_total"),
        n1.get("owned_reads_total"), n1.get("forwarded_total"), d["n2"].get("received_total"))
print("  %-12s %-10s rep %s: %9.0f msg/s  p50 %9.0f us  p99 %9.0f us  lost %6s%s%s" % (d["variant"], d["scenario"], d["rep"],
    d.get("throughput_msg_s", 0), d.get("latency_p50_us", 0) or 0, d.get("latency_p99_us", 0) or 0, d.get("lost", "?"),
    "  ERR " + d["errors"][0] if d.get("errors") else "", extra))' >&2
}

# --- part 1: forwarding --------------------------------------------------------
if has_part forward; then
    VARIANTS=(kadmq-single kadmq-n1 kadmq-x)
    ((RMQTT)) && VARIANTS+=(rmqtt-n1 rmqtt-x)
    wait_quiet
    log "part 1: ${VARIANTS[*]}, $REPEATS repetitions; results in $RESULTS"
    for rep in $(seq 1 "$REPEATS"); do
        start_single single
        start_cluster 3 3 fwd
        if ((RMQTT)); then start_rmqtt || { log "rmqtt did not start"; }; fi
        for v in "${VARIANTS[@]}"; do warm_up "$v"; done
        # Rotate the order every repetition.
        order=()
        for i in "${!VARIANTS[@]}"; do order+=("${VARIANTS[$(((i + rep - 1) % ${#VARIANTS[@]}))]}"); done
        for scenario in "${SCENARIOS[@]}"; do
            name=${scenario%%|*}
            args=${scenario#*|}
            selected "$name" || continue
            for v in "${order[@]}"; do
                # shellcheck disable=SC2086
                run_one "$v" "$name" "$rep" $args
            done
        done
        stop_pids "$SINGLE_PID" "${CLUSTER_PIDS[@]}" ${RMQTT_PIDS[@]+"${RMQTT_PIDS[@]}"}
        RMQTT_PIDS=()
    done
fi

# --- part 2: the lookup path (replication 1) -----------------------------------
if has_part lookup; then
    log "part 2: 3 kadmq nodes, --replication 1 (node 1 owns some shards only)"
    start_cluster 3 1 lookup
    warm_up kadmq-r1-x
    for rep in 1 2 3; do
        # shellcheck disable=SC2086
        run_one kadmq-r1-x lookup-qos0 "$rep" ${SCENARIOS[0]#*|}
    done
    stop_pids "${CLUSTER_PIDS[@]}"
fi

# --- part 3: route entries and memory --------------------------------------------
rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }

subscribe_all() { # tag nodes port-of-node-function... ; clients in SUB_PIDS
    local tag=$1 nodes=$2 i port
    shift 2
    SUB_PIDS=()
    touch "$WORK/hold"
    for i in $(seq "$nodes"); do
        port=$("$@" "$i")
        python3 "$ROOT/benches/cluster/subscribe_many.py" "127.0.0.1:$port" "$tag-sub$i" \
            $(((i - 1) * FILTERS_PER_NODE)) "$FILTERS_PER_NODE" --hold-file "$WORK/hold" \
            >"$WORK/$tag-sub$i.out" 2>&1 &
        SUB_PIDS+=($!)
        PIDS+=($!)
    done
    for _ in $(seq 600); do
        local done_count
        done_count=$(cat "$WORK/$tag"-sub*.out 2>/dev/null | grep -c '^subscribed' || true)
        ((done_count == nodes)) && return 0
        sleep 0.5
    done
    log "$tag: not every client finished subscribing in 300 s"
}

unsubscribe_all() {
    rm -f "$WORK/hold"
    for _ in $(seq 20); do
        local alive=0 pid
        for pid in "${SUB_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.5
    done
    stop_pids "${SUB_PIDS[@]}"
}

node_port() { echo $((28900 + $1)); }
single_port() { echo "$SINGLE_PORT"; }

# Waits until the entries owned over all nodes stop changing (3 s) and reach
# the expected total; bounded at 120 s.
wait_entries() { # nodes expected
    local n=$1 want=$2 last=-1 same=0 total i
    for _ in $(seq 240); do
        total=0
        for i in $(seq "$n"); do
            local e
            e=$(metrics $((28910 + i)) | python3 -c 'import json,sys; print(json.load(sys.stdin)["shard_entries_owned"])')
            total=$((total + e))
        done
        if ((total == last)); then same=$((same + 1)); else same=0; fi
        last=$total
        ((total >= want && same >= 6)) && return 0
        sleep 0.5
    done
    log "entries owned: $total of $want expected after 120 s"
}

record_nodes() { # tag replication nodes phase
    local tag=$1 r=$2 n=$3 phase=$4 i
    for i in $(seq "$n"); do
        python3 - "$(metrics $((28910 + i)))" "$tag" "$r" "n$i" "$phase" "$(rss_kb "${CLUSTER_PIDS[$((i - 1))]}")" >>"$ROUTES" <<'EOF'
import json, sys
m = json.loads(sys.argv[1])
print(json.dumps(dict(tag=sys.argv[2], replication=int(sys.argv[3]), node=sys.argv[4], phase=sys.argv[5], rss_kb=int(sys.argv[6]),
    entries=m["shard_entries_owned"], shards=m["shards_owned"], local_filters=m["local_filters"],
    cache_entries=m["route_cache_entries"])))
EOF
    done
}

if has_part routes; then
    total=$((5 * FILTERS_PER_NODE))
    for r in 3 5; do
        log "part 3: $total filters over 5 kadmq nodes, replication $r"
        start_cluster 5 "$r" "routes-r$r"
        sleep 2
        record_nodes "routes-r$r" "$r" 5 idle
        t0=$(date +%s.%N)
        subscribe_all "routes-r$r" 5 node_port
        wait_entries 5 $((r * total))
        t1=$(date +%s.%N)
        sleep 2
        record_nodes "routes-r$r" "$r" 5 subscribed
        log "  subscribed and settled in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b - a}') s"
        unsubscribe_all
        stop_pids "${CLUSTER_PIDS[@]}"
    done
    log "part 3: the same $total filters on one kadmq without a cluster"
    start_single routes-single
    sleep 1
    echo "{\"tag\":\"single\",\"replication\":0,\"node\":\"single\",\"phase\":\"idle\",\"rss_kb\":$(rss_kb "$SINGLE_PID")}" >>"$ROUTES"
    subscribe_all routes-single 5 single_port
    sleep 2
    echo "{\"tag\":\"single\",\"replication\":0,\"node\":\"single\",\"phase\":\"subscribed\",\"rss_kb\":$(rss_kb "$SINGLE_PID")}" >>"$ROUTES"
    unsubscribe_all
    stop_pids "$SINGLE_PID"
fi

# --- tables --------------------------------------------------------------------
python3 - "$RESULTS" "$ROUTES" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
routes = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]

def med(rs, key):
    v = [r.get(key) for r in rs if r.get(key) is not None]
    return statistics.median(v) if v else None
def fmt(v, d=0):
    return "-" if v is None else f"{v:,.{d}f}"
def ratio(a, b):
    return "-" if not a or not b else f"{a / b:.2f}"

fwd = [r for r in rows if r["variant"] in ("kadmq-single", "kadmq-n1", "kadmq-x", "rmqtt-n1", "rmqtt-x")]
if fwd:
    variants = [v for v in ("kadmq-single", "kadmq-n1", "kadmq-x", "rmqtt-n1", "rmqtt-x") if any(r["variant"] == v for r in fwd)]
    scenarios = []
    for r in fwd:
        if r["scenario"] not in scenarios:
            scenarios.append(r["scenario"])
    print()
    print("Medians over %d repetitions; loads (1 min) during the runs: %s-%s" % (
        max(r["rep"] for r in fwd), min(r["load1"] for r in fwd), max(r["load1"] for r in fwd)))
    print()
    print("| scenario | variant | msg/s | p50 µs | p99 µs | lost (median, max) | runs with errors |")
    print("|---|---|---:|---:|---:|---:|---:|")
    m = {}
    for s in scenarios:
        for v in variants:
            rs = [r for r in fwd if r["scenario"] == s and r["variant"] == v]
            m[s, v] = {k: med(rs, k) for k in ("throughput_msg_s", "latency_p50_us", "latency_p99_us", "lost")}
            lost_max = max((r.get("lost", 0) or 0 for r in rs), default=None)
            errs = sum(1 for r in rs if r.get("errors"))
            print(f"| {s} | {v} | {fmt(m[s, v]['throughput_msg_s'])} | {fmt(m[s, v]['latency_p50_us'])} | "
                  f"{fmt(m[s, v]['latency_p99_us'])} | {fmt(m[s, v]['lost'])}, {fmt(lost_max)} | {errs} |")
    print()
    print("Ratios of medians (throughput; for lat-* rows: p99 latency)")
    print()
    print("| scenario | kadmq-x / kadmq-single | kadmq-x / kadmq-n1 | kadmq-n1 / kadmq-single | kadmq-x / rmqtt-x | kadmq-n1 / rmqtt-n1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in scenarios:
        key = "latency_p99_us" if s.startswith("lat") else "throughput_msg_s"
        g = lambda v: m.get((s, v), {}).get(key)
        print(f"| {s} | {ratio(g('kadmq-x'), g('kadmq-single'))} | {ratio(g('kadmq-x'), g('kadmq-n1'))} | "
              f"{ratio(g('kadmq-n1'), g('kadmq-single'))} | {ratio(g('kadmq-x'), g('rmqtt-x'))} | {ratio(g('kadmq-n1'), g('rmqtt-n1'))} |")

counted = [r for r in rows if r.get("n1")]
if counted:
    print()
    print("Node 1 / node 2 cluster counters, delta over each measured run (after a warm-up)")
    print()
    print("| variant | scenario | rep | sent | n1 remote lookups | n1 cache hits | n1 cache misses | n1 owned reads | n1 forwarded | n2 received | n1 resent | n1 refused (outbox full) | received by subscriber |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in counted:
        n1, n2 = r["n1"], r["n2"]
        print(f"| {r['variant']} | {r['scenario']} | {r['rep']} | {r.get('sent', '-')} | {n1.get('remote_lookups_total')} | "
              f"{n1.get('route_cache_hits_total')} | {n1.get('route_cache_misses_total')} | {n1.get('owned_reads_total')} | "
              f"{n1.get('forwarded_total')} | {n2.get('received_total')} | {n1.get('outbox_resent_total')} | "
              f"{n1.get('publishes_refused_total')} | {r.get('received', '-')} |")

if routes:
    print()
    print("Route table: per node, 100,000 filters over the nodes (RSS in MiB)")
    print()
    print("| run | node | entries owned | shards owned | local filters | RSS idle | RSS subscribed | Δ RSS |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for tag in dict.fromkeys(r["tag"] for r in routes):
        for node in dict.fromkeys(r["node"] for r in routes if r["tag"] == tag):
            idle = next((r for r in routes if r["tag"] == tag and r["node"] == node and r["phase"] == "idle"), {})
            sub = next((r for r in routes if r["tag"] == tag and r["node"] == node and r["phase"] == "subscribed"), {})
            ri, rs = idle.get("rss_kb"), sub.get("rss_kb")
            print(f"| {tag} | {node} | {fmt(sub.get('entries'))} | {fmt(sub.get('shards'))} | {fmt(sub.get('local_filters'))} | "
                  f"{fmt(ri and ri / 1024, 1)} | {fmt(rs and rs / 1024, 1)} | {fmt(ri and rs and (rs - ri) / 1024, 1)} |")
EOF
log "raw results: $RESULTS $ROUTES"
