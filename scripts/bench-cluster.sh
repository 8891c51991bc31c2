#!/usr/bin/env bash
# Cluster benchmark on one machine: three `shoal up` processes on 127.0.0.11-13 (telemetry:
# 8 partitions, RF 3, acks=quorum) against one node, under the same QoS 1 load, in the same
# run, interleaved (single, cluster, single, ...), RUNS repetitions, medians reported.
#
# Measures:
#  1. QoS 1 100-byte ingest flat out, CONNS connections split over three load generators
#     (pointed at the one node, or one per cluster node): acked msgs/s and the ratio;
#  2. replication lag: publish at LAG_RATE/s to node 1, receive on node 2 (shoal-sim lag);
#  3. re-replication: REREP records loaded into the cluster, node 3 killed and its data
#     wiped, restarted empty: time until every telemetry partition has the same digest on
#     all three replicas again (records/s).
# Prints a markdown table and writes it to target/bench-cluster.md. BENCHMARKS.md explains it.
#
# Usage: bash scripts/bench-cluster.sh
# Knobs (env): RUNS (3), CONNS (30), MSGS (300000), WINDOW (20), LAG_RATE (2000),
#   LAG_SECS (10), REREP (1000000), SKIP_INGEST=1 (lag and re-replication only),
#   CARGO_TARGET_DIR (./target).
# Needs: cargo, curl, python3. Listens on 127.0.0.11-13 only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
RUNS=${RUNS:-3}
CONNS=${CONNS:-30}
MSGS=${MSGS:-300000}
WINDOW=${WINDOW:-20}
LAG_RATE=${LAG_RATE:-2000}
LAG_SECS=${LAG_SECS:-10}
REREP=${REREP:-1000000}
RESULTS_MD="$ROOT/target/bench-cluster.md"

for tool in curl python3; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is required" >&2; exit 1; }
done
echo "bench: building release binaries"
cargo build --release -p shoal -p simulator
SHOAL="$CARGO_TARGET_DIR/release/shoal"
SIM="$CARGO_TARGET_DIR/release/shoal-sim"
WORK=$(mktemp -d -t shoal-cluster-bench.XXXXXX)
declare -A PIDS=()
cat >"$WORK/shoal.toml" <<EOF
[cluster]
gossip_interval = "200ms"
anti_entropy_interval = "2s"
EOF

stop_node() { # i: SIGTERM, wait, then SIGKILL
  local pid=${PIDS[$1]:-}
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  PIDS[$1]=""
}
cleanup() { for i in 1 2 3; do stop_node "$i"; done; rm -rf "$WORK"; }
trap cleanup EXIT

start_node() { # i [seed]: node i on 127.0.0.1i, data in $WORK/n$i
  local i=$1 ip="127.0.0.1$1" seed=()
  [ -n "${2:-}" ] && seed=(--seed "$2")
  "$SHOAL" up --node-id "n$i" --data-dir "$WORK/n$i" --config "$WORK/shoal.toml" \
    --mqtt-addr "$ip:1883" --http-addr "$ip:8080" --peer-addr "$ip:7070" \
    --gossip-addr "$ip:7946" "${seed[@]}" --log warn 2>>"$WORK/n$i.log" &
  PIDS[$i]=$!
  until curl -sf -o /dev/null "http://$ip:8080/readyz"; do sleep 0.05; done
}

live_members() { # i
  curl -sf "http://127.0.0.1$1:8080/v1/cluster" |
    python3 -c 'import json,sys; print(sum(m["live"] for m in json.load(sys.stdin)["members"]))'
}

start_cluster() {
  rm -rf "$WORK"/n1 "$WORK"/n2 "$WORK"/n3
  start_node 1
  start_node 2 127.0.0.11:7946
  start_node 3 127.0.0.11:7946
  for i in 1 2 3; do until [ "$(live_members "$i")" = 3 ]; do sleep 0.1; done; done
}

converged() { # topic: all partitions converged, seen from node 1
  curl -sf "http://127.0.0.11:8080/v1/topics/$1" | python3 -c '
import json, sys
v = json.load(sys.stdin)
sys.exit(0 if all(p.get("converged") for p in v["partitions_detail"]) else 1)'
}

