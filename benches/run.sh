#!/usr/bin/env bash
# Reproduces the kadmq vs mosquitto vs rumqttd comparison in docs/BENCHMARKS.md.
#
#   benches/run.sh                 # 5 repetitions of every scenario
#   REPEATS=3 benches/run.sh       # fewer repetitions
#   ONLY=qos1-fanin benches/run.sh # one scenario (comma-separated list)
#   MQTTWRK=0 benches/run.sh       # skip the mqttwrk cross-check
#   RUMQTTD=0 benches/run.sh       # skip rumqttd
#
# For every repetition and scenario it starts a fresh broker process (kadmq,
# mosquitto, rumqttd; each goes first in turn), runs kadmq-loadgen against it
# on loopback, and kills the broker by its PID. Prints a table of medians
# and kadmq/peer ratios; raw results (one JSON object per run) stay in
# $WORK/results.jsonl.
#
# Needs: cargo, python3, root for `apt-get install mosquitto` if missing;
# rumqttd 0.20 is installed with `cargo install rumqttd` (not --locked, ~10
# minutes, once) unless RUMQTTD=0; if it does not build, that is said and it
# is skipped.
set -euo pipefail

REPEATS=${REPEATS:-5}
ONLY=${ONLY:-}
MQTTWRK=${MQTTWRK:-1}
RUMQTTD=${RUMQTTD:-1}
KPORT=${KPORT:-28830}
MPORT=${MPORT:-28831}
RPORT=${RPORT:-28832}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-$(mktemp -d /tmp/kadmq-bench.XXXXXX)}
mkdir -p "$WORK"
RESULTS=$WORK/results.jsonl
: >"$RESULTS"

BROKER_PID=
cleanup() {
    if [[ -n $BROKER_PID ]]; then
        kill "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
    fi
    # The data directory and binary copies; results and logs stay.
    [[ ${KEEP_DATA:-0} == 1 ]] || rm -rf "$WORK/kadmq-data" "$WORK/kadmq" "$WORK/kadmq-loadgen"
}
trap cleanup EXIT

log() { echo "[run.sh] $*" >&2; }

# --- tools -----------------------------------------------------------------
if ! command -v mosquitto >/dev/null; then
    log "installing mosquitto"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
fi
# The Debian package starts a system mosquitto on 1883; we never use it.
command -v python3 >/dev/null || { log "python3 is needed for the table"; exit 1; }
BROKERS=(kadmq mosquitto)
if [[ $RUMQTTD == 1 ]]; then
    RUMQTTD_BIN=$(command -v rumqttd || true)
    if [[ -z $RUMQTTD_BIN ]]; then
        log "installing rumqttd (cargo install rumqttd, at most 20 minutes)"
        if timeout 1200 cargo install rumqttd >"$WORK/rumqttd-install.log" 2>&1; then
            RUMQTTD_BIN=$(command -v rumqttd || echo "$HOME/.cargo/bin/rumqttd")
        else
            log "rumqttd did not install (see $WORK/rumqttd-install.log): rumqttd skipped"
        fi
    fi
    if [[ -n ${RUMQTTD_BIN:-} && -x $RUMQTTD_BIN ]]; then BROKERS+=(rumqttd); fi
else
    log "RUMQTTD=0: rumqttd skipped"
fi

log "building kadmq and kadmq-loadgen (release)"
(cd "$ROOT" && cargo build --release --bin kadmq --bin kadmq-loadgen)
# Copies: others may rebuild target/ while this runs.
cp "$ROOT/target/release/kadmq" "$ROOT/target/release/kadmq-loadgen" "$WORK/"
KADMQ=$WORK/kadmq
LOADGEN=$WORK/kadmq-loadgen

# mosquitto: unlimited in-flight would be "0"; 1000 is far above what the
# loadgen keeps in flight (100 per publisher, and its subscribers ack at once).
# max_queued_messages 1,000,000: mosquitto otherwise drops QoS 0 messages to
# a subscriber with more than 1000 packets waiting (and queues at most 1000
# QoS 1/2), which the fan-in runs exceed. No byte limits (the default).
cat >"$WORK/mosquitto.conf" <<EOF
listener $MPORT 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
max_inflight_messages 1000
max_queued_messages 1000000
persistence false
log_dest none
EOF

# shellcheck source=benches/rumqttd.sh
source "$ROOT/benches/rumqttd.sh"
write_rumqttd_config "$WORK/rumqttd.toml" "$RPORT"

