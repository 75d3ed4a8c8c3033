#!/usr/bin/env bash
# Re-encryption work against the dedup ratio: a volume of SIZE written with
# every 4 KiB block repeated DUP times, then a full rotation; reports the
# logical blocks, the content blocks, the blocks the rotation re-encrypted
# and the time the staging took.
#
#   benches/rotation-dedup.sh          # SIZE=256M DUP=4
set -euo pipefail
SIZE=${SIZE:-256M}
DUP=${DUP:-4}
PORT=${PORT:-12085}
. "$(dirname "$0")/lib.sh"
bench_init rotdedup
new_pool "$SIZE" 's/^grace_secs = .*/grace_secs = 0/; s/^staging_capacity_mib = .*/staging_capacity_mib = 4096/'
serve "$PORT"
python3 - "$work/src" "$SIZE" "$DUP" <<'PY'
import os, re, sys
path, size, dup = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = re.fullmatch(r"(\d+)([kKmMgG]?)", size)
n = int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
with open(path, "wb") as f:
    for _ in range(n // 4096 // dup):
        b = os.urandom(4096)
        f.write(b * dup)
PY
nbdcopy "$work/src" "nbd://127.0.0.1:$PORT/vol0"
t0=$(date +%s.%N)
"$K" rotate prepare "${opts[@]}" --zone z >/dev/null
wait_status 's["staged_blocks"] == s["content_blocks"]'
t1=$(date +%s.%N)
"$K" volume stats "${opts[@]}" --json > "$work/stats"
status > "$work/status"
python3 - "$work/stats" "$work/status" "$t0" "$t1" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))[0]
s = json.load(open(sys.argv[2]))
t = float(sys.argv[4]) - float(sys.argv[3])
print(f"logical blocks {v['mapped_blocks']}, content blocks {v['content_blocks']} (dedup {v['dedup_ratio']:.2f}x), "
      f"re-encrypted {s['reencrypted_blocks']} = {s['reencrypted_blocks'] / v['mapped_blocks']:.3f} of the logical blocks; staging took {t:.2f} s")
PY