load() { # hosts...: one generator per host, CONNS/3 connections and MSGS/3 messages each
  local outs=() pids=() k=0
  for h in "$@"; do
    "$SIM" load --host "$h" --port 1883 --connections $((CONNS / 3)) --messages $((MSGS / 3)) \
      --inflight "$WINDOW" --qos 1 --payload-size 100 --topic-prefix "bench/$k" \
      --client-id-prefix "g$k-$RANDOM" --json >"$WORK/load.$k" &
    pids+=($!)
    outs+=("$WORK/load.$k")
    k=$((k + 1))
  done
  for p in "${pids[@]}"; do wait "$p"; done
  python3 -c '
import json, sys
print(round(sum(json.load(open(f))["msgs_per_s"] for f in sys.argv[1:])))' "${outs[@]}"
}

single=()
cluster=()
if [ "${SKIP_INGEST:-0}" = 1 ]; then # only lag and re-replication (for a quick re-run)
  start_cluster
  single=(1) cluster=(1)
fi
for run in $(seq "$RUNS"); do
  [ "${SKIP_INGEST:-0}" = 1 ] && break
  rm -rf "$WORK/n1"
  start_node 1
  single+=("$(load 127.0.0.11 127.0.0.11 127.0.0.11)")
  stop_node 1
  start_cluster
  cluster+=("$(load 127.0.0.11 127.0.0.12 127.0.0.13)")
  echo "bench: run $run: single ${single[-1]} msgs/s, cluster ${cluster[-1]} msgs/s"
  if [ "$run" = "$RUNS" ]; then break; fi
  for i in 1 2 3; do stop_node "$i"; done
done

echo "bench: replication lag"
lags=()
for run in $(seq "$RUNS"); do
  lags+=("$("$SIM" lag --publish-to 127.0.0.11:1883 --subscribe-to 127.0.0.12:1883 \
    --rate "$LAG_RATE" --seconds "$LAG_SECS" --json)")
done

echo "bench: re-replication of $REREP records"
python3 - "$REREP" <<'EOF'
import json, sys, urllib.request
n = int(sys.argv[1])
step = 50_000
for start in range(0, n, step):
    body = "".join(json.dumps({"subject": f"plant/{i % 500}", "payload": i}) + "\n"
                   for i in range(start, min(n, start + step))).encode()
    req = urllib.request.Request("http://127.0.0.11:8080/v1/topics/telemetry/records", data=body, method="POST")
    urllib.request.urlopen(req, timeout=300).read()
EOF
until converged telemetry; do sleep 0.2; done
kill -KILL "${PIDS[3]}" 2>/dev/null || true
wait "${PIDS[3]}" 2>/dev/null || true
PIDS[3]=""
rm -rf "$WORK/n3"
t0=$(date +%s.%N)
start_node 3 127.0.0.11:7946
# Converged only counts once node 1 sees the new node 3 as a live replica again.
until [ "$(live_members 1)" = 3 ] && converged telemetry; do sleep 0.05; done
t1=$(date +%s.%N)
held=$(curl -sf "http://127.0.0.13:8080/v1/topics/telemetry?scope=local" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["records"])')

python3 - "$RESULTS_MD" "$t0" "$t1" "$held" "$REREP" "${single[*]}" "${cluster[*]}" "${lags[@]}" <<'EOF'
import json, statistics, sys
out, t0, t1, held, rerep = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
single = [float(x) for x in sys.argv[6].split()]
cluster = [float(x) for x in sys.argv[7].split()]
lags = [json.loads(x) for x in sys.argv[8:]]
ratio = [c / s for s, c in zip(single, cluster)]
med = statistics.median
secs = t1 - t0
lines = [
    "| Measure | Median | Runs | Target |",
    "|---|---|---|---|",
    f"| QoS 1 ingest, one node (msgs/s) | {med(single):,.0f} | {', '.join(f'{x:,.0f}' for x in single)} | |",
    f"| QoS 1 ingest, 3 nodes RF 3 acks=quorum (msgs/s) | {med(cluster):,.0f} | {', '.join(f'{x:,.0f}' for x in cluster)} | |",
    f"| Ratio cluster / one node | {med(ratio):.2f} | {', '.join(f'{x:.2f}' for x in ratio)} | >= 0.5 |",
    f"| Replication lag p50 (ms) at {lags[0]['rate']}/s | {med(l['p50_ms'] for l in lags):.2f} | {', '.join(str(l['p50_ms']) for l in lags)} | |",
    f"| Replication lag p99 (ms) | {med(l['p99_ms'] for l in lags):.2f} | {', '.join(str(l['p99_ms']) for l in lags)} | |",
    f"| Re-replication to a wiped node: {held:,} records | {held / secs:,.0f} records/s ({secs:.1f} s) | 1 | >= 200k/s |",
]
text = "\n".join(lines)
print(text)
open(out, "w").write(text + "\n")
EOF