wait_listening() {
    local port=$1
    for _ in $(seq 100); do
        if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then return 0; fi
        sleep 0.05
    done
    log "nothing listens on $port"
    return 1
}

start_broker() {
    case $1 in
    kadmq)
        rm -rf "$WORK/kadmq-data"
        # Same queue bound as mosquitto (the default, 10,000, drops in the
        # QoS 0 fan-in runs when the subscriber falls behind).
        "$KADMQ" start --no-ws --data-dir "$WORK/kadmq-data" --log warn --mqtt "127.0.0.1:$KPORT" \
            --sys-interval 0 --max-queued-messages 1000000 >>"$WORK/kadmq.log" 2>&1 &
        BROKER_PID=$!
        PORT=$KPORT
        ;;
    mosquitto)
        mosquitto -c "$WORK/mosquitto.conf" >>"$WORK/mosquitto.log" 2>&1 &
        BROKER_PID=$!
        PORT=$MPORT
        ;;
    rumqttd)
        "$RUMQTTD_BIN" -q -c "$WORK/rumqttd.toml" >>"$WORK/rumqttd.log" 2>&1 &
        BROKER_PID=$!
        PORT=$RPORT
        ;;
    esac
    wait_listening "$PORT"
}

stop_broker() {
    kill "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
    BROKER_PID=
}

# --- scenarios: name | loadgen arguments -----------------------------------
# Throughput runs publish as fast as the window allows (QoS 1/2: 100 in
# flight per publisher); latency runs publish at a fixed moderate rate so the
# latency is the broker's, not queueing behind a backlog.
SCENARIOS=(
    "qos0-fanin|--mode fan-in --publishers 8 --subscribers 1 --qos 0 --messages 25000"
    "qos1-fanin|--mode fan-in --publishers 8 --subscribers 1 --qos 1 --messages 20000"
    "qos2-fanin|--mode fan-in --publishers 8 --subscribers 1 --qos 2 --messages 10000"
    "qos0-fanout|--mode fan-out --publishers 1 --subscribers 8 --qos 0 --messages 25000"
    "qos1-fanout|--mode fan-out --publishers 1 --subscribers 8 --qos 1 --messages 20000"
    "qos1-pairs|--mode pairs --publishers 8 --qos 1 --messages 20000"
    "lat-qos0|--mode fan-in --publishers 4 --subscribers 1 --qos 0 --messages 4000 --rate 1000"
    "lat-qos1|--mode fan-in --publishers 4 --subscribers 1 --qos 1 --messages 4000 --rate 1000"
)
# Keep-alive 60 s: rumqttd refuses 0.
COMMON="--payload 64 --mqtt-version 3 --keep-alive 60 --duration-limit 60 --drain 3 --json"

selected() { [[ -z $ONLY ]] || [[ ",$ONLY," == *",$1,"* ]]; }

run_one() { # broker scenario-name rep args...
    local broker=$1 name=$2 rep=$3
    shift 3
    start_broker "$broker"
    local out
    # shellcheck disable=SC2086
    out=$(timeout 90 "$LOADGEN" --pub-addrs "127.0.0.1:$PORT" "$@" $COMMON 2>>"$WORK/loadgen.err") || true
    # Exit status 3 (run ended early) still prints a report; anything else does not.
    if ! python3 -c 'import json,sys; json.loads(sys.argv[1])' "$out" 2>/dev/null; then
        log "$broker $name rep $rep: loadgen failed (see $WORK/loadgen.err)"
        out='{"errors":["loadgen failed"]}'
    fi
    stop_broker
    python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(broker=sys.argv[2], scenario=sys.argv[3], rep=int(sys.argv[4])); print(json.dumps(d))' \
        "$out" "$broker" "$name" "$rep" >>"$RESULTS"
    python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print("  %-9s %-11s rep %s: %9.0f msg/s  p50 %8.0f us  p99 %8.0f us  lost %s%s" % (sys.argv[2], sys.argv[3], sys.argv[4], d.get("throughput_msg_s",0), d.get("latency_p50_us",0), d.get("latency_p99_us",0), d.get("lost","?"), "  ERR" if d.get("errors") else ""))' \
        "$out" "$broker" "$name" "$rep" >&2
}

