#!/usr/bin/env bash
# XTS throughput per core: keyturn's dispatched backend (benches/xts.rs) vs
# OpenSSL 3 `openssl speed -evp aes-256-xts`, one data unit per call, at 4096
# and 512 byte units, encrypt and decrypt.
#
#   tools/bench-xts.sh            # 5 rounds x 4 configs x 2 impls x 1 s: about 1 min
#   ROUNDS=9 SECS=2 tools/bench-xts.sh
#   CLOCK=wall tools/bench-xts.sh # wall time on both sides (openssl -elapsed)
#
# Clock: `openssl speed` divides by user CPU time unless given -elapsed, so by
# default ours divides by its thread's on-CPU time too (CLOCK=cpu); on this
# shared box wall time mostly measures the other tenants.
#
# The runs are interleaved (per round and config: openssl then ours, or ours
# then openssl, alternating) so that load from other tenants hits both sides
# alike. The table gives medians over rounds and the median of the per-round
# paired ratios ours/openssl, with their min-max. MB/s = 10^6 bytes/s.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
SECS=${SECS:-1}
CLOCK=${CLOCK:-cpu}
[[ $CLOCK == cpu || $CLOCK == wall ]] || { echo "CLOCK=cpu|wall" >&2; exit 1; }
CONFIGS=("4096 enc" "4096 dec" "512 enc" "512 dec")

command -v openssl >/dev/null || { echo "openssl not found" >&2; exit 1; }
out=$(mktemp -d /tmp/bench-xts.XXXXXX)
trap 'rm -rf "$out"' EXIT
csv=$out/runs.csv
echo "round,unit,op,impl,mbs" >"$csv"

echo "building benches/xts.rs (release)..." >&2
cargo bench --bench xts --no-run -q 2>&1 | grep -v '^ *Executable' >&2 || true

openssl_mbs() { # unit op
    local dec=()
    [[ $2 == dec ]] && dec=(-decrypt)
    [[ $CLOCK == wall ]] && dec+=(-elapsed)
    openssl speed -mr -evp aes-256-xts -bytes "$1" -seconds "$SECS" "${dec[@]}" 2>/dev/null |
        awk -F: '/^\+F:/ { printf "%.0f\n", $4 / 1e6 }'
}

ours_mbs() { # unit op
    cargo bench -q --bench xts -- --unit "$1" --op "$2" --reps 1 --secs "$SECS" \
        --backend dispatched --clock "$CLOCK" 2>/dev/null | tee -a "$out/ours.log" |
        sed -n 's/^RESULT .*median_mbs=\([0-9]*\).*/\1/p'
}

for ((r = 1; r <= ROUNDS; r++)); do
    for c in "${CONFIGS[@]}"; do
        read -r unit op <<<"$c"
        if ((r % 2)); then
            o=$(openssl_mbs "$unit" "$op"); k=$(ours_mbs "$unit" "$op")
        else
            k=$(ours_mbs "$unit" "$op"); o=$(openssl_mbs "$unit" "$op")
        fi
        echo "$r,$unit,$op,openssl,$o" >>"$csv"
        echo "$r,$unit,$op,keyturn,$k" >>"$csv"
        printf 'round %d/%d  %4s %s  openssl %6s  keyturn %6s MB/s\n' "$r" "$ROUNDS" "$unit" "$op" "$o" "$k" >&2
    done
done

backend=$(sed -n 's/.*Xts::new dispatches to \(.*\)$/\1/p' "$out/ours.log" | head -1)
echo
echo "AES-256-XTS, one core, MB/s (10^6 B/s) per $CLOCK second, median of $ROUNDS interleaved rounds x ${SECS}s;"
echo "keyturn backend: $backend; $(openssl version); load avg: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$csv" <<'PY'
import csv, statistics as st, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print()
print("| unit | op  | openssl 3 | keyturn | ratio (median of paired) | ratio min-max |")
print("|-----:|-----|----------:|--------:|-------------------------:|--------------:|")
for unit, op in [("4096", "enc"), ("4096", "dec"), ("512", "enc"), ("512", "dec")]:
    sel = [r for r in rows if r["unit"] == unit and r["op"] == op]
    o = {r["round"]: float(r["mbs"]) for r in sel if r["impl"] == "openssl"}
    k = {r["round"]: float(r["mbs"]) for r in sel if r["impl"] == "keyturn"}
    ratios = [k[x] / o[x] for x in o if x in k and o[x] > 0]
    print(f"| {unit} | {op} | {st.median(o.values()):.0f} | {st.median(k.values()):.0f} | "
          f"{st.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f} |")
PY
