#!/usr/bin/env bash
# Change streams: what streaming costs the foreground, what crosses the wire
# on a duplicated load, how far a replica lags, and how fast an agent applies.
#
#   benches/stream.sh          # REPS=3 RUNTIME=10
#
# 1. Foreground cost: fio 4 KiB random writes (QD32) and 1 MiB sequential
#    writes (QD8) for RUNTIME seconds on a volume of a streaming zone and of
#    a zone that does not stream, in one server, alternated REPS times;
#    medians and the on/off ratio.
# 2. Wire dedup: 256 MiB of fio writes with dedupe_percentage=75 (each block
#    written about four times over) to the streaming zone: record bytes /
#    logical bytes from `stream status`.
# 3. Lag: an agent follows while fio writes at half the 4 KiB random write
#    rate measured in 1; the agent reports p50/p99 of the age of each record
#    when it applied it (over its last 10,000 records).
# 4. Apply throughput: 512 MiB written sequentially with the agent away,
#    then the agent catches up (records/s, MiB/s), against fio's own 1 MiB
#    sequential write throughput on the replica pool served alone.
set -euo pipefail
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-10}
PORT=${PORT:-12097}
. "$(dirname "$0")/lib.sh"
bench_init stream
new_pool 1G
"$K" zone create "${opts[@]}" s >/dev/null 2>&1
"$K" volume create "${opts[@]}" --zone s --size 1G svol >/dev/null 2>&1
"$K" volume create "${opts[@]}" --zone s --size 1G dup >/dev/null 2>&1
"$K" stream enable "${opts[@]}" --zone s >/dev/null 2>&1
serve "$PORT" --stream-listen 127.0.0.1:0
src=$(sed -n 's/^stream: //p' "$work/out")
uri=nbd://127.0.0.1:$PORT
for v in vol0 svol; do
    fio --name=fill --ioengine=nbd --uri=$uri/$v --rw=write --bs=1m --iodepth=8 --size=1G \
        --refill_buffers --output=/dev/null
done
iops() {
    fio --name=w --ioengine=nbd --uri=$uri/$1 --rw=randwrite --bs=4k --iodepth=32 --size=1G \
        --time_based --runtime="$RUNTIME" --norandommap --refill_buffers --output-format=json 2>/dev/null |
        python3 -c "import json,sys; t=sys.stdin.read(); print(round(json.loads(t[t.index('{'):])['jobs'][0]['write']['iops']))"
}
seqmb() {
    fio --name=s --ioengine=nbd --uri=$uri/$1 --rw=write --bs=1m --iodepth=8 --size=1G \
        --time_based --runtime="$RUNTIME" --refill_buffers --output-format=json 2>/dev/null |
        python3 -c "import json,sys; t=sys.stdin.read(); print(round(json.loads(t[t.index('{'):])['jobs'][0]['write']['bw']/1024))"
}
csv="$work/r.csv"; : > "$csv"
for rep in $(seq 1 "$REPS"); do
    for v in vol0 svol; do
        [ $v = vol0 ] && m=off || m=on
        echo "rand-$m,$(iops $v)" >> "$csv"
        echo "seq-$m,$(seqmb $v)" >> "$csv"
    done
    echo "rep $rep: $(tail -4 "$csv" | tr '\n' ' ')"
done
python3 - "$csv" <<'PY'
import csv, statistics, sys
rows = list(csv.reader(open(sys.argv[1])))
m = {k: statistics.median(float(v) for kk, v in rows if kk == k) for k in {r[0] for r in rows}}
print(f"4 KiB random write IOPS: off {m['rand-off']:.0f}, on {m['rand-on']:.0f} ({m['rand-on']/m['rand-off']:.2f}x)")
print(f"1 MiB sequential write MiB/s: off {m['seq-off']:.0f}, on {m['seq-on']:.0f} ({m['seq-on']/m['seq-off']:.2f}x)")
open(sys.argv[1] + ".half", "w").write(str(int(m['rand-on'] / 2)))
PY

# 2. Wire dedup.
before=$("$K" stream status "${opts[@]}" --zone s --json)
fio --name=d --ioengine=nbd --uri=$uri/dup --rw=write --bs=64k --iodepth=8 --size=256M \
    --dedupe_percentage=75 --refill_buffers --output=/dev/null
