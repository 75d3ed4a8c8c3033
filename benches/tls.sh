#!/usr/bin/env bash
# NBD over TLS against plaintext, on one server (`[tls] nbd = "optional"`, so
# the same process serves both), and memory per idle connection.
#
#   benches/tls.sh             # REPS=3 RUNTIME=10
#
# 1. Throughput: fio 4 KiB random read and write (QD32) and 1 MiB sequential
#    read and write (QD8) for RUNTIME seconds, over nbd:// and over nbds://
#    with a client certificate (mutual TLS), alternated REPS times in one
#    run; medians and the TLS/plain ratio.
# 2. Memory: the server's RSS before and after IDLE (default 200) idle
#    connections that finished the handshake (GO), plain and TLS.
set -euo pipefail
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-10}
IDLE=${IDLE:-200}
PORT=${PORT:-12096}
. "$(dirname "$0")/lib.sh"
bench_init tls
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
serve "$PORT"
plain=nbd://127.0.0.1:$PORT/vol0
tls=nbds://127.0.0.1:$PORT/vol0
# fio's libnbd refuses a certificate directory in the URI and reads
# $HOME/.pki/libnbd, or /etc/pki/libnbd for root: as root, both columns'
# fio runs as nobody with a HOME of its own.
fhome="$work/fio-home"
mkdir -p "$fhome/.pki"
cp -r "$pki/client" "$fhome/.pki/libnbd"
FIO=(fio)
if [ "$(id -u)" = 0 ]; then
    chmod 755 "$work" "$fhome" "$fhome/.pki" "$fhome/.pki/libnbd"
    chmod 644 "$fhome/.pki/libnbd/"*
    FIO=(setpriv --reuid=65534 --regid=65534 --clear-groups env HOME="$fhome" fio)
else
    FIO=(env HOME="$fhome" fio)
fi
fio --name=fill --ioengine=nbd --uri="$plain" --rw=write --bs=1m --iodepth=8 --size=1G \
    --refill_buffers --output=/dev/null
run() { # uri rw bs qd -> IOPS (4k) or MiB/s (1m)
    "${FIO[@]}" --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --size=1G \
        --time_based --runtime="$RUNTIME" --norandommap --refill_buffers \
        --output-format=json 2>/dev/null |
        python3 -c "
import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index('{'):])['jobs'][0]
d=j['read'] if j['read']['io_bytes'] else j['write']
print(round(d['iops']) if '$3'=='4k' else round(d['bw']/1024))"
}
csv="$work/r.csv"; : > "$csv"
for rep in $(seq 1 "$REPS"); do
    for w in "randread 4k 32" "randwrite 4k 32" "read 1m 8" "write 1m 8"; do
        set -- $w
        # Alternate which goes first, so drift hits both alike.
        if [ $((rep % 2)) = 1 ]; then order="plain tls"; else order="tls plain"; fi
        for m in $order; do
            [ $m = plain ] && u=$plain || u=$tls
            echo "$1-$2-$m,$(run "$u" "$1" "$2" "$3")" >> "$csv"
        done
    done
    echo "rep $rep: $(tail -8 "$csv" | tr '\n' ' ')"
done
python3 - "$csv" <<'PY'
import csv, statistics, sys
rows = list(csv.reader(open(sys.argv[1])))
med = {k: statistics.median(float(v) for kk, v in rows if kk == k) for k in {r[0] for r in rows}}
for w in ["randread-4k", "randwrite-4k", "read-1m", "write-1m"]:
    unit = "IOPS" if w.endswith("4k") else "MiB/s"
    p, t = med[w + "-plain"], med[w + "-tls"]
    print(f"{w:13} plain {p:9.0f} {unit:5}  tls {t:9.0f} {unit:5}  tls/plain {t / p:.2f}")
PY

# Idle connections: handshake to GO, then hold. Plain first, then TLS.
python3 - "$PORT" "$IDLE" "$pki/client" "$pid" <<'PY'
import socket, ssl, struct, sys, time
port, n, certs, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"):
            return int(l.split()[1])
def opt(s, code, data=b""):
    s.sendall(b"IHAVEOPT" + struct.pack(">II", code, len(data)) + data)
def replies(s, until_ack=True):
    while True:
        hdr = recvn(s, 20)
        _, _, kind, ln = struct.unpack(">QIII", hdr)
        recvn(s, ln)
        if kind == 1 or kind & 0x80000000:
            return kind
def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError
        b += c
    return b
def connect(use_tls):
    s = socket.create_connection(("127.0.0.1", port))
    recvn(s, 18)
    s.sendall(struct.pack(">I", 3))
    if use_tls:
        opt(s, 5)
        assert replies(s) == 1
        ctx = ssl.create_default_context(cafile=f"{certs}/ca-cert.pem")
        ctx.load_cert_chain(f"{certs}/client-cert.pem", f"{certs}/client-key.pem")
        s = ctx.wrap_socket(s, server_hostname="localhost")
    name = b"vol0"
    opt(s, 7, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    assert replies(s) == 1
    return s
for mode in (False, True):
    time.sleep(1)
    before = rss()
    conns = [connect(mode) for _ in range(n)]
    time.sleep(1)
    after = rss()
    print(f"idle {'TLS  ' if mode else 'plain'} connections: {n}, server RSS {before} -> {after} KiB, "
          f"{(after - before) / n:.1f} KiB per connection")
    for c in conns:
        c.close()
PY
