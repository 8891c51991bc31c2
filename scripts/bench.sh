#!/usr/bin/env bash
# Reproducible single-machine benchmark: Shoal vs Debian's mosquitto, same load generator,
# same run, interleaved (Shoal, mosquitto, Shoal, ...), RUNS repetitions, medians reported.
#
# Measures: Shoal start-up time (spawn -> /readyz), idle RSS, QoS 1 100-byte ingest flat out
# at 1, 10 and 100 connections (acked msgs/s, ack latency), RSS under load and peak RSS,
# server CPU-seconds per million messages, ack latency at half the 10-connection peak rate,
# and (if node/examples/storage_bench.rs exists) the raw storage append rate.
# Prints a markdown table and writes it to target/bench-results.md. BENCHMARKS.md explains it.
#
# Usage: bash scripts/bench.sh
# Knobs (env): RUNS (3), MSGS_1 / MSGS_10 / MSGS_100 (messages per flat-out run), WINDOW (20),
#   HALF_SECS (8, length of each half-rate run), PIN=1 (server on CPU 1, generator on CPU 0),
#   STORAGE_RECORDS (argument to storage_bench), CARGO_TARGET_DIR (./target).
# Needs: cargo, curl, python3, /usr/sbin/mosquitto. Listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

RUNS=${RUNS:-3}
WINDOW=${WINDOW:-20}
PAYLOAD=100
QOS=1
CONNS=(1 10 100)
declare -A MSGS=([1]=${MSGS_1:-100000} [10]=${MSGS_10:-400000} [100]=${MSGS_100:-1000000})
HALF_SECS=${HALF_SECS:-8}
MQTT_PORT=21883
HTTP_PORT=28080
MOSQ_PORT=21884
MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
RESULTS_MD="$ROOT/target/bench-results.md"

for tool in curl python3; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is required" >&2; exit 1; }
done
[ -x "$MOSQUITTO" ] || { echo "bench: $MOSQUITTO not found (apt-get install mosquitto)" >&2; exit 1; }

SERVER_CPU=()
GEN_CPU=()
if [ "${PIN:-0}" = 1 ]; then
  SERVER_CPU=(taskset -c 1)
  GEN_CPU=(taskset -c 0)
fi

echo "bench: building release binaries (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo build --release -p shoal -p simulator
SHOAL="$CARGO_TARGET_DIR/release/shoal"
SIM="$CARGO_TARGET_DIR/release/shoal-sim"

