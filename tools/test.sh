#!/usr/bin/env bash
# README's second command: installs what the tests need when it is missing,
# then runs every test (unit tests, and integration tests that drive the real
# keyturn binary with qemu-io, qemu-img, nbdinfo, nbdcopy and fio, and check
# the Prometheus rules and a live scrape with promtool and amtool, and the
# dashboard page in headless Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-io  >/dev/null || need+=(qemu-utils)
command -v nbdinfo  >/dev/null || need+=(libnbd-bin)
command -v fio      >/dev/null || need+=(fio)
command -v python3  >/dev/null || need+=(python3)
command -v timeout  >/dev/null || need+=(coreutils)
command -v softhsm2-util >/dev/null || need+=(softhsm2)
command -v nats-server >/dev/null || need+=(nats-server)
command -v openssl  >/dev/null || need+=(openssl)
command -v promtool >/dev/null || need+=(prometheus)
command -v amtool   >/dev/null || need+=(prometheus-alertmanager)
# PyKMIP's server (tests/kmip.rs) goes into a venv, which needs ensurepip.
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv python3-pip)
command -v chromium >/dev/null || need+=(chromium)
command -v c++      >/dev/null || need+=(g++)   # libfuzzer-sys builds libFuzzer
if ((${#need[@]})); then
    echo "tools/test.sh: installing ${need[*]}"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# PyKMIP (pip package `pykmip`) in a venv under target/, so the system's
# Python stays untouched (Debian marks it externally managed).
pykmip=target/pykmip-venv
if [ ! -x "$pykmip/bin/pykmip-server" ]; then
    echo "tools/test.sh: installing PyKMIP into $pykmip"
    rm -rf "$pykmip"
    python3 -m venv "$pykmip"
    "$pykmip/bin/pip" install -q pykmip
fi
export KEYTURN_PYKMIP_SERVER="$PWD/$pykmip/bin/pykmip-server"
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi

# Integration tests find the shared NBD conformance kit here.
export KEYTURN_NBD_KIT="${KEYTURN_NBD_KIT:-$(cd .. && pwd)/shared/nbd-kit}"
cargo nextest run --workspace --no-fail-fast "$@"

# The fuzz smoke test: every fuzz target for KEYTURN_FUZZ_SECS seconds
# (default 10; 0 skips) on its seed corpus; fails on any crash.
if [ "${KEYTURN_FUZZ_SECS:-10}" != 0 ]; then
    tools/fuzz.sh "${KEYTURN_FUZZ_SECS:-10}"
fi
