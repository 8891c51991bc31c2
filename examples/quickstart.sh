#!/usr/bin/env bash
# Quick start: a Shoal node, three anomaly detectors, a generated sensor fleet (its history
# backfilled, then replayed live over MQTT), and the alerts arriving — over MQTT, the CLI
# and the scorer.
#
#   bash examples/quickstart.sh
#
# Clustering is not in this build yet, so this runs one node (the three-node version
# comes with it). Everything runs on 127.0.0.1 and is cleaned up on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building shoal, shoal-sim and the example consumers"
cargo build --release -q -p shoal -p simulator
cargo build -q --profile wasm --target wasm32-unknown-unknown -p zscore -p flatline -p missing-data
SHOAL=./target/release/shoal
SIM=./target/release/shoal-sim
WASM=target/wasm32-unknown-unknown/wasm
WORK=$(mktemp -d)
MQTT_PORT=${MQTT_PORT:-18830}
HTTP_PORT=${HTTP_PORT:-18088}
export SHOAL_URL=http://127.0.0.1:$HTTP_PORT
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

echo "== starting a node (data in $WORK/data)"
$SHOAL up --data-dir "$WORK/data" --mqtt-addr 127.0.0.1:$MQTT_PORT --http-addr 127.0.0.1:$HTTP_PORT --log warn &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "$SHOAL_URL/readyz" >/dev/null && break; sleep 0.05; done

echo "== deploying three detectors"
echo '{"threshold": 5, "warmup": 30, "scale": "diff"}' > "$WORK/zscore.json"
echo '{"min_count": 30}' > "$WORK/flatline.json"
echo '{"max_gap_ms": 60000}' > "$WORK/gaps.json"
$SHOAL consumer deploy spikes  $WASM/zscore.wasm       --filter 'sensors/#' --config "$WORK/zscore.json"
$SHOAL consumer deploy stuck   $WASM/flatline.wasm     --filter 'sensors/#' --config "$WORK/flatline.json"
$SHOAL consumer deploy gaps    $WASM/missing_data.wasm --filter 'sensors/#' --config "$WORK/gaps.json"

echo "== generating 20 devices x 5 sensors x 2 hours with labelled anomalies"
$SIM generate --devices 20 --duration 2h --seed 42 --out "$WORK/history.csv"

echo "== watching alerts over MQTT (mosquitto_sub, if installed)"
if command -v mosquitto_sub >/dev/null; then
  mosquitto_sub -p $MQTT_PORT -t 'shoal/alerts/#' -v > "$WORK/mqtt-alerts.txt" &
  pids+=($!)
fi

echo "== backfilling the history with its event times"
$SIM backfill "$WORK/history.csv" --state none
for _ in $(seq 1 300); do
  lag=$($SHOAL consumer list | awk 'NR>1 {s += $7} END {print s + 0}')
  [ "$lag" = "0" ] && break
  sleep 0.1
done
$SHOAL consumer list

echo "== a few alerts"
$SHOAL alerts | head -n 3
[ -f "$WORK/mqtt-alerts.txt" ] && echo "   ($(wc -l < "$WORK/mqtt-alerts.txt") alerts arrived over MQTT so far)"

echo "== scoring the alerts against the labels (spikes, stuck values, dropouts)"
$SIM score --labels "$WORK/history.labels.jsonl" --url "$SHOAL_URL" --kinds spike,stuck,dropout

echo "== replaying 2 minutes of fresh readings live over MQTT at 10x speed"
$SIM generate --devices 20 --duration 2m --seed 43 --start 2026-01-01T02:00:00Z --out "$WORK/live.csv" >/dev/null
$SIM replay "$WORK/live.csv" --port $MQTT_PORT --speed 10 --qos 1
echo "done."