after=$("$K" stream status "${opts[@]}" --zone s --json)
python3 - "$before" "$after" <<'PY'
import json, sys
b, a = (json.loads(x) for x in sys.argv[1:])
logical = a["logical_bytes"] - b["logical_bytes"]
wire = a["record_bytes"] - b["record_bytes"]
refs = a["referenced_blocks"] - b["referenced_blocks"]
pay = a["payload_blocks"] - b["payload_blocks"]
print(f"wire dedup on a 4x duplicated load: {wire/2**20:.1f} MiB of records for {logical/2**20:.0f} MiB written ({wire/logical:.2f} of logical); {pay} blocks as payload, {refs} as references")
PY

# 3. Lag at half the streaming zone's random write rate.
"$K" init --pool "$work/replica" --passphrase-file "$work/pass" --kdf-memory-kib 8192 --kdf-iterations 1 >/dev/null 2>&1
"$K" agent-key --out "$work/agent.key" > "$work/agent.pub"
"$K" stream grant "${opts[@]}" --zone s --agent bench --public-key "$(cat "$work/agent.pub")" >/dev/null
agent() {
    exec "$K" replicate --source "$src" --zone s --to "$work/replica" --to-zone r --agent bench \
        --agent-key "$work/agent.key" --passphrase-file "$work/pass" "$@" 2>>"$work/agent.log"
}
(agent --until-caught-up >/dev/null) || { tail -20 "$work/agent.log"; exit 1; }
agent >/dev/null &
apid=$!
rate=$(cat "$csv.half")

fio --name=l --ioengine=nbd --uri=$uri/svol --rw=randwrite --bs=4k --iodepth=16 --size=1G --time_based \
    --runtime="$RUNTIME" --rate_iops="$rate" --norandommap --refill_buffers --output=/dev/null
sleep 2
python3 - "$work/replica" "$rate" <<'PY'
import glob, json, sys
s = json.load(open(glob.glob(sys.argv[1] + "/replicas/*.status.json")[0]))
print(f"replication lag (age of each record when applied, last 10,000): p50 {s['lag_p50_seconds']*1000:.0f} ms, p99 {s['lag_p99_seconds']*1000:.0f} ms; fio at {sys.argv[2]} IOPS, half the streaming rate above; {s['full_syncs']} full syncs in the run")
PY
kill $apid; wait $apid 2>/dev/null || true

# 4. Apply throughput: a 512 MiB backlog.
fio --name=b --ioengine=nbd --uri=$uri/svol --rw=write --bs=1m --iodepth=8 --size=512M \
    --refill_buffers --output=/dev/null
t0=$(date +%s.%N)
(agent --until-caught-up > "$work/catchup") || { tail -20 "$work/agent.log"; exit 1; }
t1=$(date +%s.%N)
stop_server
opts=(--pool "$work/replica" --passphrase-file "$work/pass")
serve "$PORT"
own=$(fio --name=o --ioengine=nbd --uri=nbd://127.0.0.1:$PORT/svol --rw=write --bs=1m --iodepth=8 --size=512M \
    --refill_buffers --output-format=json 2>/dev/null |
    python3 -c "import json,sys; t=sys.stdin.read(); print(round(json.loads(t[t.index('{'):])['jobs'][0]['write']['bw']/1024))")
# The agent applies one record at a time: the same writes at queue depth 1.
qd1=$(fio --name=o --ioengine=nbd --uri=nbd://127.0.0.1:$PORT/svol --rw=write --bs=1m --iodepth=1 --size=512M \
    --refill_buffers --output-format=json 2>/dev/null |
    python3 -c "import json,sys; t=sys.stdin.read(); print(round(json.loads(t[t.index('{'):])['jobs'][0]['write']['bw']/1024))")
python3 - "$t0" "$t1" "$own" "$(cat "$work/catchup")" "$qd1" <<'PY'
import sys
t0, t1, own = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
qd1 = float(sys.argv[5])
mbs = 512 / (t1 - t0)
print(f"agent apply: 512 MiB backlog in {t1-t0:.1f} s ({mbs:.0f} MiB/s, start-up included); replica pool's own 1 MiB sequential writes {own:.0f} MiB/s at QD8 ({mbs/own:.2f}x), {qd1:.0f} MiB/s at QD1 ({mbs/qd1:.2f}x)")
print(sys.argv[4])
PY
