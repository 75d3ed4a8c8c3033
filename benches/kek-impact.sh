#!/usr/bin/env bash
# Volume I/O during KEK rotations: fio 4 KiB random read/write (70/30) at
# queue depth 32 for RUNTIME seconds, idle and while `keyturn keys
# rotate-kek` runs through the running server every EVERY seconds (each
# re-wraps the zone's keys; EVERY=0: back to back), interleaved, REPS
# times; medians and the ratio.
#
#   benches/kek-impact.sh             # REPS=3 RUNTIME=10 EVERY=1
set -euo pipefail
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-10}
EVERY=${EVERY:-1}
PORT=${PORT:-12095}
. "$(dirname "$0")/lib.sh"
bench_init kekimpact
new_pool 1G
serve "$PORT"
fio --name=fill --ioengine=nbd --uri=nbd://127.0.0.1:$PORT/vol0 --rw=write --bs=1m --iodepth=8 \
    --size=1G --refill_buffers --output=/dev/null
load() {
    fio --name=rw --ioengine=nbd --uri=nbd://127.0.0.1:$PORT/vol0 --rw=randrw --rwmixread=70 --bs=4k \
        --iodepth=32 --size=1G --time_based --runtime="$RUNTIME" --norandommap --refill_buffers \
        --output-format=json 2>/dev/null | python3 -c "import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index('{'):])['jobs'][0]; print(round(j['read']['iops']+j['write']['iops']))"
}
csv="$work/r.csv"; : > "$csv"
for rep in $(seq 1 "$REPS"); do
    echo "idle,$(load)" >> "$csv"
    ( n=0; end=$((SECONDS + RUNTIME)); while [ $SECONDS -lt $end ]; do "$K" keys rotate-kek "${opts[@]}" --zone z >/dev/null; n=$((n+1)); sleep "$EVERY"; done; echo "$n" > "$work/n" ) &
    rot=$!
    echo "rotating,$(load)" >> "$csv"
    wait $rot
    echo "rep $rep: $(tail -2 "$csv" | tr '\n' ' ') ($(cat "$work/n") KEK rotations during the run)"
done
python3 - "$csv" <<'PY'
import csv, statistics, sys
rows = list(csv.reader(open(sys.argv[1])))
m = {s: statistics.median(float(v) for k, v in rows if k == s) for s in ("idle", "rotating")}
print(f"median IOPS: idle {m['idle']:.0f}, during KEK rotations {m['rotating']:.0f} ({m['rotating'] / m['idle']:.2f}x)")
PY
