#!/usr/bin/env bash
# Quick start: a three-node Shoal cluster, three anomaly detectors, a generated sensor fleet
# (its history backfilled through node 1, then replayed live over MQTT to node 2), and the
# alerts arriving — over MQTT on node 3, the CLI and the scorer. Then node 3 is killed and
# the cluster keeps going.
#
#   bash examples/quickstart.sh
#
# Everything runs on 127.0.0.1 (ports 1883x, 1808x, 1707x, 1794x) and is cleaned up on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building shoal, shoal-sim and the example consumers"
cargo build --release -q -p shoal -p simulator
cargo build -q --profile wasm --target wasm32-unknown-unknown -p zscore -p flatline -p missing-data
SHOAL=./target/release/shoal
SIM=./target/release/shoal-sim
WASM=target/wasm32-unknown-unknown/wasm
WORK=$(mktemp -d)
export SHOAL_URL=http://127.0.0.1:18081
pids=()
declare -A node_pid=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

echo "== starting a three-node cluster (data in $WORK/n1..n3)"
for i in 1 2 3; do
  seed=()
  [ "$i" != 1 ] && seed=(--seed 127.0.0.1:17941)
  $SHOAL up --node-id "n$i" --data-dir "$WORK/n$i" --mqtt-addr "127.0.0.1:1883$i" \
    --http-addr "127.0.0.1:1808$i" --peer-addr "127.0.0.1:1707$i" \
    --gossip-addr "127.0.0.1:1794$i" "${seed[@]}" --log warn &
  pids+=($!)
  node_pid[$i]=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:1808$i/readyz" >/dev/null && break; sleep 0.05; done
done
for _ in $(seq 1 100); do
  live=$(curl -sf "$SHOAL_URL/v1/cluster" | grep -o '"live":true' | wc -l)
  [ "$live" = 3 ] && break
  sleep 0.1
done
$SHOAL cluster | head -n 5

echo "== deploying three detectors"
echo '{"threshold": 5, "warmup": 30, "scale": "diff"}' > "$WORK/zscore.json"
echo '{"min_count": 30}' > "$WORK/flatline.json"
echo '{"max_gap_ms": 60000}' > "$WORK/gaps.json"
$SHOAL consumer deploy spikes  $WASM/zscore.wasm       --filter 'sensors/#' --config "$WORK/zscore.json"
$SHOAL consumer deploy stuck   $WASM/flatline.wasm     --filter 'sensors/#' --config "$WORK/flatline.json"
$SHOAL consumer deploy gaps    $WASM/missing_data.wasm --filter 'sensors/#' --config "$WORK/gaps.json"

echo "== generating 20 devices x 5 sensors x 2 hours with labelled anomalies"
$SIM generate --devices 20 --duration 2h --seed 42 --out "$WORK/history.csv"

echo "== watching alerts over MQTT on node 3 (mosquitto_sub, if installed)"
if command -v mosquitto_sub >/dev/null; then
  mosquitto_sub -p 18833 -t 'shoal/alerts/#' -v > "$WORK/mqtt-alerts.txt" &
  pids+=($!)
fi

echo "== backfilling the history with its event times, through node 1"
$SIM backfill "$WORK/history.csv" --state none
# Each partition is processed by its owner: wait until every node's consumers caught up.
for _ in $(seq 1 600); do
  lag=0
  for i in 1 2 3; do
    l=$(SHOAL_URL=http://127.0.0.1:1808$i $SHOAL consumer list | awk 'NR>1 {s += $7} END {print s + 0}')
    lag=$((lag + l))
  done
  [ "$lag" = "0" ] && break
  sleep 0.1
done
$SHOAL consumer list

echo "== a few alerts"
$SHOAL alerts | head -n 3
[ -f "$WORK/mqtt-alerts.txt" ] && echo "   ($(wc -l < "$WORK/mqtt-alerts.txt") alerts arrived over MQTT so far)"

echo "== scoring the alerts against the labels (spikes, stuck values, dropouts)"
$SIM score --labels "$WORK/history.labels.jsonl" --url "$SHOAL_URL" --kinds spike,stuck,dropout

echo "== killing node 3: writes and reads go on (quorum = 2 of 3)"
kill -9 "${node_pid[3]}"
echo "== replaying 2 minutes of fresh readings live over MQTT to node 2 at 10x speed"
$SIM generate --devices 20 --duration 2m --seed 43 --start 2026-01-01T02:00:00Z --out "$WORK/live.csv" >/dev/null
$SIM replay "$WORK/live.csv" --port 18832 --speed 10 --qos 1
$SHOAL cluster | head -n 5
echo "done."
