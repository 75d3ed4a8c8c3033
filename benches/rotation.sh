#!/usr/bin/env bash
# DEK rotation on an idle server, against cryptsetup reencrypt on the same
# machine and data size (../shared/bench/reencrypt-speed.sh), interleaved
# per repetition; medians reported.
#
#   stage    rotate prepare → every content block staged under the next key
#            (read, decrypt, verify, encrypt, write to staging): MB/s
#   flip     the flip itself (zone lock → durable journal record), in µs,
#            for a small zone (64 MiB) and the full one (SIZE)
#   destage  migration after a fully staged flip (verify, copy back): MB/s
#   reenc    emergency rotation with nothing staged: the migrator
#            re-encrypts the whole zone in place: MB/s
#   The server times these itself (status: staging_secs, migration_secs:
#   window open → all staged, flip → migration records durable). The
#   *-wall variants are timed from here, command to the status poll (every
#   0.2 s) that sees the step done; destage-wall and reenc-wall also include
#   the old key's destruction (grace 0: erase, discard of free space).
#   cryptsetup-checksum / -none, dd-direct-write: from reencrypt-speed.sh
#   dd-direct-read+write: dd reading SIZE and another writing SIZE at once
#            (O_DIRECT), SIZE / time until both end: the disk's rate for
#            the traffic of destaging or re-encrypting when the source and
#            destination share it, as they do here
#
#   benches/rotation.sh                 # SIZE=1G REPS=3
#   SIZE=256M REPS=1 CRYPTSETUP=0 benches/rotation.sh
set -euo pipefail
SIZE=${SIZE:-1G}
REPS=${REPS:-3}
PORT=${PORT:-12070}
CRYPTSETUP=${CRYPTSETUP:-1}
BATCH=${BATCH:-}              # override [rotation] batch_blocks
PEERS=../shared/bench/reencrypt-speed.sh
. "$(dirname "$0")/lib.sh"
bench_init rotbench
BYTES=$(python3 -c "import re,sys; m=re.fullmatch(r'(\d+)([kKmMgG]?)',sys.argv[1]); print(int(m.group(1))*{'':1,'k':1<<10,'m':1<<20,'g':1<<30}[m.group(2).lower()])" "$SIZE")
if [ "$CRYPTSETUP" = 1 ] && ! command -v cryptsetup >/dev/null; then
    apt-get install -y -qq cryptsetup-bin >/dev/null
fi
head -c "$BYTES" /dev/urandom > "$work/random"
csv="$work/results.csv"; echo "rep,variant,value,unit" > "$csv"

field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
rate() { python3 -c "import sys; print(f'{$BYTES / float(sys.stdin.read()) / 1e6:.1f}')"; }
now() { date +%s.%N; }

pool_with() { # SIZE of data → a served pool at $PORT holding it
    local size=$1
    new_pool "$size" "s/^grace_secs = .*/grace_secs = 0/; s/^staging_capacity_mib = .*/staging_capacity_mib = 4096/${BATCH:+; s/^batch_blocks = .*/batch_blocks = $BATCH/}"
    serve "$PORT"
    head -c "$size" "$work/random" > "$work/src"
    nbdcopy "$work/src" "nbd://127.0.0.1:$PORT/vol0"
    sync
}


for rep in $(seq 1 "$REPS"); do
    # Flip time on a small zone.
    pool_with 64M
    "$K" rotate prepare "${opts[@]}" --zone z >/dev/null
    wait_status 's["staged_blocks"] == s["content_blocks"]'
    "$K" rotate flip "${opts[@]}" --zone z >/dev/null
    echo "$rep,flip-64M,$(status | field '["last_flip_micros"]'),us" >> "$csv"
    stop_server

    pool_with "$SIZE"
    t0=$(now)
    "$K" rotate prepare "${opts[@]}" --zone z >/dev/null
    wait_status 's["staged_blocks"] == s["content_blocks"]'
    t1=$(now)
    echo "$rep,stage-wall,$(python3 -c "print(f'{$BYTES / ($t1 - $t0) / 1e6:.1f}')"),MB/s" >> "$csv"
    echo "$rep,stage,$(status | field '["staging_secs"]' | rate),MB/s" >> "$csv"
    "$K" rotate flip "${opts[@]}" --zone z >/dev/null
    t2=$(now)
    echo "$rep,flip-$SIZE,$(status | field '["last_flip_micros"]'),us" >> "$csv"
    wait_status 's["phase"] == "idle" and s["staging_used_bytes"] == 0'
    t3=$(now)
    echo "$rep,destage-wall,$(python3 -c "print(f'{$BYTES / ($t3 - $t2) / 1e6:.1f}')"),MB/s" >> "$csv"
    echo "$rep,destage,$(status | field '["migration_secs"]' | rate),MB/s" >> "$csv"
    t4=$(now)
    "$K" rotate emergency "${opts[@]}" --zone z --reason "benchmark" >/dev/null
    wait_status 's["phase"] == "idle"'
    t5=$(now)
    echo "$rep,reenc-wall,$(python3 -c "print(f'{$BYTES / ($t5 - $t4) / 1e6:.1f}')"),MB/s" >> "$csv"
    echo "$rep,reenc,$(status | field '["migration_secs"]' | rate),MB/s" >> "$csv"
    # Everything still reads back.
    nbdcopy "nbd://127.0.0.1:$PORT/vol0" "$work/back"
    cmp -s "$work/src" "$work/back" || { echo "DATA MISMATCH after rotation" >&2; exit 1; }
    rm -f "$work/back"
    stop_server

    if [ "$CRYPTSETUP" = 1 ] && [ -x "$PEERS" ]; then
        out="$work/peers-$rep"
        SIZE=$SIZE REPS=1 MODES="checksum none" QEMU=0 DISK=1 OUTDIR="$out" "$PEERS" >/dev/null 2>&1 || true
        tail -n +2 "$out/runs.csv" | while IFS=, read -r _ variant _ _ mbps _; do
            echo "$rep,$variant,$mbps,MB/s" >> "$csv"
        done
    fi
    # What the disk does when one stream reads and another writes at once,
    # as destaging and re-encryption do: BYTES each way, O_DIRECT.
    rm -f "$work/dd.bin"
    t0=$(now)
    dd if="$work/src" of=/dev/null bs=1M iflag=direct status=none &
    ddr=$!
    dd if=/dev/zero of="$work/dd.bin" bs=1M count=$((BYTES >> 20)) oflag=direct status=none
    wait "$ddr"
    t1=$(now)
    rm -f "$work/dd.bin"
    echo "$rep,dd-direct-read+write,$(python3 -c "print(f'{$BYTES / ($t1 - $t0) / 1e6:.1f}')"),MB/s" >> "$csv"
    tail -n +2 "$csv" | grep "^$rep," | sed 's/^/  /'
done
echo "== medians over $REPS repetition(s), SIZE=$SIZE"
python3 - "$csv" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
by = {}
for r in rows:
    by.setdefault((r["variant"], r["unit"]), []).append(float(r["value"]))
med = {k: statistics.median(v) for k, v in by.items()}
for (v, u), m in sorted(med.items()):
    print(f"  {v:28s} {m:10.1f} {u}   (n={len(by[(v, u)])})")
def get(name):
    return next((m for (v, u), m in med.items() if v == name), None)
for ours in ("stage", "reenc", "destage"):
    for peer in ("cryptsetup-checksum", "cryptsetup-none", "dd-direct-write", "dd-direct-read+write"):
        a, b = get(ours), get(peer)
        if a and b:
            print(f"  {ours} / {peer}: {a / b:.2f}x")
EOF
