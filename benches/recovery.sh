#!/usr/bin/env bash
# Recovery time: write a volume randomly with fio (4 KiB blocks, no final
# flush), kill -9 the server, and time a restart until it accepts clients
# ("ready:" on stdout). Also reports the server's resident memory after the
# writes, and the size of the metadata on disk.
#
#   benches/recovery.sh               # 1 GiB volume, 3 repetitions
#   SIZE=4G REPS=5 benches/recovery.sh
set -euo pipefail
SIZE=${SIZE:-1G}
REPS=${REPS:-3}
PORT=${PORT:-12060}
PROFILE=${PROFILE:-ci-2core}
. "$(dirname "$0")/lib.sh"
bench_init recovery

start() { # sets $pid, and $secs: the seconds from exec to "ready:"
    local t0 t1
    t0=$(date +%s.%N)
    serve "$PORT" --profile "$PROFILE"
    t1=$(date +%s.%N)
    secs=$(python3 -c "print(f'{$t1 - $t0:.3f}')")
}

times=()
for rep in $(seq 1 "$REPS"); do
    new_pool "$SIZE"
    start
    fio --name=fill --ioengine=nbd --uri=nbd://127.0.0.1:$PORT/vol0 --rw=randwrite --bs=4k \
        --iodepth=32 --size="$SIZE" --norandommap --randrepeat=0 --output=/dev/null
    rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
    kill -9 "$pid"; wait "$pid" 2>/dev/null || true
    meta=$(du -sk --exclude=data --exclude=staging "$work/pool" | cut -f1)
    journal=$(du -kc "$work/pool/journal"* | tail -1 | cut -f1)
    start
    times+=("$secs")
    replayed=$(grep -o 'replayed_to=[0-9]*' "$work/log" | tail -1)
    echo "rep $rep: restart to ready ${secs}s ($replayed); before the kill: server RSS ${rss} KiB, metadata ${meta} KiB (journal ${journal} KiB)"
    stop_server
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print "median restart to ready: " a[int((NR+1)/2)] " s over " NR " runs"}'
