#!/usr/bin/env bash
# NBD over TLS against plaintext and against nbdkit, and memory per idle
# connection.
#
#   REPS=3 RUNTIME=8 benches/tls.sh
#   PROFILE=1 REPS=3 RUNTIME=8 benches/tls.sh   # and section 3
#
# 1. Throughput: fio 4 KiB random read and write (QD32) and 1 MiB sequential
#    read and write (QD8) for RUNTIME seconds against three columns,
#    alternated REPS times in one run: keyturn over nbd:// and over nbds://
#    with a client certificate (mutual TLS), from one server with
#    `[tls] nbd = "optional"`, and nbdkit --tls=require --tls-verify-peer
#    with its luks filter (LUKSv1 aes-256-xts-plain64, the same certificates);
#    medians and the ratios.
# 2. Memory: RSS before and after IDLE (default 200) idle connections that
#    finished the handshake (GO), each kind against a fresh server of its
#    own so that none reuses memory another kind freed: keyturn plain,
#    keyturn TLS, nbdkit TLS; and what closing them gave back.
# 3. (PROFILE=1) 4 KiB random writes (or PROFILE_JOB="write 1m 8"), plain
#    then TLS, with `perf stat` on the keyturn server (CPU, context
#    switches, socket syscalls per I/O) and fio's CPU per I/O, and
#    `perf record -g` during a TLS run (top symbols).
#
# REPS=0 skips section 1, IDLE=0 section 2.
set -euo pipefail
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-10}
IDLE=${IDLE:-200}
PORT=${PORT:-12096}
NPORT=$((PORT + 1))
for t in fio nbdkit qemu-img openssl python3; do
    command -v $t >/dev/null || {
        apt-get update -qq && apt-get install -y -qq fio nbdkit qemu-utils openssl python3 >/dev/null
        break
    }
done
if [ "${PROFILE:-0}" = 1 ] && ! command -v perf >/dev/null; then
    apt-get install -y -qq linux-perf >/dev/null
fi
. "$(dirname "$0")/lib.sh"
bench_init tls
npid=""
trap 'for p in $pid $npid; do kill -9 "$p" 2>/dev/null; done; rm -rf "$work"' EXIT
pki="$work/pki"
mkdir -p "$pki/client"
(
    cd "$pki"
    ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    openssl req -x509 "${ec[@]}" -keyout ca-key.pem -out ca-cert.pem -subj /CN=bench-ca -days 2
    for who in server client; do
        openssl req "${ec[@]}" -keyout $who-key.pem -out $who.csr -subj /CN=$who
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > $who.ext
        openssl x509 -req -in $who.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
            -out $who-cert.pem -days 2 -extfile $who.ext
    done
    cp ca-cert.pem client/ca-cert.pem
    cp client-cert.pem client/client-cert.pem
    cp client-key.pem client/client-key.pem
) >/dev/null 2>&1
new_pool 1G
cat >> "$work/pool/pool.toml" <<EOF

[tls]
cert = "$pki/server-cert.pem"
key = "$pki/server-key.pem"
ca = "$pki/ca-cert.pem"
nbd = "optional"
EOF
# nbdkit: file plugin under the luks filter, TLS required with client
# certificates from the same CA (--tls-certificates reads ca-cert.pem,
# server-cert.pem and server-key.pem from the directory).
luks="$work/nbdkit-luks.img"
printf bench-pass > "$work/luks-pass"
qemu-img create -q -f luks --object secret,id=s0,file="$work/luks-pass" \
    -o key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256,iter-time=10 \
    "$luks" 1G
serve_nbdkit() {
    nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$NPORT" \
        --tls=require --tls-certificates="$pki" --tls-verify-peer \
        --filter=luks file file="$luks" passphrase=+"$work/luks-pass" 2>>"$work/nbdkit.log" &
    npid=$!
    for _ in $(seq 1 300); do
        (exec 3<>/dev/tcp/127.0.0.1/$NPORT) 2>/dev/null && return
        sleep 0.05
    done
    echo "nbdkit did not start:" >&2
    cat "$work/nbdkit.log" >&2
    exit 1
}
stop_nbdkit() { kill "$npid"; wait "$npid" 2>/dev/null || true; npid=""; }
serve "$PORT"
serve_nbdkit
plain=nbd://127.0.0.1:$PORT/vol0
tls=nbds://127.0.0.1:$PORT/vol0
nbdkit_tls=nbds://127.0.0.1:$NPORT/
# fio's libnbd refuses a certificate directory in the URI and reads
# $HOME/.pki/libnbd, or /etc/pki/libnbd for root: as root, every column's
# fio runs as nobody with a HOME of its own.
fhome="$work/fio-home"
mkdir -p "$fhome/.pki"
cp -r "$pki/client" "$fhome/.pki/libnbd"
if [ "$(id -u)" = 0 ]; then
    chmod 755 "$work" "$fhome" "$fhome/.pki" "$fhome/.pki/libnbd"
    chmod 644 "$fhome/.pki/libnbd/"*
    FIO=(setpriv --reuid=65534 --regid=65534 --clear-groups env HOME="$fhome" fio)
