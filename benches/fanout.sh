#!/usr/bin/env bash
# Fan-out with runs long enough to measure: 1 publisher -> 8 subscribers on
# one topic, 200,000 messages (1.6 M deliveries), kadmq and rumqttd 0.20
# alternating, QoS 1 then QoS 0 (docs/BENCHMARKS.md, "Against rumqttd").
#
#   benches/fanout.sh              # 5 repetitions
#   REPEATS=3 benches/fanout.sh
#
# Starts each broker fresh on loopback, kills it by its PID. Needs rumqttd on
# PATH (`cargo install rumqttd`, not --locked; benches/run.sh installs it).
# Prints one line per run and the medians.
set -euo pipefail

REPEATS=${REPEATS:-5}
MESSAGES=${MESSAGES:-200000}
KPORT=${KPORT:-28840}
RPORT=${RPORT:-28842}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-$(mktemp -d /tmp/kadmq-fanout.XXXXXX)}
mkdir -p "$WORK"
log() { echo "[fanout.sh] $*" >&2; }

RUMQTTD_BIN=$(command -v rumqttd || true)
[[ -n $RUMQTTD_BIN ]] || { log "rumqttd is not installed (cargo install rumqttd): nothing to compare with"; exit 1; }
(cd "$ROOT" && cargo build --release --bin kadmq --bin kadmq-loadgen)
cp "$ROOT/target/release/kadmq" "$ROOT/target/release/kadmq-loadgen" "$WORK/"

PID=
cleanup() { [[ -z $PID ]] || { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }; }
trap cleanup EXIT

# shellcheck source=benches/rumqttd.sh
source "$ROOT/benches/rumqttd.sh"
write_rumqttd_config "$WORK/rumqttd.toml" "$RPORT"

: >"$WORK/results.txt"
for qos in 1 0; do
    for rep in $(seq 1 "$REPEATS"); do
        for broker in kadmq rumqttd; do
            if [[ $broker == kadmq ]]; then
                rm -rf "$WORK/data"
                "$WORK/kadmq" start --no-ws --data-dir "$WORK/data" --log warn --mqtt "127.0.0.1:$KPORT" \
                    --sys-interval 0 --max-queued-messages 1000000 >>"$WORK/kadmq.log" 2>&1 &
                PID=$!
                port=$KPORT
            else
                "$RUMQTTD_BIN" -q -c "$WORK/rumqttd.toml" >>"$WORK/rumqttd.log" 2>&1 &
                PID=$!
                port=$RPORT
            fi
            sleep 0.5
            out=$(timeout 90 "$WORK/kadmq-loadgen" --pub-addrs "127.0.0.1:$port" --mode fan-out --publishers 1 \
                --subscribers 8 --qos "$qos" --messages "$MESSAGES" --payload 64 --mqtt-version 3 --keep-alive 60 \
                --duration-limit 60 --drain 3 --json 2>>"$WORK/loadgen.err") || true
            kill "$PID" 2>/dev/null || true
            wait "$PID" 2>/dev/null || true
            PID=
            line=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(round(d["throughput_msg_s"]), round(d["elapsed_s"], 2), d["lost"])' "$out" 2>/dev/null || echo "0 0 ?")
            echo "qos$qos $rep $broker $line" | tee -a "$WORK/results.txt" >&2
        done
    done
done

python3 - "$WORK/results.txt" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
for qos in ("qos1", "qos0"):
    med = {b: statistics.median(int(r[3]) for r in rows if r[0] == qos and r[2] == b) for b in ("kadmq", "rumqttd")}
    print(f"{qos}-fanout: kadmq {med['kadmq']:,.0f} msg/s, rumqttd {med['rumqttd']:,.0f} msg/s, ratio {med['kadmq'] / max(med['rumqttd'], 1):.2f}")
EOF
