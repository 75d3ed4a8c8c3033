# Shared setup of the keyturn benches. Source it from a bench script:
#
#   . "$(dirname "$0")/lib.sh"; bench_init NAME
#
# bench_init NAME        cd to the repository, build the release binary ($K),
#                        make a scratch directory ($work, removed on exit with
#                        any server left in $pid killed), a passphrase file
#                        and the CLI's pool options ($opts)
# new_pool SIZE [SED]    a fresh pool in $work/pool (cheap KDF), pool.toml
#                        edited by the sed script SED, zone "z" and volume
#                        "vol0" of SIZE
# serve PORT [ARGS...]   `keyturn serve` on 127.0.0.1:PORT with its admin API
#                        on a free port, until it prints "ready:" ($pid)
# stop_server            SIGTERM, and wait for it
# status                 `keyturn rotate status --zone z --json`
# wait_status PRED       until the python predicate PRED on the status JSON
#                        `s` holds, polling every 0.2 s

bench_init() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    # KEYTURN_BIN=/path/to/keyturn: measure that binary instead (A/B), and
    # build nothing (a build beside a measurement skews it).
    if [ -z "${KEYTURN_BIN:-}" ]; then cargo build --release --quiet; fi
    K=${KEYTURN_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/keyturn}
    work=$(mktemp -d "/tmp/keyturn-$1.XXXXXX")
    pid=""
    trap 'if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null; fi; rm -rf "$work"' EXIT
    echo "bench-pass" > "$work/pass"
    opts=(--pool "$work/pool" --passphrase-file "$work/pass")
}

new_pool() {
    rm -rf "$work/pool"
    "$K" init "${opts[@]}" --kdf-memory-kib 8192 --kdf-iterations 1 >/dev/null 2>&1
    if [ -n "${2:-}" ]; then sed -i "$2" "$work/pool/pool.toml"; fi
    "$K" zone create "${opts[@]}" z >/dev/null 2>&1
    "$K" volume create "${opts[@]}" --zone z --size "$1" vol0 >/dev/null 2>&1
}

serve() {
    local port=$1
    shift
    : >"$work/out"
    "$K" serve "${opts[@]}" --listen "127.0.0.1:$port" --admin-listen 127.0.0.1:0 "$@" >"$work/out" 2>>"$work/log" &
    pid=$!
    for _ in $(seq 1 6000); do grep -q '^ready:' "$work/out" 2>/dev/null && break; sleep 0.005; done
}

stop_server() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""; }

status() { "$K" rotate status "${opts[@]}" --zone z --json; }

# One python process polls the admin API for the whole wait: a CLI process
# and an interpreter per poll cost about 90 ms of CPU, a fifth of a core at
# five polls a second, taken from the server being measured.
wait_status() {
    local admin
    admin=$(sed -n 's/^admin: //p' "$work/out")
    python3 - "$1" "$admin" "$work/pool/admin.token" <<'PY'
import json, sys, time, urllib.request
pred, admin, token_file = sys.argv[1:]
token = open(token_file).read().strip()
req = urllib.request.Request(admin + "api/v1/zones/z/rotation",
                             headers={"Authorization": "Bearer " + token})
deadline = time.monotonic() + 2400
while time.monotonic() < deadline:
    with urllib.request.urlopen(req) as r:
        s = json.load(r)
    if eval(pred):
        sys.exit(0)
    time.sleep(0.2)
sys.exit(f"timed out waiting for: {pred}")
PY
}
