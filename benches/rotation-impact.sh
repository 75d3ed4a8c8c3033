#!/usr/bin/env bash
# Foreground cost of a rotation: 4 KiB random read IOPS at queue depth 32
# (fio's nbd engine) on a volume of SIZE random data, with the default
# throttle, in three states measured back to back in each repetition:
#   idle     no rotation
#   staging  a window is open and the pipeline is staging
#   migrate  right after the flip, the migrator re-encrypts what staging
#            had not reached and destages the rest
# and the flip's own time (server-timed) for the SIZE zone.
# Reported: medians and the ratio to idle (target: >= 0.7x). The volume is
# large enough that staging and migration are still running when each
# measurement ends (the progress column shows it): with a smaller one they
# finish early and the rest of the run is idle, which flatters the ratio.
#
#   benches/rotation-impact.sh            # SIZE=4G REPS=3 RUNTIME=8
set -euo pipefail
SIZE=${SIZE:-4G}
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-8}
PORT=${PORT:-12080}
. "$(dirname "$0")/lib.sh"
bench_init rotimpact
csv="$work/results.csv"; echo "rep,state,iops,progress_at_end" > "$csv"

randread() { # → IOPS
    fio --name=rr --ioengine=nbd --uri=nbd://127.0.0.1:$PORT/vol0 --rw=randread --bs=4k \
        --iodepth=32 --size="$SIZE" --time_based --runtime="$RUNTIME" --norandommap \
        --output-format=json 2>/dev/null | python3 -c "import json,sys; t=sys.stdin.read(); print(round(json.loads(t[t.index('{'):])['jobs'][0]['read']['iops']))"
}
progress() { status | python3 -c "import json,sys; s=json.load(sys.stdin); print(f\"{s['phase']}:{s['progress_percent']:.0f}%\")"; }

for rep in $(seq 1 "$REPS"); do
    new_pool "$SIZE" 's/^grace_secs = .*/grace_secs = 0/; s/^staging_capacity_mib = .*/staging_capacity_mib = 4096/'
    serve "$PORT"
    fio --name=fill --ioengine=nbd --uri=nbd://127.0.0.1:$PORT/vol0 --rw=write --bs=1m --iodepth=8 \
        --size="$SIZE" --refill_buffers --output=/dev/null
    # The 1 MiB fill goes past the page cache (`uncached_write_kib`): read
    # the volume once so that all three states start from a cached volume,
    # not the idle one from a cold one and the later ones from what it warmed.
    fio --name=warm --ioengine=nbd --uri=nbd://127.0.0.1:$PORT/vol0 --rw=read --bs=1m --iodepth=8 \
        --size="$SIZE" --output=/dev/null
    echo "$rep,idle,$(randread),-" >> "$csv"
    "$K" rotate prepare "${opts[@]}" --zone z >/dev/null
    iops=$(randread); echo "$rep,staging,$iops,$(progress)" >> "$csv"
    "$K" rotate flip "${opts[@]}" --zone z >/dev/null
    flip_us=$(status | python3 -c "import json,sys; print(json.load(sys.stdin)['last_flip_micros'])")
    iops=$(randread); echo "$rep,migrate,$iops,$(progress)" >> "$csv"
    echo "$rep,flip-us,$flip_us,-" >> "$csv"
    stop_server
    grep "^$rep," "$csv" | sed 's/^/  /'
done
python3 - "$csv" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
med = {s: statistics.median(float(r["iops"]) for r in rows if r["state"] == s) for s in ("idle", "staging", "migrate")}
flips = sorted(float(r["iops"]) for r in rows if r["state"] == "flip-us")
print(f"== medians over {len(flips)} repetition(s)")
print(f"  flip of the whole zone while staging: median {statistics.median(flips) / 1000:.2f} ms ({', '.join(f'{f / 1000:.2f}' for f in flips)})")
for s, m in med.items():
    print(f"  {s:8s} {m:10.0f} IOPS   {m / med['idle']:.2f}x idle")
EOF
