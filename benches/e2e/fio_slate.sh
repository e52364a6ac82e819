#!/usr/bin/env bash
# End-to-end data-path benchmark: starts `slate up` (3 meta + 3 storage nodes, R=2,
# file-backed disks) with the given binary, waits until the storage nodes have
# zeroed their fresh disks, then runs fio's nbd engine against the demo volume's
# unix socket and prints one line per job: name, IOPS, MB/s, p50 and p99 latency (µs),
# and the CPU time all of Slate's processes used per GB moved.
#
#   benches/e2e/fio_slate.sh [SLATE_BINARY] [RUNTIME_SECONDS]
#
# Needs fio (with the nbd engine), jq and curl. Jobs: 4K random write QD32,
# 4K random read QD32, 1M sequential write QD8, 1M sequential read QD8.
set -euo pipefail
slate=${1:-target/release/slate}
runtime=${2:-20}
dir=$(mktemp -d /var/tmp/slate-bench.XXXXXX)
log=$dir/up.log
"$slate" up --dir "$dir/data" --volume-size 2G --disk-size 4G >"$log" 2>&1 &
up=$!
cleanup() {
  kill -TERM "$up" 2>/dev/null || true
  wait "$up" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
uri=
for _ in $(seq 1 240); do
  uri=$(jq -r '.volumes[0].nbd_unix // empty' "$dir/data/cluster.json" 2>/dev/null || true)
  [[ -n $uri && -S ${uri#*socket=} ]] && break
  kill -0 "$up" 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.5
done
metrics=$(jq -r '.processes[] | select(.role == "node") | .metrics' "$dir/data/cluster.json")
# Wait for the fresh disks' zeroing to end (no extent dirty or zeroing on any node).
for _ in $(seq 1 600); do
  busy=0
  for m in $metrics; do
    n=$(curl -s "http://$m/metrics" | awk '/^slate_node_extents\{state="(dirty|zeroing)"\}/ {s += $2} END {print s + 0}')
    busy=$((busy + ${n%.*}))
  done
  [[ $busy -eq 0 ]] && break
  sleep 1
done
# CPU time (clock ticks) used so far by `slate up` and every process it started.
cpu_ticks() {
  local total=0 pid
  for pid in $up $(pgrep -P "$up"); do
    read -r -a f <"/proc/$pid/stat" 2>/dev/null || continue
    total=$((total + f[13] + f[14]))
  done
  echo "$total"
}
hz=$(getconf CLK_TCK)
job() { # name rw bs iodepth
  local before after
  before=$(cpu_ticks)
  fio --name="$1" --ioengine=nbd --uri="$uri" --rw="$2" --bs="$3" --iodepth="$4" --size=2G \
    --time_based --runtime="$runtime" --ramp_time=2 --output-format=json 2>/dev/null | sed -n '/^{/,$p' >"$dir/$1.json"
  after=$(cpu_ticks)
  # CPU per GB counts the ramp too (fio's bytes do not): compare runs of the same script only.
  jq -r --arg n "$1" --argjson cpu "$(((after - before) * 1000 / hz))" '.jobs[0] |
      (if .write.io_bytes > 0 then .write else .read end) as $d |
      "\($n) iops=\($d.iops | floor) MBps=\($d.bw_bytes / 1e6 | floor) p50us=\($d.clat_ns.percentile["50.000000"] / 1000 | floor) p99us=\($d.clat_ns.percentile["99.000000"] / 1000 | floor) slate_cpu_ms_per_GB=\($cpu / ($d.io_bytes / 1e9) | floor)"' "$dir/$1.json"
}
job seqwrite-1M-qd8 write 1M 8
job randwrite-4K-qd32 randwrite 4k 32
job randread-4K-qd32 randread 4k 32
job seqread-1M-qd8 read 1M 8
