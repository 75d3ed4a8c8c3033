#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ (libFuzzer through libfuzzer-sys, on
# stable Rust: see docs/fuzzing.md) and runs each one on its corpus.
#
#   tools/fuzz.sh [SECONDS] [TARGET...]   # default: 10 s for every target
#
# Fails on the first crash, hang (10 s on one input) or memory blow-up; the
# input that did it is left in fuzz/artifacts/TARGET/. Inputs found along
# the way stay in a temporary directory (copy the interesting ones into
# fuzz/corpus/TARGET/ by hand). tools/test.sh runs it as the fuzz smoke
# test; a long run is `tools/fuzz.sh 600 journal`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

secs=${1:-10}
[ $# -gt 0 ] && shift
targets=("$@")
if ((${#targets[@]} == 0)); then
    targets=(nbd_session nbd_codec journal table audit_log pool_config policy admin_body)
fi

# Coverage instrumentation for keyturn and the targets only (see
# tools/fuzz-rustc.sh). A target directory of their own: sharing the tests'
# would make each build undo the other's (the wrapper changes the build
# scripts' environment, and features unify differently).
export RUSTC_WRAPPER="$root/tools/fuzz-rustc.sh"
export CARGO_TARGET_DIR="$root/target/fuzz"
(cd fuzz && cargo build --bins --locked --quiet)
bin="$CARGO_TARGET_DIR/debug"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
printf '%-12s %12s %10s %8s %s\n' target executions exec/s corpus result
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "fuzz/artifacts/$t"
    log="$scratch/$t.log"
    # New inputs go to the first directory (scratch); the checked-in seeds
    # are only read.
    if TMPDIR="$scratch" "$bin/$t" -max_total_time="$secs" -max_len=65536 \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" "$scratch/$t" "fuzz/corpus/$t" >"$log" 2>&1; then
        result=ok
    else
        result=FAILED
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    corpus=$(find "$scratch/$t" "fuzz/corpus/$t" -type f | wc -l)
    printf '%-12s %12s %10s %8s %s\n' "$t" "${execs:-?}" "${rate:-?}" "$corpus" "$result"
    if [ "$result" != ok ]; then
        echo "--- $t: last lines of libFuzzer's log"
        tail -40 "$log"
        exit 1
    fi
done
