#!/usr/bin/env bash
# Re-encryption work against the dedup ratio: a volume of SIZE written with
# every 4 KiB block repeated DUP times, then a full rotation; reports the
# logical blocks, the content blocks, the blocks the rotation re-encrypted
# and the time the staging took.
#
#   benches/rotation-dedup.sh          # SIZE=256M DUP=4
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-256M}
DUP=${DUP:-4}
PORT=${PORT:-12085}
cargo build --release --quiet
K=${CARGO_TARGET_DIR:-$PWD/target}/release/keyturn
work=$(mktemp -d /tmp/keyturn-rotdedup.XXXXXX)
pid=""
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
echo "bench-pass" > "$work/pass"
opts=(--pool "$work/pool" --passphrase-file "$work/pass")
"$K" init "${opts[@]}" --kdf-memory-kib 8192 --kdf-iterations 1 >/dev/null 2>&1
sed -i 's/^grace_secs = .*/grace_secs = 0/; s/^staging_capacity_mib = .*/staging_capacity_mib = 4096/' "$work/pool/pool.toml"
"$K" zone create "${opts[@]}" z >/dev/null 2>&1
"$K" volume create "${opts[@]}" --zone z --size "$SIZE" vol0 >/dev/null 2>&1
"$K" serve "${opts[@]}" --listen 127.0.0.1:$PORT --admin-listen 127.0.0.1:0 >"$work/out" 2>>"$work/log" &
pid=$!
for _ in $(seq 1 2000); do grep -q '^ready:' "$work/out" 2>/dev/null && break; sleep 0.01; done
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
status() { "$K" rotate status "${opts[@]}" --zone z --json; }
t0=$(date +%s.%N)
"$K" rotate prepare "${opts[@]}" --zone z >/dev/null
until status | python3 -c "import json,sys; s=json.load(sys.stdin); sys.exit(0 if s['staged_blocks']==s['content_blocks'] else 1)"; do sleep 0.2; done
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
