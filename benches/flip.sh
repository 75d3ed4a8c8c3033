#!/usr/bin/env bash
# The flip's own time (zone lock → durable journal record, timed by the
# server: `last_flip_micros`) over FLIPS rotations of a zone of each SIZE,
# under three loads:
#
#   idle      nothing else runs
#   seqwrite  fio 1 MiB sequential writes at QD8 to a volume of another
#             zone of the same pool, for the whole run: someone else's data
#             on the same data device
#   buffered  dd writing 1 GiB files through the page cache to the pool's
#             filesystem, over and over, never synced: the writeback an
#             ext4 commit in ordered mode may wait for
#
# Each rotation: `rotate prepare`, wait until every content block is
# staged, `rotate flip`, wait until the migration is done and the old key
# destroyed (grace 0). Reported: p50, p99 and max flip time per size and
# load, and the `rotate flip` command's wall time (which includes the
# commit of what was pending before the flip).
#
#   benches/flip.sh                          # FLIPS=20 SIZES="64M 4G"
#   FLIPS=5 SIZES=64M LOADS="idle seqwrite" benches/flip.sh
#   LOG=/tmp/flip.log benches/flip.sh        # keep the servers' logs (each
#                                            # flip's line says how it committed)
set -euo pipefail
FLIPS=${FLIPS:-20}
SIZES=${SIZES:-64M 4G}
LOADS=${LOADS:-idle seqwrite buffered}
PORT=${PORT:-12074}
for t in fio python3; do
    command -v $t >/dev/null || {
        apt-get update -qq && apt-get install -y -qq fio python3 >/dev/null
        break
    }
done
. "$(dirname "$0")/lib.sh"
bench_init flipbench
csv="$work/results.csv"; echo "size,load,flip,micros,wall_ms" > "$csv"
loadpid=""
trap 'for p in $pid $loadpid; do kill -9 "$p" 2>/dev/null; done; pkill -f "$work" 2>/dev/null || true; [ -z "${LOG:-}" ] || cp "$work/log" "$LOG"; rm -rf "$work"' EXIT
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
now() { date +%s.%N; }

start_load() {
    case $1 in
    idle) loadpid="" ;;
    seqwrite)
        fio --name=load --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/load0" \
            --rw=write --bs=1M --iodepth=8 --size=1G --time_based --runtime=100000 \
            --refill_buffers >/dev/null 2>&1 &
        loadpid=$!
        ;;
    buffered)
        (while :; do dd if=/dev/zero of="$work/pool/buffered.bin" bs=1M count=1024 status=none; done) &
        loadpid=$!
        ;;
    esac
    sleep 1
}

stop_load() {
    if [ -n "$loadpid" ]; then
        kill "$loadpid" 2>/dev/null || true
        pkill -P "$loadpid" 2>/dev/null || true
        wait "$loadpid" 2>/dev/null || true
        loadpid=""
    fi
    rm -f "$work/pool/buffered.bin"
}

for size in $SIZES; do
    new_pool "$size" "s/^grace_secs = .*/grace_secs = 0/; s/^staging_capacity_mib = .*/staging_capacity_mib = 8192/"
    "$K" zone create "${opts[@]}" z2 >/dev/null
    "$K" volume create "${opts[@]}" --zone z2 --size 1G load0 >/dev/null
    serve "$PORT"
    # The zone full of data that does not dedup.
    fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/vol0" --rw=write \
        --bs=1M --iodepth=8 --size="$size" --refill_buffers >/dev/null
    for load in $LOADS; do
        start_load "$load"
        for i in $(seq 1 "$FLIPS"); do
            "$K" rotate prepare "${opts[@]}" --zone z >/dev/null
            wait_status 's["staged_blocks"] == s["content_blocks"]'
            t0=$(now)
            "$K" rotate flip "${opts[@]}" --zone z >/dev/null
            t1=$(now)
            us=$(status | field '["last_flip_micros"]')
            echo "$size,$load,$i,$us,$(python3 -c "print(f'{($t1 - $t0) * 1e3:.1f}')")" >> "$csv"
            wait_status 's["phase"] == "idle"'
        done
        stop_load
        grep "^$size,$load," "$csv" | awk -F, '{printf "  %s %s flip %s: %s us\n", $1, $2, $3, $4}' | tail -n 3
    done
    stop_server
done
echo "== flip time over $FLIPS flips (server-timed; wall: the rotate flip command)"
python3 - "$csv" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
by = {}
for r in rows:
    by.setdefault((r["size"], r["load"]), []).append((float(r["micros"]), float(r["wall_ms"])))
def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]
for (size, load), v in by.items():
    us = [a for a, _ in v]
    wall = [b for _, b in v]
    print(f"  {size:>5} {load:9s} n={len(us):3d}  p50 {pct(us, .5) / 1e3:7.2f} ms  "
          f"p99 {pct(us, .99) / 1e3:7.2f} ms  max {max(us) / 1e3:7.2f} ms   "
          f"wall p50 {statistics.median(wall):7.1f} ms  max {max(wall):7.1f} ms")
EOF
