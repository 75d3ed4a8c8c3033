#!/usr/bin/env bash
# Where streaming's cost goes: fio 1 MiB sequential writes (QD8, 6 s) on a
# plain and on a streaming zone of one server, each with the server's CPU
# seconds and `strace -c -f` syscall counts, then `perf record -g` of the
# streaming run (needs perf and strace).
#
#   benches/stream-profile.sh
set -euo pipefail
PORT=${PORT:-12197}
. "$(dirname "$0")/lib.sh"
bench_init stream-profile
new_pool 1G
"$K" zone create "${opts[@]}" s >/dev/null 2>&1
"$K" volume create "${opts[@]}" --zone s --size 1G svol >/dev/null 2>&1
"$K" stream enable "${opts[@]}" --zone s >/dev/null 2>&1
serve "$PORT" --stream-listen 127.0.0.1:0
uri=nbd://127.0.0.1:$PORT
for v in vol0 svol; do
  fio --name=fill --ioengine=nbd --uri=$uri/$v --rw=write --bs=1m --iodepth=8 --size=1G --refill_buffers --output=/dev/null
done
for v in vol0 svol; do
  t0=$(awk '{print $14+$15}' /proc/$pid/stat)
  strace -f -c -o $work/strace-$v.txt -e trace=fsync,fdatasync,pwrite64,write,io_uring_enter,futex -p $pid &
  sp=$!
  sleep 0.5
  fio --name=s --ioengine=nbd --uri=$uri/$v --rw=write --bs=1m --iodepth=8 --size=1G --time_based --runtime=6 --refill_buffers --output-format=json > $work/fio-$v.json 2>/dev/null
  kill -INT $sp; wait $sp || true
  t1=$(awk '{print $14+$15}' /proc/$pid/stat)
  bw=$(python3 -c "import json; t=open('$work/fio-$v.json').read(); print(round(json.loads(t[t.index('{'):])['jobs'][0]['write']['bw']/1024))")
  echo "$v: $bw MiB/s, server CPU ticks $((t1-t0)) over 6 s"
  head -12 $work/strace-$v.txt
done
# CPU profile of the streaming case.
perf record -F 999 -g -p $pid -o $work/perf.data -- sleep 6 >/dev/null 2>&1 &
pp=$!
fio --name=s --ioengine=nbd --uri=$uri/svol --rw=write --bs=1m --iodepth=8 --size=1G --time_based --runtime=6 --refill_buffers --output=/dev/null
wait $pp || true
perf report -i $work/perf.data --no-children --sort dso,symbol --stdio 2>/dev/null | grep -v "^#" | grep -v "^$" | grep "%" | head -40