log "results in $RESULTS; machine: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
for rep in $(seq 1 "$REPEATS"); do
    # Each broker goes first in turn.
    shift_by=$(((rep - 1) % ${#BROKERS[@]}))
    order=("${BROKERS[@]:shift_by}" "${BROKERS[@]:0:shift_by}")
    for scenario in "${SCENARIOS[@]}"; do
        name=${scenario%%|*}
        args=${scenario#*|}
        selected "$name" || continue
        for broker in "${order[@]}"; do
            # shellcheck disable=SC2086
            run_one "$broker" "$name" "$rep" $args
        done
    done
done

# --- cross-check with mqttwrk (rumqttc-based) ------------------------------
MQTTWRK_BIN=$(command -v mqttwrk || true)
[[ -z $MQTTWRK_BIN && -x /tmp/mqttwrk/bin/mqttwrk ]] && MQTTWRK_BIN=/tmp/mqttwrk/bin/mqttwrk
if [[ $MQTTWRK == 1 && -z $MQTTWRK_BIN ]]; then
    log "installing mqttwrk (cargo install, at most 10 minutes)"
    if timeout 600 cargo install mqttwrk --root /tmp/mqttwrk >"$WORK/mqttwrk-install.log" 2>&1; then
        MQTTWRK_BIN=/tmp/mqttwrk/bin/mqttwrk
    else
        log "mqttwrk did not install in 10 minutes; cross-check skipped"
    fi
fi
if [[ $MQTTWRK == 1 && -n $MQTTWRK_BIN ]] && selected qos1-fanin; then
    log "mqttwrk cross-check: QoS 1 fan-in, 8 publishers x 20000 -> 1 subscriber, 64 B, 100 in flight"
    for rep in 1 2 3; do
        for broker in "${BROKERS[@]}"; do
            start_broker "$broker"
            tput=$(timeout 120 "$MQTTWRK_BIN" bench -S 127.0.0.1 -P "$PORT" -n 20000 -p 8 -s 1 \
                --publish-qos 1 --subscribe-qos 1 -m 64 -i 100 2>&1 |
                awk '/Aggregate SubStats/{s=1} s && /throughput/{gsub(/,/,""); print $2; exit}') || true
            stop_broker
            log "  mqttwrk $broker rep $rep: ${tput:-?} msg/s (subscriber)"
            echo "{\"broker\":\"$broker\",\"scenario\":\"mqttwrk-qos1-fanin\",\"rep\":$rep,\"throughput_msg_s\":${tput:-0}}" >>"$RESULTS"
        done
    done
fi

# --- table -----------------------------------------------------------------
python3 - "$RESULTS" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
order = []
for r in rows:
    if r["scenario"] not in order:
        order.append(r["scenario"])
def med(scenario, broker, key):
    v = [r.get(key) for r in rows if r["scenario"] == scenario and r["broker"] == broker and r.get(key) is not None]
    return statistics.median(v) if v else None
def fmt(v, d=0):
    return "-" if v is None else f"{v:,.{d}f}"
def ratio(a, b):
    return "-" if not a or not b else f"{a / b:.2f}"
print()
print("Medians over %d repetitions (k/m = kadmq / mosquitto, k/r = kadmq / rumqttd; rumqttd empty when it did not run)" % max(r["rep"] for r in rows))
print()
print("| scenario | kadmq msg/s | mosquitto msg/s | k/m | rumqttd msg/s | k/r | kadmq p50 µs | mosq p50 µs | rumqttd p50 µs | kadmq p99 µs | mosq p99 µs | rumqttd p99 µs | lost k / m / r |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
brokers = ("kadmq", "mosquitto", "rumqttd")
for s in order:
    kt, mt, rt = (med(s, b, "throughput_msg_s") for b in brokers)
    k50, m50, r50 = (med(s, b, "latency_p50_us") for b in brokers)
    k99, m99, r99 = (med(s, b, "latency_p99_us") for b in brokers)
    kl, ml, rl = (med(s, b, "lost") for b in brokers)
    print(f"| {s} | {fmt(kt)} | {fmt(mt)} | {ratio(kt, mt)} | {fmt(rt)} | {ratio(kt, rt)} | {fmt(k50)} | {fmt(m50)} | {fmt(r50)} | {fmt(k99)} | {fmt(m99)} | {fmt(r99)} | {fmt(kl)} / {fmt(ml)} / {fmt(rl)} |")
errors = [r for r in rows if r.get("errors")]
if errors:
    print()
    print("%d run(s) reported errors, e.g.: %s %s: %s" % (len(errors), errors[0]["broker"], errors[0]["scenario"], errors[0]["errors"][0]))
EOF
log "raw results: $RESULTS"