else
    FIO=(env HOME="$fhome" fio)
fi
for u in "$plain" "$nbdkit_tls"; do
    "${FIO[@]}" --name=fill --ioengine=nbd --uri="$u" --rw=write --bs=1m --iodepth=8 --size=1G \
        --refill_buffers --output=/dev/null
done
run() { # uri rw bs qd [cpu] -> IOPS (4k) or MiB/s (1m) [, and "IOPS fio-CPU-us-per-I/O"]
    "${FIO[@]}" --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --size=1G \
        --time_based --runtime="$RUNTIME" --norandommap --refill_buffers \
        --output-format=json 2>/dev/null |
        python3 -c "
import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index('{'):])['jobs'][0]
d=j['read'] if j['read']['io_bytes'] else j['write']
if '${5:-}' == 'cpu':
    cpu = (j['usr_cpu'] + j['sys_cpu']) / 100 * j['job_runtime'] / 1000
    print(round(d['iops']), round(cpu / d['total_ios'] * 1e6, 2))
else:
    print(round(d['iops']) if '$3'=='4k' else round(d['bw']/1024))"
}
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
csv="$work/r.csv"
: > "$csv"
orders=("plain tls nbdkit" "nbdkit tls plain" "tls plain nbdkit"
    "nbdkit plain tls" "tls nbdkit plain" "plain nbdkit tls")
for rep in $(seq 1 "$REPS"); do # REPS=0: no throughput table
    for w in "randread 4k 32" "randwrite 4k 32" "read 1m 8" "write 1m 8"; do
        set -- $w
        # Rotate the order, so drift hits every column alike.
        for m in ${orders[$(((rep - 1) % 6))]}; do
            case $m in plain) u=$plain ;; tls) u=$tls ;; nbdkit) u=$nbdkit_tls ;; esac
            echo "$1-$2-$m,$(run "$u" "$1" "$2" "$3")" >> "$csv"
        done
    done
    echo "rep $rep: $(tail -12 "$csv" | tr '\n' ' ') load $(cut -d' ' -f1 /proc/loadavg)"
done
[ "$REPS" = 0 ] || python3 - "$csv" <<'PY'
import csv, statistics, sys
rows = list(csv.reader(open(sys.argv[1])))
med = {k: statistics.median(float(v) for kk, v in rows if kk == k) for k in {r[0] for r in rows}}
print(f"{'':18} {'keyturn plain':>13} {'keyturn TLS':>12} {'nbdkit TLS+luks':>16}  TLS/plain  TLS/nbdkit")
for w in ["randread-4k", "randwrite-4k", "read-1m", "write-1m"]:
    unit = "IOPS" if w.endswith("4k") else "MiB/s"
    p, t, n = med[w + "-plain"], med[w + "-tls"], med[w + "-nbdkit"]
    print(f"{w + ' ' + unit:18} {p:13.0f} {t:12.0f} {n:16.0f}  {t / p:9.2f}  {t / n:10.2f}")
PY
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

# Optional profile of one workload (PROFILE_JOB, default 4 KiB random
# writes) on the keyturn server: perf stat over each fio run (plain, then
# TLS), with fio's own CPU per I/O beside it (libnbd and GnuTLS run in the
# fio process, on the same cores), and perf record -g over a second TLS run.
if [ "${PROFILE:-0}" = 1 ]; then
    set -- ${PROFILE_JOB:-randwrite 4k 32}
    job="$1-$2"
    ev=task-clock,context-switches,cpu-migrations
    for sc in read write recvfrom sendto readv writev futex epoll_wait; do
        ev="$ev,syscalls:sys_enter_$sc"
    done
    for m in plain tls; do
        [ $m = plain ] && u=$plain || u=$tls
        perf stat -x, -e "$ev" -p "$pid" -o "$work/stat-$m" -- sleep $((RUNTIME + 1)) &
        sp=$!
        sleep 0.5
        r=$(run "$u" "$1" "$2" "$3" cpu)
        wait "$sp" || true
        python3 - "$work/stat-$m" "$RUNTIME" "$m" "$job" $r <<'PY'
