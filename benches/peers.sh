#!/usr/bin/env bash
# keyturn as one more column of the shared peer benchmark
# (../shared/bench/peers.sh: nbdkit file, nbdkit+luks, qemu-nbd+luks; fio over
# NBD, servers interleaved round by round, medians and paired ratios).
#
#   benches/peers.sh                       # full run, about 10 min
#   QUICK=1 benches/peers.sh               # smoke run
#   PROFILE=nvme-server benches/peers.sh   # another hardware profile
#   REF=nbdkit-luks benches/peers.sh       # ratios against another column
#
# keyturn gets the harness's fresh sparse image as its data device, and its
# pool metadata in the harness's scratch directory.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
K=${CARGO_TARGET_DIR:-$PWD/target}/release/keyturn
PROFILE=${PROFILE:-ci-2core}
POOL='$BENCH_WORKDIR/keyturn-pool'
OPTS="--pool $POOL --passphrase-file \"\$BENCH_PASSFILE\""
export TARGET_NAME=${TARGET_NAME:-keyturn}
export TARGET_URI=nbd://127.0.0.1:12050/vol0
export TARGET_PREP="rm -rf $POOL && $K init $OPTS --data \"\$BENCH_IMG\" --kdf-memory-kib 8192 --kdf-iterations 1 \
 && $K zone create $OPTS bench && $K volume create $OPTS --zone bench --size \"\$BENCH_SIZE\" vol0"
export TARGET_CMD="exec $K serve $OPTS --listen 127.0.0.1:\$BENCH_PORT --profile $PROFILE"
exec ../shared/bench/peers.sh "$@"
