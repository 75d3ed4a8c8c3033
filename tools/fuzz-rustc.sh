#!/bin/sh
# RUSTC_WRAPPER for tools/fuzz.sh: adds libFuzzer's coverage
# instrumentation (sanitizer-coverage, as cargo-fuzz passes it) to keyturn
# and the fuzz targets only, on stable Rust. Dependencies stay
# uninstrumented: they build as they do for the tests (faster runs, and no
# instrumented proc-macros or build scripts, which would not link).
rustc="$1"
shift
case " $* " in
*" --crate-name keyturn "* | *fuzz_targets/*)
    exec "$rustc" "$@" \
        -Cpasses=sancov-module \
        -Cllvm-args=-sanitizer-coverage-level=4 \
        -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
        -Cllvm-args=-sanitizer-coverage-pc-table \
        -Cllvm-args=-sanitizer-coverage-trace-compares \
        --cfg fuzzing
    ;;
esac
exec "$rustc" "$@"