import sys
path, rt, mode, job, iops, fio_us = sys.argv[1:]
iops, rt = float(iops), float(rt)
ios = iops * rt
out = []
for line in open(path):
    f = line.strip().split(",")
    if len(f) < 3 or not f[0].replace(".", "").isdigit():
        continue
    v, name = float(f[0]), f[2].replace("syscalls:sys_enter_", "")
    out.append(f"{name} {v / ios * (1000 if name == 'task-clock' else 1):.2f}")
print(f"{job} {mode:5} {iops:.0f} IOPS; server per I/O: " + ", ".join(out)
      + f" (task-clock in us); fio client CPU {fio_us} us per I/O")
PY
    done
    perf record -g -o "$work/perf.data" -p "$pid" -- sleep "$RUNTIME" >/dev/null 2>&1 &
    sp=$!
    sleep 0.5
    run "$tls" "$1" "$2" "$3" >/dev/null
    wait "$sp" || true
    echo "perf record -g, TLS $job: top symbols (self), then by object"
    perf report -i "$work/perf.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -30 | cut -c1-120 || true
    perf report -i "$work/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -6 || true
    if [ -n "${PERF_KEEP:-}" ]; then cp "$work/perf.data" "$PERF_KEEP"; fi
fi

# Idle connections: handshake to GO, then hold. Each kind against a fresh
# server, so that none reuses memory that another freed.
idle() { # pid port export tls(0/1) label
    python3 - "$@" "$IDLE" "$pki/client" <<'PY'
import socket, ssl, struct, sys, time
pid, port, name, use_tls, label, n, certs = sys.argv[1:]
port, use_tls, n = int(port), use_tls == "1", int(n)
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"):
            return int(l.split()[1])
def opt(s, code, data=b""):
    s.sendall(b"IHAVEOPT" + struct.pack(">II", code, len(data)) + data)
def replies(s):
    while True:
        _, _, kind, ln = struct.unpack(">QIII", recvn(s, 20))
        recvn(s, ln)
        if kind == 1 or kind & 0x80000000:
            return kind
def recvn(s, k):
    b = b""
    while len(b) < k:
        c = s.recv(k - len(b))
        if not c:
            raise EOFError
        b += c
    return b
def connect():
    s = socket.create_connection(("127.0.0.1", port))
    recvn(s, 18)
    s.sendall(struct.pack(">I", 3))
    if use_tls:
        opt(s, 5)
        assert replies(s) == 1
        ctx = ssl.create_default_context(cafile=f"{certs}/ca-cert.pem")
        ctx.load_cert_chain(f"{certs}/client-cert.pem", f"{certs}/client-key.pem")
        s = ctx.wrap_socket(s, server_hostname="localhost")
    e = name.encode()
    opt(s, 7, struct.pack(">I", len(e)) + e + struct.pack(">H", 0))
    assert replies(s) == 1
    return s
def settled():
    # A fresh server gives back start-up memory for some seconds: wait
    # until RSS holds still (within 64 KiB over 2 s, at most 30 s).
    last, t0 = rss(), time.monotonic()
    while time.monotonic() - t0 < 30:
        time.sleep(2)
        now = rss()
        if abs(now - last) <= 64:
            return now
        last = now
    return last
connect().close()  # the first connection's one-off allocations are not per connection
before = settled()
conns = [connect() for _ in range(n)]
after = settled()
for c in conns:
    c.close()
closed = settled()
print(f"idle {label:13} {n} connections: RSS {before} -> {after} -> {closed} KiB (closed), "
      f"{(after - before) / n:.1f} KiB per connection opened, {(after - closed) / n:.1f} freed")
PY
}
# keyturn gives freed memory back to the kernel at once here
# (MIMALLOC_PURGE_DELAY=0), so that RSS follows the connections' memory and
# not what the allocator happens to keep.
stop_server
stop_nbdkit
[ "$IDLE" = 0 ] && exit 0
MIMALLOC_PURGE_DELAY=0 serve "$PORT"
idle "$pid" "$PORT" vol0 0 "keyturn plain"
stop_server
MIMALLOC_PURGE_DELAY=0 serve "$PORT"
idle "$pid" "$PORT" vol0 1 "keyturn TLS"
stop_server
serve_nbdkit
idle "$npid" "$NPORT" "" 1 "nbdkit TLS"
stop_nbdkit
