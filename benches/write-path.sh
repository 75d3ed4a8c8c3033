#!/usr/bin/env bash
# The write path of one keyturn server, measured from the server's side:
# fio over NBD against a fresh 1 GiB volume (prefilled with 1 MiB writes),
# and per workload the rate, p99, server CPU per I/O and per GB (utime +
# stime of the server process over ramp and run; fio's own CPU beside it,
# all its jobs together, since client and server share the machine), context switches per I/O
# (every thread of the server), and how many WRITEs went in batches
# (keyturn_nbd_write_batches_total / keyturn_nbd_batched_writes_total),
# and the server's resident memory at the end of the run.
#
#   benches/write-path.sh                          # the workloads below, 3 rounds
#   BASE=/path/to/older/keyturn benches/write-path.sh   # A/B, rounds interleaved
#   JOBS="1 2 4" WORKLOADS=randwrite4k benches/write-path.sh   # scaling over connections
#
# Knobs: ROUNDS (3), RUNTIME (5 s after 1 s of ramp), WORKLOADS
# ("randwrite4k randrw4k seqwrite1m"), JOBS ("1": fio jobs, one NBD
# connection each), PROFILE (ci-2core), PERF (a directory: `perf record -g`
# on the server over each measured run, kept there as
# perf-<workload>-<round>-<this|base>.data). Each line is one run; compare
# medians, the machine is shared. The -flush workloads also print the
# FLUSH latency (fio's sync latency): p99 and max.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
bench_init write-path
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5}
WORKLOADS=${WORKLOADS:-"randwrite4k randrw4k seqwrite1m"}
JOBS=${JOBS:-1}
PROFILE=${PROFILE:-ci-2core}
BINS=("$K")
if [ -n "${BASE:-}" ]; then BINS=("$BASE" "$K"); fi
MAIN=$K

args_of() {
    case $1 in
    randwrite4k) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    randread4k) echo "--rw=randread --bs=4k --iodepth=32" ;;
    randrw4k) echo "--rw=randrw --rwmixread=70 --bs=4k --iodepth=16" ;;
    seqwrite1m) echo "--rw=write --bs=1M --iodepth=8" ;;
    seqread1m) echo "--rw=read --bs=1M --iodepth=8" ;;
    # With a FLUSH after every 64 (16) writes: each one waits for a commit.
    randwrite4k-flush) echo "--rw=randwrite --bs=4k --iodepth=32 --fsync=64" ;;
    seqwrite1m-flush) echo "--rw=write --bs=1M --iodepth=8 --fsync=16" ;;
    *) echo "unknown workload $1" >&2; exit 2 ;;
    esac
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
switches() { cat /proc/"$pid"/task/*/status | awk '/ctxt_switches/ {s += $2} END {print s}'; }
metric() {
    local admin
    admin=$(sed -n 's/^admin: //p' "$work/out")
    curl -s -H "Authorization: Bearer $(cat "$work/pool/admin.token")" "${admin}metrics" |
        awk -v m="$1" '$1 == m {print $2}'
}

port=12090
for round in $(seq 1 "$ROUNDS"); do
    for bin in "${BINS[@]}"; do
        K=$bin
        for jobs in $JOBS; do
            for w in $WORKLOADS; do
                new_pool 1G
                port=$((port + 1))
                serve "$port" --profile "$PROFILE"
                uri="nbd://127.0.0.1:$port/vol0"
                fio --name=prefill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size=1G >/dev/null
                label=$([ "$bin" = "$MAIN" ] && echo this || echo base)
                perf_pid=""
                if [ -n "${PERF:-}" ]; then
                    mkdir -p "$PERF"
                    perf record -q -F 999 -g -p "$pid" -o "$PERF/perf-$w-$round-$label.data" >/dev/null 2>&1 &
                    perf_pid=$!
                fi
                c0=$(cpu_ticks) s0=$(switches) b0=$(metric keyturn_nbd_batched_writes_total) n0=$(metric keyturn_nbd_write_batches_total)
                # shellcheck disable=SC2046
                fio --name="$w" --ioengine=nbd --uri="$uri" $(args_of "$w") --numjobs="$jobs" --group_reporting \
                    --size=1G --time_based --runtime="$RUNTIME" --ramp_time=1 --norandommap --randrepeat=0 \
                    --output-format=json >"$work/fio.json"
                c1=$(cpu_ticks) s1=$(switches) b1=$(metric keyturn_nbd_batched_writes_total) n1=$(metric keyturn_nbd_write_batches_total)
                rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
                if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
                stop_server
                python3 - "$work/fio.json" "$w" "$jobs" "$round" "$label" "$RUNTIME" \
                    "$c0" "$c1" "$s0" "$s1" "${b0:-0}" "${b1:-0}" "${n0:-0}" "${n1:-0}" "$rss" <<'PY'
import json, sys
path, w, jobs, rnd, label, runtime = sys.argv[1:7]
c0, c1, s0, s1, b0, b1, n0, n1, rss = (float(x) for x in sys.argv[7:16])
text = open(path).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
ios = bws = 0.0
p99 = 0.0
for d in ("read", "write"):
    x = job[d]
    if x["io_bytes"]:
        ios += x["iops"]
        bws += x["bw_bytes"]
        p99 = max(p99, x["clat_ns"]["percentile"].get("99.000000", 0) / 1e6)
secs = float(runtime) + 1  # CPU and switches are counted over ramp and run
cpu = (c1 - c0) / 100
n_io = ios * secs
# The batch counters, like CPU, cover ramp and run; fio's count covers the run.
writes = job["write"]["total_ios"] * secs / float(runtime)
batched = f"{(b1 - b0) / writes:.0%} of writes in {n1 - n0:.0f} batches" if writes else "-"
sync = job.get("sync", {})
flush = ""
if sync.get("total_ios"):
    lat = sync["lat_ns"]
    fp99 = lat.get("percentile", {}).get("99.000000", 0) / 1e6
    flush = f"  flush p99 {fp99:.1f} max {lat['max'] / 1e6:.1f} ms over {sync['total_ios']}"
print(f"round {rnd} {label:4} jobs={jobs} {w:11} {ios:9,.0f} IOPS {bws / 1e6:6.0f} MB/s p99 {p99:7.2f} ms "
      f"cpu {cpu / secs:4.0%} (fio {(job['usr_cpu'] + job['sys_cpu']) * int(jobs) / 100:4.0%}) {cpu * 1e6 / n_io:6.1f} us/io {cpu / (bws * secs / 1e9):5.2f} s/GB "
      f"{(s1 - s0) / n_io:5.2f} switches/io  rss {rss / 1024:4.0f} MiB  {batched}{flush}", flush=True)
PY
            done
        done
    done
done