WORK=$(mktemp -d -t shoal-bench.XXXXXX)
SHOAL_PID=""
MOSQ_PID=""
SAMPLER_PID=""
stop() { # stop PID: SIGTERM, wait up to 5 s, then SIGKILL
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  stop "$SAMPLER_PID"
  stop "$SHOAL_PID"
  stop "$MOSQ_PID"
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for port in $MQTT_PORT $HTTP_PORT $MOSQ_PORT; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "bench: 127.0.0.1:$port is already in use; stop whatever listens there" >&2
    exit 1
  fi
done

RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
now_ns() { date +%s%N; }
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
CLK_TCK=$(getconf CLK_TCK)

start_shoal() { # start_shoal RUN: fresh data dir; sets SHOAL_PID and STARTUP_MS
  local dir="$WORK/shoal-data-$1"
  local t0
  t0=$(now_ns)
  "${SERVER_CPU[@]}" "$SHOAL" up --data-dir "$dir" --node-id bench \
    --mqtt-addr "127.0.0.1:$MQTT_PORT" --http-addr "127.0.0.1:$HTTP_PORT" --log warn \
    >"$WORK/shoal-$1.log" 2>&1 &
  SHOAL_PID=$!
  until curl -sf -o /dev/null "http://127.0.0.1:$HTTP_PORT/readyz"; do
    if ! kill -0 "$SHOAL_PID" 2>/dev/null; then
      echo "bench: shoal exited during start-up:" >&2
      cat "$WORK/shoal-$1.log" >&2
      exit 1
    fi
    if [ $(( ($(now_ns) - t0) / 1000000 )) -gt 30000 ]; then
      echo "bench: shoal not ready after 30 s" >&2
      exit 1
    fi
    sleep 0.005
  done
  STARTUP_MS=$(( ($(now_ns) - t0) / 1000000 ))
}

# mosquitto leaves Nagle on by default, which holds a PUBACK back until the client's next
# PUBLISH carries the TCP ACK (~1-2 ms at paced rates); set_tcp_nodelay gives it its best
# latency (Shoal sets TCP_NODELAY too). Persistence off: mosquitto acks QoS 1 from memory.
start_mosquitto() {
  cat >"$WORK/mosquitto.conf" <<EOF
listener $MOSQ_PORT 127.0.0.1
allow_anonymous true
persistence false
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
EOF
  "${SERVER_CPU[@]}" "$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
  MOSQ_PID=$!
  for _ in $(seq 1000); do
    (exec 3<>"/dev/tcp/127.0.0.1/$MOSQ_PORT") 2>/dev/null && return 0
    kill -0 "$MOSQ_PID" 2>/dev/null || break
    sleep 0.01
  done
  echo "bench: mosquitto did not start:" >&2
  cat "$WORK/mosquitto.log" >&2
  exit 1
}

# load SERVER PID PORT PHASE RUN CONNS MESSAGES [RATE]: one shoal-sim run; appends a JSON
# line with the generator's report, the server's max sampled RSS and its CPU time.
load() {
  local server=$1 pid=$2 port=$3 phase=$4 run=$5 conns=$6 msgs=$7 rate=${8:-0}
  local samples="$WORK/rss-samples" out="$WORK/sim.json" cpu0 cpu1
  : >"$samples"
  (while kill -0 "$pid" 2>/dev/null; do status_kb "$pid" VmRSS >>"$samples"; sleep 0.1; done) &
  SAMPLER_PID=$!
  cpu0=$(cpu_ticks "$pid")
  if ! "${GEN_CPU[@]}" "$SIM" load --host 127.0.0.1 --port "$port" --connections "$conns" \
    --messages "$msgs" --qos "$QOS" --payload-size "$PAYLOAD" --inflight "$WINDOW" \
    --rate "$rate" --topic-prefix bench --json >"$out"; then
    echo "bench: load generator failed against $server ($phase, $conns connections)" >&2
    exit 1
  fi
  cpu1=$(cpu_ticks "$pid")
  stop "$SAMPLER_PID"
  SAMPLER_PID=""
  python3 - "$out" "$samples" "$server" "$phase" "$run" "$((cpu1 - cpu0))" "$CLK_TCK" \
    "$(status_kb "$pid" VmHWM)" >>"$RESULTS" <<'PY'
import json, sys
out, samples, server, phase, run, ticks, tck, hwm = sys.argv[1:]
sim = json.load(open(out))
rss = [int(x) for x in open(samples).read().split() if x.isdigit()]
print(json.dumps({"kind": "load", "server": server, "phase": phase, "run": int(run),
                  "sim": sim, "rss_max_kb": max(rss, default=0), "hwm_kb": int(hwm or 0),
                  "cpu_s": int(ticks) / int(tck)}))
PY
  python3 -c '
import json, sys
r = json.loads(sys.stdin.readlines()[-1]); s = r["sim"]; l = s["latency_ms"] or {}
i = s["latency_from_intended_ms"]
print("  %-9s %-5s n=%-3d run %d: %8.0f msgs/s  p50 %s ms  p99 %s ms%s  rss %.1f MiB  cpu %.2f s" % (
  r["server"], r["phase"], s["connections"], r["run"], s["msgs_per_s"], l.get("p50"),
  l.get("p99"), " (intended p99 %s ms)" % i["p99"] if i else "", r["rss_max_kb"] / 1024,
  r["cpu_s"]))' <"$RESULTS"
}

note() { # note KEY VALUE: a scalar measurement for the table
  printf '{"kind": "note", "key": "%s", "value": %s}\n' "$1" "$2" >>"$RESULTS"
}

median_rate() { # median msgs/s of SERVER PHASE CONNS in RUN
  python3 - "$RESULTS" "$@" <<'PY'
import json, sys, statistics
path, server, phase, conns, run = sys.argv[1:]
rows = [json.loads(l) for l in open(path)]
v = [r["sim"]["msgs_per_s"] for r in rows if r["kind"] == "load" and r["server"] == server
     and r["phase"] == phase and r["sim"]["connections"] == int(conns) and r["run"] == int(run)]
print(int(statistics.median(v)))
PY
}

echo "bench: $(nproc) CPUs, $(uname -r), $("$MOSQUITTO" -h 2>&1 | head -1), RUNS=$RUNS"
start_mosquitto
sleep 1
note mosquitto_idle_rss_kb "$(status_kb "$MOSQ_PID" VmRSS)"
for run in $(seq "$RUNS"); do
  echo "bench: run $run/$RUNS"
  start_shoal "$run"
  sleep 1
  note startup_ms "$STARTUP_MS"
  note idle_rss_kb "$(status_kb "$SHOAL_PID" VmRSS)"
  echo "  shoal start-up ${STARTUP_MS} ms, idle RSS $(status_kb "$SHOAL_PID" VmRSS) KiB"
  for n in "${CONNS[@]}"; do
    load shoal "$SHOAL_PID" "$MQTT_PORT" peak "$run" "$n" "${MSGS[$n]}"
    load mosquitto "$MOSQ_PID" "$MOSQ_PORT" peak "$run" "$n" "${MSGS[$n]}"
  done
  # Half of this run's 10-connection peak, for both servers at the same rate.
  half=$(( $(median_rate shoal peak 10 "$run") / 2 ))
  load shoal "$SHOAL_PID" "$MQTT_PORT" half "$run" 10 $((half * HALF_SECS)) "$half"
  load mosquitto "$MOSQ_PID" "$MOSQ_PORT" half "$run" 10 $((half * HALF_SECS)) "$half"
  note peak_rss_kb "$(status_kb "$SHOAL_PID" VmHWM)"
  note db_bytes "$(du -sb "$WORK/shoal-data-$run" | cut -f1)"
  stop "$SHOAL_PID"
  SHOAL_PID=""
  rm -rf "$WORK/shoal-data-$run"
done
note mosquitto_peak_rss_kb "$(status_kb "$MOSQ_PID" VmHWM)"
stop "$MOSQ_PID"
MOSQ_PID=""

STORAGE_LINE=""
if [ -f node/examples/storage_bench.rs ]; then
  echo "bench: storage append (cargo run --release -p shoal --example storage_bench)"
  STORAGE_LINE=$(cargo run -q --release -p shoal --example storage_bench -- ${STORAGE_RECORDS:+"$STORAGE_RECORDS"} | tail -1)
  echo "  $STORAGE_LINE"
else
  echo "bench: node/examples/storage_bench.rs does not exist yet; storage append not measured"
fi

mkdir -p "$(dirname "$RESULTS_MD")"
python3 - "$RESULTS" "$RUNS" "$WINDOW" "$STORAGE_LINE" "$(nproc)" >"$RESULTS_MD" <<'PY'
import json, statistics, sys
path, runs, window, storage, cpus = sys.argv[1:]
rows = [json.loads(l) for l in open(path)]
loads = [r for r in rows if r["kind"] == "load"]
def med(v):
    return statistics.median(v) if v else float("nan")
def spread(v):
    return "%s–%s" % (fmt(min(v)), fmt(max(v))) if v else "n/a"
def fmt(x):
    return "%.0f" % x if abs(x) >= 100 or float(x).is_integer() else "%.2f" % x
def notes(key):
    return [r["value"] for r in rows if r["kind"] == "note" and r["key"] == key]
def sel(server, phase, n):
    return [r for r in loads if r["server"] == server and r["phase"] == phase
            and r["sim"]["connections"] == n]
def lat(rs, q, key="latency_ms"):
    return [r["sim"][key][q] for r in rs if r["sim"].get(key)]
def verdict(ok):
    return "met" if ok else "**not met**"
out = []
w = out.append
w("## Results (medians of %s runs; range in brackets)" % runs)
w("")
w("QoS 1, 100-byte payloads, window %s unacked per connection, %s CPUs shared by server and load generator." % (window, cpus))
w("")
w("| Connections | Shoal msgs/s | mosquitto msgs/s | Shoal / mosquitto | Shoal ack p50 / p99 / p99.9 ms | mosquitto ack p50 / p99 ms | CPU-s per 1M msgs, Shoal / mosquitto |")
w("|---:|---:|---:|---:|---:|---:|---:|")
ratios = {}
for n in (1, 10, 100):
    s, m = sel("shoal", "peak", n), sel("mosquitto", "peak", n)
    sr = [r["sim"]["msgs_per_s"] for r in s]
    mr = [r["sim"]["msgs_per_s"] for r in m]
    per_run = [a["sim"]["msgs_per_s"] / b["sim"]["msgs_per_s"]
               for a in s for b in m if a["run"] == b["run"] and b["sim"]["msgs_per_s"]]
    ratios[n] = med(per_run)
    cpu = lambda rs: med([r["cpu_s"] / r["sim"]["messages_measured"] * 1e6 for r in rs])
    w("| %d | %.0f [%s] | %.0f [%s] | **%.2f** [%s] | %.2f / %.2f / %.2f | %.2f / %.2f | %.1f / %.1f |" % (
        n, med(sr), spread(sr), med(mr), spread(mr), ratios[n], spread(per_run),
        med(lat(s, "p50")), med(lat(s, "p99")), med(lat(s, "p999")),
        med(lat(m, "p50")), med(lat(m, "p99")), cpu(s), cpu(m)))
w("")
hs, hm = sel("shoal", "half", 10), sel("mosquitto", "half", 10)
w("Half-rate run (10 connections paced at half of Shoal's 10-connection peak, median target %.0f msgs/s):" % med([r["sim"]["rate_target"] for r in hs]))
w("")
w("| Server | achieved msgs/s | ack p50 ms | ack p99 ms | ack p99.9 ms | p99 from intended send time ms |")
w("|---|---:|---:|---:|---:|---:|")
for name, rs in (("Shoal", hs), ("mosquitto", hm)):
    w("| %s | %.0f | %.2f | %.2f | %.2f | %.2f |" % (name, med([r["sim"]["msgs_per_s"] for r in rs]),
        med(lat(rs, "p50")), med(lat(rs, "p99")), med(lat(rs, "p999")),
        med(lat(rs, "p99", "latency_from_intended_ms"))))
w("")
load_rss = [r["rss_max_kb"] / 1024 for r in loads if r["server"] == "shoal"]
mload_rss = [r["rss_max_kb"] / 1024 for r in loads if r["server"] == "mosquitto"]
startup = notes("startup_ms")
idle = [k / 1024 for k in notes("idle_rss_kb")]
peak = [k / 1024 for k in notes("peak_rss_kb")]
half_p99 = med(lat(hs, "p99"))
half_p99_intended = med(lat(hs, "p99", "latency_from_intended_ms"))
w("| Target | Measured (median) | Verdict |")
w("|---|---|---|")
w("| QoS 1 ingest, every acked record fsynced, >= mosquitto QoS 1 (ratio >= 1.0) | ratio %s at 1 / 10 / 100 connections | %s |" % (
    " / ".join("%.2f" % ratios[n] for n in (1, 10, 100)),
    ", ".join("%d conn: %s" % (n, verdict(ratios[n] >= 1.0)) for n in (1, 10, 100))))
w("| Ack latency p99 < 10 ms at half the peak rate | %.2f ms send -> ack; %.2f ms from intended send time | %s send -> ack; %s from intended send time |" % (
    half_p99, half_p99_intended, verdict(half_p99 < 10), verdict(half_p99_intended < 10)))
w("| RSS under load < 100 MiB | %.1f MiB max sampled (peak VmHWM %.1f MiB; mosquitto %.1f MiB) | %s |" % (
    max(load_rss, default=0), med(peak), max(mload_rss, default=0),
    verdict(max(load_rss + peak, default=0) < 100)))
w("| Idle RSS < 30 MiB | %.1f MiB [%s] (mosquitto %.1f MiB) | %s |" % (
    med(idle), spread(idle), med([k / 1024 for k in notes("mosquitto_idle_rss_kb")]), verdict(med(idle) < 30)))
w("| Start-up (spawn -> /readyz) < 200 ms | %.0f ms [%s] | %s |" % (med(startup), spread(startup), verdict(med(startup) < 200)))
w("")
w("Storage append (`cargo run --release -p shoal --example storage_bench`): " + (storage if storage else "node/examples/storage_bench.rs did not exist when this ran; not measured."))
w("")
w("Shoal database size after each run: %s MiB." % ", ".join("%.0f" % (b / 2**20) for b in notes("db_bytes")))
print("\n".join(out))
PY

echo
cat "$RESULTS_MD"
echo
echo "bench: table written to $RESULTS_MD"
