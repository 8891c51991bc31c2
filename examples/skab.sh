#!/usr/bin/env bash
# Anomaly detection on real data: SKAB (Skoltech Anomaly Benchmark) through Shoal.
#
#   bash examples/skab.sh [SKAB_DIR]
#
# SKAB_DIR defaults to ../shared/datasets/skab/data (the layout of the SKAB repository:
# valve1/*.csv, other/*.csv, ...). The data is GPL-3.0 and is not shipped with Shoal; put
# SKAB's `data` directory somewhere and pass its path. Each file is backfilled into its own
# topic with its original timestamps, two detectors run over it, and the alerts are scored
# against SKAB's `anomaly` column.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/datasets/skab/data}
if [ ! -d "$DATA" ]; then
  echo "SKAB data not found at $DATA." >&2
  echo "Put SKAB's data directory there (valve1/0.csv, other/1.csv, ...) or pass its path:" >&2
  echo "  bash examples/skab.sh /path/to/SKAB/data" >&2
  exit 2
fi
cargo build --release -q -p shoal -p simulator
cargo build -q --profile wasm --target wasm32-unknown-unknown -p zscore -p rate-of-change
SHOAL=./target/release/shoal
SIM=./target/release/shoal-sim
WASM=target/wasm32-unknown-unknown/wasm
WORK=$(mktemp -d)
HTTP_PORT=${HTTP_PORT:-18089}
export SHOAL_URL=http://127.0.0.1:$HTTP_PORT
$SHOAL up --data-dir "$WORK/data" --mqtt-addr 127.0.0.1:0 --http-addr 127.0.0.1:$HTTP_PORT --log warn &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 100); do curl -sf "$SHOAL_URL/readyz" >/dev/null && break; sleep 0.05; done

# SKAB sensors are noisy and drift slowly; its anomalies are sustained faults (minutes),
# so the z-score uses the level's spread and a short warm-up per experiment.
echo '{"threshold": 3.5, "alpha": 0.02, "warmup": 60, "adapt_after": 1000000}' > "$WORK/z.json"
$SHOAL consumer deploy skab-z $WASM/zscore.wasm --filter 'sensors/#' --config "$WORK/z.json" >/dev/null

# anomaly-free.csv is SKAB's training file: the benchmark scores the experiments only.
files=$(find "$DATA" -name '*.csv' ! -path '*anomaly-free*' | sort)
n=0
for f in $files; do
  $SIM backfill "$f" --state none >/dev/null
  n=$((n + 1))
done
for _ in $(seq 1 600); do
  lag=$($SHOAL consumer list | awk 'NR>1 {s += $7} END {print s + 0}')
  [ "$lag" = "0" ] && break
  sleep 0.1
done
echo "== $n SKAB files backfilled; scoring (SKAB's published leaderboard: F1 0.29 to 0.78)"
$SIM score --labels "$DATA" --url "$SHOAL_URL" --consumer skab-z --tolerance 0s --points "$DATA"
